"""The gateway over real HTTP: a real uvicorn server in front of real in-process services.

The registry is a small Eureka stand-in (it crosses a service boundary); every upstream
records what reached it, so a refused request is shown to have reached nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
import uvicorn
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict
from starlette.applications import Starlette

from shop.gateway.app import build_app
from shop.gateway.settings import GatewaySettings
from shop.platform.problems import PROBLEM_SCHEMA
from shop.platform.serve import bind_socket, server_config
from shop.platform.settings import PlatformSettings, Profile, SettingsRefused
from tests.fakes import FakeRegistry
from tests.support import free_port, require_or_skip

ISSUER = "shop-auth"
AUDIENCE = "shop"
MAX_BODY = 64 * 1024
UPSTREAM_TIMEOUT_S = 0.3
JWKS_REFETCH_S = 0.3
PROBLEM = "application/problem+json"


# --- signing keys and tokens ------------------------------------------------------------


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, Any]:
        raw: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key())
        )
        return {**raw, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "email": "ada@example.com",
        "roles": ["customer"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return base


def mint(key: SigningKey, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key.private, algorithm="RS256", headers={"kid": key.kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], *, hs256_secret: bytes | None) -> str:
    """Tokens pyjwt refuses to make: alg none, or HS256 keyed with the public key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if hs256_secret is None:
        return signing_input + "."
    mac = hmac.new(hs256_secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the world around the gateway -------------------------------------------------------


STREAMED_PARTS = [bytes([65 + i]) * 100_000 for i in range(5)]


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


class Upstream:
    """A service instance that records every request and echoes it back."""

    def __init__(self, name: str, *, openapi: dict[str, Any] | None = None) -> None:
        self.name = name
        self.received: list[Received] = []
        self.openapi = openapi
        self.openapi_hits = 0
        self.jwks: list[SigningKey] = []
        self.jwks_hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/auth/.well-known/jwks.json" and self.jwks:
            self.jwks_hits += 1
            return web.json_response({"keys": [k.jwk() for k in self.jwks]})
        if request.path == "/openapi.json":
            self.openapi_hits += 1
            if self.openapi is None:
                return web.Response(status=404)
            return web.json_response(self.openapi)
        body = await request.read()
        self.received.append(
            Received(request.method, request.raw_path, dict(request.headers), body)
        )
        if request.path.endswith("/slow"):
            await asyncio.sleep(1.0)
        if request.path.endswith("/gzipped"):
            return web.Response(
                body=gzip.compress(b'{"compressed": true}'),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        if request.path.endswith("/conflict"):
            return web.json_response({"title": "Conflict"}, status=409)
        if request.path.endswith("/streamed"):
            streamed = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            streamed.enable_chunked_encoding()
            await streamed.prepare(request)
            for part in STREAMED_PARTS:
                await streamed.write(part)
                await asyncio.sleep(0.02)
            await streamed.write_eof()
            return streamed
        if request.path.endswith("/broken") and request.transport is not None:
            broken = web.StreamResponse(headers={"Content-Length": "1000"})
            await broken.prepare(request)
            await broken.write(b"x" * 10)
            request.transport.close()  # 990 promised bytes never come
            return broken
        if request.path.endswith("/then-hang-up") and request.transport is not None:
            # Closes the kept-alive connection just after answering, as an idle timeout would.
            asyncio.get_running_loop().call_later(0.05, request.transport.close)
        return web.json_response(
            {"service": self.name, "port": self.port, "path": request.raw_path},
            headers={
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "secret",
                "X-Request-ID": "upstream-own-id",
                "X-Total-Count": "42",
            },
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Gateway:
    url: str
    port: int
    app: Starlette


def _pinned_jwks(registry: FakeRegistry) -> str | None:
    ports = registry.topology.get("AUTH-SERVICE", [])
    return f"http://127.0.0.1:{ports[0]}/auth/.well-known/jwks.json" if ports else None


@asynccontextmanager
async def running_gateway(
    registry: FakeRegistry,
    *,
    profile: Profile = "embedded",
    cache_ttl_s: float = 30.0,
    trusted_proxies: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Gateway]:
    platform = PlatformSettings(
        profile=profile,
        registry_url=registry.url,
        registry_cache_ttl_s=cache_ttl_s,
        max_body_bytes=MAX_BODY,
        auth_issuer=ISSUER,
        auth_audience=AUDIENCE,
        heartbeat_interval_s=30.0,
        # The operator pins the JWKS (SHOP_JWKS_URL): here, where the topology puts auth.
        jwks_url=_pinned_jwks(registry),
    )
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        upstream_timeout_s=overrides.pop("upstream_timeout_s", UPSTREAM_TIMEOUT_S),
        jwks_min_refetch_s=JWKS_REFETCH_S,
        openapi_cache_ttl_s=30.0,
        trusted_proxies=list(trusted_proxies),
        **overrides,
    )
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = port
    # As `python -m shop.gateway` serves it: the edge (X-Forwarded-For from a caller is not
    # its address), with its connection limits.
    server = uvicorn.Server(
        server_config(
            app, log_level="warning", proxy_headers=False, limits=settings.server_limits()
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield Gateway(url=f"http://127.0.0.1:{port}", port=port, app=app)
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def started(*things: Upstream | FakeRegistry) -> AsyncIterator[None]:
    for thing in things:
        await thing.start()
    try:
        yield
    finally:
        for thing in things:
            await thing.stop()


def _operation(summary: str, ref: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    if ref:
        operation["responses"]["200"]["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
        }
    return operation


PRODUCT_OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "product", "version": "1"},
    "paths": {
        "/api/product": {"get": _operation("list products", "Product")},
        "/api/product/{id}": {
            "get": {
                **_operation("one product", "Product"),
                "x-not-found": {"$ref": "#/components/schemas/Problem"},
            },
            "put": {**_operation("change a product"), "security": [{"HTTPBearer": []}]},
        },
        "/health/live": {"get": _operation("live")},
        "/metrics": {"get": _operation("metrics")},
    },
    "components": {
        "schemas": {
            "Product": {"type": "object", "properties": {"id": {"type": "string"}}},
            "Problem": {"type": "object", "title": "product problem"},
        },
        # Same name as auth's scheme, another definition: the merge must keep both.
        "securitySchemes": {"HTTPBearer": {"type": "http", "scheme": "bearer"}},
    },
}
INVENTORY_OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "inventory", "version": "1"},
    "paths": {
        "/api/inventory": {
            "get": _operation("stock", "Problem"),
            "delete": _operation("not routed by the gateway"),
        },
        "/internal/reservations": {"post": _operation("reserve", "Reservation")},
    },
    "components": {
        "schemas": {
            "Problem": {"type": "object", "title": "inventory problem"},
            "Reservation": {"type": "object"},
        }
    },
}
# As FastAPI describes the real auth service: its token routes name their own schemes.
AUTH_OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "auth", "version": "1"},
    "paths": {
        "/auth/token": {"post": _operation("log in")},
        "/auth/me": {"get": {**_operation("me"), "security": [{"HTTPBearer": []}]}},
    },
    "components": {
        "securitySchemes": {
            "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "auth's"},
            "HTTPBasic": {"type": "http", "scheme": "basic"},
        }
    },
}


