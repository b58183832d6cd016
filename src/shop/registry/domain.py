"""Leases of registered instances: what an instance may register, when its lease runs out.

Pure rules over plain values; time is always passed in (seconds since the epoch), never read.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, get_args

__all__ = [
    "MAX_DEPTH",
    "MAX_LEASE_DURATION_S",
    "MAX_RENEWAL_INTERVAL_S",
    "STATUSES",
    "Clock",
    "InstanceStatus",
    "InvalidInstance",
    "Lease",
    "UnknownApplication",
    "UnknownInstance",
    "apps_hashcode",
    "new_lease",
    "normalise_app",
]

InstanceStatus = Literal["UP", "DOWN", "STARTING", "OUT_OF_SERVICE", "UNKNOWN"]
STATUSES: Final[tuple[str, ...]] = get_args(InstanceStatus)

Clock = Callable[[], float]

DEFAULT_RENEWAL_INTERVAL_S: Final = 30
# An hour: enough for any heartbeat schedule, short enough that a dead instance goes away.
MAX_LEASE_DURATION_S: Final = 3600
MAX_RENEWAL_INTERVAL_S: Final = 3600
# Eureka's documents nest four or five levels; the XML writer recurses once per level.
MAX_DEPTH: Final = 32
_APP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
# Everything but the characters XML 1.0 allows: one of them in any field makes the whole
# XML listing not well-formed, and every py-eureka-client loses discovery at once.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Java clients read timestamps as a long.
_MAX_TIMESTAMP_MS: Final = 2**63 - 1
# Fields the registry owns: whatever a client sends for them is replaced, never echoed.
_SERVER_FIELDS: Final = frozenset(
    {
        "overriddenstatus",
        "overriddenStatus",
        "leaseInfo",
        "lastUpdatedTimestamp",
        "lastDirtyTimestamp",
        "actionType",
    }
)


class InvalidInstance(ValueError):
    """The instance document cannot be registered; ``errors`` maps field → message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


class UnknownInstance(LookupError):
    def __init__(self, app: str, instance_id: str) -> None:
        super().__init__(f"No instance {instance_id!r} of {app} is registered.")
        self.app = app
        self.instance_id = instance_id


class UnknownApplication(LookupError):
    def __init__(self, app: str) -> None:
        super().__init__(f"No instance of {app} is registered.")
        self.app = app


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Lease:
    """One registered instance and the lease that keeps it listed."""

    app: str
    instance_id: str
    document: Mapping[str, Any]
    reported_status: str
    duration_s: int
    renewal_interval_s: int
    registered_at: float
    renewed_at: float
    updated_at: float
    dirty_at_ms: int
    up_since: float | None = None
    override: str | None = None
    action: Literal["ADDED", "MODIFIED"] = "ADDED"

    @property
    def status(self) -> str:
        """What discovery clients see: an operator's override beats what the instance says."""
        return self.override or self.reported_status

    @property
    def health(self) -> tuple[str, str] | None:
        """What the instance says of itself beyond its status, from its metadata (the
        platform's heartbeat writes ``health``: ``DEGRADED``, and ``healthReason``); None
        when it says nothing (it is as healthy as its status)."""
        metadata = self.document.get("metadata")
        if not isinstance(metadata, Mapping):
            return None
        health = metadata.get("health")
        if not isinstance(health, str) or not health:
            return None
        reason = metadata.get("healthReason")
        return health, reason if isinstance(reason, str) else ""

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.duration_s

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def renewed(self, now: float) -> Lease:
        return replace(self, renewed_at=now)

    def overridden(self, status: str, now: float) -> Lease:
        if status not in STATUSES:
            raise InvalidInstance({"value": _status_message()})
        return replace(self, override=status, updated_at=now, action="MODIFIED")

    def without_override(self, now: float) -> Lease:
        return replace(self, override=None, updated_at=now, action="MODIFIED")

    @property
    def host(self) -> str:
        return str(self.document.get("ipAddr") or self.document.get("hostName") or "")

    @property
    def port(self) -> int:
        port = self.document.get("port")
        return int(port["$"]) if isinstance(port, Mapping) else 0

    def as_instance(self) -> dict[str, Any]:
        """The instance as Eureka shows it: the registered document plus the server's fields."""
        instance = dict(self.document)
        instance.update(
            status=self.status,
            overriddenStatus=self.override or "UNKNOWN",
            leaseInfo={
                "renewalIntervalInSecs": self.renewal_interval_s,
                "durationInSecs": self.duration_s,
                "registrationTimestamp": _ms(self.registered_at),
                "lastRenewalTimestamp": _ms(self.renewed_at),
                "evictionTimestamp": 0,
                "serviceUpTimestamp": _ms(self.up_since) if self.up_since is not None else 0,
            },
            # Eureka writes these two as strings; Java and Python clients both expect that.
            lastUpdatedTimestamp=str(_ms(self.updated_at)),
            lastDirtyTimestamp=str(self.dirty_at_ms),
            actionType=self.action,
        )
        return instance


def normalise_app(app: str) -> str:
    """Application names are case-insensitive; Eureka keeps them upper-case."""
    name = app.strip()
    if not _APP_NAME.fullmatch(name):
        raise InvalidInstance(
            {"app": "must be 1 to 255 characters among letters, digits, '_', '.' and '-'"}
        )
    return name.upper()


def _status_message() -> str:
    return "must be one of " + ", ".join(STATUSES)


