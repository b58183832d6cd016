"""What clients of the registry can do: register, renew, cancel, override a status, look up."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge

from shop.platform.worker import Loop
from shop.registry.domain import (
    Clock,
    Lease,
    UnknownApplication,
    UnknownInstance,
    new_lease,
    normalise_app,
)
from shop.registry.store import LeaseConflict, LeaseStore, StoredLease, StoreUnavailable

__all__ = [
    "InstanceCounts",
    "Listing",
    "Registry",
    "RegistryFull",
    "TooContended",
    "counting_loop",
    "eviction_loop",
]

log = logging.getLogger("shop.registry")

MAX_ATTEMPTS = 10


class TooContended(Exception):
    """An instance kept changing under every attempt to change it; the caller may retry."""


class RegistryFull(Exception):
    """A new instance would take the registry (or its application) over its size limit."""


@dataclass(frozen=True, slots=True)
class Listing:
    """Every live lease, by application then instance id, and the version they are at."""

    leases: list[Lease]
    version: int


async def _back_off(attempt: int) -> None:
    # Full jitter: writers that lost to each other must not meet again at the same instant.
    await asyncio.sleep(random.uniform(0, min(0.1, 0.005 * 2**attempt)))  # noqa: S311


class Registry:
    """The discovery server's use cases over a lease store and a clock.

    A lease past its expiry is gone for every read and renewal at once; the eviction sweep
    only reclaims it (and says so in the log), so answers never depend on its timing.

    Each change reads the lease, applies a rule of ``domain`` and writes it back only if no
    one wrote it meanwhile; a change that lost that race (another registry node, sharing the
    store, got there first) is read and applied again, up to ``max_attempts`` times.
    """

    def __init__(
        self,
        *,
        store: LeaseStore,
        clock: Clock,
        default_lease_duration_s: int,
        max_instances: int = 5000,
        max_instances_per_app: int = 500,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._default_duration_s = default_lease_duration_s
        self._max_instances = max_instances
        self._max_instances_per_app = max_instances_per_app
        self._max_attempts = max_attempts
        self.started_at = clock()

    def now(self) -> float:
        return self._clock()

    async def ping(self) -> None:
        await self._store.ping()

    async def version(self) -> int:
        """Discovery clients compare it to decide whether their cached copy is stale."""
        return (await self._store.snapshot()).version

    def _live(self, stored: StoredLease | None, now: float) -> Lease | None:
        if stored is None or stored.lease.is_expired(now):
            return None
        return stored.lease

    async def _change(
        self,
        app: str,
        instance_id: str,
        change: Callable[[Lease, float], Lease],
        *,
        moves_version: bool,
    ) -> Lease:
        name = normalise_app(app)
        for attempt in range(self._max_attempts):
            stored = await self._store.get(name, instance_id)
            now = self._clock()
            live = self._live(stored, now)
            if stored is None or live is None:
                raise UnknownInstance(name, instance_id)
            lease = change(live, now)
            try:
                await self._store.put(lease, expected=stored.revision, moves_version=moves_version)
            except LeaseConflict:
                await _back_off(attempt)
                continue
            return lease
        raise TooContended(f"{name}/{instance_id} kept changing; try again")

    async def register(self, app: str, document: object) -> Lease:
        name = normalise_app(app)
        # Validates before any store call, and says which key the lease goes to.
        instance_id = new_lease(
            app=name, document=document, now=self._clock(), default_duration_s=1
        ).instance_id
        for attempt in range(self._max_attempts):
            stored = await self._store.get(name, instance_id)
            now = self._clock()
            previous = self._live(stored, now)
            if previous is None:
                await self._check_room(name, now)
            lease = new_lease(
                app=name,
                document=document,
                now=now,
                default_duration_s=self._default_duration_s,
                previous=previous,
            )
            expected = stored.revision if stored is not None else None
            try:
                await self._store.put(lease, expected=expected, moves_version=True)
            except LeaseConflict:
                await _back_off(attempt)
                continue
            log.info(
                "registered %s/%s at %s:%d (%s, lease %d s)",
                lease.app,
                lease.instance_id,
                lease.host,
                lease.port,
                lease.status,
                lease.duration_s,
            )
            return lease
        raise TooContended(f"{name}/{instance_id} kept changing; try again")

    async def _check_room(self, app: str, now: float) -> None:
        """Room for one more instance. Registrations racing on several nodes may each see the
        last free place: the limits bound the registry's size, give or take that race."""
        live = [
            s.lease for s in (await self._store.snapshot()).leases if not s.lease.is_expired(now)
        ]
        if len(live) >= self._max_instances:
            raise RegistryFull(
                f"The registry holds its maximum of {self._max_instances} instances."
            )
        if sum(lease.app == app for lease in live) >= self._max_instances_per_app:
            raise RegistryFull(f"{app} has its maximum of {self._max_instances_per_app} instances.")

    async def renew(self, app: str, instance_id: str) -> Lease:
        return await self._change(
            app, instance_id, lambda lease, now: lease.renewed(now), moves_version=False
        )

    async def cancel(self, app: str, instance_id: str) -> Lease:
        name = normalise_app(app)
        for attempt in range(self._max_attempts):
            stored = await self._store.get(name, instance_id)
            live = self._live(stored, self._clock())
            if stored is None or live is None:
                raise UnknownInstance(name, instance_id)
            try:
                await self._store.remove(name, instance_id, expected=stored.revision)
            except LeaseConflict:
                await _back_off(attempt)
                continue
            log.info("cancelled %s/%s", name, instance_id)
            return live
        raise TooContended(f"{name}/{instance_id} kept changing; try again")

    async def override_status(self, app: str, instance_id: str, status: str) -> Lease:
        lease = await self._change(
            app, instance_id, lambda lease, now: lease.overridden(status, now), moves_version=True
        )
        log.info("status of %s/%s overridden to %s", lease.app, lease.instance_id, status)
        return lease

    async def remove_override(self, app: str, instance_id: str) -> Lease:
        lease = await self._change(
            app, instance_id, lambda lease, now: lease.without_override(now), moves_version=True
        )
        log.info("status override of %s/%s removed", lease.app, lease.instance_id)
        return lease

    async def listing(self) -> Listing:
        """Every live lease and the version, read together so the two always agree."""
        snapshot = await self._store.snapshot()
        now = self._clock()
        live = [s.lease for s in snapshot.leases if not s.lease.is_expired(now)]
        live.sort(key=lambda lease: (lease.app, lease.instance_id))
        return Listing(leases=live, version=snapshot.version)

    async def leases(self) -> list[Lease]:
        """Every live lease, by application then instance id."""
        return (await self.listing()).leases

    async def application(self, app: str) -> list[Lease]:
        name = normalise_app(app)
        found = [lease for lease in await self.leases() if lease.app == name]
        if not found:
            raise UnknownApplication(name)
        return found

    async def instance(self, app: str, instance_id: str) -> Lease:
        name = normalise_app(app)
        lease = self._live(await self._store.get(name, instance_id), self._clock())
        if lease is None:
            raise UnknownInstance(name, instance_id)
        return lease

    async def find_instance(self, instance_id: str) -> Lease:
        """An instance by id alone, whatever its application (Eureka's ``/instances/{id}``)."""
        for lease in await self.leases():
            if lease.instance_id == instance_id:
                return lease
        raise UnknownInstance("any application", instance_id)

    async def evict_expired(self) -> list[Lease]:
        """Remove expired leases. Several nodes may sweep the same store: a lease another node
        evicted, or that was renewed since the read, is left alone (the removal is guarded)."""
        now = self._clock()
        evicted = []
        for stored in (await self._store.snapshot()).leases:
            lease = stored.lease
            if not lease.is_expired(now):
                continue
            try:
                await self._store.remove(lease.app, lease.instance_id, expected=stored.revision)
            except LeaseConflict:
                continue
            log.warning(
                "evicted %s/%s: no heartbeat for %.0f s (lease %d s)",
                lease.app,
                lease.instance_id,
                now - lease.renewed_at,
                lease.duration_s,
            )
            evicted.append(lease)
        return evicted


