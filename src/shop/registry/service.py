"""What clients of the registry can do: register, renew, cancel, override a status, look up."""

from __future__ import annotations

import asyncio
import logging

from shop.registry.domain import (
    Clock,
    Lease,
    UnknownApplication,
    UnknownInstance,
    new_lease,
    normalise_app,
)
from shop.registry.store import LeaseStore

__all__ = ["Registry", "evict_periodically"]

log = logging.getLogger("shop.registry")


class Registry:
    """The discovery server's use cases over a lease store and a clock.

    A lease past its expiry is gone for every read and renewal at once; the eviction sweep
    only reclaims it (and says so in the log), so answers never depend on its timing.
    """

    def __init__(self, *, store: LeaseStore, clock: Clock, default_lease_duration_s: int) -> None:
        self._store = store
        self._clock = clock
        self._default_duration_s = default_lease_duration_s
        # Discovery clients compare it to decide whether their cached copy is stale.
        self.version = 1
        self.started_at = clock()

    def now(self) -> float:
        return self._clock()

    async def _live(self, app: str, instance_id: str) -> Lease:
        name = normalise_app(app)
        lease = await self._store.get(name, instance_id)
        if lease is None or lease.is_expired(self._clock()):
            raise UnknownInstance(name, instance_id)
        return lease

    async def register(self, app: str, document: object) -> Lease:
        now = self._clock()
        name = normalise_app(app)
        previous = None
        if isinstance(document, dict):
            raw_id = document.get("instanceId") or document.get("hostName")
            if isinstance(raw_id, str):
                found = await self._store.get(name, raw_id.strip())
                previous = found if found and not found.is_expired(now) else None
        lease = new_lease(
            app=name,
            document=document,
            now=now,
            default_duration_s=self._default_duration_s,
            previous=previous,
        )
        await self._store.put(lease)
        self.version += 1
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

    async def renew(self, app: str, instance_id: str) -> Lease:
        lease = (await self._live(app, instance_id)).renewed(self._clock())
        await self._store.put(lease)
        return lease

    async def cancel(self, app: str, instance_id: str) -> Lease:
        lease = await self._live(app, instance_id)
        await self._store.remove(lease.app, lease.instance_id)
        self.version += 1
        log.info("cancelled %s/%s", lease.app, lease.instance_id)
        return lease

    async def override_status(self, app: str, instance_id: str, status: str) -> Lease:
        lease = (await self._live(app, instance_id)).overridden(status, self._clock())
        await self._store.put(lease)
        self.version += 1
        log.info("status of %s/%s overridden to %s", lease.app, lease.instance_id, status)
        return lease

    async def remove_override(self, app: str, instance_id: str) -> Lease:
        lease = (await self._live(app, instance_id)).without_override(self._clock())
        await self._store.put(lease)
        self.version += 1
        log.info("status override of %s/%s removed", lease.app, lease.instance_id)
        return lease

    async def leases(self) -> list[Lease]:
        """Every live lease, by application then instance id."""
        now = self._clock()
        live = [lease for lease in await self._store.all() if not lease.is_expired(now)]
        return sorted(live, key=lambda lease: (lease.app, lease.instance_id))

    async def application(self, app: str) -> list[Lease]:
        name = normalise_app(app)
        found = [lease for lease in await self.leases() if lease.app == name]
        if not found:
            raise UnknownApplication(name)
        return found

    async def instance(self, app: str, instance_id: str) -> Lease:
        return await self._live(app, instance_id)

    async def find_instance(self, instance_id: str) -> Lease:
        """An instance by id alone, whatever its application (Eureka's ``/instances/{id}``)."""
        for lease in await self.leases():
            if lease.instance_id == instance_id:
                return lease
        raise UnknownInstance("any application", instance_id)

    async def evict_expired(self) -> list[Lease]:
        now = self._clock()
        expired = [lease for lease in await self._store.all() if lease.is_expired(now)]
        for lease in expired:
            await self._store.remove(lease.app, lease.instance_id)
            log.warning(
                "evicted %s/%s: no heartbeat for %.0f s (lease %d s)",
                lease.app,
                lease.instance_id,
                now - lease.renewed_at,
                lease.duration_s,
            )
        if expired:
            self.version += 1
        return expired


async def evict_periodically(registry: Registry, *, interval_s: float) -> None:
    """Runs for the life of the app; one failed sweep must not end the sweeping."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await registry.evict_expired()
        except Exception:
            log.exception("eviction sweep failed")
