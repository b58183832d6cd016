"""The console's parts: which paths the gateway keeps for itself, the registry's answer
read in both of Eureka's JSON shapes, and the health word shown for each instance."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shop.gateway.console import _probe, _registered, serves
from shop.platform.discovery import Instance
from tests.support import free_port


@pytest.mark.parametrize(
    "path", ["/console", "/console/api/services", "/console/assets/console.js", "/redoc"]
)
def test_the_console_and_docs_paths_are_the_gateways_own(path: str) -> None:
    assert serves(path)


@pytest.mark.parametrize(
    "path", ["/api/order", "/consoles", "/redocs", "/auth/token", "/documents", "/"]
)
def test_every_other_path_goes_to_the_proxy(path: str) -> None:
    assert not serves(path)


def _instance(app: str, port: int, status: str = "UP") -> dict[str, object]:
    return {
        "instanceId": f"127.0.0.1:{app}:{port}",
        "app": app.upper(),
        "ipAddr": "127.0.0.1",
        "status": status,
        "port": {"$": port, "@enabled": "true"},
    }


def test_a_list_of_one_written_as_the_item_alone_is_read() -> None:
    body = {
        "applications": {
            "application": {"name": "ORDER-SERVICE", "instance": _instance("order-service", 1)}
        }
    }
    [only] = _registered(body)
    assert (only.app, only.port, only.status) == ("order-service", 1, "UP")


def test_every_instance_of_every_application_is_read() -> None:
    body = {
        "applications": {
            "application": [
                {"name": "A", "instance": [_instance("a", 1), _instance("a", 2, "DOWN")]},
                {"name": "B", "instance": [_instance("b", 3)]},
            ]
        }
    }
    found = _registered(body)
    assert [(i.app, i.port, i.status) for i in found] == [
        ("a", 1, "UP"),
        ("a", 2, "DOWN"),
        ("b", 3, "UP"),
    ]


@pytest.mark.parametrize("body", [None, [], {}, {"applications": []}, {"applications": {}}])
def test_an_empty_or_odd_answer_is_no_instance(body: object) -> None:
    assert _registered(body) == []


async def _serving(routes: dict[str, tuple[int, object]]) -> tuple[web.AppRunner, int]:
    """A stand-in instance answering ``routes`` (path -> status, JSON body); 404 elsewhere."""
    app = web.Application()
    for path, (status, body) in routes.items():

        async def answer(_request: web.Request, status: int = status, body: object = body) -> Any:
            return web.json_response(body, status=status)

        app.router.add_get(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.mark.parametrize(
    ("routes", "shown"),
    [
        # /health's word wins: a degraded service that still serves is shown DEGRADED.
        ({"/health": (200, {"status": "DEGRADED"}), "/health/ready": (200, {})}, "DEGRADED"),
        ({"/health": (200, {"status": "UP"})}, "UP"),
        # A process without /health (the gateway, the registry) is asked for readiness.
        ({"/health/ready": (200, {"status": "UP"})}, "UP"),
        ({"/health/ready": (503, {"status": "DOWN"})}, "DOWN"),
        ({"/health": (503, {"status": "DOWN"})}, "DOWN"),
    ],
)
async def test_each_instance_is_shown_with_its_own_word_on_its_health(
    routes: dict[str, tuple[int, object]], shown: str
) -> None:
    runner, port = await _serving(routes)
    try:
        async with aiohttp.ClientSession() as http:
            instance = Instance.from_eureka(_instance("order-service", port))
            assert await _probe(http, instance) == shown
    finally:
        await runner.cleanup()


async def test_an_instance_nobody_answers_at_is_unreachable() -> None:
    async with aiohttp.ClientSession() as http:
        instance = Instance.from_eureka(_instance("order-service", free_port()))
        assert await _probe(http, instance) == "UNREACHABLE"
