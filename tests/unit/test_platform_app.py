"""The outside every service shares: health, metrics, request ids, problem+json errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from shop.platform.app import create_app
from shop.platform.problems import PROBLEM_JSON, Problem
from shop.platform.settings import PlatformSettings


class Widget(BaseModel):
    name: str = Field(min_length=1)
    quantity: int = Field(gt=0)


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/widgets", status_code=201)
    async def create_widget(widget: Widget) -> Widget:
        return widget

    @router.get("/widgets/{name}")
    async def get_widget(name: str) -> Widget:
        raise Problem(404, f"No widget named {name}.")

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("SELECT secret FROM users -- must never leak")

    return router


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    platform = PlatformSettings(max_body_bytes=200_000, registry_url="http://127.0.0.1:9/eureka")
    app: FastAPI = create_app(
        name="test-service", title="Test", platform=platform, routers=[_router()]
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def test_live_and_ready_answer_up(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    ready = await client.get("/health/ready")
    assert live.status_code == 200 and live.json() == {"status": "UP"}
    assert ready.status_code == 200 and ready.json()["status"] == "UP"


async def test_every_answer_has_a_request_id_and_a_sane_one_is_kept(
    client: httpx.AsyncClient,
) -> None:
    fresh = await client.get("/health/live")
    kept = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    replaced = await client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert len(fresh.headers["x-request-id"]) == 32
    assert kept.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"] != "bad id\twith spaces"


async def test_validation_error_is_422_problem_with_field_errors(
    client: httpx.AsyncClient,
) -> None:
    resp = await client.post("/widgets", json={"name": "", "quantity": 0})
    body = resp.json()
    assert resp.status_code == 422
    assert resp.headers["content-type"] == PROBLEM_JSON
    assert set(body["errors"]) == {"name", "quantity"}
    assert body["requestId"] == resp.headers["x-request-id"]
    assert body["instance"] == "/widgets"


@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000, b'{"a":' * 5_000])
async def test_malformed_json_is_422_not_500(client: httpx.AsyncClient, body: bytes) -> None:
    resp = await client.post("/widgets", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["errors"] == {"body": "is not valid JSON"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/widgets", 405), ("GET", "/widgets/zed", 404)],
)
async def test_routing_errors_are_problems(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    resp = await client.request(method, path)
    assert resp.status_code == status
    assert resp.headers["content-type"] == PROBLEM_JSON
    assert resp.json()["status"] == status


async def test_oversized_body_is_413_declared_or_streamed(client: httpx.AsyncClient) -> None:
    big = b'{"name": "' + b"x" * 250_000 + b'", "quantity": 1}'
    declared = await client.post(
        "/widgets", content=big, headers={"content-type": "application/json"}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * 60_000

    streamed = await client.post(
        "/widgets", content=chunks(), headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413 and declared.headers["content-type"] == PROBLEM_JSON
    assert streamed.status_code == 413 and streamed.headers["content-type"] == PROBLEM_JSON


async def test_crash_is_500_problem_without_internals(client: httpx.AsyncClient) -> None:
    resp = await client.get(
        "/boom", headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    )
    assert resp.status_code == 500
    assert resp.headers["content-type"] == PROBLEM_JSON
    assert "SELECT" not in resp.text and "RuntimeError" not in resp.text
    assert resp.json()["traceId"] == "a" * 32
    assert resp.json()["requestId"] == resp.headers["x-request-id"]


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/widgets/one")
    await client.get("/widgets/two")
    text = (await client.get("/metrics")).text
    assert 'route="/widgets/{name}"' in text
    assert "/widgets/one" not in text


async def test_head_is_get_without_the_body(client: httpx.AsyncClient) -> None:
    get = await client.get("/health/live")
    head = await client.head("/health/live")
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    missing = await client.head("/widgets/nope")
    assert missing.status_code == 404 and missing.content == b""
    refused = await client.head("/widgets")  # POST only: HEAD is as refused as GET
    assert refused.status_code == 405


async def test_the_document_says_errors_are_problems(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    invalid = document["paths"]["/widgets"]["post"]["responses"]["422"]
    assert invalid["content"] == {
        PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    schemas = document["components"]["schemas"]
    assert "Problem" in schemas and "HTTPValidationError" not in schemas
