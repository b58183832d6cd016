"""The lean path of platform/fastpath.py answers exactly as the FastAPI route it stands in for.

The same app is built twice, with and without the lean route, and each request is sent to
both: status, headers and problem body must match (bar the request's own ids).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from shop.platform.app import add_lean_route, create_app
from shop.platform.fastpath import LeanRequest, Reply, json_reply
from shop.platform.problems import PROBLEM_JSON, Problem, problem_response
from shop.platform.settings import PlatformSettings

LIMIT = 2_000


class Line(BaseModel):
    sku: str = Field(max_length=20)
    quantity: StrictInt = Field(gt=0)


class Basket(BaseModel):
    lines: list[Line] = Field(min_length=1)


class SoldOut(Exception):
    pass


def _answer(basket: Basket, key: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    if basket.lines[0].sku == "boom":
        raise RuntimeError("SELECT secret FROM users -- must never leak")
    if basket.lines[0].sku == "gone":
        raise SoldOut
    if basket.lines[0].sku == "refused":
        raise Problem(409, "Refused.", headers={"Retry-After": "3"})
    return {"lines": len(basket.lines), "key": key}, {"Location": "/baskets/1"}


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/baskets", status_code=201)
    async def create_basket(
        basket: Basket, key: str | None = Header(default=None, alias="Idempotency-Key")
    ) -> Any:
        body, headers = _answer(basket, key)
        return JSONResponse(body, status_code=201, headers=headers)

    return router


async def _lean_basket(request: LeanRequest) -> Reply:
    basket = request.valid(Basket)
    body, headers = _answer(basket, request.header(b"idempotency-key"))
    return json_reply(body, 201, headers)


def _app(*, lean: bool) -> FastAPI:
    platform = PlatformSettings(max_body_bytes=LIMIT, registry_url="http://127.0.0.1:9/eureka")
    app = create_app(name="test-service", title="Test", platform=platform, routers=[_router()])

    async def sold_out(_request: Any, _exc: Exception) -> Any:
        return problem_response(409, instance="/baskets", detail="Sold out.")

    app.add_exception_handler(SoldOut, sold_out)
    if lean:
        add_lean_route(app, "POST", "/baskets", _lean_basket)
    return app


@pytest.fixture
async def clients() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    lean, full = _app(lean=True), _app(lean=False)
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=lean), base_url="http://test"
        ) as lean_client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=full), base_url="http://test"
        ) as full_client,
    ):
        yield lean_client, full_client


def _seen(answer: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in answer.headers.items() if k != "x-request-id"}
    try:
        body: Any = answer.json()
    except ValueError:
        body = answer.text
    if isinstance(body, dict):
        body.pop("requestId", None)
        body.pop("traceId", None)
    return answer.status_code, headers, body


def _cases() -> Iterator[Any]:
    json_type = {"Content-Type": "application/json"}
    good = json.dumps({"lines": [{"sku": "a", "quantity": 2}]}).encode()
    yield pytest.param(good, json_type, id="good")
    yield pytest.param(good, {**json_type, "Idempotency-Key": "k-1"}, id="header")
    yield pytest.param(good, {"Content-Type": "application/vnd.x+json"}, id="plus-json")
    yield pytest.param(good, {}, id="no-content-type")
    yield pytest.param(good, {"Content-Type": "text/plain"}, id="text")
    yield pytest.param(b"", json_type, id="empty")
    yield pytest.param(b"null", json_type, id="null")
    yield pytest.param(b"[1, 2]", json_type, id="list")
    yield pytest.param(b"{}", json_type, id="missing-field")
    yield pytest.param(b'{"lines": [', json_type, id="broken-json")
    yield pytest.param(b"[" * 50_000, json_type, id="too-deep")
    yield pytest.param(b"\xff\xfe{", json_type, id="not-utf8")
    bad = {"lines": [{"sku": "x" * 21, "quantity": "2"}, {"quantity": 0}]}
    yield pytest.param(json.dumps(bad).encode(), json_type, id="field-errors")
    for sku in ("gone", "refused"):
        body = json.dumps({"lines": [{"sku": sku, "quantity": 1}]}).encode()
        yield pytest.param(body, json_type, id=sku)
    yield pytest.param(b"{}", {**json_type, "Content-Length": "x"}, id="bad-length")
    yield pytest.param(b" " * (LIMIT + 1), json_type, id="too-large")


@pytest.mark.parametrize(("body", "headers"), list(_cases()))
async def test_the_lean_route_answers_as_the_fastapi_route(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], body: bytes, headers: dict[str, str]
) -> None:
    lean, full = clients
    lean_answer = await lean.post("/baskets", content=body, headers=headers)
    full_answer = await full.post("/baskets", content=body, headers=headers)
    assert _seen(lean_answer) == _seen(full_answer)
    assert lean_answer.headers["x-request-id"]


async def test_a_streamed_body_over_the_limit_is_413(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * 1_000

    lean, _ = clients
    answer = await lean.post("/baskets", content=chunks())
    assert answer.status_code == 413
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.headers["connection"] == "close"


async def test_a_crash_is_a_500_problem_without_internals(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    lean, _ = clients
    body = {"lines": [{"sku": "boom", "quantity": 1}]}
    answer = await lean.post("/baskets", json=body, headers={"X-Request-ID": "req-42"})
    assert answer.status_code == 500
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.headers["x-request-id"] == "req-42"
    assert answer.json()["requestId"] == "req-42"
    assert "secret" not in answer.text


async def test_request_identity_is_kept_and_metrics_count_the_template(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    lean, _ = clients
    body = {"lines": [{"sku": "a", "quantity": 1}]}
    answer = await lean.post("/baskets", json=body, headers={"X-Request-ID": "req-7"})
    assert answer.status_code == 201
    assert answer.headers["x-request-id"] == "req-7"
    metrics = (await lean.get("/metrics")).text
    assert (
        'shop_http_requests_total{method="POST",route="/baskets",'
        'service="test-service",status="201"} 1.0'
    ) in metrics


async def test_other_methods_and_paths_take_the_full_stack(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    lean, full = clients
    for method, path in (("GET", "/baskets"), ("PUT", "/baskets"), ("POST", "/baskets/")):
        lean_answer = await lean.request(method, path, follow_redirects=False)
        full_answer = await full.request(method, path, follow_redirects=False)
        assert _seen(lean_answer) == _seen(full_answer)
    assert "/baskets" in (await lean.get("/openapi.json")).json()["paths"]


def test_only_a_declared_route_can_be_lean() -> None:
    app = _app(lean=False)
    with pytest.raises(ValueError, match="not a route"):
        add_lean_route(app, "POST", "/elsewhere", _lean_basket)
    with pytest.raises(ValueError, match="not a route"):
        add_lean_route(app, "DELETE", "/baskets", _lean_basket)


async def test_a_lean_get_is_given_the_raw_query_string() -> None:
    """A lean GET reads its parameters from ``LeanRequest.query``: the query string exactly
    as sent (percent-escapes and repeats kept, for the handler to parse as FastAPI would), and
    empty when there is none."""
    router = APIRouter()

    @router.get("/search")
    async def search() -> Any:  # the declared route, for the docs
        return {}

    seen: list[bytes] = []

    async def lean_search(request: LeanRequest) -> Reply:
        seen.append(request.query)
        return json_reply({"query": request.query.decode("latin-1")}, 200)

    platform = PlatformSettings(max_body_bytes=LIMIT, registry_url="http://127.0.0.1:9/eureka")
    app = create_app(name="test-service", title="Test", platform=platform, routers=[router])
    add_lean_route(app, "GET", "/search", lean_search)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        asked = await client.get("/search?q=caf%C3%A9+au+lait&page=2&page=3")
        bare = await client.get("/search")
    assert asked.status_code == bare.status_code == 200
    assert seen == [b"q=caf%C3%A9+au+lait&page=2&page=3", b""]
    assert asked.json() == {"query": "q=caf%C3%A9+au+lait&page=2&page=3"}
