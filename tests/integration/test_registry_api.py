"""The registry's HTTP API through its ASGI app, lifespan and eviction sweeper included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from py_eureka_client.eureka_basic import _build_applications
from pydantic import SecretStr

from shop.platform.settings import PlatformSettings
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings
from tests.support import ManualClock

T0 = 1_700_000_000.0
JSON = {"Accept": "application/json"}
ORDER_ID = "10.0.0.5:order-service:8081"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def client(clock: ManualClock) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(
        platform=PlatformSettings(),
        settings=RegistrySettings(eviction_interval_s=0.02),
        clock=clock,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            yield http


def instance(instance_id: str = ORDER_ID, **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "instanceId": instance_id,
        "hostName": "10.0.0.5",
        "app": "ORDER-SERVICE",
        "ipAddr": "10.0.0.5",
        "status": "UP",
        "port": {"$": 8081, "@enabled": "true"},
        "leaseInfo": {"renewalIntervalInSecs": 10, "durationInSecs": 30},
    }
    document.update(fields)
    return {"instance": document}


async def register(http: httpx.AsyncClient, app: str = "order-service", **fields: Any) -> None:
    answer = await http.post(f"/eureka/apps/{app}", json=instance(**fields))
    assert answer.status_code == 204, answer.text


async def shown(http: httpx.AsyncClient, app: str = "ORDER-SERVICE") -> dict[str, Any]:
    answer = await http.get(f"/eureka/apps/{app}/{ORDER_ID}", headers=JSON)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()["instance"]
    return document


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert body["requestId"] == answer.headers["x-request-id"]
    return body


async def test_registered_instance_is_listed_as_json(client: httpx.AsyncClient) -> None:
    await register(client, "order-service")
    await register(client, "ORDER-SERVICE", instanceId="second")
    await register(client, "inventory-service", instanceId="inv-1")

    answer = await client.get("/eureka/apps", headers=JSON)

    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    apps = answer.json()["applications"]
    assert apps["apps__hashcode"] == "UP_3_"
    assert int(apps["versions__delta"]) > 0
    listed = {
        a["name"]: sorted(i["instanceId"] for i in a["instance"]) for a in apps["application"]
    }
    assert listed == {"INVENTORY-SERVICE": ["inv-1"], "ORDER-SERVICE": [ORDER_ID, "second"]}
    one = await shown(client, "order-service")
    assert one["port"] == {"$": 8081, "@enabled": "true"}
    assert one["leaseInfo"]["durationInSecs"] == 30
    assert one["lastDirtyTimestamp"] == one["lastUpdatedTimestamp"] == str(int(T0 * 1000))


async def test_no_accept_header_means_xml_as_eureka_answers(client: httpx.AsyncClient) -> None:
    await register(client)
    client.headers.pop("accept")  # py-eureka-client sends none, and parses only XML

    answer = await client.get("/eureka/apps/order-service")

    assert answer.headers["content-type"] == "application/xml"
    assert ElementTree.fromstring(answer.content).findtext("name") == "ORDER-SERVICE"  # noqa: S314


@pytest.mark.parametrize("accept", ["application/xml", "*/*"])
async def test_xml_listing_is_what_py_eureka_client_parses(
    client: httpx.AsyncClient, accept: str
) -> None:
    await register(client)

    answer = await client.get("/eureka/apps", headers={"Accept": accept})

    assert answer.headers["content-type"].startswith("application/xml")
    apps = _build_applications(ElementTree.fromstring(answer.content))  # noqa: S314
    (found,) = apps.get_application("ORDER-SERVICE").up_instances
    assert (found.instanceId, found.ipAddr, found.port.port) == (ORDER_ID, "10.0.0.5", 8081)
    assert apps.apps__hashcode == "UP_1_"


async def test_listing_with_a_trailing_slash_is_answered_directly(
    client: httpx.AsyncClient,
) -> None:
    await register(client)

    answer = await client.get("/eureka/apps/", headers=JSON)

    assert answer.status_code == 200
    assert answer.json()["applications"]["apps__hashcode"] == "UP_1_"


async def test_single_instance_by_app_and_by_id(client: httpx.AsyncClient) -> None:
    await register(client)

    by_app = await client.get("/eureka/apps/order-service/10.0.0.5%3Aorder-service%3A8081")
    by_id = await client.get(f"/eureka/instances/{ORDER_ID}", headers=JSON)

    root = ElementTree.fromstring(by_app.content)  # noqa: S314
    assert root.tag == "instance"
    assert root.findtext("instanceId") == ORDER_ID
    assert by_id.json()["instance"]["app"] == "ORDER-SERVICE"


async def test_delta_answers_the_full_registry(client: httpx.AsyncClient) -> None:
    await register(client)

    full = (await client.get("/eureka/apps", headers=JSON)).json()
    delta = (await client.get("/eureka/apps/delta", headers=JSON)).json()

    assert delta == full


async def test_unknown_names_are_404(client: httpx.AsyncClient) -> None:
    await register(client)

    assert_problem(await client.get("/eureka/apps/nobody", headers=JSON), 404)
    assert_problem(await client.get("/eureka/apps/order-service/nobody"), 404)
    assert_problem(await client.get("/eureka/instances/nobody"), 404)
    assert_problem(await client.put("/eureka/apps/order-service/nobody"), 404)
    assert_problem(await client.delete("/eureka/apps/order-service/nobody"), 404)
    assert_problem(await client.put("/eureka/apps/nobody/x/status?value=DOWN"), 404)


async def test_heartbeat_renews_the_lease(client: httpx.AsyncClient, clock: ManualClock) -> None:
    await register(client)
    clock.now += 25

    answer = await client.put(
        f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}",
        params={"status": "UP", "lastDirtyTimestamp": "1700000000000"},
    )

    assert answer.status_code == 200
    assert (await shown(client))["leaseInfo"]["lastRenewalTimestamp"] == int((T0 + 25) * 1000)
    clock.now += 25
    assert (await client.get("/eureka/apps/order-service", headers=JSON)).status_code == 200


async def test_expired_lease_is_gone_and_its_heartbeat_is_404(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    await register(client)
    clock.now += 30

    assert_problem(await client.get("/eureka/apps/order-service", headers=JSON), 404)
    assert_problem(await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}"), 404)
    await register(client)
    assert (await shown(client))["status"] == "UP"


async def test_sweeper_evicts_and_logs(
    client: httpx.AsyncClient, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shop.registry")
    await register(client)
    clock.now += 31

    for _ in range(100):
        if "evicted ORDER-SERVICE/" in caplog.text:
            break
        await asyncio.sleep(0.01)

    assert f"evicted ORDER-SERVICE/{ORDER_ID}: no heartbeat for 31 s (lease 30 s)" in caplog.text


async def test_cancel_removes_the_instance(client: httpx.AsyncClient) -> None:
    await register(client)

    answer = await client.delete(f"/eureka/apps/order-service/{ORDER_ID}")

    assert answer.status_code == 200
    assert_problem(await client.get("/eureka/apps/order-service", headers=JSON), 404)
    listing = (await client.get("/eureka/apps", headers=JSON)).json()["applications"]
    assert listing["application"] == []
    assert listing["apps__hashcode"] == ""


async def test_status_override_holds_until_removed(client: httpx.AsyncClient) -> None:
    await register(client)

    answer = await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}/status?value=OUT_OF_SERVICE")
    assert answer.status_code == 200
    await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}?status=UP")
    await register(client, status="UP")
    overridden = await shown(client)
    assert (overridden["status"], overridden["overriddenStatus"]) == ("OUT_OF_SERVICE",) * 2

    answer = await client.delete(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}/status")
    assert answer.status_code == 200
    restored = await shown(client)
    assert (restored["status"], restored["overriddenStatus"]) == ("UP", "UNKNOWN")


async def test_bad_status_value_is_422_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await register(client)
    before = await shown(client)

    answer = await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}/status?value=ASLEEP")
    missing = await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}/status")
    heartbeat = await client.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}?status=ASLEEP")

    assert "value" in assert_problem(answer, 422)["errors"]
    assert "value" in assert_problem(missing, 422)["errors"]
    assert "status" in assert_problem(heartbeat, 422)["errors"]
    assert await shown(client) == before


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b"this is not json", "application/json", 400, None),
        (b"", "application/json", 400, None),
        (b'{"app": "ORDER-SERVICE"}', "application/json", 422, "instance"),
        (b'{"instance": "me"}', "application/json", 422, "instance"),
        (b'{"instance": {"ipAddr": "10.0.0.9"}}', "application/json", 422, "instance.instanceId"),
        (
            b'{"instance": {"instanceId": "x", "port": {"$": -1}}}',
            "application/json",
            422,
            "instance.port",
        ),
        (b"<instance><instanceId>x</instanceId>", "application/xml", 400, None),
        (b'<!DOCTYPE i [<!ENTITY e "e">]><instance>&e;</instance>', "text/xml", 400, None),
    ],
)
async def test_bad_registration_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, body: bytes, content_type: str, status: int, field: str | None
) -> None:
    await register(client)
    before = (await client.get("/eureka/apps", headers=JSON)).json()

    answer = await client.post(
        "/eureka/apps/order-service", content=body, headers={"Content-Type": content_type}
    )

    problem = assert_problem(answer, status)
    if field is not None:
        assert field in problem["errors"]
    assert (await client.get("/eureka/apps", headers=JSON)).json() == before


@pytest.mark.parametrize(
    ("app", "body", "status"),
    [
        ("%C3%BC%00", instance(), 422),
        ("order-service", instance(instanceId="evil\x00"), 422),
        ("order-service", instance(metadata={"zone": "\x0c"}), 422),
        ("order-service", instance(hostName="\ud800"), 422),
        ("order-service", instance(leaseInfo={"durationInSecs": 10**26}), 422),
        ("order-service", {"instance": {"instanceId": "x", "n": float("inf")}}, 400),
    ],
)
async def test_hostile_registration_is_refused_and_discovery_still_parses(
    client: httpx.AsyncClient, app: str, body: dict[str, Any], status: int
) -> None:
    await register(client)

    # httpx writes NaN/Infinity and lone surrogates as Python's json module does.
    content = json.dumps(body).encode()
    answer = await client.post(
        f"/eureka/apps/{app}", content=content, headers={"Content-Type": "application/json"}
    )

    assert_problem(answer, status)
    listing = await client.get("/eureka/apps", headers={"Accept": "application/xml"})
    apps = _build_applications(ElementTree.fromstring(listing.content))  # noqa: S314
    assert [a.name for a in apps.applications] == ["ORDER-SERVICE"]
    assert [i.instanceId for i in apps.get_application("ORDER-SERVICE").instances] == [ORDER_ID]
    assert (await client.get("/eureka/apps", headers=JSON)).status_code == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" * 100_000, "application/json"),
        (b'{"instance": {"a": ' * 3000 + b"1" + b"}" * 3001, "application/json"),
        (b"<a>" * 100_000, "application/xml"),
        (b"<a>" * 100_000 + b"</a>" * 100_000, "application/xml"),
    ],
)
async def test_deeply_nested_body_is_400_and_changes_nothing(
    client: httpx.AsyncClient, body: bytes, content_type: str
) -> None:
    await register(client)
    before = (await client.get("/eureka/apps", headers=JSON)).json()

    answer = await client.post(
        "/eureka/apps/order-service", content=body, headers={"Content-Type": content_type}
    )

    assert_problem(answer, 400)
    assert (await client.get("/eureka/apps", headers=JSON)).json() == before


async def test_xml_registration_is_accepted(client: httpx.AsyncClient) -> None:
    body = f"""<instance><instanceId>{ORDER_ID}</instanceId><hostName>box</hostName>
        <ipAddr>10.0.0.5</ipAddr><status>STARTING</status><port enabled="true">8081</port>
        <dataCenterInfo class="com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo">
        <name>MyOwn</name></dataCenterInfo></instance>"""

    answer = await client.post(
        "/eureka/apps/order-service", content=body, headers={"Content-Type": "application/xml"}
    )

    assert answer.status_code == 204
    registered = await shown(client)
    assert (registered["status"], registered["port"]["$"]) == ("STARTING", 8081)
    assert registered["dataCenterInfo"]["name"] == "MyOwn"


async def test_dashboard_lists_every_instance(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    await register(client)
    await register(client, "inventory-service", instanceId="inv-1", ipAddr="10.0.0.6")
    await client.put("/eureka/apps/INVENTORY-SERVICE/inv-1/status?value=OUT_OF_SERVICE")
    clock.now += 12

    page = await client.get("/eureka/web")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "ORDER-SERVICE" in html and "INVENTORY-SERVICE" in html
    assert ORDER_ID in html and "10.0.0.6:8081" in html
    assert "OUT_OF_SERVICE</span> <small>(override)</small>" in html
    assert "12 s ago" in html and "in 18 s" in html


async def test_root_redirects_to_the_dashboard(client: httpx.AsyncClient) -> None:
    answer = await client.get("/")

    assert answer.status_code in (302, 307)
    assert answer.headers["location"] == "/eureka/web"


async def test_operations_endpoints(client: httpx.AsyncClient) -> None:
    await register(client)

    ready = await client.get("/health/ready")
    metrics = await client.get("/metrics")

    assert ready.json() == {"status": "UP", "checks": {"store": "UP"}}
    assert 'route="/eureka/apps/{app}"' in metrics.text


# -- who may write -------------------------------------------------------------------------

ORDER_SECRET = "order-service-secret-of-32-chars!"
AUTH_SECRET = "auth-service-secret-of-32-chars!!"
AUTH_ID = "10.0.0.7:auth-service:9000"
ORDER = ("order-service", ORDER_SECRET)
AUTH = ("auth-service", AUTH_SECRET)


@contextlib.asynccontextmanager
async def guarded_client(clock: ManualClock, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    clients = json.dumps({"order-service": ORDER_SECRET, "AUTH-SERVICE": AUTH_SECRET})
    app = build_app(
        platform=PlatformSettings(),
        settings=RegistrySettings(clients=SecretStr(clients), **settings),
        clock=clock,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            yield http


@pytest.fixture
async def guarded(clock: ManualClock) -> AsyncIterator[httpx.AsyncClient]:
    async with guarded_client(clock) as http:
        yield http


def auth_instance() -> dict[str, Any]:
    return instance(AUTH_ID, app="AUTH-SERVICE", hostName="10.0.0.7", ipAddr="10.0.0.7")


async def listing(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/eureka/apps", headers=JSON)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()["applications"]
    return document


async def test_a_service_registers_renews_and_cancels_with_its_own_credential(
    guarded: httpx.AsyncClient,
) -> None:
    registered = await guarded.post("/eureka/apps/ORDER-SERVICE", json=instance(), auth=ORDER)
    renewed = await guarded.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}", auth=ORDER)
    read_by_anyone = await guarded.get(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}", headers=JSON)
    cancelled = await guarded.delete(f"/eureka/apps/order-service/{ORDER_ID}", auth=ORDER)
    assert (registered.status_code, renewed.status_code) == (204, 200)
    assert read_by_anyone.status_code == 200 and cancelled.status_code == 200


@pytest.mark.parametrize(
    "auth",
    [None, ("auth-service", ORDER_SECRET), ("auth-service", "guess"), ("nobody", AUTH_SECRET)],
)
async def test_a_rogue_registration_without_the_credential_is_401_and_not_listed(
    guarded: httpx.AsyncClient, auth: tuple[str, str] | None
) -> None:
    path = "/eureka/apps/AUTH-SERVICE"
    answer = await (
        guarded.post(path, json=auth_instance(), auth=auth)
        if auth
        else guarded.post(path, json=auth_instance())
    )
    body = assert_problem(answer, 401)
    assert answer.headers["www-authenticate"] == 'Basic realm="shop-registry"'
    assert ORDER_SECRET not in answer.text and AUTH_SECRET not in answer.text
    assert body["detail"]
    assert (await guarded.get("/eureka/apps/AUTH-SERVICE", headers=JSON)).status_code == 404
    assert (await listing(guarded))["versions__delta"] == "0"


async def test_another_services_credential_cannot_register_or_override_it(
    guarded: httpx.AsyncClient,
) -> None:
    assert (
        await guarded.post("/eureka/apps/AUTH-SERVICE", json=auth_instance(), auth=AUTH)
    ).status_code == 204
    before = await listing(guarded)

    rogue = await guarded.post("/eureka/apps/AUTH-SERVICE", json=auth_instance(), auth=ORDER)
    rogue_other_id = await guarded.post(
        "/eureka/apps/auth-service",
        json=instance("10.6.6.6:auth-service:1", app="AUTH-SERVICE"),
        auth=ORDER,
    )
    override = await guarded.put(
        f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}/status",
        params={"value": "OUT_OF_SERVICE"},
        auth=ORDER,
    )
    cancel = await guarded.delete(f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}", auth=ORDER)

    for answer in (rogue, rogue_other_id, override, cancel):
        assert_problem(answer, 403)
    assert await listing(guarded) == before
    (shown_auth,) = before["application"][0]["instance"]
    assert shown_auth["status"] == "UP" and shown_auth["instanceId"] == AUTH_ID


async def test_anonymous_cancel_and_status_changes_are_refused_and_change_nothing(
    guarded: httpx.AsyncClient,
) -> None:
    assert (
        await guarded.post("/eureka/apps/AUTH-SERVICE", json=auth_instance(), auth=AUTH)
    ).status_code == 204
    assert (
        await guarded.put(
            f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}/status",
            params={"value": "DOWN"},
            auth=AUTH,
        )
    ).status_code == 200
    before = await listing(guarded)

    attempts = [
        await guarded.delete(f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}"),
        await guarded.put(
            f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}/status", params={"value": "OUT_OF_SERVICE"}
        ),
        await guarded.delete(f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}/status"),
        await guarded.put(f"/eureka/apps/AUTH-SERVICE/{AUTH_ID}"),
    ]

    for answer in attempts:
        assert_problem(answer, 401)
    assert await listing(guarded) == before


async def test_writes_from_one_address_are_throttled_with_retry_after(
    clock: ManualClock,
) -> None:
    async with guarded_client(clock, write_rate_per_s=1.0, write_burst=3) as http:
        await http.post("/eureka/apps/ORDER-SERVICE", json=instance(), auth=ORDER)
        for _ in range(2):
            ok = await http.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}", auth=ORDER)
            assert ok.status_code == 200
        # Unauthenticated guesses are counted too, and throttled the same way.
        throttled = await http.delete(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}")
        assert_problem(throttled, 429)
        assert throttled.headers["retry-after"] == "1"
        assert (await http.get("/eureka/apps", headers=JSON)).status_code == 200, "reads are free"
        clock.advance(1.0)
        assert (
            await http.put(f"/eureka/apps/ORDER-SERVICE/{ORDER_ID}", auth=ORDER)
        ).status_code == 200


async def test_the_registry_holds_a_bounded_number_of_instances(clock: ManualClock) -> None:
    async with guarded_client(clock, max_instances=3, max_instances_per_app=2) as http:

        async def add(
            app: str, auth: tuple[str, str], n: int, http: httpx.AsyncClient = http
        ) -> httpx.Response:
            document = instance(f"10.0.0.{n}:{app}:80", app=app.upper())
            return await http.post(f"/eureka/apps/{app}", json=document, auth=auth)

        assert (await add("order-service", ORDER, 1)).status_code == 204
        assert (await add("order-service", ORDER, 2)).status_code == 204
        per_app = await add("order-service", ORDER, 3)
        assert (
            "ORDER-SERVICE has its maximum of 2 instances" in assert_problem(per_app, 409)["detail"]
        )
        again = await add("order-service", ORDER, 2)
        assert again.status_code == 204, "a live instance registering again takes no new place"
        assert (await add("auth-service", AUTH, 4)).status_code == 204
        full = await add("auth-service", AUTH, 5)
        assert "maximum of 3 instances" in assert_problem(full, 409)["detail"]
        listed = await listing(http)
        assert sum(len(a["instance"]) for a in listed["application"]) == 3


async def test_a_utf16_xml_body_with_entities_is_refused(guarded: httpx.AsyncClient) -> None:
    body = (
        '<?xml version="1.0" encoding="UTF-16"?>'
        '<!DOCTYPE i [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
        "<instance><instanceId>&b;</instanceId><hostName>h</hostName></instance>"
    ).encode("utf-16")
    answer = await guarded.post(
        "/eureka/apps/ORDER-SERVICE",
        content=body,
        headers={"Content-Type": "application/xml"},
        auth=ORDER,
    )
    assert_problem(answer, 400)
    assert (await guarded.get("/eureka/apps/ORDER-SERVICE", headers=JSON)).status_code == 404
