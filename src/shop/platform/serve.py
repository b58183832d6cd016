"""Run one service process: bind the port (0 = any free one), then serve and register it."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

__all__ = ["bind_socket", "configure_logging", "run", "serve"]


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