def eviction_loop(registry: Registry, *, interval_s: float) -> Loop:
    """The sweep that evicts instances whose heartbeats stopped, every ``interval_s``; a
    store that cannot be reached skips a sweep (one warning line), anything else is logged
    and counted, and the sweeping goes on."""

    async def sweep() -> bool:
        await registry.evict_expired()
        return False

    return Loop(
        sweep,
        name="registry-eviction",
        interval_s=interval_s,
        backoff_s=interval_s,
        backoff_max_s=max(interval_s, 5.0),
        expected=(StoreUnavailable,),
    )


class InstanceCounts:
    """``shop_registry_instances{app, status}`` (the status callers see) and
    ``shop_registry_instances_degraded{app}`` (UP, but the instance says DEGRADED)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_status = Gauge(
            "shop_registry_instances",
            "Live registered instances, by application and status",
            ["app", "status"],
            registry=registry,
        )
        self._degraded = Gauge(
            "shop_registry_instances_degraded",
            "Live instances whose own health says DEGRADED, by application",
            ["app"],
            registry=registry,
        )

    def update(self, leases: list[Lease]) -> None:
        """Set the gauges from the live leases; a pair no longer seen drops out."""
        by_status = Counter((lease.app, lease.status) for lease in leases)
        degraded = Counter(
            lease.app
            for lease in leases
            if (said := lease.health) is not None and said[0] == "DEGRADED"
        )
        self._by_status.clear()
        self._degraded.clear()
        for (app, status), n in by_status.items():
            self._by_status.labels(app, status).set(n)
        for app in {lease.app for lease in leases}:
            self._degraded.labels(app).set(degraded[app])


def counting_loop(registry: Registry, counts: InstanceCounts, *, interval_s: float) -> Loop:
    """The gauges follow the leases within ``interval_s``."""

    async def count() -> bool:
        counts.update(await registry.leases())
        return False

    return Loop(
        count,
        name="registry-counts",
        interval_s=interval_s,
        backoff_s=interval_s,
        backoff_max_s=max(interval_s, 5.0),
        expected=(StoreUnavailable,),
    )
