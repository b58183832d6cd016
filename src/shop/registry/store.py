"""Where leases live, behind a small protocol: in memory for one registry node (here), or in
etcd for several nodes sharing one view (``store_etcd``).

Every change is a compare-and-set on the revision the lease was read at, so two nodes that
change the same instance at once cannot lose an update: the loser gets ``LeaseConflict``
and the service reads again. The registry's version (what discovery clients compare) is kept
by the store too, so every node reports the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shop.registry.domain import Lease

__all__ = [
    "InMemoryLeaseStore",
    "LeaseConflict",
    "LeaseStore",
    "Revision",
    "Snapshot",
    "StoreUnavailable",
    "StoredLease",
]

Revision = int
"""When a lease was last written, as the store counts: it only grows, and differs after any
write of that lease."""


class LeaseConflict(Exception):
    """The lease changed (or appeared, or went) since it was read: read it again."""


class StoreUnavailable(Exception):
    """The store cannot be reached (etcd down or without quorum); the request may be retried."""


@dataclass(frozen=True, slots=True)
class StoredLease:
    lease: Lease
    revision: Revision


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every stored lease (expired ones too) and the registry's version, read at one instant."""

    leases: list[StoredLease]
    version: int


class LeaseStore(Protocol):
    async def get(self, app: str, instance_id: str) -> StoredLease | None: ...

    async def put(self, lease: Lease, *, expected: Revision | None, moves_version: bool) -> None:
        """Write ``lease`` if its key is still at ``expected`` (``None``: still absent), else
        raise ``LeaseConflict``. ``moves_version``: a change discovery clients must notice
        (not a heartbeat)."""
        ...

    async def remove(self, app: str, instance_id: str, *, expected: Revision) -> None:
        """Delete the lease if it is still at ``expected``, else raise ``LeaseConflict``.
        Always moves the version."""
        ...

    async def snapshot(self) -> Snapshot: ...

    async def ping(self) -> None:
        """Readiness: raise unless the store answers."""
        ...


class InMemoryLeaseStore:
    """Leases of one registry node, counted with one revision counter as etcd does.

    No method yields to the event loop, so a conflict can only come from a caller that
    awaited something else between its read and its write.
    """

    def __init__(self) -> None:
        self._leases: dict[tuple[str, str], StoredLease] = {}
        self._revision: Revision = 0
        self._version = 0

    def _next_revision(self) -> Revision:
        self._revision += 1
        return self._revision

    def _current(self, app: str, instance_id: str) -> Revision | None:
        stored = self._leases.get((app, instance_id))
        return stored.revision if stored is not None else None

    async def get(self, app: str, instance_id: str) -> StoredLease | None:
        return self._leases.get((app, instance_id))

    async def put(self, lease: Lease, *, expected: Revision | None, moves_version: bool) -> None:
        if self._current(lease.app, lease.instance_id) != expected:
            raise LeaseConflict(f"{lease.app}/{lease.instance_id}")
        revision = self._next_revision()
        self._leases[(lease.app, lease.instance_id)] = StoredLease(lease, revision)
        if moves_version:
            self._version = revision

    async def remove(self, app: str, instance_id: str, *, expected: Revision) -> None:
        if self._current(app, instance_id) != expected:
            raise LeaseConflict(f"{app}/{instance_id}")
        del self._leases[(app, instance_id)]
        self._version = self._next_revision()

    async def snapshot(self) -> Snapshot:
        return Snapshot(leases=list(self._leases.values()), version=self._version)

    async def ping(self) -> None:
        return None