@dataclass
class World:
    registry: FakeRegistry
    auth: Upstream
    products: tuple[Upstream, Upstream]
    inventory: Upstream
    dead_port: int
    gateway: Gateway
    http: aiohttp.ClientSession
    keys: dict[str, SigningKey]
    customer: str
    admin: str

    @property
    def upstreams(self) -> list[Upstream]:
        return [self.auth, *self.products, self.inventory]

    def forget_requests(self) -> None:
        for upstream in self.upstreams:
            upstream.received.clear()

    def reached(self) -> list[Received]:
        return [r for u in self.upstreams for r in u.received]


@pytest.fixture(scope="module")
async def world() -> AsyncIterator[World]:
    keys = {"k1": SigningKey("k1"), "k2": SigningKey("k2"), "rogue": SigningKey("k1")}
    auth = Upstream("auth-service", openapi=AUTH_OPENAPI)
    auth.jwks = [keys["k1"]]
    products = (
        Upstream("product-service", openapi=PRODUCT_OPENAPI),
        Upstream("product-service", openapi=PRODUCT_OPENAPI),
    )
    inventory = Upstream("inventory-service", openapi=INVENTORY_OPENAPI)
    # Bound but never listening: connections are refused, and no other test can take the port.
    dead = bind_socket("127.0.0.1", 0)
    with dead:
        async with started(auth, *products, inventory):
            dead_port = dead.getsockname()[1]
            registry = FakeRegistry(
                {
                    "auth-service": [auth.port],
                    "product-service": [p.port for p in products],
                    "inventory-service": [inventory.port],
                    "order-service": [dead_port],
                }
            )
            async with started(registry), running_gateway(registry) as gateway:
                async with aiohttp.ClientSession(auto_decompress=False) as http:
                    yield World(
                        registry=registry,
                        auth=auth,
                        products=products,
                        inventory=inventory,
                        dead_port=dead_port,
                        gateway=gateway,
                        http=http,
                        keys=keys,
                        customer=mint(keys["k1"]),
                        admin=mint(keys["k1"], roles=["customer", "admin"]),
                    )


@pytest.fixture(autouse=True)
def _fresh_records(request: pytest.FixtureRequest) -> Iterator[None]:
    if "world" in request.fixturenames:
        request.getfixturevalue("world").forget_requests()
    yield


