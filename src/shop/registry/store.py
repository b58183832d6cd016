"""Where leases live. In memory for a single registry node; the protocol leaves room for etcd."""

from __future__ import annotations

from typing import Protocol

from shop.registry.domain import Lease

__all__ = ["InMemoryLeaseStore", "LeaseStore"]


class LeaseStore(Protocol):
    async def get(self, app: str, instance_id: str) -> Lease | None: ...

    async def put(self, lease: Lease) -> None: ...

    async def remove(self, app: str, instance_id: str) -> Lease | None: ...

    async def all(self) -> list[Lease]: ...


class InMemoryLeaseStore:
    """Leases by application, then instance id.

    Every method finishes without yielding to the event loop, so a read-modify-write in
    the service cannot interleave with another request.
    """

    def __init__(self) -> None:
        self._apps: dict[str, dict[str, Lease]] = {}

    async def get(self, app: str, instance_id: str) -> Lease | None:
        return self._apps.get(app, {}).get(instance_id)

    async def put(self, lease: Lease) -> None:
        self._apps.setdefault(lease.app, {})[lease.instance_id] = lease

    async def remove(self, app: str, instance_id: str) -> Lease | None:
        instances = self._apps.get(app)
        if instances is None:
            return None
        lease = instances.pop(instance_id, None)
        if not instances:
            del self._apps[app]
        return lease

    async def all(self) -> list[Lease]:
        return [lease for instances in self._apps.values() for lease in instances.values()]