def _int(value: Any) -> int | None:
    """An integer from JSON (number) or XML (text); ``None`` when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _port(value: Any, *, field: str, errors: dict[str, str]) -> dict[str, Any] | None:
    enabled: Any = "true"
    if isinstance(value, Mapping):
        enabled = value.get("@enabled", "true")
        value = value.get("$")
    number = _int(value)
    if number is None or not 0 <= number <= 65535:
        errors[field] = "must be a port number (0-65535)"
        return None
    flag = enabled if isinstance(enabled, bool) else str(enabled).strip().lower() == "true"
    return {"$": number, "@enabled": "true" if flag else "false"}


def _seconds(
    value: Any, *, field: str, default: int, least: int, most: int, errors: dict[str, str]
) -> int:
    if value is None:
        return default
    number = _int(value)
    if number is None or not least <= number <= most:
        errors[field] = f"must be a whole number of seconds, from {least} to {most}"
        return default
    return number


def _unwritable_fields(document: Mapping[str, Any], errors: dict[str, str]) -> None:
    """Refuse what the XML listing could not carry: XML-illegal characters, NaN, deep nests.

    Iterative, so a hostile document costs no Python stack. Error keys are built from
    acceptable keys only: the hostile text is never echoed back.
    """
    pending: list[tuple[str, Any, int]] = [("instance", document, 1)]
    while pending:
        path, value, depth = pending.pop()
        if isinstance(value, str):
            if _NOT_XML_CHAR.search(value):
                errors[path] = "must not contain control characters or unpaired surrogates"
        elif isinstance(value, float):
            if not math.isfinite(value):
                errors[path] = "must be a finite number"
        elif isinstance(value, Mapping | list):
            if depth > MAX_DEPTH:
                errors["instance"] = f"must not nest deeper than {MAX_DEPTH} levels"
                return
            if isinstance(value, list):
                pending.extend((path, item, depth + 1) for item in value)
                continue
            for key, child in value.items():
                if not isinstance(key, str) or _NOT_XML_CHAR.search(key):
                    errors[path] = "field names must not contain control characters"
                else:
                    pending.append((f"{path}.{key}", child, depth + 1))


def new_lease(
    *,
    app: str,
    document: Any,
    now: float,
    default_duration_s: int,
    previous: Lease | None = None,
) -> Lease:
    """Validate what an instance registers and open its lease.

    Registering again over a live lease keeps an operator's status override, as Eureka does:
    the override belongs to the instance, not to one registration of it.
    """
    if not isinstance(document, Mapping):
        raise InvalidInstance({"instance": "must be an object"})
    errors: dict[str, str] = {}
    _unwritable_fields(document, errors)
    raw_id = document.get("instanceId") or document.get("hostName")
    instance_id = raw_id.strip() if isinstance(raw_id, str) else ""
    if not instance_id:
        errors["instance.instanceId"] = "is required (or instance.hostName)"
    elif "/" in instance_id or len(instance_id) > 255:
        errors["instance.instanceId"] = "must be at most 255 characters, without '/'"

    raw_status = document.get("status")
    status = "UP" if raw_status in (None, "") else str(raw_status).strip().upper()
    if status not in STATUSES:
        errors["instance.status"] = _status_message()

    normalised = {k: v for k, v in document.items() if k not in _SERVER_FIELDS}
    for field in ("port", "securePort"):
        if normalised.get(field) is not None:
            port = _port(normalised[field], field=f"instance.{field}", errors=errors)
            normalised[field] = port
    metadata = normalised.get("metadata")
    if metadata is None or metadata == "":
        normalised["metadata"] = {}
    elif not isinstance(metadata, Mapping):
        errors["instance.metadata"] = "must be an object"

    lease_info = document.get("leaseInfo") or {}
    if not isinstance(lease_info, Mapping):
        errors["instance.leaseInfo"] = "must be an object"
        lease_info = {}
    duration = _seconds(
        lease_info.get("durationInSecs"),
        field="instance.leaseInfo.durationInSecs",
        default=default_duration_s,
        least=1,
        most=MAX_LEASE_DURATION_S,
        errors=errors,
    )
    # Only informative (the lease is what counts); sub-second heartbeats round down to 0.
    interval = _seconds(
        lease_info.get("renewalIntervalInSecs"),
        field="instance.leaseInfo.renewalIntervalInSecs",
        default=DEFAULT_RENEWAL_INTERVAL_S,
        least=0,
        most=MAX_RENEWAL_INTERVAL_S,
        errors=errors,
    )
    if errors:
        raise InvalidInstance(errors)

    name = normalise_app(app)
    normalised.update(app=name, instanceId=instance_id, status=status)
    dirty = _int(document.get("lastDirtyTimestamp"))
    up_since = previous.up_since if previous is not None else None
    if up_since is None and status == "UP":
        up_since = now
    return Lease(
        app=name,
        instance_id=instance_id,
        document=normalised,
        reported_status=status,
        duration_s=duration,
        renewal_interval_s=interval,
        registered_at=now,
        renewed_at=now,
        updated_at=now,
        dirty_at_ms=dirty if dirty is not None and 0 < dirty <= _MAX_TIMESTAMP_MS else _ms(now),
        up_since=up_since,
        override=previous.override if previous is not None else None,
    )


def apps_hashcode(leases: Iterable[Lease]) -> str:
    """Eureka's reconcile hash: ``DOWN_1_UP_2_``, status counts sorted by status."""
    counts = Counter(lease.status for lease in leases)
    return "".join(f"{status}_{counts[status]}_" for status in sorted(counts))
