"""The gateway's pure rules: canonical paths, the route table, headers, the merged API."""

from __future__ import annotations

from typing import Any

import pytest

from shop.gateway.domain import (
    Access,
    Match,
    MethodNotAllowed,
    NotRouted,
    RouteTimeouts,
    canonical_path,
    merge_openapi,
    public_route_table,
    request_head,
    response_headers,
    upstream_headers,
)
from shop.gateway.settings import GatewaySettings
from shop.platform.problems import PROBLEM_JSON, PROBLEM_SCHEMA
from shop.platform.settings import PlatformSettings

ROUTES = public_route_table(dashboard_access=Access.PUBLIC)


@pytest.mark.parametrize(
    "raw",
    [
        b"/",
        b"/api/product",
        b"/api/product/64b7f0c2a1b2c3d4e5f60718",
        b"/api/inventory/iphone_13-red~2",
        b"/api/product/caf%C3%A9",
        b"/api/product/a%20b",
        b"/auth/.well-known/jwks.json",
        b"/api/order/3f2c/cancel",
    ],
)
def test_canonical_paths_are_accepted(raw: bytes) -> None:
    assert canonical_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"api/product",
        b"/api/../internal",
        b"/api/./order",
        b"/api/product/..",
        b"/api/product/.",
        b"/api/product/%2e%2e",
        b"/api/product/%2E",
        b"/api/product/%2f",
        b"/api/product/%2F..",
        b"/api/product/%5c..",
        b"/api/product/..\\x",
        b"/api/product;x=1",
        b"/api/product/%3b",
        b"/api/product/%00",
        b"/api/product/\x00",
        b"/api/product/%25",
        b"/api/product/%2",
        b"/api/product/%zz",
        b"/api/product/%41",
        b"/api/product/%7e",
        b"//api/product",
        b"/api//product",
        b"/api/product/",
        b"/api/product/a b",
        b"/api/product/\xc3\xa9",
        b"/api/product/a\tb",
    ],
)
def test_disguised_paths_are_not_canonical(raw: bytes) -> None:
    assert not canonical_path(raw)


@pytest.mark.parametrize(
    ("method", "path", "service", "access"),
    [
        ("GET", "/api/product", "product-service", Access.PUBLIC),
        ("GET", "/api/product/abc", "product-service", Access.PUBLIC),
        ("DELETE", "/api/product/abc", "product-service", Access.ADMIN),
        ("GET", "/api/inventory", "inventory-service", Access.TOKEN),
        ("PUT", "/api/inventory/sku", "inventory-service", Access.ADMIN),
        ("POST", "/api/order/x/cancel", "order-service", Access.TOKEN),
        ("GET", "/api/notifications", "notification-service", Access.TOKEN),
        ("POST", "/auth/register", "auth-service", Access.PUBLIC),
        ("GET", "/auth/getToken", "auth-service", Access.PUBLIC),
        ("POST", "/auth/logout", "auth-service", Access.TOKEN),
        ("GET", "/auth/me", "auth-service", Access.TOKEN),
    ],
)
def test_routes_resolve_to_a_service_and_a_rule(
    method: str, path: str, service: str, access: Access
) -> None:
    outcome = ROUTES.match(method, path)
    assert isinstance(outcome, Match)
    assert (outcome.route.service, outcome.access) == (service, access)


@pytest.mark.parametrize(
    "path",
    [
        "/api/products",
        "/api/Product",
        "/auth/me/x",
        "/auth",
        "/api",
        "/internal/reservations",
        "/api/inventory/INTERNAL/x",
        "/eureka/web/x",
        "/eureka/apps/AUTH-SERVICE",
    ],
)
def test_everything_else_is_not_routed(path: str) -> None:
    assert isinstance(ROUTES.match("GET", path), NotRouted)


def test_a_known_path_with_another_method_says_what_is_allowed() -> None:
    outcome = ROUTES.match("PATCH", "/api/inventory/sku")
    assert isinstance(outcome, MethodNotAllowed)
    assert outcome.route.allow == "GET, HEAD, POST, PUT"


def test_the_dashboard_rule_follows_the_profile() -> None:
    production = public_route_table(dashboard_access=Access.ADMIN)
    outcome = production.match("GET", "/eureka/web")
    assert isinstance(outcome, Match) and outcome.access is Access.ADMIN