async def call(
    world: World, method: str, path: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with world.http.request(method, world.gateway.url + path, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def assert_problem(
    status: int, headers: CIMultiDict[str], body: bytes, expected: int
) -> dict[str, Any]:
    assert status == expected, body
    assert headers["Content-Type"] == PROBLEM
    problem: dict[str, Any] = json.loads(body)
    assert problem["status"] == expected
    assert problem["requestId"] == headers["X-Request-ID"]
    return problem


async def raw_request(port: int, head: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send bytes exactly as written: the client libraries would tidy the tricks away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [
        (n.strip().lower(), v.strip()) for n, v in (line.split(":", 1) for line in lines[1:])
    ]
    return status, headers, body


# --- access rules -----------------------------------------------------------------------


async def test_catalogue_reads_are_public_and_reach_a_product_instance(world: World) -> None:
    status, headers, body = await call(world, "GET", "/api/product?q=phone&limit=5")
    assert status == 200
    assert json.loads(body)["service"] == "product-service"
    assert headers["X-Total-Count"] == "42"
    [received] = world.reached()
    assert (received.method, received.raw_path) == ("GET", "/api/product?q=phone&limit=5")


async def test_catalogue_writes_need_an_admin(world: World) -> None:
    product = {"name": "Phone", "price": "10.00", "skuCode": "phone"}
    status, headers, body = await call(world, "POST", "/api/product", json=product)
    assert_problem(status, headers, body, 401)
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, headers, body = await call(
        world, "POST", "/api/product", json=product, headers=bearer(world.customer)
    )
    assert_problem(status, headers, body, 403)
    assert world.reached() == []

    status, _, _ = await call(world, "DELETE", "/api/product/abc", headers=bearer(world.admin))
    assert status == 200
    status, _, _ = await call(
        world, "POST", "/api/product", json=product, headers=bearer(world.admin)
    )
    assert status == 200
    by_method = {r.method: r for r in world.reached()}
    assert sorted(by_method) == ["DELETE", "POST"]
    assert by_method["DELETE"].raw_path == "/api/product/abc"
    assert json.loads(by_method["POST"].body) == product
    assert by_method["POST"].headers["Authorization"] == f"Bearer {world.admin}"


async def test_stock_reads_need_a_token_and_writes_an_admin(world: World) -> None:
    status, headers, body = await call(world, "GET", "/api/inventory?skuCode=a")
    assert_problem(status, headers, body, 401)
    status, _, _ = await call(
        world, "GET", "/api/inventory?skuCode=a", headers=bearer(world.customer)
    )
    assert status == 200
    status, headers, body = await call(
        world, "PUT", "/api/inventory/a", json={"quantity": 1}, headers=bearer(world.customer)
    )
    assert_problem(status, headers, body, 403)
    assert [r.method for r in world.inventory.received] == ["GET"]


async def test_a_service_token_is_no_users_login(world: World) -> None:
    service = mint(world.keys["k1"], roles=["service"], sub="service:order-service")
    for method, path in (("GET", "/api/inventory?skuCode=a"), ("POST", "/api/order")):
        status, headers, body = await call(world, method, path, headers=bearer(service))
        assert_problem(status, headers, body, 403)
    assert world.reached() == []


async def test_auth_routes_follow_their_own_rules(world: World) -> None:
    status, _, _ = await call(world, "POST", "/auth/token", json={"email": "a", "password": "b"})
    assert status == 200
    status, _, _ = await call(world, "GET", "/auth/.well-known/jwks.json")
    assert status == 200
    status, headers, body = await call(world, "GET", "/auth/me")
    assert_problem(status, headers, body, 401)
    status, headers, body = await call(world, "POST", "/auth/logout", json={"refresh_token": "x"})
    assert_problem(status, headers, body, 401)
    status, _, _ = await call(world, "GET", "/auth/me", headers=bearer(world.customer))
    assert status == 200
    assert [r.raw_path for r in world.auth.received] == ["/auth/token", "/auth/me"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"exp": int(time.time()) - 60}, id="expired"),
        pytest.param({"aud": "someone-else"}, id="wrong-audience"),
        pytest.param({"iss": "evil-issuer"}, id="wrong-issuer"),
    ],
)
async def test_tokens_with_bad_claims_are_refused(world: World, overrides: dict[str, Any]) -> None:
    token = mint(world.keys["k1"], roles=["admin"], **overrides)
    status, headers, body = await call(world, "GET", "/api/inventory", headers=bearer(token))
    assert_problem(status, headers, body, 401)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert world.reached() == []


async def test_unsigned_and_hs256_tokens_are_refused(world: World) -> None:
    payload = claims(roles=["admin"])
    unsigned = forge({"alg": "none", "typ": "JWT", "kid": "k1"}, payload, hs256_secret=None)
    confused = forge(
        {"alg": "HS256", "typ": "JWT", "kid": "k1"},
        payload,
        hs256_secret=world.keys["k1"].public_pem(),
    )
    stolen_kid = mint(world.keys["rogue"], roles=["admin"])
    for token in (unsigned, confused, stolen_kid, "not-a-jwt"):
        status, headers, body = await call(world, "GET", "/api/inventory", headers=bearer(token))
        assert_problem(status, headers, body, 401)
    assert world.reached() == []


