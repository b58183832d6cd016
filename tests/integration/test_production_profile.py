"""The production profile fails closed: each real process refuses a bad setting at once, in one
line, with exit code 2, before it binds a port."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from shop.auth.app import passwords_from, refuse_dev_admin
from shop.auth.domain import ADMIN, CUSTOMER, User, new_user_id
from shop.auth.keys import new_private_key, private_pem
from shop.auth.settings import DEV_ADMIN_PASSWORD, AuthSettings
from shop.auth.store import SqlAuthStore
from shop.platform.db import create_engine, migrate

SECRET = "a-production-service-secret-of-32-chars"
MYSQL_PLACEHOLDER = "mysql://shop:secret@127.0.0.1:9/shop"  # never reached: refused first


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    took_s: float


async def _start(module: str, env: dict[str, str], *args: str) -> Outcome:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHOP_", "AUTH_", "ORDER_"))}
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    code = process.returncode
    assert code is not None
    return Outcome(code, out.decode(), err.decode(), time.monotonic() - started)


def _production(**env: str) -> dict[str, str]:
    return {
        "SHOP_PROFILE": "production",
        "SHOP_EVENT_BUS_URL": "kafka://127.0.0.1:9",
        "SHOP_SERVICE_SECRET": SECRET,
        "AUTH_SERVICE_CLIENTS": f'{{"order-service": "{SECRET}"}}',
        # Not contacted by these tests: every auth case is refused, or answers, before.
        "AUTH_LOGIN_THROTTLE_STORAGE_URL": "redis://127.0.0.1:6379/0",
        # Each process's own registry credential (the auth case needs one to get that far).
        "SHOP_REGISTRY_URL": f"http://auth-service:{SECRET}@127.0.0.1:9/eureka",
        "ORDER_DATABASE_URL": MYSQL_PLACEHOLDER,
        **env,
    }


CASES: list[tuple[str, dict[str, str], str]] = [
    (
        "shop.order",
        _production(ORDER_DATABASE_URL=""),
        "order-service refuses to start: the production profile needs ORDER_DATABASE_URL",
    ),
    (
        "shop.order",
        _production(ORDER_DATABASE_URL="sqlite:///orders.db"),
        "order-service refuses to start: ORDER_DATABASE_URL points at SQLite",
    ),
    (
        "shop.order",
        _production(SHOP_EVENT_BUS_URL=""),
        "order-service refuses to start: the production profile needs SHOP_EVENT_BUS_URL",
    ),
    (
        "shop.order",
        {"ORDER_DATABASE_URL": "postgres://db/shop"},
        "order-service refuses to start: ORDER_DATABASE_URL names 'postgres', which Shop cannot",
    ),
    (
        "shop.order",
        _production(),
        "order-service refuses to start: the production profile needs SHOP_AUTH_URL",
    ),
    (
        "shop.order",
        _production(SHOP_AUTH_URL="http://auth.internal:8080"),
        "order-service refuses to start: SHOP_AUTH_URL must be https on the production profile",
    ),
    (
        "shop.notification",
        _production(NOTIFICATION_DATABASE_URL=MYSQL_PLACEHOLDER, SHOP_EVENT_BUS_URL="sqlite:///e"),
        "notification-service refuses to start: SHOP_EVENT_BUS_URL points at SQLite",
    ),
    (
        "shop.gateway",
        {"SHOP_HEARTBEAT_INTERVAL_S": "0"},
        "api-gateway refuses to start: SHOP_HEARTBEAT_INTERVAL_S: Input should be greater than",
    ),
    (
        "shop.auth",
        _production(AUTH_DATABASE_URL=MYSQL_PLACEHOLDER, AUTH_LOGIN_THROTTLE_STORAGE_URL=""),
        "auth-service refuses to start: the production profile needs"
        " AUTH_LOGIN_THROTTLE_STORAGE_URL=redis://",
    ),
    (
        "shop.auth",
        _production(AUTH_DATABASE_URL=MYSQL_PLACEHOLDER),
        "auth-service refuses to start: the production profile needs a signing key",
    ),
    (
        "shop.auth",
        _production(AUTH_DATABASE_URL=MYSQL_PLACEHOLDER, AUTH_SIGNING_KEY="pem"),
        "auth-service refuses to start: the production profile refuses the default admin password",
    ),
]


async def test_every_process_refuses_a_bad_setting_in_one_line_before_binding() -> None:
    outcomes = await asyncio.gather(*(_start(module, env) for module, env, _ in CASES))
    for (module, _, expected), outcome in zip(CASES, outcomes, strict=True):
        assert outcome.code == 2, (module, outcome)
        assert outcome.stderr.startswith(expected), (module, outcome.stderr)
        assert outcome.stderr.count("\n") == 1, "one line, no traceback"
        assert "listening on" not in outcome.stdout, "refused before binding a port"


async def test_an_admin_account_that_still_has_the_dev_password_is_refused_until_changed(
    make_mysql_url: Callable[[], str],
) -> None:
    """A database first used on the embedded profile keeps its admin: production refuses to
    serve while that account opens with the published dev password."""
    url = make_mysql_url()
    engine = create_engine(url)
    settings = AuthSettings(_env_file=None)
    passwords = passwords_from(settings)
    try:
        await migrate(engine, package="shop.auth", service="auth")
        store = SqlAuthStore(engine)
        admin = User(
            id=new_user_id(), name="Admin", email="admin@example.com", roles=(CUSTOMER, ADMIN)
        )
        await store.add_user(
            admin, password_hash=await passwords.hash(DEV_ADMIN_PASSWORD), now=datetime.now(UTC)
        )
        env = _production(
            AUTH_DATABASE_URL=url,
            AUTH_SIGNING_KEY=private_pem(new_private_key()).decode(),
            AUTH_ADMIN_PASSWORD="the-real-admin-secret",
        )
        refused = await _start("shop.auth", env)
        assert refused.code == 2
        assert refused.stderr == (
            "auth-service refuses to start: the admin account admin@example.com still has the"
            " dev password; give it the one in AUTH_ADMIN_PASSWORD with"
            " `python -m shop.auth set-admin-password`\n"
        )
        assert "listening on" not in refused.stdout

        changed = await _start("shop.auth", env, "set-admin-password")
        assert changed.code == 0, changed
        await refuse_dev_admin(store, passwords, email="admin@example.com")  # no longer raises
        found = await store.credentials("admin@example.com")
        assert found is not None
        assert await passwords.verify(found.password_hash, "the-real-admin-secret")
    finally:
        await engine.dispose()


@pytest.mark.parametrize("password", ["", DEV_ADMIN_PASSWORD])
async def test_set_admin_password_needs_a_new_password(password: str) -> None:
    outcome = await _start("shop.auth", {"AUTH_ADMIN_PASSWORD": password}, "set-admin-password")
    assert outcome.code == 2 and "AUTH_ADMIN_PASSWORD" in outcome.stderr
