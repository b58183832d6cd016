"""The log-in throttle shared through Redis: the in-memory rules, held across instances.

Against the Redis at 127.0.0.1:6379 (skipped without it, a failure under SHOP_REQUIRE_ALL=1),
each test under a key prefix of its own, deleted afterwards."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from shop.auth.domain import TooManyAttempts
from shop.auth.settings import AuthSettings
from shop.auth.throttle import Attempt, SharedLoginThrottle, redis_client
from shop.platform.settings import SettingsRefused, load_settings
from tests.support import free_port, require_or_skip

REDIS_URL = "redis://127.0.0.1:6379/0"
ADA, BOB, CAROL = "ada@x.io", "bob@x.io", "carol@x.io"
ATTACKER, OWNER = "203.0.113.66", "198.51.100.20"

Make = Callable[..., SharedLoginThrottle]


def _require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        require_or_skip(f"no Redis at {REDIS_URL}")


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Builds throttles (each an auth instance, with its own Redis client) sharing one fresh
    key prefix; the prefix's keys are deleted at the end."""
    prefix = f"test-auth-{uuid.uuid4().hex}"
    made: list[SharedLoginThrottle] = []

    def build(
        *,
        per_pair: int = 5,
        per_client: int = 20,
        window_s: float = 60.0,
        url: str = REDIS_URL,
        fallbacks: Counter | None = None,
        retry_every_s: float = 1.0,
    ) -> SharedLoginThrottle:
        if url == REDIS_URL:
            _require_redis()
        throttle = SharedLoginThrottle(
            redis_client(url),
            max_failures_per_email=per_pair,
            max_failures_per_client=per_client,
            window_s=window_s,
            key_prefix=prefix,
            fallbacks=fallbacks,
            retry_every_s=retry_every_s,
        )
        made.append(throttle)
        return throttle

    yield build
    for throttle in made:
        await throttle.aclose()
    cleaner = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        keys = list(cleaner.scan_iter(match=f"{prefix}:*"))
        if keys:
            cleaner.delete(*keys)
    except redis.ConnectionError:
        pass  # no Redis: the test used none
    finally:
        cleaner.close()


async def _refused(throttle: SharedLoginThrottle, *, email: str, client: str) -> int:
    """The Retry-After of a refused attempt (fails the test if it is admitted)."""
    with pytest.raises(TooManyAttempts) as refused:
        await throttle.admit(email=email, client=client)
    return refused.value.retry_after_s


async def test_two_instances_refuse_the_sixth_failure_whichever_it_reaches(make: Make) -> None:
    one, two = make(), make()
    for i in range(5):
        attempt = await (one, two)[i % 2].admit(email=ADA, client=ATTACKER)
        assert attempt.member is not None  # counted in Redis, not in memory
    assert await _refused(one, email=ADA, client=ATTACKER) == 60
    assert await _refused(two, email=ADA, client=ATTACKER) == 60
    # A fresh instance (a restart) knows the counts too.
    assert await _refused(make(), email=ADA, client=ATTACKER) == 60


async def test_concurrent_guesses_over_two_instances_are_all_counted(make: Make) -> None:
    one, two = make(), make()
    guesses = [(one, two)[i % 2].admit(email=ADA, client=ATTACKER) for i in range(12)]
    outcomes = await asyncio.gather(*guesses, return_exceptions=True)
    admitted = [o for o in outcomes if isinstance(o, Attempt)]
    refused = [o for o in outcomes if isinstance(o, TooManyAttempts)]
    assert (len(admitted), len(refused)) == (5, 7), outcomes


async def test_a_success_clears_its_pair_and_itself_only(make: Make) -> None:
    one, two = make(per_pair=3, per_client=6), make(per_pair=3, per_client=6)
    for _ in range(3):
        await one.admit(email=ADA, client=ATTACKER)  # someone else's failures on ada
    for _ in range(2):
        await one.admit(email=ADA, client=OWNER)
    await two.succeeded(await two.admit(email=ADA, client=OWNER))
    # The owner's pair is cleared: three more failures before a refusal, not one.
    for _ in range(3):
        await one.admit(email=ADA, client=OWNER)
    await _refused(two, email=ADA, client=OWNER)
    # The success withdrew itself but not the owner's earlier failures: 2 + 3 of 6 so far.
    await one.admit(email=BOB, client=OWNER)
    await _refused(one, email=CAROL, client=OWNER)
    # The other client's count on the same account is untouched.
    await _refused(two, email=ADA, client=ATTACKER)


async def test_a_client_locked_out_of_one_account_is_judged_apart_elsewhere(make: Make) -> None:
    one, two = make(per_pair=2, per_client=4), make(per_pair=2, per_client=4)
    for _ in range(2):
        await one.admit(email=ADA, client=ATTACKER)
    await _refused(two, email=ADA, client=ATTACKER)
    # Another account from that client, and that account from another client, are admitted.
    await two.admit(email=BOB, client=ATTACKER)
    await two.succeeded(await one.admit(email=ADA, client=OWNER))
    # The attacker's own limit over every account: 3 failures, the 4th admitted, then none.
    await one.admit(email=CAROL, client=ATTACKER)
    await _refused(two, email="dave@x.io", client=ATTACKER)