async def test_a_rotated_key_is_fetched_once_and_then_trusted(world: World) -> None:
    await asyncio.sleep(JWKS_REFETCH_S)  # the refetch is rate-limited: start outside the window
    world.auth.jwks = [world.keys["k2"], world.keys["k1"]]
    try:
        fetched = world.auth.jwks_hits
        token = mint(world.keys["k2"])
        for _ in range(3):
            status, _, _ = await call(world, "GET", "/api/inventory", headers=bearer(token))
            assert status == 200
        assert world.auth.jwks_hits == fetched + 1

        # A flood of unknown key ids inside the window costs the auth service nothing more.
        for n in range(5):
            forged = jwt.encode(
                claims(), world.keys["k2"].private, algorithm="RS256", headers={"kid": f"x{n}"}
            )
            status, _, _ = await call(world, "GET", "/api/inventory", headers=bearer(forged))
            assert status == 401
        assert world.auth.jwks_hits == fetched + 1
    finally:
        world.auth.jwks = [world.keys["k1"]]


async def test_an_unreachable_auth_service_is_503_not_a_bad_token(world: World) -> None:
    registry = FakeRegistry({"auth-service": [world.dead_port], "inventory-service": []})
    async with started(registry), running_gateway(registry) as gateway:
        async with world.http.get(
            gateway.url + "/api/inventory", headers=bearer(world.customer)
        ) as resp:
            assert resp.status == 503
            assert resp.headers["Content-Type"] == PROBLEM
            assert "Retry-After" in resp.headers


# --- what never reaches a service -------------------------------------------------------

TRICKS = [
    "/api/product/../order",
    "/api/product/./../order",
    "/api/product/%2e%2e/order",
    "/api/product/%2E%2E/order",
    "/api/product/.%2e/order",
    "/api/product/..%2forder",
    "/api/product%2f..%2forder",
    "/api/product/..%2Forder",
    "/api/product/..%5corder",
    "/api/product/..\\order",
    "/api/product/;/../order",
    "/api/product;jsessionid=1",
    "/api/order;x=1",
    "/api/product/x%00",
    "/api/product/%252e%252e/order",
    "//api/order",
    "/api//order",
    "/api/./order",
    "/api/product/",
    "/API/Order",
    "/api/ORDER",
    "/Api/product",
    "/internal/reservations",
    "/Internal/reservations",
    "/INTERNAL/reservations",
    "/api/inventory/internal/reservations",
    "/api/product/Internal",
    "/api/product/%69nternal",
    "/auth/../internal/reservations",
    "/api/product/%41",
]


@pytest.mark.parametrize("path", TRICKS)
async def test_path_tricks_never_reach_a_service(world: World, path: str) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {world.customer}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, headers, body = await raw_request(world.gateway.port, request)
    # 400 is uvicorn's own answer to a request line it will not parse at all.
    assert status in (400, 404), body
    if status == 404:
        assert ("content-type", PROBLEM) in headers
    assert world.reached() == []


async def test_internal_api_is_not_routed_even_for_an_admin(world: World) -> None:
    for method in ("POST", "DELETE"):
        status, headers, body = await call(
            world, method, "/internal/reservations/o-1", json={}, headers=bearer(world.admin)
        )
        assert_problem(status, headers, body, 404)
    assert world.reached() == []


@pytest.mark.parametrize(
    "path", ["/api/unknown", "/api/products", "/healthz", "/auth/health/live", "/eureka/apps/X"]
)
async def test_unrouted_paths_are_404(world: World, path: str) -> None:
    status, headers, body = await call(world, "GET", path, headers=bearer(world.admin))
    assert_problem(status, headers, body, 404)
    assert world.reached() == []


async def test_a_wrong_method_on_a_routed_path_is_405(world: World) -> None:
    status, headers, body = await call(world, "DELETE", "/api/order/1", headers=bearer(world.admin))
    assert_problem(status, headers, body, 405)
    assert headers["Allow"] == "GET, HEAD, POST"
    status, headers, body = await call(world, "GET", "/auth/token")
    assert_problem(status, headers, body, 405)
    assert world.reached() == []


async def test_a_body_over_the_limit_is_413_declared_or_streamed(world: World) -> None:
    big = b"x" * (MAX_BODY + 1)
    status, headers, body = await call(
        world, "POST", "/api/product", data=big, headers=bearer(world.admin)
    )
    assert_problem(status, headers, body, 413)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    status, headers, body = await call(
        world, "POST", "/api/product", data=chunks(), headers=bearer(world.admin)
    )
    assert_problem(status, headers, body, 413)
    assert world.reached() == []


# --- failures of the services behind ----------------------------------------------------


