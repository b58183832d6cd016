"""The one pooled aiohttp client of a process, opened and closed in the app's lifespan."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

__all__ = ["http_session"]


@asynccontextmanager
async def http_session(
    *,
    limit: int = 200,
    total_timeout_s: float = 10.0,
    decompress: bool = True,
    ca_file: Path | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """``ca_file``: the CA that signs the https peers (SHOP_TLS_CAFILE); the system's otherwise."""
    connector = aiohttp.TCPConnector(
        ssl=ssl.create_default_context(cafile=ca_file) if ca_file is not None else True,
        limit=limit,
        limit_per_host=limit,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=total_timeout_s, connect=2.0),
        auto_decompress=decompress,
        raise_for_status=False,
        # Cookies are the callers' business, never shared between them.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        yield session
    finally:
        await session.close()
