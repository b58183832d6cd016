"""Auth instances counting failed log-ins in one Redis: over HTTP, with the real lifespan.

Against the Redis at 127.0.0.1:6379 (skipped without it, a failure under SHOP_REQUIRE_ALL=1),
under a key prefix of each test's own, deleted afterwards."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shop.auth.__main__ import main as auth_main
from shop.auth.app import build_app
from shop.auth.settings import AuthSettings
from shop.platform.settings import PlatformSettings
from tests.prometheus import metric
from tests.support import free_port, require_or_skip

REDIS_URL = "redis://127.0.0.1:6379/0"
PASSWORD = "correct horse"
ATTACKER = {"X-Forwarded-For": "203.0.113.66"}
OWNER = {"X-Forwarded-For": "198.51.100.20"}
WRONG = {"email": "ada@example.com", "password": "wrong-guess"}
RIGHT = {"email": "ada@example.com", "password": PASSWORD}


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix on the test Redis; its keys are deleted afterwards."""
    server = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        server.ping()
    except redis.ConnectionError:
        require_or_skip(f"no Redis at {REDIS_URL}")
    prefix = f"test-auth-{uuid.uuid4().hex}"
    yield prefix
    keys = list(server.scan_iter(match=f"{prefix}:*"))
    if keys:
        server.delete(*keys)
    server.close()


@asynccontextmanager
async def running(data_dir: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """One auth instance (embedded profile, its SQLite under ``data_dir``)."""
    settings = AuthSettings(_env_file=None, **overrides)
    app = build_app(platform=PlatformSettings(data_dir=data_dir), settings=settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            yield client


@asynccontextmanager
async def instances(
    data_dir: Path, count: int, **overrides: Any
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` auth instances sharing one database (as replicas do) and ``overrides``."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running(data_dir, **overrides)) for _ in range(count)
        ]


async def _register(auth: httpx.AsyncClient) -> None:
    body = {"name": "Ada", "email": RIGHT["email"], "password": PASSWORD}
    assert (await auth.post("/auth/register", json=body)).status_code == 201


async def test_instances_sharing_redis_share_one_budget(tmp_path: Path, prefix: str) -> None:
    shared = {"login_throttle_storage_url": REDIS_URL, "login_throttle_key_prefix": prefix}
    async with instances(tmp_path, 2, **shared) as (one, two):
        await _register(one)
        # 12 concurrent wrong guesses, spread over both: 5 are judged, the other 7 refused.
        spread = itertools.cycle((one, two))
        answers = await asyncio.gather(
            *(next(spread).post("/auth/token", json=WRONG, headers=ATTACKER) for _ in range(12))
        )
        assert sorted(a.status_code for a in answers) == [401] * 5 + [429] * 7
        assert all(
            1 <= int(a.headers["retry-after"]) <= 300 for a in answers if a.status_code == 429
        )
        judged = [
            await metric(i, "shop_auth_logins_total", outcome="bad_credentials") for i in (one, two)
        ]
        assert sum(v or 0 for v in judged) == 5  # counted where each guess was judged
        # Whichever instance it reaches, the right password from that client is refused too...
        for auth in (one, two):
            assert (await auth.post("/auth/token", json=RIGHT, headers=ATTACKER)).status_code == 429
        # ...and accepted from the owner's.
        assert (await two.post("/auth/token", json=RIGHT, headers=OWNER)).status_code == 200
    # A restarted instance still knows the counts.
    async with running(tmp_path, **shared) as again:
        assert (await again.post("/auth/token", json=WRONG, headers=ATTACKER)).status_code == 429
        assert await metric(again, "shop_auth_login_throttle_fallbacks_total") == 0


async def test_an_unreachable_redis_still_throttles_and_never_answers_5xx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed_port = free_port()  # nothing listens there
    settings = {"login_throttle_storage_url": f"redis://127.0.0.1:{closed_port}/0"}
    async with running(tmp_path, **settings) as auth:
        await _register(auth)
        codes = [
            (await auth.post("/auth/token", json=WRONG, headers=ATTACKER)).status_code
            for _ in range(6)
        ]
        assert codes == [401] * 5 + [429]
        assert (await auth.post("/auth/token", json=RIGHT, headers=OWNER)).status_code == 200
        assert await metric(auth, "shop_auth_login_throttle_fallbacks_total") == 7
    outage = [r for r in caplog.records if r.name == "shop.auth" and r.levelname == "WARNING"]
    assert len(outage) == 1


def test_a_storage_url_auth_cannot_use_stops_it_at_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith(("AUTH_", "SHOP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTH_LOGIN_THROTTLE_STORAGE_URL", "memory://")
    assert auth_main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        "auth-service refuses to start: AUTH_LOGIN_THROTTLE_STORAGE_URL: give redis://host:6379/0"
    ), err


def test_the_key_prefix_is_never_empty() -> None:
    with pytest.raises(ValueError, match="login_throttle_key_prefix"):
        AuthSettings(_env_file=None, login_throttle_key_prefix="")
    assert AuthSettings(_env_file=None).login_throttle_key_prefix == "shop-auth-login"
