"""Lease rules of the registry, with a clock the test moves by hand."""

from __future__ import annotations

from typing import Any

import pytest

from shop.registry.domain import InvalidInstance, UnknownApplication, UnknownInstance
from shop.registry.service import Registry
from shop.registry.store import InMemoryLeaseStore
from tests.support import ManualClock

T0 = 1_700_000_000.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def registry(clock: ManualClock) -> Registry:
    return Registry(store=InMemoryLeaseStore(), clock=clock, default_lease_duration_s=90)


def instance(instance_id: str = "10.0.0.5:order-service:8081", **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "instanceId": instance_id,
        "hostName": "order-1",
        "ipAddr": "10.0.0.5",
        "status": "UP",
        "port": {"$": 8081, "@enabled": "true"},
        "metadata": {"zone": "a"},
    }
    document.update(fields)
    return document


async def test_registration_is_listed_with_the_servers_timestamps(
    registry: Registry, clock: ManualClock
) -> None:
    await registry.register("order-service", instance())

    (lease,) = await registry.application("ORDER-SERVICE")
    shown = lease.as_instance()
    assert shown["app"] == "ORDER-SERVICE"
    assert shown["instanceId"] == "10.0.0.5:order-service:8081"
    assert shown["status"] == "UP"
    assert shown["overriddenStatus"] == "UNKNOWN"
    assert shown["actionType"] == "ADDED"
    assert shown["metadata"] == {"zone": "a"}
    assert shown["lastUpdatedTimestamp"] == str(int(T0 * 1000))
    assert shown["leaseInfo"]["registrationTimestamp"] == int(T0 * 1000)
    assert shown["leaseInfo"]["lastRenewalTimestamp"] == int(T0 * 1000)
    assert shown["leaseInfo"]["durationInSecs"] == 90


async def test_application_names_are_case_insensitive(registry: Registry) -> None:
    await registry.register("Order-Service", instance())

    assert [lease.app for lease in await registry.application("order-service")] == ["ORDER-SERVICE"]
    assert (await registry.instance("ORDER-service", "10.0.0.5:order-service:8081")).port == 8081


async def test_host_name_is_the_id_when_there_is_no_instance_id(registry: Registry) -> None:
    await registry.register("app", {"hostName": "box-7", "port": 9000})

    lease = await registry.instance("APP", "box-7")
    assert lease.port == 9000
    assert lease.as_instance()["port"] == {"$": 9000, "@enabled": "true"}


async def test_a_lease_lasts_the_duration_the_instance_asked_for(
    registry: Registry, clock: ManualClock
) -> None:
    await registry.register("app", instance(leaseInfo={"durationInSecs": 10}))

    clock.advance(9.9)
    assert len(await registry.leases()) == 1
    clock.advance(0.1)
    assert await registry.leases() == []
    with pytest.raises(UnknownInstance):
        await registry.renew("app", "10.0.0.5:order-service:8081")


async def test_without_a_stated_duration_the_default_lease_applies(
    registry: Registry, clock: ManualClock
) -> None:
    await registry.register("app", instance())

    clock.advance(89)
    assert len(await registry.leases()) == 1
    clock.advance(1)
    assert await registry.leases() == []


async def test_each_heartbeat_extends_the_lease(registry: Registry, clock: ManualClock) -> None:
    await registry.register("app", instance(leaseInfo={"durationInSecs": 10}))

    for _ in range(5):
        clock.advance(8)
        lease = await registry.renew("app", "10.0.0.5:order-service:8081")
    assert lease.renewed_at == T0 + 40
    assert lease.as_instance()["leaseInfo"]["lastRenewalTimestamp"] == int((T0 + 40) * 1000)
    clock.advance(9)
    assert len(await registry.leases()) == 1


async def test_eviction_removes_only_expired_leases(registry: Registry, clock: ManualClock) -> None:
    await registry.register("app", instance("short", leaseInfo={"durationInSecs": 5}))
    await registry.register("app", instance("long", leaseInfo={"durationInSecs": 60}))
    clock.advance(6)

    evicted = await registry.evict_expired()

    assert [lease.instance_id for lease in evicted] == ["short"]
    assert [lease.instance_id for lease in await registry.leases()] == ["long"]
    assert await registry.evict_expired() == []


async def test_cancel_removes_the_instance(registry: Registry) -> None:
    await registry.register("app", instance())

    await registry.cancel("APP", "10.0.0.5:order-service:8081")

    with pytest.raises(UnknownApplication):
        await registry.application("app")
    with pytest.raises(UnknownInstance):
        await registry.cancel("APP", "10.0.0.5:order-service:8081")


async def test_override_beats_heartbeats_and_reregistration(
    registry: Registry, clock: ManualClock
) -> None:
    await registry.register("app", instance())
    await registry.override_status("app", "10.0.0.5:order-service:8081", "OUT_OF_SERVICE")

    clock.advance(1)
    await registry.renew("app", "10.0.0.5:order-service:8081")
    await registry.register("app", instance(status="UP"))

    lease = await registry.instance("app", "10.0.0.5:order-service:8081")
    assert lease.status == "OUT_OF_SERVICE"
    assert lease.as_instance()["overriddenStatus"] == "OUT_OF_SERVICE"


async def test_removing_the_override_restores_the_reported_status(registry: Registry) -> None:
    await registry.register("app", instance(status="STARTING"))
    await registry.override_status("app", "10.0.0.5:order-service:8081", "OUT_OF_SERVICE")

    lease = await registry.remove_override("app", "10.0.0.5:order-service:8081")

    assert lease.status == "STARTING"
    assert lease.as_instance()["actionType"] == "MODIFIED"


