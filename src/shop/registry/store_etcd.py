"""Leases in etcd: every registry node given the same prefix serves the same registry.

Keys under the prefix (``/shop/registry`` unless the URL names another):

- ``<prefix>/leases/<APP>/<instance id>``: one lease, as JSON (``lease_to_dict``);
- ``<prefix>/version``: written, empty, in the same transaction as every change that
  discovery clients must notice. Its mod revision, etcd's global and ever-growing counter
  of writes, is the registry's version: no two nodes can disagree on it, and it needs no
  read-modify-write of its own, so unrelated changes never contend on it.

Every write is a transaction guarded by the lease's mod revision (or by its absence), which
is how a node that lost a race learns it (``LeaseConflict``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Final, TypeVar

import aetcd

from shop.registry.domain import Lease
from shop.registry.store import LeaseConflict, Revision, Snapshot, StoredLease, StoreUnavailable

__all__ = ["EtcdLeaseStore", "lease_from_dict", "lease_to_dict"]

log = logging.getLogger("shop.registry")

T = TypeVar("T")

_FORMAT: Final = 1
_LEASE_FIELDS: Final = tuple(f.name for f in fields(Lease))
_CHANNEL_OPTIONS: Final[Mapping[str, int]] = {
    # gRPC's default back-off reaches two minutes: a restarted etcd would stay "down" for us.
    # (Not min_reconnect_backoff_ms: gRPC also takes it as the connection attempt's timeout.)
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    # One listing is one range read of every lease; 4 MiB (the default) is ~2000 instances.
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
# Nothing reached etcd, or it could not answer in time: another member may.
_TRY_ANOTHER_MEMBER = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError)


def lease_to_dict(lease: Lease) -> dict[str, Any]:
    data = {name: getattr(lease, name) for name in _LEASE_FIELDS}
    data["document"] = dict(lease.document)
    return {"format": _FORMAT, **data}


def lease_from_dict(data: Any) -> Lease:
    """ValueError when ``data`` is not a lease this code wrote; unknown fields are ignored,
    so a node running newer code can share the store during a rolling upgrade."""
    if not isinstance(data, Mapping):
        raise ValueError("not a lease: not an object")
    if data.get("format") != _FORMAT:
        raise ValueError(f"lease format {data.get('format')!r}, not {_FORMAT}")
    try:
        lease = Lease(**{name: data[name] for name in _LEASE_FIELDS if name in data})
    except TypeError as exc:
        raise ValueError(f"not a lease: {exc}") from exc
    if not isinstance(lease.document, Mapping):
        raise ValueError("not a lease: its document is not an object")
    return lease


class EtcdLeaseStore:
    """``endpoints`` are members of one etcd cluster: calls go to the one that answered last
    and move on to the next when it cannot be reached."""

    def __init__(
        self, *, endpoints: Sequence[tuple[str, int]], prefix: str, timeout_s: float
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._clients = [
            aetcd.Client(host=host, port=port, timeout=timeout_s, options=dict(_CHANNEL_OPTIONS))
            for host, port in endpoints
        ]
        self._current = 0
        prefix = prefix.rstrip("/")
        self._prefix = f"{prefix}/".encode()
        self._leases = f"{prefix}/leases/".encode()
        self._version_key = f"{prefix}/version".encode()

    def _key(self, app: str, instance_id: str) -> bytes:
        return self._leases + f"{app}/{instance_id}".encode()

    async def _call(self, operation: Callable[[Any], Awaitable[T]]) -> T:
        failure: Exception | None = None
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            try:
                result = await operation(self._clients[index])
            except _TRY_ANOTHER_MEMBER as exc:
                failure = exc
                continue
            except aetcd.ClientError as exc:
                raise StoreUnavailable(f"etcd refused the request: {exc}") from exc
            self._current = index
            return result
        raise StoreUnavailable(f"etcd cannot be reached: {failure}") from failure

    def _decode(self, key: bytes, value: bytes) -> Lease:
        try:
            return lease_from_dict(json.loads(value))
        except ValueError as exc:  # JSONDecodeError and bad UTF-8 included
            raise ValueError(f"unreadable lease at {key!r}: {exc}") from exc

    async def get(self, app: str, instance_id: str) -> StoredLease | None:
        key = self._key(app, instance_id)
        found = await self._call(lambda client: client.get(key))
        if found is None:
            return None
        return StoredLease(self._decode(key, found.value), found.mod_revision)

    async def _transaction(self, compare: Callable[[Any], Any], success: list[Any]) -> bool:
        async def run(client: Any) -> bool:
            succeeded, _ = await client.transaction(
                compare=[compare(client.transactions)], success=success, failure=[]
            )
            return bool(succeeded)

        return await self._call(run)

    def _version_touch(self) -> Any:
        return aetcd.Transactions().put(self._version_key, b"")

    async def put(self, lease: Lease, *, expected: Revision | None, moves_version: bool) -> None:
        key = self._key(lease.app, lease.instance_id)
        value = json.dumps(lease_to_dict(lease), separators=(",", ":")).encode()
        success = [aetcd.Transactions().put(key, value)]
        if moves_version:
            success.append(self._version_touch())

        def unchanged(tx: Any) -> Any:
            # A key that does not exist has version 0; one that does, a mod revision.
            return tx.version(key) == 0 if expected is None else tx.mod(key) == expected

        if not await self._transaction(unchanged, success):
            raise LeaseConflict(f"{lease.app}/{lease.instance_id}")

    async def remove(self, app: str, instance_id: str, *, expected: Revision) -> None:
        key = self._key(app, instance_id)
        success = [aetcd.Transactions().delete(key), self._version_touch()]
        if not await self._transaction(lambda tx: tx.mod(key) == expected, success):
            raise LeaseConflict(f"{app}/{instance_id}")

    async def snapshot(self) -> Snapshot:
        # One range read: the leases and the version as of the same revision.
        found = await self._call(lambda client: client.get_prefix(self._prefix))
        leases: list[StoredLease] = []
        version = 0
        for kv in found:
            if kv.key == self._version_key:
                version = kv.mod_revision
            elif kv.key.startswith(self._leases):
                try:
                    leases.append(StoredLease(self._decode(kv.key, kv.value), kv.mod_revision))
                except ValueError as exc:
                    # One bad value must not take discovery away from every other instance.
                    log.warning("%s; left out of the listing", exc)
        return Snapshot(leases=leases, version=version)

    async def ping(self) -> None:
        # A linearizable read: it needs the cluster's quorum, as every write will.
        await self._call(lambda client: client.get(self._version_key))

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