async def test_a_slow_service_is_504(world: World) -> None:
    began = time.monotonic()
    status, headers, body = await call(
        world, "GET", "/api/inventory/slow", headers=bearer(world.customer)
    )
    assert_problem(status, headers, body, 504)
    assert time.monotonic() - began < 0.9


async def test_a_service_without_instances_is_503_with_retry_after(world: World) -> None:
    status, headers, body = await call(
        world, "GET", "/api/notifications", headers=bearer(world.customer)
    )
    assert_problem(status, headers, body, 503)
    assert int(headers["Retry-After"]) >= 1


async def test_a_service_whose_instance_is_down_is_503_with_retry_after(world: World) -> None:
    status, headers, body = await call(
        world, "POST", "/api/order", json={"items": []}, headers=bearer(world.customer)
    )
    assert_problem(status, headers, body, 503)
    assert int(headers["Retry-After"]) >= 1


async def test_a_refused_connection_is_retried_on_another_instance(world: World) -> None:
    registry = FakeRegistry(
        {
            "auth-service": [world.auth.port],
            "order-service": [world.dead_port, world.inventory.port],
        }
    )
    async with started(registry), running_gateway(registry) as gateway:
        for _ in range(4):
            async with world.http.post(
                gateway.url + "/api/order", json={"items": [1]}, headers=bearer(world.customer)
            ) as resp:
                assert resp.status == 200
    assert len(world.inventory.received) == 4
    assert all(json.loads(r.body) == {"items": [1]} for r in world.inventory.received)


async def test_a_service_answer_passes_through_unchanged(world: World) -> None:
    status, headers, body = await call(world, "GET", "/api/product/conflict")
    assert status == 409
    assert json.loads(body) == {"title": "Conflict"}
    status, headers, body = await call(world, "GET", "/api/product/gzipped")
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b'{"compressed": true}'


async def test_a_streamed_answer_arrives_whole(world: World) -> None:
    status, headers, body = await call(world, "GET", "/api/product/streamed")
    assert status == 200
    assert body == b"".join(STREAMED_PARTS)
    assert "Transfer-Encoding" not in headers or headers["Transfer-Encoding"] == "chunked"


async def test_an_answer_broken_off_midway_cuts_the_callers_connection(world: World) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(world, "GET", "/api/product/broken")
    # The gateway itself is fine, and so is the next request.
    status, _, _ = await call(world, "GET", "/api/product")
    assert status == 200


async def test_head_is_forwarded_as_head_and_the_connection_stays_usable(world: World) -> None:
    _, get_headers, get_body = await call(world, "GET", "/api/product/1")
    for _ in range(3):
        status, headers, body = await call(world, "HEAD", "/api/product/1")
        assert status == 200
        assert body == b""
        assert headers["Content-Length"] == str(len(get_body))
        assert headers["Content-Type"] == get_headers["Content-Type"]
        status, _, body = await call(world, "GET", "/api/product/1")
        assert status == 200
        assert json.loads(body)["path"] == "/api/product/1"
    assert [r.method for r in world.reached()].count("HEAD") == 3


async def test_a_connection_the_service_closed_while_idle_is_not_an_error(world: World) -> None:
    for _ in range(3):
        status, _, _ = await call(world, "GET", "/api/product/then-hang-up")
        assert status == 200
        await asyncio.sleep(0.2)  # the service has closed the kept-alive connection by now
    for _ in range(4):
        status, _, _ = await call(
            world, "POST", "/api/product", json={}, headers=bearer(world.admin)
        )
        assert status == 200


