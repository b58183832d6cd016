"""/docs and /redoc work with no internet: every asset they load comes from the app."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from shop.platform.app import create_app
from shop.platform.docs import ASSETS_PATH, install_offline_docs
from shop.platform.settings import PlatformSettings

# Every src/href of a page's <script>/<link>, and the URLs written inside its inline script.
_LOADED = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    platform = PlatformSettings(registry_url="http://127.0.0.1:9/eureka")
    app: FastAPI = create_app(name="test-service", title="Test", platform=platform)
    install_offline_docs(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def _loaded(html: str) -> list[str]:
    return [a or b for a, b in _LOADED.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_pages_load_nothing_from_another_origin(
    client: httpx.AsyncClient, page: str
) -> None:
    answer = await client.get(page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    loaded = _loaded(answer.text)
    assert loaded, answer.text
    assert all(url.startswith("/") and not url.startswith("//") for url in loaded), loaded
    for url in loaded:
        asset = await client.get(url)
        assert asset.status_code == 200, url


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "text/css"),
        ("redoc.standalone.js", "javascript"),
    ],
)
async def test_the_assets_are_served_and_revalidated_not_refetched(
    client: httpx.AsyncClient, name: str, media_type: str
) -> None:
    first = await client.get(f"{ASSETS_PATH}/{name}")
    assert first.status_code == 200 and media_type in first.headers["content-type"]
    assert len(first.content) > 10_000
    again = await client.get(
        f"{ASSETS_PATH}/{name}", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304


async def test_an_unknown_asset_is_a_404(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{ASSETS_PATH}/nothing.js")).status_code == 404


async def test_the_oauth2_redirect_page_and_the_openapi_document_stay(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/docs/oauth2-redirect")).status_code == 200
    document = (await client.get("/openapi.json")).json()
    assert "/docs" not in document["paths"] and "/redoc" not in document["paths"]


async def test_an_app_without_docs_gets_none() -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    install_offline_docs(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/docs")).status_code == 404
        assert (await c.get(f"{ASSETS_PATH}/swagger-ui.css")).status_code == 404
