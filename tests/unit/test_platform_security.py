"""Reading the bearer token a caller sent; fetching keys and service tokens from the pinned
auth address only; which callers an internal route admits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import aiohttp
import httpx
import pytest
from aiohttp import web
from fastapi import APIRouter, Depends, FastAPI
from pydantic import SecretStr

from shop.platform.app import create_app
from shop.platform.security import (
    JwksUnavailable,
    ServiceTokens,
    ServiceTokenUnavailable,
    bearer_token,
    internal_caller,
    jwks_from_url,
    max_age_of,
)
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import InvalidToken, Jwks, Principal


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer a b", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("public, max-age=60", 60.0),
        ('max-age="120"', 120.0),
        ("no-store", 0.0),
        ("public, no-cache, max-age=60", 0.0),
        ("public", None),
        (None, None),
        ("s-maxage=5", None),
    ],
)
def test_the_max_age_a_jwks_answer_allows(header: str | None, seconds: float | None) -> None:
    assert max_age_of(header) == seconds


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_the_jwks_comes_from_the_pinned_url_with_its_max_age() -> None:
    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": []}, headers={"Cache-Control": "public, max-age=42"})

    async def elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:9/evil.json")

    app = web.Application()
    app.router.add_get("/auth/.well-known/jwks.json", jwks)
    app.router.add_get("/moved", elsewhere)
    async with serving(app) as base, aiohttp.ClientSession() as http:
        fetched = await jwks_from_url(f"{base}/auth/.well-known/jwks.json", http)()
        # A redirect could point anywhere: the pinned URL is the only source.
        with pytest.raises(JwksUnavailable, match="302"):
            await jwks_from_url(f"{base}/moved", http)()
    assert fetched == Jwks(document={"keys": []}, max_age_s=42.0)


async def test_a_service_token_is_asked_of_the_pinned_auth_url_per_target_and_refreshed() -> None:
    issued: list[dict[str, str]] = []
    expires_in = 90

    async def service_token(request: web.Request) -> web.Response:
        issued.append(await request.json())
        return web.json_response({"access_token": f"t{len(issued)}", "expires_in": expires_in})

    app = web.Application()
    app.router.add_post("/internal/service-token", service_token)
    async with serving(app) as base, aiohttp.ClientSession() as http:
        tokens = ServiceTokens(
            name="order-service",
            secret=SecretStr("s3cret"),
            auth_url=base + "/",
            session=http,
            refresh_margin_s=60,
        )
        a, b = "http://10.0.0.7:8083", "http://10.0.0.8:8083"
        first, again, other = await tokens.bearer(a), await tokens.bearer(a), await tokens.bearer(b)
        expires_in = 30  # inside the refresh margin: fetched again next time
        nearly_expired = await tokens.bearer("http://10.0.0.9:8083")
        renewed = await tokens.bearer("http://10.0.0.9:8083")
    # One token per instance called, each kept until near its expiry.
    assert (first, again, other) == ("Bearer t1", "Bearer t1", "Bearer t2")
    assert (nearly_expired, renewed) == ("Bearer t3", "Bearer t4")
    assert issued[0] == {"service": "order-service", "secret": "s3cret", "target": a}
    assert issued[1]["target"] == b


async def test_a_redirecting_auth_url_never_gets_the_secret_elsewhere() -> None:
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(request.url.with_path("/collect")))

    async def collect(request: web.Request) -> web.Response:
        seen.append(await request.text())
        return web.json_response({"access_token": "x", "expires_in": 90})

    app = web.Application()
    app.router.add_post("/internal/service-token", moved)
    app.router.add_post("/collect", collect)
    async with serving(app) as base, aiohttp.ClientSession() as http:
        tokens = ServiceTokens(
            name="order-service", secret=SecretStr("s3cret"), auth_url=base, session=http
        )
        with pytest.raises(ServiceTokenUnavailable, match="307"):
            await tokens.bearer("http://10.0.0.7:8083")
    assert seen == []


@pytest.mark.parametrize(
    ("secret", "auth_url", "missing"),
    [(None, "http://127.0.0.1:9", "SHOP_SERVICE_SECRET"), ("s", None, "SHOP_AUTH_URL")],
)
async def test_without_a_secret_or_a_pinned_auth_url_there_is_no_service_token(
    secret: str | None, auth_url: str | None, missing: str
) -> None:
    async with aiohttp.ClientSession() as http:
        tokens = ServiceTokens(
            name="x",
            secret=SecretStr(secret) if secret else None,
            auth_url=auth_url,
            session=http,
        )
        with pytest.raises(ServiceTokenUnavailable, match=missing):
            await tokens.bearer("http://10.0.0.7:8083")


async def test_callers_queued_behind_a_failed_fetch_fail_at_once() -> None:
    async def never_answers(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/internal/service-token", never_answers)
    async with (
        serving(app) as base,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http,
    ):
        tokens = ServiceTokens(
            name="order-service", secret=SecretStr("s"), auth_url=base, session=http
        )
        began = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(
            *(tokens.bearer(f"http://10.0.0.{n}:8083") for n in range(5)), return_exceptions=True
        )
        took = asyncio.get_running_loop().time() - began
    assert all(isinstance(o, ServiceTokenUnavailable) for o in outcomes)
    assert took < 3.5, f"five callers waited {took:.1f}s: one timeout each, in turn"


class _Principals:
    """A verifier that knows a few tokens by name: this test is about the route's rules."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._principals = principals

    async def verify(self, token: str) -> Principal:
        try:
            return self._principals[token]
        except KeyError:
            raise InvalidToken("unknown") from None