async def test_request_bodies_reach_the_service_byte_for_byte(world: World) -> None:
    payload = bytes(range(256)) * 64
    status, _, _ = await call(
        world,
        "PUT",
        "/api/product/1",
        data=payload,
        headers={**bearer(world.admin), "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    (received,) = world.reached()
    assert received.method == "PUT"
    assert received.body == payload
    assert received.headers["Content-Length"] == str(len(payload))


# --- what crosses the gateway -----------------------------------------------------------


async def test_hop_by_hop_headers_stop_and_forwarding_headers_are_set(world: World) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    request = (
        "GET /api/product/p-1 HTTP/1.1\r\n"
        "Host: shop.example\r\n"
        "Connection: close, X-Hop-Secret\r\n"
        "X-Hop-Secret: do-not-forward\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "X-Forwarded-For: 203.0.113.9\r\n"
        "X-Forwarded-Proto: https\r\n"
        "X-Forwarded-Host: evil.example\r\n"
        "X-Request-ID: req-123\r\n"
        f"traceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n"
        f"Authorization: Bearer {world.customer}\r\n"
        "\r\n"
    ).encode()
    status, answer_headers, _ = await raw_request(world.gateway.port, request)
    assert status == 200
    [received] = world.reached()
    sent = {k.lower(): v for k, v in received.headers.items()}
    for hop in ("x-hop-secret", "keep-alive", "te", "proxy-authorization"):
        assert hop not in sent
    # What the caller wrote in X-Forwarded-* is replaced by what the gateway saw.
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == "shop.example"
    assert sent["x-request-id"] == "req-123"
    assert sent["authorization"] == f"Bearer {world.customer}"
    _, trace, span, _ = sent["traceparent"].split("-")
    assert (trace, span != "00f067aa0ba902b7") == (trace_id, True)

    names = [n for n, _ in answer_headers]
    for hop in ("x-upstream-hop", "keep-alive", "proxy-authenticate"):
        assert hop not in names
    assert [v for n, v in answer_headers if n == "x-request-id"] == ["req-123"]


@pytest.mark.parametrize("trusted", ["127.0.0.1", "127.0.0.0/8"])
async def test_behind_a_trusted_load_balancer_its_forwarding_is_kept(
    world: World, trusted: str
) -> None:
    """Trusted by its address, or by its network (pods whose addresses change)."""
    registry = FakeRegistry({"product-service": [world.products[0].port]})
    async with started(registry), running_gateway(registry, trusted_proxies=(trusted,)) as gw:
        spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        async with world.http.get(gw.url + "/api/product", headers=spoof) as resp:
            assert resp.status == 200
    [received] = world.reached()
    sent = {k.lower(): v for k, v in received.headers.items()}
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "https"


async def test_requests_alternate_between_instances(world: World) -> None:
    for _ in range(4):
        status, _, _ = await call(world, "GET", "/api/product")
        assert status == 200
    assert [len(p.received) for p in world.products] == [2, 2]


async def test_instances_are_looked_up_once_not_per_request(world: World) -> None:
    registry = FakeRegistry({"product-service": [p.port for p in world.products]})
    async with started(registry), running_gateway(registry) as gateway:
        for _ in range(20):
            async with world.http.get(gateway.url + "/api/product") as resp:
                assert resp.status == 200
    assert registry.lookups["PRODUCT-SERVICE"] == 1


# --- the gateway's own endpoints --------------------------------------------------------


async def test_the_gateway_registers_the_port_it_bound_and_is_ready(world: World) -> None:
    for _ in range(200):
        if world.registry.registered:
            break
        await asyncio.sleep(0.01)
    [instance] = world.registry.registered.values()
    assert instance["app"] == "API-GATEWAY"
    assert instance["port"]["$"] == world.gateway.port
    status, _, body = await call(world, "GET", "/health/ready")
    # The edge says only its status unless told to say more (GATEWAY_PUBLIC_OPERATIONS).
    assert (status, json.loads(body)) == (200, {"status": "UP"})
    status, _, body = await call(world, "GET", "/health/live")
    assert (status, json.loads(body)) == (200, {"status": "UP"})


async def test_without_a_registry_the_gateway_is_not_ready(world: World) -> None:
    registry = FakeRegistry({})
    registry.url = f"http://127.0.0.1:{free_port()}/eureka"  # nothing listens there
    async with running_gateway(registry, public_operations=True) as gateway:
        async with world.http.get(gateway.url + "/health/ready") as resp:
            assert resp.status == 503
            assert resp.headers["Content-Type"] == PROBLEM
            assert (await resp.json(content_type=None))["checks"]["registry"] == "DOWN"
    async with running_gateway(registry) as gateway:
        async with world.http.get(gateway.url + "/health/ready") as resp:
            assert resp.status == 503
            assert "checks" not in await resp.json(content_type=None)
        async with world.http.get(gateway.url + "/api/product") as resp:
            assert resp.status == 503
            assert "Retry-After" in resp.headers


async def test_the_dashboard_is_open_on_a_laptop(world: World) -> None:
    status, _, body = await call(world, "GET", "/eureka/web")
    assert status == 200
    assert b"Instances currently registered" in body


async def test_the_dashboard_is_for_admins_in_production(world: World) -> None:
    async with running_gateway(world.registry, profile="production") as gateway:
        url = gateway.url + "/eureka/web"
        async with world.http.get(url) as resp:
            assert resp.status == 401
        async with world.http.get(url, headers=bearer(world.customer)) as resp:
            assert resp.status == 403
        async with world.http.get(url, headers=bearer(world.admin)) as resp:
            assert resp.status == 200


async def test_openapi_merges_the_public_api_of_every_running_service(world: World) -> None:
    before = world.inventory.openapi_hits
    status, _, body = await call(world, "GET", "/openapi.json")
    assert status == 200
    document = json.loads(body)
    assert set(document["paths"]) == {
        "/api/product",
        "/api/product/{id}",
        "/api/inventory",
        "/auth/token",
        "/auth/me",
    }
    assert set(document["paths"]["/api/inventory"]) == {"get"}
    assert document["paths"]["/api/inventory"]["get"]["security"] == [{"bearerAuth": []}]
    # Swagger's "Authorize" needs every scheme an operation requires to be defined.
    schemes = document["components"]["securitySchemes"]
    required = {
        name
        for operations in document["paths"].values()
        for operation in operations.values()
        for requirement in operation.get("security", [])
        for name in requirement
    }
    assert required == {"HTTPBearer", "ProductServiceHTTPBearer", "bearerAuth"}
    assert required <= set(schemes)
    assert document["paths"]["/auth/me"]["get"]["security"] == [{"HTTPBearer": []}]
    assert schemes["HTTPBearer"]["description"] == "auth's"
    assert document["paths"]["/api/product/{id}"]["put"]["security"] == [
        {"ProductServiceHTTPBearer": []}
    ]
    assert "HTTPBasic" not in schemes  # /auth/getToken is not in this description
    schemas = document["components"]["schemas"]
    # Same name, different schemas: each service keeps its own, references follow; the
    # plain name stays the gateway's own (the body of what it answers itself).
    assert schemas["Problem"] == PROBLEM_SCHEMA
    assert schemas["InventoryServiceProblem"]["title"] == "inventory problem"
    assert schemas["ProductServiceProblem"]["title"] == "product problem"
    assert document["paths"]["/api/product/{id}"]["get"]["x-not-found"] == {
        "$ref": "#/components/schemas/ProductServiceProblem"
    }
    assert set(schemas) == {  # no Reservation
        "Problem",
        "InventoryServiceProblem",
        "Product",
        "ProductServiceProblem",
    }
    status, _, body = await call(world, "GET", "/openapi.json")
    assert json.loads(body) == document
    assert world.inventory.openapi_hits == before + 1  # cached

    status, headers, body = await call(world, "GET", "/docs")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"swagger-ui" in body and b"/openapi.json" in body


async def test_metrics_count_requests_by_route_not_by_raw_path(world: World) -> None:
    async with running_gateway(world.registry, public_operations=True) as gateway:
        async with world.http.get(gateway.url + "/api/product/abc123") as resp:
            assert resp.status == 200
        async with world.http.get(gateway.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert 'route="/api/product"' in text
    assert "abc123" not in text


async def test_operations_endpoints_answer_problems_too(world: World) -> None:
    status, headers, body = await call(world, "POST", "/health/live")
    assert_problem(status, headers, body, 405)


async def test_metrics_and_readiness_detail_are_not_public_by_default(world: World) -> None:
    status, headers, body = await call(world, "GET", "/metrics")
    assert_problem(status, headers, body, 404)


# --- abuse limits -----------------------------------------------------------------------


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def _assert_limited(status: int, headers: CIMultiDict[str], body: bytes) -> None:
    problem = assert_problem(status, headers, body, 429)
    assert 1 <= int(headers["Retry-After"]) <= 60, problem


async def _get(url: str, http: aiohttp.ClientSession, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with http.get(url, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def storage_url(request: pytest.FixtureRequest) -> str:
    url: str = request.param
    if url.startswith("redis"):
        import redis

        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            require_or_skip(f"no Redis at {url}")
    return url


@pytest.mark.parametrize("storage_url", ["memory://", REDIS_URL], indirect=True)
async def test_each_client_is_limited_with_429_and_retry_after(
    world: World, storage_url: str
) -> None:
    async with running_gateway(
        world.registry,
        # The test's own peer stands for a load balancer so each test client has an address.
        trusted_proxies=("127.0.0.1",),
        rate_limit_per_client="3/minute",
        rate_limit_storage_url=storage_url,
        rate_limit_key_prefix=f"test-{uuid.uuid4().hex}",
    ) as gateway:
        url = gateway.url + "/api/product"
        for _ in range(3):
            assert (await _get(url, world.http, headers=_from("198.51.100.1")))[0] == 200
        world.forget_requests()
        _assert_limited(*await _get(url, world.http, headers=_from("198.51.100.1")))
        assert world.reached() == []
        # Refused paths count too: they are work for the gateway all the same.
        _assert_limited(
            *await _get(gateway.url + "/nowhere", world.http, headers=_from("198.51.100.1"))
        )
        assert (await _get(url, world.http, headers=_from("198.51.100.2")))[0] == 200


@pytest.mark.parametrize("storage_url", ["memory://", REDIS_URL], indirect=True)
async def test_each_user_is_limited_whatever_address_they_come_from(
    world: World, storage_url: str
) -> None:
    async with running_gateway(
        world.registry,
        trusted_proxies=("127.0.0.1",),
        rate_limit_per_user="2/minute",
        rate_limit_storage_url=storage_url,
        rate_limit_key_prefix=f"test-{uuid.uuid4().hex}",
    ) as gateway:
        url = gateway.url + "/api/inventory"
        ada = bearer(mint(world.keys["k1"]))
        for address in ("198.51.100.1", "198.51.100.2"):
            status, _, _ = await _get(url, world.http, headers={**ada, **_from(address)})
            assert status == 200
        _assert_limited(*await _get(url, world.http, headers={**ada, **_from("198.51.100.3")}))
        bob = bearer(mint(world.keys["k1"]))
        assert (await _get(url, world.http, headers=bob))[0] == 200
        # Public routes need no token and are limited per client only.
        assert (await _get(gateway.url + "/api/product", world.http, headers=ada))[0] == 200


@pytest.mark.parametrize("storage_url", [REDIS_URL], indirect=True)
async def test_gateways_sharing_redis_share_the_counts(world: World, storage_url: str) -> None:
    shared: dict[str, Any] = {
        "rate_limit_per_client": "3/minute",
        "rate_limit_storage_url": storage_url,
        "rate_limit_key_prefix": f"test-{uuid.uuid4().hex}",
    }
    async with (
        running_gateway(world.registry, **shared) as first,
        running_gateway(world.registry, **shared) as second,
    ):
        for gateway in (first, second, first):
            assert (await _get(gateway.url + "/api/product", world.http))[0] == 200
        _assert_limited(*await _get(second.url + "/api/product", world.http))


def test_production_refuses_limits_counted_in_one_gateways_memory() -> None:
    production = PlatformSettings(profile="production")
    with pytest.raises(SettingsRefused, match="GATEWAY_RATE_LIMIT_STORAGE_URL"):
        GatewaySettings().check_stores(production)
    GatewaySettings(rate_limit_storage_url=REDIS_URL).check_stores(production)


async def _cut_off_within(
    port: int, *, head: bytes, trickle: bytes, every_s: float, limit_s: float
) -> tuple[float, bytes]:
    """Send ``head``, then ``trickle`` a byte at a time; how long until the gateway answered
    and closed, and what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    received = bytearray()

    async def closed_within(seconds: float) -> bool:
        # read(n) gives up nothing when a timeout cancels it (read() until EOF would drop
        # what it had read so far), so an answer that arrives before the close is kept.
        try:
            async with asyncio.timeout(seconds):
                while chunk := await reader.read(65536):
                    received.extend(chunk)
        except TimeoutError:
            return False
        except ConnectionError:
            pass  # closed with our unread trickle in its buffer: a reset, after the answer
        return True

    try:
        writer.write(head)
        for byte in trickle:
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            # Waiting for the server is the pace of the trickle: it answers or it does not.
            if await closed_within(every_s):
                return time.monotonic() - began, bytes(received)
        await closed_within(limit_s)
        return time.monotonic() - began, bytes(received)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_trickling_its_headers_is_cut_off(world: World) -> None:
    async with running_gateway(world.registry, header_timeout_s=0.5) as gateway:
        took, answer = await _cut_off_within(
            gateway.port,
            head=b"GET /api/product HTTP/1.1\r\nHost: shop\r\n",
            trickle=b"X-Slow: " + b"a" * 100,
            every_s=0.1,
            limit_s=2.0,
        )
    assert took < 1.5
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"application/problem+json" in answer
    assert world.reached() == []


async def test_a_connection_that_sends_nothing_is_closed(world: World) -> None:
    async with running_gateway(world.registry, header_timeout_s=0.3) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_trickling_body_is_cut_off_with_408(world: World) -> None:
    async with running_gateway(world.registry, body_timeout_s=0.5) as gateway:
        took, answer = await _cut_off_within(
            gateway.port,
            head=(
                b"POST /api/product HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\n"
                + b"Content-Length: 200\r\n"
                + f"Authorization: Bearer {world.admin}\r\n\r\n".encode()
            ),
            trickle=b"x" * 200,
            every_s=0.1,
            limit_s=2.0,
        )
    assert took < 1.5
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"application/problem+json" in answer
    assert world.reached() == []


async def test_oversized_headers_are_431_and_never_forwarded(world: World) -> None:
    async with running_gateway(world.registry, max_header_bytes=4096) as gateway:
        head = b"GET /api/product HTTP/1.1\r\nHost: shop\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        status, headers, body = await raw_request(gateway.port, head)
        assert status == 431
        assert dict(headers)["content-type"] == PROBLEM
        assert json.loads(body)["status"] == 431
        # Many headers add up as one.
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 100) for i in range(50))
        status, _, _ = await raw_request(
            gateway.port, b"GET /api/product HTTP/1.1\r\n" + many + b"\r\n"
        )
        assert status == 431
        # Megabytes are refused as soon as the limit is passed: the answer may be lost to the
        # reset of a connection closed with unread bytes, but nothing is forwarded.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"GET /api/product HTTP/1.1\r\nX-Huge: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(64):
                    writer.write(b"a" * 65536)
                    await writer.drain()
            with contextlib.suppress(ConnectionError):
                answer = await asyncio.wait_for(reader.read(), 5.0)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        fine = b"GET /api/product HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
        status, _, _ = await raw_request(gateway.port, fine)
        assert status == 200
    assert len(world.reached()) == 1
