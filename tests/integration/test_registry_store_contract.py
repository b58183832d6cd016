"""The lease store contract, run on every backend: in memory and a real etcd.

Then the registry's use cases over each store, with a competing registry node's write
slipped in between a read and its write, at the worst moment, every time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import pytest

from shop.registry.domain import Lease, new_lease
from shop.registry.service import Registry, TooContended
from shop.registry.settings import parse_etcd_url
from shop.registry.store import (
    InMemoryLeaseStore,
    LeaseConflict,
    LeaseStore,
    Revision,
    Snapshot,
    StoredLease,
    StoreUnavailable,
)
from shop.registry.store_etcd import EtcdLeaseStore
from tests.support import ManualClock

T0 = 1_700_000_000.0
ID = "10.0.0.5:order-service:8081"


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LeaseStore]:
    if request.param == "memory":
        yield InMemoryLeaseStore()
        return
    etcd_url: str = request.getfixturevalue("etcd_server_url")
    target = parse_etcd_url(f"{etcd_url}/test/{uuid.uuid4().hex}")
    etcd = EtcdLeaseStore(endpoints=target.endpoints, prefix=target.prefix, timeout_s=2.0)
    try:
        await until_reachable(etcd)
        yield etcd
    finally:
        await etcd.close()


async def until_reachable(store: LeaseStore, *, within_s: float = 15.0) -> None:
    """The etcd fixture waits for the port only; the first election takes a moment more."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def lease(instance_id: str = ID, *, now: float = T0, **fields: Any) -> Lease:
    document = {
        "instanceId": instance_id,
        "ipAddr": "10.0.0.5",
        "port": {"$": 8081},
        "metadata": {"zone": "a", "nested": {"list": [1, 2.5, "x", None, True]}},
        "leaseInfo": {"durationInSecs": 30},
        **fields,
    }
    return new_lease(app="ORDER-SERVICE", document=document, now=now, default_duration_s=90)


async def stored(store: LeaseStore, instance_id: str = ID) -> StoredLease:
    found = await store.get("ORDER-SERVICE", instance_id)
    assert found is not None
    return found


# --- the store contract --------------------------------------------------------------------


async def test_a_lease_comes_back_exactly_as_written(store: LeaseStore) -> None:
    written = lease(now=T0 + 0.123456789).overridden("OUT_OF_SERVICE", T0 + 1.5)

    assert await store.get("ORDER-SERVICE", ID) is None
    await store.put(written, expected=None, moves_version=True)

    found = await stored(store)
    assert found.lease == written
    assert found.lease.as_instance() == written.as_instance()


async def test_creating_a_lease_that_exists_is_a_conflict(store: LeaseStore) -> None:
    await store.put(lease(), expected=None, moves_version=True)

    with pytest.raises(LeaseConflict):
        await store.put(lease(status="DOWN"), expected=None, moves_version=True)

    assert (await stored(store)).lease.status == "UP"


async def test_a_write_from_a_stale_read_is_a_conflict(store: LeaseStore) -> None:
    await store.put(lease(), expected=None, moves_version=True)
    first = await stored(store)
    await store.put(first.lease.renewed(T0 + 5), expected=first.revision, moves_version=False)
    second = await stored(store)

    with pytest.raises(LeaseConflict):
        await store.put(first.lease.renewed(T0 + 1), expected=first.revision, moves_version=False)

    assert second.revision > first.revision
    assert (await stored(store)) == second
    assert second.lease.renewed_at == T0 + 5


