"""Reading the bearer token a caller sent."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from shop.platform.discovery import RegistryClient
from shop.platform.security import ServiceTokens, ServiceTokenUnavailable, bearer_token


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


async def test_a_service_token_is_fetched_once_and_refreshed_before_it_expires() -> None:
    issued: list[dict[str, str]] = []
    bound: dict[str, int] = {}

    async def service_token(request: web.Request) -> web.Response:
        issued.append(await request.json())
        return web.json_response({"access_token": f"t{len(issued)}", "expires_in": 90})

    async def apps(request: web.Request) -> web.Response:
        instance = {"app": "AUTH-SERVICE", "ipAddr": "127.0.0.1", "status": "UP"}
        return web.json_response(
            {"application": {"instance": [{**instance, "port": {"$": bound["port"]}}]}}
        )

    app = web.Application()
    app.router.add_post("/internal/service-token", service_token)
    app.router.add_get("/eureka/apps/AUTH-SERVICE", apps)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    bound["port"] = port
    try:
        async with aiohttp.ClientSession() as http:
            registry = RegistryClient(base_url=f"http://127.0.0.1:{port}/eureka", session=http)
            tokens = ServiceTokens(
                name="order-service",
                secret=SecretStr("s3cret"),
                registry=registry,
                session=http,
                refresh_margin_s=60,
            )
            first, again = await tokens.bearer(), await tokens.bearer()
            tokens._expires_at = 0.0  # as if 90 s had passed
            later = await tokens.bearer()
    finally:
        await runner.cleanup()
    assert (first, again, later) == ("Bearer t1", "Bearer t1", "Bearer t2")
    assert issued[0] == {"service": "order-service", "secret": "s3cret"}


async def test_without_a_secret_there_is_no_service_token() -> None:
    async with aiohttp.ClientSession() as http:
        registry = RegistryClient(base_url="http://127.0.0.1:9/eureka", session=http)
        tokens = ServiceTokens(name="x", secret=None, registry=registry, session=http)
        with pytest.raises(ServiceTokenUnavailable):
            await tokens.bearer()


async def test_callers_queued_behind_a_failed_fetch_fail_at_once() -> None:
    async def never_answers(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    async def apps(request: web.Request) -> web.Response:
        instance = {"app": "AUTH-SERVICE", "ipAddr": "127.0.0.1", "status": "UP"}
        return web.json_response(
            {"application": {"instance": [{**instance, "port": {"$": bound["port"]}}]}}
        )

    bound: dict[str, int] = {}
    app = web.Application()
    app.router.add_post("/internal/service-token", never_answers)
    app.router.add_get("/eureka/apps/AUTH-SERVICE", apps)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bound["port"] = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
            registry = RegistryClient(
                base_url=f"http://127.0.0.1:{bound['port']}/eureka", session=http
            )
            tokens = ServiceTokens(
                name="order-service", secret=SecretStr("s"), registry=registry, session=http
            )
            began = asyncio.get_running_loop().time()
            outcomes = await asyncio.gather(
                *(tokens.bearer() for _ in range(5)), return_exceptions=True
            )
            took = asyncio.get_running_loop().time() - began
    finally:
        await runner.cleanup()
    assert all(isinstance(o, ServiceTokenUnavailable) for o in outcomes)
    assert took < 3.5, f"five callers waited {took:.1f}s: one timeout each, in turn"