OrderServiceCaller = Annotated[Principal, Depends(internal_caller("order-service"))]
_internal = APIRouter()


@_internal.post("/internal/reservations")
async def _reserve(who: OrderServiceCaller) -> dict[str, str]:
    return {"caller": who.user_id}


HERE = "http://127.0.0.1:8083"  # the instance under test, as the registry lists it


def _principal(sub: str, *roles: str, audience: str, target: str = HERE) -> Principal:
    return Principal(
        user_id=sub,
        email="",
        roles=frozenset(roles),
        token_id=sub,
        audience=audience,
        target=target,
    )


async def test_an_internal_route_admits_only_the_callers_it_names() -> None:
    platform = PlatformSettings()
    users, internal = platform.auth_audience, platform.internal_audience
    known = {
        "order": _principal("service:order-service", "service", audience=internal),
        # order-service's genuine token, issued for another instance (which replays it).
        "order-elsewhere": _principal(
            "service:order-service", "service", audience=internal, target="http://10.6.6.6:8083"
        ),
        "order-untargeted": _principal(
            "service:order-service", "service", audience=internal, target=""
        ),
        "notification": _principal("service:notification-service", "service", audience=internal),
        # A service token minted for the users' audience (an old auth, a mistake): refused.
        "order-public": _principal("service:order-service", "service", audience=users),
        "admin": _principal("u1", "customer", "admin", audience=users),
        # Claims a service role, but the subject is a user's: still nobody's service.
        "odd": _principal("u2", "service", audience=internal),
    }
    app: FastAPI = create_app(name="x", title="x", platform=platform, routers=[_internal])
    async with app.router.lifespan_context(app):
        app.state.runtime.tokens = _Principals(known)
        app.state.runtime.origin = HERE
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:

            async def status(token: str | None) -> int:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                return (await client.post("/internal/reservations", headers=headers)).status_code

            outcomes = {name: await status(name) for name in [*known, "forged"]}
            outcomes["none"] = await status(None)
    assert outcomes == {
        "order": 200,
        "order-elsewhere": 403,
        "order-untargeted": 403,
        "notification": 403,
        "order-public": 403,
        "admin": 403,
        "odd": 403,
        "forged": 401,
        "none": 401,
    }


def test_an_internal_route_names_at_least_one_caller() -> None:
    with pytest.raises(ValueError, match="at least one caller"):
        internal_caller()
