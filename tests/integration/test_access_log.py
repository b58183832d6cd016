"""One access line per request at the gateway, on the fast lane and on the ASGI path alike:
the route's template (never the raw path), the status, and the ids the caller can quote."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shop.gateway.fastlane import GatewayProtocol
from shop.platform import logs
from shop.platform.logs import AccessEntry
from tests.integration import test_gateway
from tests.integration.test_gateway import World, call

world = test_gateway.world  # the same world around a gateway, one for this module


class Collector:
    """Stands in for the log writer: keeps the access entries it is handed."""

    def __init__(self) -> None:
        self.entries: list[AccessEntry] = []

    def access(self, entry: AccessEntry) -> None:
        self.entries.append(entry)


@pytest.fixture
def access_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[AccessEntry]]:
    collector = Collector()
    monkeypatch.setattr(logs, "_access_handler", collector)
    yield collector.entries


@pytest.mark.parametrize("fast", [True, False], ids=["fast-lane", "asgi-path"])
async def test_each_request_has_one_access_line_with_its_template_and_ids(
    world: World,
    access_lines: list[AccessEntry],
    monkeypatch: pytest.MonkeyPatch,
    fast: bool,
) -> None:
    taken: list[bool] = []
    original = GatewayProtocol._take

    def spy(self: GatewayProtocol, *args: Any) -> bool:
        took = original(self, *args) if fast else False
        taken.append(took)
        return took

    monkeypatch.setattr(GatewayProtocol, "_take", spy)
    for _ in range(4):  # instances known, a kept-alive connection idle to each
        await call(world, "GET", "/api/product")
    access_lines.clear()
    taken.clear()
    world.forget_requests()
    status, headers, _ = await call(
        world, "GET", "/api/product/7?q=secret", headers={"X-Request-ID": "quote-me-1"}
    )
    assert status == 200
    assert taken == [fast]
    (line,) = access_lines
    _, service, method, route, code, seconds, request_id, trace_id, span_id = line
    # The gateway's route (a prefix it owns, as in its metrics), not the path asked for.
    assert (service, method, route, code) == ("api-gateway", "GET", "/api/product", 200)
    assert 0 < seconds < 10
    assert request_id == headers["X-Request-ID"] == "quote-me-1"
    (reached,) = world.reached()
    sent = reached.headers["traceparent"]
    assert sent.split("-")[1] == trace_id  # the service logs the same trace
    assert len(span_id) == 16


async def test_a_refusal_is_logged_under_its_route_or_as_unmatched(
    world: World, access_lines: list[AccessEntry]
) -> None:
    status, headers, _ = await call(world, "GET", "/no/such/thing/42")
    assert status == 404
    (line,) = access_lines
    assert line[2:5] == ("GET", "unmatched", 404)
    assert line[6] == headers["X-Request-ID"]