async def test_cancel_forgets_the_override(registry: Registry) -> None:
    await registry.register("app", instance())
    await registry.override_status("app", "10.0.0.5:order-service:8081", "DOWN")

    await registry.cancel("app", "10.0.0.5:order-service:8081")
    await registry.register("app", instance())

    assert (await registry.instance("app", "10.0.0.5:order-service:8081")).status == "UP"


async def test_client_cannot_set_server_fields(registry: Registry, clock: ManualClock) -> None:
    await registry.register(
        "app",
        instance(
            overriddenstatus="OUT_OF_SERVICE",
            actionType="DELETED",
            lastUpdatedTimestamp="1",
            leaseInfo={"durationInSecs": 30, "lastRenewalTimestamp": 5},
        ),
    )

    shown = (await registry.instance("app", "10.0.0.5:order-service:8081")).as_instance()
    assert shown["status"] == "UP"
    assert shown["overriddenStatus"] == "UNKNOWN"
    assert "overriddenstatus" not in shown
    assert shown["actionType"] == "ADDED"
    assert shown["lastUpdatedTimestamp"] == str(int(T0 * 1000))
    assert shown["leaseInfo"]["lastRenewalTimestamp"] == int(T0 * 1000)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ("not an object", "instance"),
        ({"ipAddr": "10.0.0.5"}, "instance.instanceId"),
        ({"instanceId": "a/b"}, "instance.instanceId"),
        ({"instanceId": "x", "status": "SLEEPY"}, "instance.status"),
        ({"instanceId": "x", "port": {"$": 70000}}, "instance.port"),
        ({"instanceId": "x", "port": "eighty"}, "instance.port"),
        (
            {"instanceId": "x", "leaseInfo": {"durationInSecs": 0}},
            "instance.leaseInfo.durationInSecs",
        ),
        (
            {"instanceId": "x", "leaseInfo": {"renewalIntervalInSecs": -1}},
            "instance.leaseInfo.renewalIntervalInSecs",
        ),
        (
            {"instanceId": "x", "leaseInfo": {"durationInSecs": True}},
            "instance.leaseInfo.durationInSecs",
        ),
        ({"instanceId": "x", "leaseInfo": "long"}, "instance.leaseInfo"),
        ({"instanceId": "x", "metadata": ["a"]}, "instance.metadata"),
        (
            {"instanceId": "x", "leaseInfo": {"durationInSecs": 99999999999999999999999999}},
            "instance.leaseInfo.durationInSecs",
        ),
        (
            {"instanceId": "x", "leaseInfo": {"durationInSecs": 3601}},
            "instance.leaseInfo.durationInSecs",
        ),
        (
            {"instanceId": "x", "leaseInfo": {"renewalIntervalInSecs": "86400"}},
            "instance.leaseInfo.renewalIntervalInSecs",
        ),
        ({"instanceId": "bad\x00id"}, "instance.instanceId"),
        ({"instanceId": "bad\ud800id"}, "instance.instanceId"),
        ({"instanceId": "x", "hostName": "h\x1b[2J"}, "instance.hostName"),
        ({"instanceId": "x", "metadata": {"zone": "a\x0bb"}}, "instance.metadata.zone"),
        ({"instanceId": "x", "metadata": {"z\x00": "a"}}, "instance.metadata"),
        ({"instanceId": "x", "port": {"$": 80, "@enabled": "\x01"}}, "instance.port.@enabled"),
        ({"instanceId": "x", "tags": ["ok", "\ufffe"]}, "instance.tags"),
        ({"instanceId": "x", "weight": float("nan")}, "instance.weight"),
    ],
)
async def test_invalid_registrations_change_nothing(
    registry: Registry, document: Any, field: str
) -> None:
    await registry.register("app", instance())
    version = await registry.version()

    with pytest.raises(InvalidInstance) as raised:
        await registry.register("app", document)

    assert field in raised.value.errors
    assert [lease.instance_id for lease in await registry.leases()] == [
        "10.0.0.5:order-service:8081"
    ]
    assert await registry.version() == version


@pytest.mark.parametrize("app", ["\u00fc\x00", "order service", "a/b", "", "x" * 256, "caf\u00e9"])
async def test_application_names_are_letters_digits_and_separators(
    registry: Registry, app: str
) -> None:
    with pytest.raises(InvalidInstance) as raised:
        await registry.register(app, instance())

    assert "app" in raised.value.errors
    assert await registry.leases() == []


async def test_the_longest_lease_and_name_are_accepted(registry: Registry) -> None:
    lease = await registry.register(
        "A_b.c-9" + "x" * 248,
        instance(leaseInfo={"durationInSecs": 3600, "renewalIntervalInSecs": 3600}),
    )

    assert (lease.app, lease.duration_s) == ("A_B.C-9" + "X" * 248, 3600)


async def test_sub_second_heartbeats_may_say_zero_interval(registry: Registry) -> None:
    lease = await registry.register("app", instance(leaseInfo={"renewalIntervalInSecs": 0}))

    assert lease.as_instance()["leaseInfo"]["renewalIntervalInSecs"] == 0


async def test_version_moves_on_changes_not_on_heartbeats(
    registry: Registry, clock: ManualClock
) -> None:
    await registry.register("app", instance())
    after_register = await registry.version()
    await registry.renew("app", "10.0.0.5:order-service:8081")
    assert await registry.version() == after_register
    await registry.override_status("app", "10.0.0.5:order-service:8081", "DOWN")
    assert await registry.version() > after_register


async def test_find_instance_by_id_alone(registry: Registry) -> None:
    await registry.register("inventory-service", instance("inv-1"))
    await registry.register("order-service", instance("ord-1"))

    assert (await registry.find_instance("ord-1")).app == "ORDER-SERVICE"
    with pytest.raises(UnknownInstance):
        await registry.find_instance("nobody")
