"""Swagger UI and ReDoc served from this process, so ``/docs`` works with no internet.

FastAPI's own pages load their scripts and styles from a CDN: on a machine without
internet ``/docs`` is a white page (issue 10). The assets come from the PyPI package
``fastapi-offline`` (MIT, kept up to date with Swagger UI 5 and ReDoc releases), served from
where it is installed: nothing is vendored into this repository. Only its files are used;
the pages are FastAPI's own (``get_swagger_ui_html``/``get_redoc_html``) pointed at them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "assets_mount", "install_offline_docs", "redoc_page", "swagger_page"]

# Under /docs, so a gateway or proxy that lets /docs through needs no second rule.
ASSETS_PATH = "/docs/assets"
# The package and folder the files come from (fastapi_offline/static/).
_ASSETS_PACKAGE = ("fastapi_offline", "static")
# The browser itself keeps the pages to this origin: ReDoc's footer links a logo on its
# makers' CDN, which is then never requested (and is hidden, see below). Inline script and
# style are FastAPI's page and the two libraries' own way of working; ReDoc searches in a
# web worker it makes from a blob.
_POLICY = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self'"
        " 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self';"
        " worker-src 'self' blob:; base-uri 'none'; frame-ancestors 'none'"
    )
}
# ReDoc's "API docs by Redocly" footer: its logo lives on a CDN, so it goes altogether.
_HIDE_REDOCLY_FOOTER = '<style>a[href^="https://redocly.com"]{display:none}</style>\n</head>'


def assets_mount() -> Mount:
    """``/docs/assets/{swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js,
    favicon.png}``, with ETag and Last-Modified so a browser asks again for 304s only."""
    return Mount(ASSETS_PATH, app=StaticFiles(packages=[_ASSETS_PACKAGE]), name="docs-assets")


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def swagger_page(
    request: Request,
    *,
    openapi_url: str,
    title: str,
    oauth2_redirect_url: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> HTMLResponse:
    """Swagger UI for ``openapi_url``, every asset from this origin."""
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=root + openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
        swagger_ui_parameters=parameters,
    )
    page.headers.update(_POLICY)
    return page


def redoc_page(request: Request, *, openapi_url: str, title: str) -> HTMLResponse:
    """ReDoc for ``openapi_url``, every asset from this origin (no Google Fonts either)."""
    root = _root(request)
    page = get_redoc_html(
        openapi_url=root + openapi_url,
        title=f"{title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )
    html = bytes(page.body).decode("utf-8").replace("</head>", _HIDE_REDOCLY_FOOTER, 1)
    return HTMLResponse(html, headers=_POLICY)


def install_offline_docs(app: FastAPI) -> None:
    """Replace the CDN pages FastAPI put at ``app.docs_url`` and ``app.redoc_url`` with
    pages whose assets this app serves under ``ASSETS_PATH``. Call it once the app is built;
    an app built with ``docs_url=None`` and ``redoc_url=None`` keeps having no docs. The
    OAuth2 redirect page FastAPI adds loads nothing from outside and stays."""
    openapi_url = app.openapi_url
    if openapi_url is None or (app.docs_url is None and app.redoc_url is None):
        return
    replaced = {app.docs_url, app.redoc_url} - {None}
    routes: list[BaseRoute] = [
        route
        for route in app.router.routes
        if not (isinstance(route, Route) and route.path in replaced)
    ]
    title = app.title

    async def swagger(request: Request) -> HTMLResponse:
        return swagger_page(
            request,
            openapi_url=openapi_url,
            title=title,
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            parameters=app.swagger_ui_parameters,
        )

    async def redoc(request: Request) -> HTMLResponse:
        return redoc_page(request, openapi_url=openapi_url, title=title)

    if app.docs_url is not None:
        routes.append(Route(app.docs_url, swagger, methods=["GET"], include_in_schema=False))
    if app.redoc_url is not None:
        routes.append(Route(app.redoc_url, redoc, methods=["GET"], include_in_schema=False))
    routes.append(assets_mount())
    app.router.routes[:] = routes