async def test_removal_is_guarded_and_a_second_one_is_harmless(store: LeaseStore) -> None:
    await store.put(lease(), expected=None, moves_version=True)
    first = await stored(store)
    await store.put(first.lease.renewed(T0 + 5), expected=first.revision, moves_version=False)

    with pytest.raises(LeaseConflict):
        await store.remove("ORDER-SERVICE", ID, expected=first.revision)
    current = await stored(store)
    await store.remove("ORDER-SERVICE", ID, expected=current.revision)
    with pytest.raises(LeaseConflict):
        await store.remove("ORDER-SERVICE", ID, expected=current.revision)

    assert await store.get("ORDER-SERVICE", ID) is None
    with pytest.raises(LeaseConflict):  # a write from before the removal cannot revive it
        await store.put(current.lease, expected=current.revision, moves_version=False)
    await store.put(lease(), expected=None, moves_version=True)


async def test_the_version_moves_on_changes_that_matter_only(store: LeaseStore) -> None:
    start = (await store.snapshot()).version
    await store.put(lease(), expected=None, moves_version=True)
    registered = (await store.snapshot()).version
    current = await stored(store)
    await store.put(current.lease.renewed(T0 + 1), expected=current.revision, moves_version=False)
    renewed = (await store.snapshot()).version
    current = await stored(store)
    await store.remove("ORDER-SERVICE", ID, expected=current.revision)
    removed = (await store.snapshot()).version
    with pytest.raises(LeaseConflict):
        await store.remove("ORDER-SERVICE", ID, expected=current.revision)

    assert start < registered == renewed < removed
    assert (await store.snapshot()).version == removed


async def test_snapshot_holds_every_lease_with_its_revision(store: LeaseStore) -> None:
    for instance_id in ("a", "b", "c"):
        await store.put(lease(instance_id), expected=None, moves_version=True)
    b = await stored(store, "b")
    await store.remove("ORDER-SERVICE", "b", expected=b.revision)

    snapshot = await store.snapshot()

    assert sorted(s.lease.instance_id for s in snapshot.leases) == ["a", "c"]
    for entry in snapshot.leases:
        assert entry == await stored(store, entry.lease.instance_id)
    await store.ping()


# --- the registry over each store, losing races on purpose ----------------------------------


class Interleaved:
    """A real store, with another node's write run once just before this node's next write."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store
        self.before_write: list[Callable[[], Awaitable[object]]] = []
        self.writes = 0

    async def _competitor(self) -> None:
        self.writes += 1
        if self.before_write:
            await self.before_write.pop(0)()

    async def get(self, app: str, instance_id: str) -> StoredLease | None:
        return await self.store.get(app, instance_id)

    async def put(self, lease: Lease, *, expected: Revision | None, moves_version: bool) -> None:
        await self._competitor()
        await self.store.put(lease, expected=expected, moves_version=moves_version)

    async def remove(self, app: str, instance_id: str, *, expected: Revision) -> None:
        await self._competitor()
        await self.store.remove(app, instance_id, expected=expected)

    async def snapshot(self) -> Snapshot:
        return await self.store.snapshot()

    async def ping(self) -> None:
        await self.store.ping()


def nodes(store: LeaseStore, clock: ManualClock) -> tuple[Registry, Registry, Interleaved]:
    """Two registry nodes on one store; the first one's writes can be made to lose."""
    slow = Interleaved(store)
    first = Registry(store=slow, clock=clock, default_lease_duration_s=90)
    return first, Registry(store=store, clock=clock, default_lease_duration_s=90), slow


def document(**fields: Any) -> dict[str, Any]:
    return {"instanceId": ID, "ipAddr": "10.0.0.5", "port": 8081, **fields}