def test_upstream_headers_drop_hop_by_hop_and_set_forwarding() -> None:
    incoming = [
        (b"host", b"shop.example"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"proxy-authorization", b"Basic x"),
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-proto", b"https"),
        (b"x-request-id", b"caller-id"),
        (b"content-length", b"12"),
        (b"authorization", b"Bearer t"),
        (b"accept", b"application/json"),
    ]
    out = upstream_headers(
        incoming,
        client_ip="10.0.0.7",
        scheme="http",
        identity=[(b"x-request-id", b"ours"), (b"traceparent", b"00-a-b-01")],
    )
    assert out == [
        (b"authorization", b"Bearer t"),
        (b"accept", b"application/json"),
        # The caller's own X-Forwarded-* are not believed: the gateway is the edge.
        (b"x-forwarded-for", b"10.0.0.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"shop.example"),
        (b"x-request-id", b"ours"),
        (b"traceparent", b"00-a-b-01"),
    ]


SPOOFED = [
    (b"host", b"shop.example"),
    (b"x-forwarded-for", b"10.9.9.77"),
    (b"X-Forwarded-For", b"10.9.9.78"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"evil.example"),
]


def _forwarding(out: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {
        name.decode(): value.decode() for name, value in out if name.startswith(b"x-forwarded-")
    }


def test_a_client_cannot_choose_the_address_services_see() -> None:
    out = upstream_headers(
        SPOOFED,
        client_ip="127.0.0.1",
        scheme="http",
        identity=[],
        trusted_proxies=frozenset({"10.0.0.1"}),
    )
    assert _forwarding(out) == {
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": "shop.example",
    }


def test_a_trusted_load_balancer_keeps_its_forwarding_headers() -> None:
    out = upstream_headers(
        SPOOFED,
        client_ip="10.0.0.1",
        scheme="http",
        identity=[],
        trusted_proxies=frozenset({"10.0.0.1"}),
    )
    assert _forwarding(out) == {
        "x-forwarded-for": "10.9.9.77, 10.9.9.78, 10.0.0.1",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "evil.example",
    }


def test_the_request_head_is_the_target_as_sent_and_the_headers_in_order() -> None:
    head = request_head(
        "GET", "/api/product/a%20b?q=1", [(b"accept", b"*/*"), (b"x-request-id", b"r")]
    )
    assert head == b"GET /api/product/a%20b?q=1 HTTP/1.1\r\naccept: */*\r\nx-request-id: r\r\n\r\n"


def test_response_headers_drop_hop_by_hop_and_the_service_request_id() -> None:
    answer = [
        (b"Content-Type", b"application/json"),
        (b"Connection", b"X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-ID", b"theirs"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert response_headers(answer) == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_merged_api_keeps_only_routed_operations() -> None:
    ref = {"$ref": "#/components/schemas/Line"}
    documents: dict[str, Any] = {
        "order-service": {
            "paths": {
                "/api/order": {"post": {"requestBody": ref}, "delete": {}},
                "/internal/orders": {"get": {"x": {"$ref": "#/components/schemas/Secret"}}},
                "/health/ready": {"get": {}},
            },
            "components": {"schemas": {"Line": {"type": "object"}, "Secret": {}}},
        },
        "product-service": {"paths": {"/api/order": {"get": {}}}},  # not its route
    }
    merged = merge_openapi(documents, routes=ROUTES)
    assert list(merged["paths"]) == ["/api/order"]
    assert list(merged["paths"]["/api/order"]) == ["post"]
    post = merged["paths"]["/api/order"]["post"]
    assert post["requestBody"] == ref and post["security"] == [{"bearerAuth": []}]
    assert merged["components"]["schemas"] == {
        "Line": {"type": "object"},
        "Problem": PROBLEM_SCHEMA,
    }
    assert merged["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_merged_api_defines_every_security_scheme_it_requires() -> None:
    bearer = {"type": "http", "scheme": "bearer"}
    documents: dict[str, Any] = {
        "auth-service": {
            "paths": {"/auth/me": {"get": {"security": [{"HTTPBearer": []}]}}},
            "components": {"securitySchemes": {"HTTPBearer": bearer}},
        },
        "order-service": {
            # Document-wide requirement, a clashing name, and a clash with the gateway's own.
            "security": [{"HTTPBearer": [], "bearerAuth": []}],
            "paths": {"/api/order": {"post": {}}},
            "components": {
                "securitySchemes": {
                    "HTTPBearer": {**bearer, "bearerFormat": "opaque"},
                    "bearerAuth": {"type": "apiKey", "in": "header", "name": "X-Key"},
                }
            },
        },
    }
    merged = merge_openapi(documents, routes=ROUTES)
    assert merged["paths"]["/auth/me"]["get"]["security"] == [{"HTTPBearer": []}]
    assert merged["paths"]["/api/order"]["post"]["security"] == [
        {"OrderServiceHTTPBearer": [], "OrderServicebearerAuth": []}
    ]
    assert merged["components"]["securitySchemes"] == {
        "HTTPBearer": bearer,
        "OrderServiceHTTPBearer": {**bearer, "bearerFormat": "opaque"},
        "OrderServicebearerAuth": {"type": "apiKey", "in": "header", "name": "X-Key"},
    }


def test_the_dashboard_url_is_derived_from_the_registry_url() -> None:
    platform = PlatformSettings(registry_url="http://registry:8761/eureka/")
    assert GatewaySettings().dashboard_url(platform) == "http://registry:8761"
    fixed = GatewaySettings(registry_dashboard_url="http://dash:9000/")
    assert fixed.dashboard_url(platform) == "http://dash:9000"


def test_head_is_routed_wherever_get_is_and_under_gets_rule() -> None:
    outcome = ROUTES.match("HEAD", "/api/product/abc")
    assert isinstance(outcome, Match) and outcome.access is Access.PUBLIC
    me = ROUTES.match("HEAD", "/auth/me")
    assert isinstance(me, Match) and me.access is Access.TOKEN
    assert isinstance(ROUTES.match("HEAD", "/auth/token"), MethodNotAllowed)  # POST only


def test_merged_api_documents_what_the_gateway_itself_answers() -> None:
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    documents: dict[str, Any] = {
        "product-service": {
            "paths": {
                "/api/product": {"get": {"responses": {"200": {"description": "OK"}}}},
                "/api/product/{id}": {
                    "put": {
                        "parameters": [{"name": "id", "in": "path", "required": True}],
                        "requestBody": {"content": {}},
                        "responses": {"409": {"description": "the service's own words"}},
                    }
                },
            }
        }
    }
    paths = merge_openapi(documents, routes=ROUTES)["paths"]
    public = paths["/api/product"]["get"]["responses"]
    assert set(public) == {"200", "429", "502", "503", "504"}
    admin = paths["/api/product/{id}"]["put"]["responses"]
    assert set(admin) == {"401", "403", "404", "409", "413", "429", "502", "503", "504"}
    assert admin["409"] == {"description": "the service's own words"}
    assert all(admin[s]["content"] == problem for s in admin if s != "409")


def test_each_route_waits_its_familys_timeout_unless_overridden() -> None:
    routes = public_route_table(dashboard_access=Access.PUBLIC)
    timeouts = RouteTimeouts(
        routes,
        read_s=5.0,
        write_s=10.0,
        order_s=8.0,
        overrides={"GET /api/inventory": 1.5, "POST /auth/token": 20.0},
    )
    by_path = {r.path: r for r in routes.routes}
    assert timeouts.of(by_path["/api/product"], "GET") == 5.0
    assert timeouts.of(by_path["/api/product"], "HEAD") == 5.0
    assert timeouts.of(by_path["/api/product"], "POST") == 10.0
    assert timeouts.of(by_path["/api/order"], "POST") == 8.0  # placement and cancel
    assert timeouts.of(by_path["/api/order"], "GET") == 5.0
    assert timeouts.of(by_path["/api/inventory"], "GET") == 1.5
    assert timeouts.of(by_path["/api/inventory"], "HEAD") == 1.5  # HEAD follows GET
    assert timeouts.of(by_path["/auth/token"], "POST") == 20.0


@pytest.mark.parametrize("key", ["GET /api/orders", "DELETE /api/order", "/api/order", "GET"])
def test_a_timeout_override_must_name_a_routed_method_and_route(key: str) -> None:
    with pytest.raises(ValueError, match="names no routed method and route"):
        RouteTimeouts.check_key(public_route_table(dashboard_access=Access.PUBLIC), key)