async def test_an_abandoned_attempt_is_not_counted(make: Make) -> None:
    one, two = make(per_pair=1, per_client=1), make(per_pair=1, per_client=1)
    await two.abandoned(await one.admit(email=ADA, client=ATTACKER))
    await two.admit(email=ADA, client=ATTACKER)
    await _refused(one, email=ADA, client=ATTACKER)


async def test_retry_after_is_until_the_oldest_failure_leaves_the_window(make: Make) -> None:
    one, two = make(per_pair=2, window_s=2.0), make(per_pair=2, window_s=2.0)
    await one.admit(email=ADA, client=ATTACKER)  # t = 0
    first_counted_by = time.monotonic()  # Redis scored it no later than this
    await asyncio.sleep(1.5)
    await two.admit(email=ADA, client=ATTACKER)  # t = 1.5
    # The first failure leaves within 0.5 s: 1, not the 2 the newest one would give.
    assert await _refused(one, email=ADA, client=ATTACKER) == 1
    await asyncio.sleep(max(0.0, first_counted_by + 2.05 - time.monotonic()))
    await two.admit(email=ADA, client=ATTACKER)  # t = 2.05: the first one left, room for one
    # Now the oldest is the one at t = 1.5, leaving in ~1.45 s.
    assert await _refused(one, email=ADA, client=ATTACKER) == 2


async def test_an_unreachable_redis_falls_back_to_this_process_memory(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    fallbacks = Counter("fallbacks", "attempts counted in memory", registry=registry)
    # Nothing listens on the port; retry_every_s=0: every attempt tries Redis first.
    down = make(url=f"redis://127.0.0.1:{free_port()}/0", fallbacks=fallbacks, retry_every_s=0)
    with caplog.at_level(logging.WARNING, logger="shop.auth"):
        attempts = [await down.admit(email=ADA, client=ATTACKER) for _ in range(5)]
        assert all(a.member is None for a in attempts)  # counted in memory
        assert await _refused(down, email=ADA, client=ATTACKER) == 60
        await down.succeeded(await down.admit(email=BOB, client=OWNER))
        await down.abandoned(await down.admit(email=ADA, client=OWNER))
    assert registry.get_sample_value("fallbacks_total") == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage
    assert "memory" in warnings[0].getMessage()


async def test_an_outage_ends_when_redis_answers_again(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    _require_redis()
    relay = _Relay()
    port = await relay.start()
    throttle = make(url=f"redis://127.0.0.1:{port}/0", per_pair=2, retry_every_s=0)
    with caplog.at_level(logging.INFO, logger="shop.auth"):
        assert (await throttle.admit(email=ADA, client=ATTACKER)).member is not None
        await relay.stop()
        assert (await throttle.admit(email=ADA, client=ATTACKER)).member is None
        await relay.start(port)
        # Shared again: Redis holds one failure, so one more is admitted there, then none.
        assert (await throttle.admit(email=ADA, client=ATTACKER)).member is not None
        await _refused(throttle, email=ADA, client=ATTACKER)
    await relay.stop()
    levels = [r.levelname for r in caplog.records if r.name == "shop.auth"]
    assert levels == ["WARNING", "INFO"]


class _Relay:
    """A TCP relay to the test Redis that can be cut and restored, as an outage would."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._writers |= {writer, upstream_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


# --- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://cache:6379/0", "cache:6379", "redis://", "redis://cache:port/0", "redis://cache/db"],
)
def test_a_storage_url_that_is_not_redis_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="redis://host:6379/0"):
        AuthSettings(_env_file=None, login_throttle_storage_url=url)


@pytest.mark.parametrize("url", ["redis://cache:6379/0", "rediss://:pw@cache.internal:6380/2"])
def test_redis_urls_are_accepted(url: str) -> None:
    assert AuthSettings(_env_file=None, login_throttle_storage_url=url).login_throttle_storage_url


def test_without_the_setting_the_counts_stay_in_memory() -> None:
    settings = AuthSettings(_env_file=None, login_throttle_storage_url=" ")
    assert settings.login_throttle_storage_url is None


def test_the_refusal_is_one_line_naming_the_setting_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("AUTH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AUTH_LOGIN_THROTTLE_STORAGE_URL", "redis://:s3cret@cache:63790000/0")
    with pytest.raises(SettingsRefused) as refused:
        load_settings(AuthSettings)
    message = str(refused.value)
    assert message.startswith("AUTH_LOGIN_THROTTLE_STORAGE_URL: give redis://host:6379/0")
    assert "\n" not in message
    assert "s3cret" not in message