async def test_an_override_survives_a_heartbeat_that_read_before_it(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    await node2.register("order-service", document())
    # node1 reads the lease for a heartbeat; node2's override lands before node1 writes.
    slow.before_write.append(lambda: node2.override_status("order-service", ID, "DOWN"))
    clock.now += 10

    renewed = await node1.renew("order-service", ID)

    assert (renewed.status, renewed.renewed_at) == ("DOWN", T0 + 10)
    assert slow.writes == 2  # lost once, read again, applied again
    assert (await node2.instance("order-service", ID)).status == "DOWN"


async def test_a_registration_keeps_an_override_made_while_it_was_written(
    store: LeaseStore,
) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    await node2.register("order-service", document(metadata={"v": "1"}))
    slow.before_write.append(lambda: node2.override_status("order-service", ID, "OUT_OF_SERVICE"))

    await node1.register("order-service", document(metadata={"v": "2"}))

    shown = (await node2.instance("order-service", ID)).as_instance()
    assert (shown["status"], shown["metadata"]) == ("OUT_OF_SERVICE", {"v": "2"})


async def test_two_first_registrations_at_once_both_land_in_turn(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    slow.before_write.append(lambda: node2.register("order-service", document(status="STARTING")))

    await node1.register("order-service", document(status="UP"))

    assert (await node2.instance("order-service", ID)).status == "UP"
    assert slow.writes == 2


async def test_eviction_leaves_a_lease_renewed_since_it_was_read(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    await node2.register("order-service", document(leaseInfo={"durationInSecs": 30}))
    clock.now += 30

    async def heartbeat_in_time() -> None:
        clock.now -= 1  # node2's heartbeat was sent before the lease ran out
        await node2.renew("order-service", ID)
        clock.now += 1

    slow.before_write.append(heartbeat_in_time)

    assert await node1.evict_expired() == []
    assert (await node2.instance("order-service", ID)).renewed_at == T0 + 29


async def test_an_instance_evicted_by_two_nodes_is_evicted_once(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    await node2.register("order-service", document(leaseInfo={"durationInSecs": 30}))
    version = await node2.version()
    clock.now += 31
    evicted_by_node2: list[list[Lease]] = []

    async def node2_sweeps() -> None:
        evicted_by_node2.append(await node2.evict_expired())

    slow.before_write.append(node2_sweeps)

    assert await node1.evict_expired() == []
    assert [[lease.instance_id for lease in found] for found in evicted_by_node2] == [[ID]]
    assert await node1.leases() == []
    assert await node1.version() > version


async def test_a_cancel_racing_a_heartbeat_still_cancels(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    node1, node2, slow = nodes(store, clock)
    await node2.register("order-service", document())
    slow.before_write.append(lambda: node2.renew("order-service", ID))

    await node1.cancel("order-service", ID)

    assert await node2.leases() == []


async def test_a_change_that_always_loses_gives_up(store: LeaseStore) -> None:
    clock = ManualClock(T0)
    slow = Interleaved(store)
    node1 = Registry(store=slow, clock=clock, default_lease_duration_s=90, max_attempts=3)
    node2 = Registry(store=store, clock=clock, default_lease_duration_s=90)
    await node2.register("order-service", document())
    slow.before_write.extend([lambda: node2.renew("order-service", ID)] * 3)

    with pytest.raises(TooContended):
        await node1.override_status("order-service", ID, "DOWN")

    assert slow.writes == 3
    assert (await node2.instance("order-service", ID)).status == "UP"


# --- etcd only -----------------------------------------------------------------------------


async def test_an_unreadable_value_is_left_out_of_the_listing(etcd_server_url: str) -> None:
    prefix = f"/test/{uuid.uuid4().hex}"
    target = parse_etcd_url(f"{etcd_server_url}{prefix}")
    store = EtcdLeaseStore(endpoints=target.endpoints, prefix=target.prefix, timeout_s=2.0)
    ((host, port),) = target.endpoints
    raw = aetcd.Client(host=host, port=port)
    try:
        await store.put(lease("good"), expected=None, moves_version=True)
        await raw.put(f"{prefix}/leases/ORDER-SERVICE/bad".encode(), b"{not json")
        await raw.put(f"{prefix}/leases/ORDER-SERVICE/old".encode(), b'{"format": 0}')

        snapshot = await store.snapshot()

        assert [s.lease.instance_id for s in snapshot.leases] == ["good"]
    finally:
        await raw.close()
        await store.close()
