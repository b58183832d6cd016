"""What the gateway decides without I/O: canonical paths, the route table, access rules,
which headers cross it, and how service API descriptions merge into one.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Access",
    "DASHBOARD",
    "HOP_BY_HOP",
    "Match",
    "MethodNotAllowed",
    "NotRouted",
    "Route",
    "RouteTable",
    "ROUTED_SERVICES",
    "canonical_path",
    "merge_openapi",
    "public_route_table",
    "response_headers",
    "upstream_headers",
]

DASHBOARD = "registry-dashboard"
"""Pseudo service: the registry's dashboard, reached at a fixed URL rather than by lookup."""

ROUTED_SERVICES = (
    "auth-service",
    "product-service",
    "inventory-service",
    "order-service",
    "notification-service",
)


class Access(enum.Enum):
    PUBLIC = "public"
    TOKEN = "token"  # noqa: S105 - a rule name, not a secret
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Route:
    """``path`` is matched exactly, or as a prefix of whole segments when ``prefix`` is set.

    It is also the metrics label of everything proxied through this route.
    """

    path: str
    service: str
    methods: Mapping[str, Access]
    prefix: bool = False

    @property
    def allow(self) -> str:
        return ", ".join(sorted(self.methods))


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    access: Access


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    route: Route


@dataclass(frozen=True, slots=True)
class NotRouted:
    pass


_NOT_ROUTED = NotRouted()


class RouteTable:
    """Exact routes by path and prefix routes by their first two segments: O(1) per request."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact = {r.path: r for r in self.routes if not r.prefix}
        self._prefix = {r.path: r for r in self.routes if r.prefix}
        for path in self._prefix:
            if path.count("/") != 2:
                raise ValueError(f"prefix routes are two segments long: {path}")

    def resolve(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        end = path.find("/", path.find("/", 1) + 1)
        return self._prefix.get(path if end == -1 else path[:end])

    def match(self, method: str, path: str) -> Match | MethodNotAllowed | NotRouted:
        if _names_internal(path):
            return _NOT_ROUTED
        route = self.resolve(path)
        if route is None:
            return _NOT_ROUTED
        access = route.methods.get(method)
        if access is None:
            return MethodNotAllowed(route)
        return Match(route, access)


def _names_internal(path: str) -> bool:
    # Services keep their service-to-service API under /internal; whatever the case or the
    # position, such a path is never proxied, even if a future route would cover it.
    return "internal" in path.lower() and any(
        segment.lower() == "internal" for segment in path.split("/")
    )


def public_route_table(*, dashboard_access: Access) -> RouteTable:
    """The gateway's routes (SPEC §3). Everything else, /internal/* above all, is a 404."""
    auth = "auth-service"
    public, token, admin = Access.PUBLIC, Access.TOKEN, Access.ADMIN
    return RouteTable(
        [
            Route("/auth/register", auth, {"POST": public}),
            Route("/auth/token", auth, {"POST": public}),
            Route("/auth/getToken", auth, {"GET": public}),
            Route("/auth/refresh", auth, {"POST": public}),
            Route("/auth/.well-known/jwks.json", auth, {"GET": public}),
            Route("/auth/logout", auth, {"POST": token}),
            Route("/auth/me", auth, {"GET": token}),
            Route(
                "/api/product",
                "product-service",
                {"GET": public, "POST": admin, "PUT": admin, "DELETE": admin},
                prefix=True,
            ),
            Route(
                "/api/inventory",
                "inventory-service",
                {"GET": token, "POST": admin, "PUT": admin},
                prefix=True,
            ),
            Route("/api/order", "order-service", {"GET": token, "POST": token}, prefix=True),
            Route("/api/notifications", "notification-service", {"GET": token}, prefix=True),
            Route("/eureka/web", DASHBOARD, {"GET": dashboard_access}),
        ]
    )


# Bytes a canonical path may carry as they are: RFC 3986 unreserved, "/", and the
# sub-delims and ":" "@" that mean nothing to any router. ";" (path parameters) is out.
_LITERAL = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,=:@"
)
# Percent-encoding is canonical only for bytes that must be encoded. An encoded unreserved
# byte (%2e, %41) or an encoded separator (%2f, %5c, %3b, %25, %00) is a disguise.
_NEVER_ENCODED = _LITERAL | frozenset(b"\\;%") | frozenset(range(0x20)) | {0x7F}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def canonical_path(raw_path: bytes) -> bool:
    """True when ``raw_path`` is already in the one form routes are matched on.

    A path that is not (dot or empty segments, a trailing slash, "\\", ";", NUL, an
    encoded "/" or ".") is refused rather than normalised: the gateway and the service
    behind it could normalise differently, and that difference is how route rules get
    bypassed.
    """
    if not raw_path.startswith(b"/"):
        return False
    i, size = 0, len(raw_path)
    while i < size:
        byte = raw_path[i]
        if byte == 0x25:  # "%"
            pair = raw_path[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                return False
            if int(pair, 16) in _NEVER_ENCODED:
                return False
            i += 3
            continue
        if byte not in _LITERAL:
            return False
        i += 1
    if raw_path == b"/":
        return True
    for segment in raw_path[1:].split(b"/"):
        if segment in (b"", b".", b".."):
            return False
    return True


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed or set for the next hop by the gateway itself.
_REWRITTEN_UPSTREAM = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "traceparent",
        "forwarded",
    }
)
_REWRITTEN_DOWNSTREAM = frozenset({"x-request-id"})


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    named.discard("")
    return named


