"""Run one service process: check its settings, bind the port (0 = any free one), then serve
and register it."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from shop.platform.settings import PlatformSettings, ServiceSettings, SettingsRefused, load_settings

__all__ = ["EXIT_REFUSED", "bind_socket", "configure_logging", "main", "run", "serve"]

# What a process that refuses its settings exits with (before it binds a port).
EXIT_REFUSED = 2

S = TypeVar("S", bound=ServiceSettings)
S_contra = TypeVar("S_contra", bound=ServiceSettings, contravariant=True)


class AppBuilder(Protocol[S_contra]):
    def __call__(self, *, platform: PlatformSettings, settings: S_contra) -> Starlette: ...


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        force=True,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(
    app: ASGIApp,
    *,
    name: str,
    sock: socket.socket,
    log_level: str = "INFO",
    proxy_headers: bool = True,
) -> None:
    """Serve on an already bound socket until SIGINT/SIGTERM; announce the real port.

    The launcher reads the ``listening on`` line to learn the port a service got.
    ``proxy_headers=False`` for the edge (the gateway): there ``X-Forwarded-For`` comes from
    the caller and must not become the client address.
    """
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        proxy_headers=proxy_headers,
        log_level=log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        date_header=False,
        log_config=None,
    )
    server = uvicorn.Server(config)
    logging.getLogger("shop").info("%s listening on http://%s:%d", name, host, port)
    server.run(sockets=[sock])


def run(
    app: Starlette,
    *,
    name: str,
    host: str,
    port: int,
    log_level: str = "INFO",
    proxy_headers: bool = True,
) -> None:
    """Bind ``host:port`` (0 = any free port), tell the app the port it got, serve it."""
    sock = bind_socket(host, port)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name=name, sock=sock, log_level=log_level, proxy_headers=proxy_headers)


def main(
    *,
    name: str,
    settings: type[S],
    build_app: AppBuilder[S],
    proxy_headers: bool = True,
    preflight: Callable[[PlatformSettings, S], None] | None = None,
) -> int:
    """A service process from start to end: every setting checked before anything is opened or
    bound — a refusal is one line on stderr and exit code 2 — then serve until SIGTERM.

    ``preflight`` is for refusals that need a look outside the settings (auth's stored admin).
    """
    try:
        platform, loaded = load_settings(settings)
        if preflight is not None:
            preflight(platform, loaded)
        configure_logging(platform.log_level)
        app = build_app(platform=platform, settings=loaded)
    except SettingsRefused as exc:
        print(f"{name} refuses to start: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    run(
        app,
        name=name,
        host=loaded.host,
        port=loaded.port,
        log_level=platform.log_level,
        proxy_headers=proxy_headers,
    )
    return 0
