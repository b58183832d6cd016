"""What the gateway decides without I/O: canonical paths, the route table, access rules,
which headers cross it, and how service API descriptions merge into one.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shop.platform.problems import PROBLEM_SCHEMA, documented_problem

__all__ = [
    "Access",
    "DASHBOARD",
    "HOP_BY_HOP",
    "Match",
    "MethodNotAllowed",
    "NotRouted",
    "Route",
    "RouteTable",
    "RouteTimeouts",
    "ROUTED_SERVICES",
    "canonical_path",
    "merge_openapi",
    "public_route_table",
    "request_head",
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
        methods = set(self.methods) | ({"HEAD"} if "GET" in self.methods else set())
        return ", ".join(sorted(methods))


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
        # HEAD is a GET without the body (RFC 9110): the same rule, and forwarded as HEAD.
        access = route.methods.get("GET" if method == "HEAD" else method)
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
            # The storefront (web-service, docs/storefront.md): pages and files, all public;
            # the shopper's data reaches the browser only through the routes above.
            Route("/", "web-service", {"GET": public}),
            Route("/shop/product", "web-service", {"GET": public}, prefix=True),
            Route("/shop/static", "web-service", {"GET": public}, prefix=True),
            *(
                Route(f"/shop/{page}", "web-service", {"GET": public})
                for page in ("cart", "checkout", "orders", "notifications", "login", "signup")
            ),
            Route("/shop/admin", "web-service", {"GET": public}),
        ]
    )


# Order placement and cancel: the order service answers only after its own calls to the
# inventory (and, for prices it lacks, the catalogue) have answered or timed out.
_ORDER_WRITES = frozenset({("POST", "/api/order")})
_READS = frozenset({"GET", "HEAD"})


class RouteTimeouts:
    """How long the gateway waits for a service's next bytes, per routed method and route:
    reads, other writes, order placement (each a setting), and per-route overrides keyed
    ``"METHOD /route-path"`` (HEAD follows GET). One dictionary look-up per request."""

    def __init__(
        self,
        routes: RouteTable,
        *,
        read_s: float,
        write_s: float,
        order_s: float,
        overrides: Mapping[str, float],
    ) -> None:
        self._default = write_s
        self._by_route: dict[tuple[str, str], float] = {}
        for route in routes.routes:
            for method in {*route.methods, *(("HEAD",) if "GET" in route.methods else ())}:
                if (method, route.path) in _ORDER_WRITES:
                    seconds = order_s
                else:
                    seconds = read_s if method in _READS else write_s
                named = "GET" if method == "HEAD" else method
                seconds = overrides.get(f"{named} {route.path}", seconds)
                self._by_route[(method, route.path)] = seconds

    def of(self, route: Route, method: str) -> float:
        return self._by_route.get((method, route.path), self._default)

    @staticmethod
    def check_key(routes: RouteTable, key: str) -> None:
        """Refuse an override key that names no routed method and route path."""
        method, _, path = key.partition(" ")
        route = next((r for r in routes.routes if r.path == path), None)
        if route is None or method not in route.methods:
            known = ", ".join(f"{m} {r.path}" for r in routes.routes for m in sorted(r.methods))
            raise ValueError(f"{key[:80]!r} names no routed method and route; known: {known}")


# Bytes a canonical path may carry as they are: RFC 3986 unreserved, "/", and the
# sub-delims and ":" "@" that mean nothing to any router. ";" (path parameters) is out.
_LITERAL = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,=:@"
)
# Percent-encoding is canonical only for bytes that must be encoded. An encoded unreserved
# byte (%2e, %41) or an encoded separator (%2f, %5c, %3b, %25, %00) is a disguise.
_NEVER_ENCODED = _LITERAL | frozenset(b"\\;%") | frozenset(range(0x20)) | {0x7F}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LITERAL_BYTES = bytes(sorted(_LITERAL))


def canonical_path(raw_path: bytes) -> bool:
    """True when ``raw_path`` is already in the one form routes are matched on.

    A path that is not (dot or empty segments, a trailing slash, "\\", ";", NUL, an
    encoded "/" or ".") is refused rather than normalised: the gateway and the service
    behind it could normalise differently, and that difference is how route rules get
    bypassed.
    """
    if not raw_path.startswith(b"/"):
        return False
    if raw_path.translate(None, _LITERAL_BYTES):
        return _canonical_bytes(raw_path) and _canonical_segments(raw_path)
    # Only literal bytes (the usual case): no byte-by-byte walk needed.
    return _canonical_segments(raw_path)


def _canonical_bytes(raw_path: bytes) -> bool:
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
    return True


def _canonical_segments(raw_path: bytes) -> bool:
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
_DROP_UPSTREAM = frozenset(n.encode() for n in HOP_BY_HOP | _REWRITTEN_UPSTREAM)
_DROP_DOWNSTREAM = frozenset(n.encode() for n in HOP_BY_HOP | _REWRITTEN_DOWNSTREAM)


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")} - {b""}


def upstream_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    scheme: str,
    identity: Iterable[tuple[bytes, bytes]],
    trusted_proxies: Container[str] = frozenset(),
) -> list[tuple[bytes, bytes]]:
    """The caller's headers as the service should see them (names in lower case).

    Hop-by-hop headers stop here; ``identity`` (request id, child ``traceparent``) replaces
    whatever the caller sent. The gateway is the edge: ``X-Forwarded-*`` say what *it* saw
    (the peer address, its scheme, the ``Host`` asked for), and whatever a caller wrote in
    them is dropped, or anyone could pick the address the log-in throttle counts. Only a
    peer in ``trusted_proxies`` (a load balancer in front) has its ``X-Forwarded-*`` kept,
    the peer appended to ``X-Forwarded-For``.
    """
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    inbound: dict[bytes, list[bytes]] = {}
    host = b""
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in _DROP_UPSTREAM:
            if name == b"host":
                host = value
            elif name == b"connection":
                named |= _connection_tokens(value)
            elif name.startswith(b"x-forwarded-"):
                inbound.setdefault(name, []).append(value)
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    proxied = client_ip is not None and client_ip in trusted_proxies
    forwarded_for = inbound.get(b"x-forwarded-for", []) if proxied else []
    scheme_bytes = scheme.encode("latin-1")
    if proxied:
        scheme_bytes = inbound.get(b"x-forwarded-proto", [scheme_bytes])[-1]
        host = inbound.get(b"x-forwarded-host", [host])[-1]
    if client_ip:
        forwarded_for = [*forwarded_for, client_ip.encode("latin-1")]
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", scheme_bytes))
    if host:
        out.append((b"x-forwarded-host", host))
    out.extend(identity)
    return out


def request_head(method: str, target: str, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request line and header block (up to and with the blank line) sent to a service."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target.encode("latin-1"))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The service's answer headers the caller gets: hop-by-hop ones and its request id dropped
    (the gateway stamps its own, the same value)."""
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in _DROP_DOWNSTREAM:
            if name == b"connection":
                named |= _connection_tokens(value)
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    return out


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