def upstream_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    scheme: str,
    identity: Mapping[str, str],
) -> list[tuple[str, str]]:
    """The caller's headers as the service should see them.

    Hop-by-hop headers stop here; ``X-Forwarded-*`` tell the service who called and how;
    ``identity`` (request id, child ``traceparent``) replaces whatever the caller sent.
    """
    headers = list(headers)
    drop = HOP_BY_HOP | _REWRITTEN_UPSTREAM | _connection_tokens(headers)
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    host = ""
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "x-forwarded-for":
            forwarded_for.append(value)
        elif name == "host":
            host = value
        if name not in drop:
            out.append((name, value))
    if client_ip:
        forwarded_for.append(client_ip)
    if forwarded_for:
        out.append(("x-forwarded-for", ", ".join(forwarded_for)))
    out.append(("x-forwarded-proto", scheme))
    if host:
        out.append(("x-forwarded-host", host))
    out.extend(identity.items())
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The service's answer headers the caller gets: hop-by-hop ones and its request id dropped
    (the gateway stamps its own, the same value)."""
    headers = list(headers)
    drop = HOP_BY_HOP | _REWRITTEN_DOWNSTREAM | _connection_tokens(headers)
    return [
        (name.lower(), value)
        for name, value in headers
        if name.decode("latin-1").lower() not in drop
    ]


_SCHEMA_REF = "#/components/schemas/"
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})


def _rename_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_SCHEMA_REF):
                name = value[len(_SCHEMA_REF) :]
                out[key] = _SCHEMA_REF + renames.get(name, name)
            else:
                out[key] = _rename_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rename_refs(item, renames) for item in node]
    return node


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_SCHEMA_REF):
                yield value[len(_SCHEMA_REF) :]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _reachable_schemas(paths: Mapping[str, Any], schemas: Mapping[str, Any]) -> set[str]:
    """Schemas the kept operations use, directly or through other schemas: the ones of
    dropped (internal) operations must not describe themselves to the public."""
    seen: set[str] = set()
    pending = [name for name in _refs(paths) if name in schemas]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(n for n in _refs(schemas[name]) if n in schemas and n not in seen)
    return seen


def _schema_prefix(service: str) -> str:
    return "".join(part.capitalize() for part in service.split("-"))


def merge_openapi(
    documents: Mapping[str, Mapping[str, Any]],
    *,
    routes: RouteTable,
    title: str = "Shop API",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """One OpenAPI document of what a client can reach through the gateway.

    Only operations the gateway routes survive (no /health, /metrics, /internal). Schemas
    merge by name; two services defining the same name differently each keep theirs under
    a service prefix (``ProductServiceProblem``), references rewritten to match.
    """
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    security_needed = False
    for service in sorted(documents):
        document = copy.deepcopy(dict(documents[service]))
        own = document.get("components", {}).get("schemas", {})
        renames = {
            name: _schema_prefix(service) + name
            for name, schema in own.items()
            if name in schemas and schemas[name] != schema
        }
        if renames:
            document = _rename_refs(document, renames)
            own = document.get("components", {}).get("schemas", {})
        for name, schema in own.items():
            schemas[renames.get(name, name)] = schema
        for path, operations in document.get("paths", {}).items():
            route = routes.resolve(path)
            if route is None or route.service != service or _names_internal(path):
                continue
            kept: dict[str, Any] = {}
            for method, operation in operations.items():
                if method not in _HTTP_METHODS:
                    kept[method] = operation  # shared "parameters", "summary"
                    continue
                access = route.methods.get(method.upper())
                if access is None:
                    continue
                if access is not Access.PUBLIC and "security" not in operation:
                    operation = {**operation, "security": [{"bearerAuth": []}]}
                    security_needed = True
                kept[method] = operation
            if any(m in _HTTP_METHODS for m in kept):
                paths.setdefault(path, {}).update(kept)
    used = _reachable_schemas(paths, schemas)
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {n: schemas[n] for n in sorted(used)}},
    }
    if security_needed:
        merged["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        }
    return merged