_BEARER_AUTH = "bearerAuth"
_BEARER_SCHEME: dict[str, Any] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}


def _renamed_requirements(security: Any, renames: Mapping[str, str]) -> Any:
    """A ``security`` list with its scheme names renamed (requirements are name → scopes)."""
    if not isinstance(security, list):
        return security
    return [
        {renames.get(name, name): scopes for name, scopes in requirement.items()}
        if isinstance(requirement, dict)
        else requirement
        for requirement in security
    ]


def _required_schemes(paths: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for operations in paths.values():
        for method, operation in operations.items():
            if method not in _HTTP_METHODS or not isinstance(operation, dict):
                continue
            for requirement in operation.get("security") or []:
                if isinstance(requirement, dict):
                    names.update(requirement)
    return names


# What the gateway itself may answer before or instead of the service: documented on every
# operation it routes, so a client (and the fuzzer) finds each status it can really get.
_GATEWAY_ANSWERS = {
    "429": "Too many requests from this client or user; see Retry-After.",
    "502": "The service broke off its answer.",
    "503": "No instance of the service is reachable; see Retry-After.",
    "504": "The service did not answer in time.",
}


def _with_gateway_answers(operation: dict[str, Any], access: Access) -> dict[str, Any]:
    answers: dict[str, Any] = dict(operation.get("responses", {}))
    own = dict(_GATEWAY_ANSWERS)
    if any(p.get("in") == "path" for p in operation.get("parameters", []) if isinstance(p, dict)):
        own["404"] = "No such resource (a path not in canonical form is refused, not normalised)."
    if "requestBody" in operation:
        own["413"] = "The request body is larger than the limit."
    if access is not Access.PUBLIC:
        own["401"] = "A valid access token is required."
    if access is Access.ADMIN:
        own["403"] = "This needs the admin role."
    for status, description in own.items():
        answers.setdefault(status, documented_problem(description))
    return {**operation, "responses": answers}


def _conflicts(own: Mapping[str, Any], merged: Mapping[str, Any], prefix: str) -> dict[str, str]:
    return {name: prefix + name for name, item in own.items() if merged.get(name, item) != item}


def merge_openapi(
    documents: Mapping[str, Mapping[str, Any]],
    *,
    routes: RouteTable,
    title: str = "Shop API",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """One OpenAPI document of what a client can reach through the gateway.

    Only operations the gateway routes survive (no /health, /metrics, /internal), each with
    the statuses the gateway itself may answer (401, 403, 404, 413, 429, 502-504). Schemas
    and security schemes merge by name; two services defining the same name differently
    each keep theirs under a service prefix (``ProductServiceProblem``), references (``$ref``,
    ``security`` requirements) rewritten to match.
    """
    paths: dict[str, Any] = {}
    # The gateway's own answers are problems too; a service's different "Problem" is renamed.
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    # The scheme the gateway adds to token routes that declare none: a service's own
    # different "bearerAuth" is renamed, like any other clash.
    schemes: dict[str, Any] = {_BEARER_AUTH: _BEARER_SCHEME}
    for service in sorted(documents):
        document = copy.deepcopy(dict(documents[service]))
        prefix = _schema_prefix(service)
        components = document.get("components", {})
        renames = _conflicts(components.get("schemas", {}), schemas, prefix)
        if renames:
            document = _rename_refs(document, renames)
        components = document.get("components", {})
        for name, schema in components.get("schemas", {}).items():
            schemas[renames.get(name, name)] = schema
        own_schemes = components.get("securitySchemes", {})
        scheme_renames = _conflicts(own_schemes, schemes, prefix)
        for name, scheme in own_schemes.items():
            schemes[scheme_renames.get(name, name)] = scheme
        # A document-wide requirement would be lost in the merge: each operation carries it.
        default_security = document.get("security")
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
                if "security" not in operation and default_security is not None:
                    operation = {**operation, "security": default_security}
                if "security" in operation:
                    security = _renamed_requirements(operation["security"], scheme_renames)
                    operation = {**operation, "security": security}
                elif access is not Access.PUBLIC:
                    operation = {**operation, "security": [{_BEARER_AUTH: []}]}
                kept[method] = _with_gateway_answers(operation, access)
            if any(m in _HTTP_METHODS for m in kept):
                paths.setdefault(path, {}).update(kept)
    used = _reachable_schemas(paths, schemas)
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {n: schemas[n] for n in sorted(used)}},
    }
    required = sorted(n for n in _required_schemes(paths) if n in schemes)
    if required:
        merged["components"]["securitySchemes"] = {n: schemes[n] for n in required}
    return merged
