"""The auth service over HTTP: the app with its real lifespan, SQLite and key files in tmp_path."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import func, select

from shop.auth.__main__ import main as auth_main
from shop.auth.app import build_app
from shop.auth.keys import new_private_key, private_pem
from shop.auth.settings import AuthSettings, UnsafeSettings
from shop.auth.store import users
from shop.platform.db import create_engine
from shop.platform.settings import PlatformSettings, SettingsRefused
from shop.platform.tokens import InvalidToken, JwksVerifier
from tests.prometheus import metric

PASSWORD = "correct horse"
IGNORED_IN_COMPARISON = {"requestId", "traceId"}


SERVICE_SECRET = "order-service's-own-secret-of-32-chars-or-more"
NOTIFICATION_SECRET = "notification's-own-secret-of-32-chars-or-more"
# The instance a service token is asked for (its base URL, as the registry lists it).
INVENTORY = "http://10.0.0.7:8083"
# Each calling service's own secret: one secret mints one name.
SERVICE_CLIENTS = json.dumps(
    {"order-service": SERVICE_SECRET, "notification-service": NOTIFICATION_SECRET}
)


def _settings(**overrides: Any) -> AuthSettings:
    return AuthSettings(_env_file=None, **{"service_clients": SERVICE_CLIENTS, **overrides})


# The production profile registers with credentials (none is contacted in these tests).
PRODUCTION_REGISTRY = (
    "http://auth-service:a-registry-secret-of-32-chars-or-more@127.0.0.1:8761/eureka"
)


def _platform(data_dir: Path, *, profile: str, service_secret: str | None) -> PlatformSettings:
    platform = PlatformSettings(data_dir=data_dir, profile=profile, service_secret=service_secret)
    if profile == "production":
        return platform.model_copy(update={"registry_url": PRODUCTION_REGISTRY})
    return platform


@asynccontextmanager
async def running(
    data_dir: Path,
    *,
    profile: str = "embedded",
    service_secret: str | None = SERVICE_SECRET,
    **overrides: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    platform = _platform(data_dir, profile=profile, service_secret=service_secret)
    app = build_app(platform=platform, settings=_settings(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            yield client


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(tmp_path) as client:
        yield client


async def _register(
    client: httpx.AsyncClient, email: str = "ada@example.com", password: str = PASSWORD
) -> dict[str, Any]:
    answer = await client.post(
        "/auth/register", json={"name": "Ada", "email": email, "password": password}
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def _log_in(
    client: httpx.AsyncClient, email: str = "ada@example.com", password: str = PASSWORD
) -> dict[str, Any]:
    answer = await client.post("/auth/token", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _without_ids(problem: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in problem.items() if k not in IGNORED_IN_COMPARISON}


async def _user_count(data_dir: Path) -> int:
    engine = create_engine(f"sqlite+aiosqlite:///{data_dir / 'auth.db'}")
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(users))).scalar_one())
    finally:
        await engine.dispose()


async def test_register_then_log_in_then_me(auth: httpx.AsyncClient) -> None:
    created = await _register(auth, email="Ada.Lovelace@Example.COM")
    assert created["email"] == "ada.lovelace@example.com"
    assert created["roles"] == ["customer"]
    tokens = await _log_in(auth, email="ADA.lovelace@example.com")
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 900
    me = await auth.get("/auth/me", headers=_bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert me.json() == created


async def test_email_is_taken_whatever_its_case(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    again = await auth.post(
        "/auth/register", json={"name": "Eve", "email": "ADA@example.com", "password": PASSWORD}
    )
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


async def test_access_token_verifies_with_the_published_jwks(auth: httpx.AsyncClient) -> None:
    user = await _register(auth)
    tokens = await _log_in(auth)

    async def fetch_jwks() -> dict[str, Any]:
        body: dict[str, Any] = (await auth.get("/auth/.well-known/jwks.json")).json()
        return body

    verifier = JwksVerifier(fetch_jwks=fetch_jwks, issuer="shop-auth", audience="shop")
    principal = await verifier.verify(tokens["access_token"])
    assert (principal.user_id, principal.email, principal.roles) == (
        user["id"],
        "ada@example.com",
        frozenset({"customer"}),
    )
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]


async def test_oauth2_password_form_logs_in(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    answer = await auth.post(
        "/auth/token",
        data={"grant_type": "password", "username": "ada@example.com", "password": PASSWORD},
    )
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    me = await auth.get("/auth/me", headers=_bearer(answer.json()["access_token"]))
    assert me.json()["email"] == "ada@example.com"
    wrong_grant = await auth.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "username": "ada@example.com", "password": "x"},
    )
    assert wrong_grant.status_code == 422
    assert "grant_type" in wrong_grant.json()["errors"]


async def test_get_token_with_basic_or_a_json_body(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    basic = await auth.get("/auth/getToken", auth=("ada@example.com", PASSWORD))
    assert basic.status_code == 200
    assert basic.json()["refresh_token"]
    body = await auth.request(
        "GET", "/auth/getToken", json={"email": "ada@example.com", "password": PASSWORD}
    )
    assert body.status_code == 200
    assert (await auth.get("/auth/me", headers=_bearer(body.json()["access_token"]))).is_success


async def test_get_token_refusals_challenge_for_basic(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    missing = await auth.get("/auth/getToken")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Basic")
    wrong = await auth.get("/auth/getToken", auth=("ada@example.com", "not the password"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Basic")
    garbled = await auth.get("/auth/getToken", headers={"Authorization": "Basic !!!"})
    assert garbled.status_code == 422
    assert "authorization" in garbled.json()["errors"]
    wrong_json = await auth.request(
        "GET", "/auth/getToken", json={"email": "ada@example.com", "password": "nope-nope"}
    )
    assert wrong_json.status_code == 401
    assert wrong_json.json()["detail"] == wrong.json()["detail"]


async def test_refresh_rotates_and_the_old_token_stops_working(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    first = await _log_in(auth)
    second = await auth.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    pair = second.json()
    assert pair["refresh_token"] != first["refresh_token"]
    assert (await auth.get("/auth/me", headers=_bearer(pair["access_token"]))).status_code == 200
    third = await auth.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert third.status_code == 200


async def test_reuse_of_a_spent_token_revokes_the_whole_family(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    stolen = (await _log_in(auth))["refresh_token"]
    other_device = (await _log_in(auth))["refresh_token"]
    owner = (await auth.post("/auth/refresh", json={"refresh_token": stolen})).json()
    newest = (
        await auth.post("/auth/refresh", json={"refresh_token": owner["refresh_token"]})
    ).json()["refresh_token"]

    replay = await auth.post("/auth/refresh", json={"refresh_token": stolen})
    assert replay.status_code == 401
    assert replay.headers["content-type"] == "application/problem+json"
    after = await auth.post("/auth/refresh", json={"refresh_token": newest})
    assert after.status_code == 401  # the owner's newest token died with the family
    elsewhere = await auth.post("/auth/refresh", json={"refresh_token": other_device})
    assert elsewhere.status_code == 200  # another login is another family


async def test_unknown_refresh_token_is_401(auth: httpx.AsyncClient) -> None:
    answer = await auth.post("/auth/refresh", json={"refresh_token": "made-up"})
    assert answer.status_code == 401


async def test_logout_needs_a_token_and_revokes_the_family(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    tokens = await _log_in(auth)
    body = {"refresh_token": tokens["refresh_token"]}
    anonymous = await auth.post("/auth/logout", json=body)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    still_good = await auth.post("/auth/refresh", json=body)
    assert still_good.status_code == 200
    current = still_good.json()
    out = await auth.post(
        "/auth/logout",
        json={"refresh_token": current["refresh_token"]},
        headers=_bearer(current["access_token"]),
    )
    assert out.status_code == 204
    refused = await auth.post("/auth/refresh", json={"refresh_token": current["refresh_token"]})
    assert refused.status_code == 401


async def test_logout_cannot_revoke_someone_elses_session(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    await _register(auth, email="eve@example.com")
    ada = await _log_in(auth)
    eve = await _log_in(auth, email="eve@example.com")
    out = await auth.post(
        "/auth/logout",
        json={"refresh_token": ada["refresh_token"]},
        headers=_bearer(eve["access_token"]),
    )
    assert out.status_code == 204
    kept = await auth.post("/auth/refresh", json={"refresh_token": ada["refresh_token"]})
    assert kept.status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-jwt", "Basic YWRhOnB3", "Bearer " + "e30.e30.", "Bearer"],
)
async def test_me_without_a_valid_token_is_401(
    auth: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    answer = await auth.get("/auth/me", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"


async def test_token_signed_by_a_stranger_key_is_401(auth: httpx.AsyncClient) -> None:
    user = await _register(auth)
    real = jwt.decode((await _log_in(auth))["access_token"], options={"verify_signature": False})
    kid = (await auth.get("/auth/.well-known/jwks.json")).json()["keys"][0]["kid"]
    forged = jwt.encode(
        {**real, "sub": user["id"], "roles": ["customer", "admin"]},
        new_private_key(),
        algorithm="RS256",
        headers={"kid": kid},
    )
    assert (await auth.get("/auth/me", headers=_bearer(forged))).status_code == 401


async def test_jwks_keeps_the_previous_key_after_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as before:
        await _register(before)
        old_token = (await _log_in(before))["access_token"]
        [old_key] = (await before.get("/auth/.well-known/jwks.json")).json()["keys"]

    monkeypatch.setenv("SHOP_DATA_DIR", str(tmp_path))
    assert auth_main(["rotate-key"]) == 0
    for key_file in (tmp_path / "auth" / "keys").glob("*.pem"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    async with running(tmp_path) as after:
        keys = (await after.get("/auth/.well-known/jwks.json")).json()["keys"]
        assert [k["kid"] for k in keys][1:] == [old_key["kid"]]
        new_kid = keys[0]["kid"]
        assert new_kid != old_key["kid"]
        for key in keys:
            assert set(key) == {"kty", "n", "e", "kid", "use", "alg"}
        assert (await after.get("/auth/me", headers=_bearer(old_token))).status_code == 200
        new_token = (await _log_in(after))["access_token"]
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid


async def test_unknown_email_and_wrong_password_answer_alike(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    wrong = await auth.post("/auth/token", json={"email": "ada@example.com", "password": "nope!"})
    unknown = await auth.post(
        "/auth/token", json={"email": "nobody@example.com", "password": "nope!"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert _without_ids(wrong.json()) == _without_ids(unknown.json())
    assert dict(wrong.headers).keys() == dict(unknown.headers).keys()


async def test_unknown_email_costs_a_password_check_too(auth: httpx.AsyncClient) -> None:
    """Timing must not reveal which emails have accounts: both paths run argon2."""
    await _register(auth)

    async def median_s(email: str) -> float:
        times = []
        for _ in range(5):
            began = time.perf_counter()
            await auth.post("/auth/token", json={"email": email, "password": "wrong-guess"})
            times.append(time.perf_counter() - began)
        return sorted(times)[2]

    known = await median_s("ada@example.com")
    unknown = await median_s("nobody@example.com")
    assert unknown > 0.4 * known


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Ada", "email": "not-an-email", "password": PASSWORD}, "email"),
        ({"name": "Ada", "email": "ada@example.com", "password": "short"}, "password"),
        ({"name": "Ada", "email": "ada@example.com"}, "password"),
        ({"email": "ada@example.com", "password": PASSWORD}, "name"),
        ({"name": "   ", "email": "ada@example.com", "password": PASSWORD}, "name"),
    ],
)
async def test_bad_registration_is_422_and_creates_nothing(
    tmp_path: Path, auth: httpx.AsyncClient, body: dict[str, str], field: str
) -> None:
    answer = await auth.post("/auth/register", json=body)
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert field in answer.json()["errors"]
    assert await _user_count(tmp_path) == 1  # the seeded admin only
    await _register(auth)  # the email is still free


NOT_TEXT = "abcdefgh\ud800"  # an unpaired surrogate: JSON can spell it, UTF-8 cannot


async def _send_json(
    client: httpx.AsyncClient, method: str, path: str, body: Any, **headers: str
) -> httpx.Response:
    # json.dumps writes the surrogate as the escape "\ud800", as a hostile client would.
    content = json.dumps(body)
    return await client.request(
        method, path, content=content, headers={"content-type": "application/json", **headers}
    )


async def test_password_that_is_not_text_is_422_and_creates_nothing(
    tmp_path: Path, auth: httpx.AsyncClient
) -> None:
    body = {"name": "Ada", "email": "ada@example.com", "password": NOT_TEXT}
    answer = await _send_json(auth, "POST", "/auth/register", body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["errors"]["password"] == "must be valid text"
    assert await _user_count(tmp_path) == 1
    await _register(auth)


async def test_strings_that_are_not_text_are_4xx_on_every_endpoint(
    auth: httpx.AsyncClient,
) -> None:
    await _register(auth)
    tokens = await _log_in(auth)
    attempts: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
        ("POST", "/auth/token", {"email": "ada@example.com", "password": NOT_TEXT}, {}),
        ("POST", "/auth/token", {"email": "nobody@example.com", "password": NOT_TEXT}, {}),
        ("POST", "/auth/token", {"email": "ada\ud800@example.com", "password": "x"}, {}),
        ("GET", "/auth/getToken", {"email": "ada@example.com", "password": NOT_TEXT}, {}),
        ("POST", "/auth/refresh", {"refresh_token": NOT_TEXT}, {}),
        (
            "POST",
            "/auth/logout",
            {"refresh_token": NOT_TEXT},
            _bearer(tokens["access_token"]),
        ),
        (
            "POST",
            "/auth/register",
            {"name": "Ada", "email": "ada\ud800@example.com", "password": PASSWORD},
            {},
        ),
    ]
    for method, path, body, headers in attempts:
        answer = await _send_json(auth, method, path, body, **headers)
        assert 400 <= answer.status_code < 500, (path, body, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    not_utf8 = base64.b64encode(b"ada@example.com:\xed\xa0\x80").decode()
    basic = await auth.get("/auth/getToken", headers={"Authorization": f"Basic {not_utf8}"})
    assert basic.status_code == 422
    # Nothing changed: the session the garbled logout named is still alive.
    again = await auth.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert again.status_code == 200


async def test_malformed_json_is_422(auth: httpx.AsyncClient) -> None:
    for path in ("/auth/register", "/auth/token", "/auth/refresh"):
        answer = await auth.post(
            path, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422, path
        assert answer.headers["content-type"] == "application/problem+json"


async def test_too_many_failures_for_an_account_from_one_client_is_429(tmp_path: Path) -> None:
    async with running(tmp_path, max_failures_per_email=3) as auth:
        await _register(auth)
        creds = {"email": "ada@example.com", "password": "wrong-guess"}
        for _ in range(3):
            assert (await auth.post("/auth/token", json=creds)).status_code == 401
        right = {"email": "ada@example.com", "password": PASSWORD}
        limited = await auth.post("/auth/token", json=right)
        assert limited.status_code == 429
        assert limited.headers["content-type"] == "application/problem+json"
        assert limited.json()["status"] == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 300
        basic = await auth.get("/auth/getToken", auth=("ADA@example.com", PASSWORD))
        assert basic.status_code == 429
        await _log_in(auth, email="admin@example.com", password="admin-password")
        # What an operator sees of it.
        assert await metric(auth, "shop_auth_logins_total", outcome="bad_credentials") == 3
        assert await metric(auth, "shop_auth_logins_total", outcome="throttled") == 2
        assert await metric(auth, "shop_auth_logins_total", outcome="success") == 1


async def test_someone_elses_failures_do_not_lock_the_owner_out(tmp_path: Path) -> None:
    async with running(tmp_path, max_failures_per_email=3) as auth:
        await _register(auth)
        attacker = {"X-Forwarded-For": "203.0.113.66"}
        for email in ("ada@example.com", "admin@example.com"):
            guess = {"email": email, "password": "wrong-guess"}
            for _ in range(5):
                await auth.post("/auth/token", json=guess, headers=attacker)
            assert (await auth.post("/auth/token", json=guess, headers=attacker)).status_code == 429
        owner = {"X-Forwarded-For": "198.51.100.20"}
        right = {"email": "ada@example.com", "password": PASSWORD}
        assert (await auth.post("/auth/token", json=right, headers=owner)).status_code == 200
        admin = {"email": "admin@example.com", "password": "admin-password"}
        assert (await auth.post("/auth/token", json=admin, headers=owner)).status_code == 200


async def test_concurrent_wrong_passwords_are_all_counted(tmp_path: Path) -> None:
    # Every guess is in flight (each waits ~25 ms for argon2 in a thread) before any fails.
    async with running(tmp_path, max_failures_per_email=6, max_failures_per_client=100) as auth:
        await _register(auth)
        guess = {"email": "ada@example.com", "password": "wrong-guess"}
        answers = await asyncio.gather(*(auth.post("/auth/token", json=guess) for _ in range(12)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [401] * 6 + [429] * 6
        right = {"email": "ada@example.com", "password": PASSWORD}
        assert (await auth.post("/auth/token", json=right)).status_code == 429


async def test_too_many_failures_from_one_client_is_429(tmp_path: Path) -> None:
    async with running(tmp_path, max_failures_per_client=3) as auth:
        await _register(auth)
        spray = {"X-Forwarded-For": "198.51.100.9"}
        for i in range(3):
            guess = {"email": f"user{i}@example.com", "password": "guess-guess"}
            assert (await auth.post("/auth/token", json=guess, headers=spray)).status_code == 401
        creds = {"email": "ada@example.com", "password": PASSWORD}
        assert (await auth.post("/auth/token", json=creds, headers=spray)).status_code == 429
        other = {"X-Forwarded-For": "198.51.100.10"}
        assert (await auth.post("/auth/token", json=creds, headers=other)).status_code == 200


async def test_behind_the_gateway_the_last_forwarded_hop_is_the_client(tmp_path: Path) -> None:
    # The test client's peer address, 127.0.0.1, is a trusted proxy (the gateway's place).
    async with running(tmp_path, max_failures_per_client=3) as auth:
        await _register(auth)
        for i in range(3):
            # Hops before the last are whatever a client wrote; they must not split its count.
            spoofed = {"X-Forwarded-For": f"10.9.9.{i}, 198.51.100.9"}
            guess = {"email": f"user{i}@example.com", "password": "guess-guess"}
            assert (await auth.post("/auth/token", json=guess, headers=spoofed)).status_code == 401
        creds = {"email": "ada@example.com", "password": PASSWORD}
        # A trusted address as the last hop is the client (the gateway's own host), not a
        # reason to look further left at hops a client wrote.
        for hops in ("10.9.9.77, 198.51.100.9", "198.51.100.9"):
            answer = await auth.post("/auth/token", json=creds, headers={"X-Forwarded-For": hops})
            assert answer.status_code == 429, hops
        local = {"X-Forwarded-For": "10.9.9.77, 127.0.0.1"}
        for i in range(3):
            guess = {"email": f"local{i}@example.com", "password": "guess-guess"}
            assert (await auth.post("/auth/token", json=guess, headers=local)).status_code == 401
        assert (await auth.post("/auth/token", json=creds)).status_code == 429
        other = {"X-Forwarded-For": "10.9.9.77"}
        assert (await auth.post("/auth/token", json=creds, headers=other)).status_code == 200


async def test_an_untrusted_peer_is_the_client_whatever_it_forwards(tmp_path: Path) -> None:
    async with running(tmp_path, max_failures_per_client=2, trusted_proxies=[]) as auth:
        await _register(auth)
        for i in range(2):
            spoofed = {"X-Forwarded-For": f"10.9.9.{i}"}
            guess = {"email": f"user{i}@example.com", "password": "guess-guess"}
            assert (await auth.post("/auth/token", json=guess, headers=spoofed)).status_code == 401
        creds = {"email": "ada@example.com", "password": PASSWORD}
        fresh = {"X-Forwarded-For": "10.9.9.200"}
        assert (await auth.post("/auth/token", json=creds, headers=fresh)).status_code == 429


async def test_dev_admin_is_created_once_across_restarts(tmp_path: Path) -> None:
    for _ in range(2):
        async with running(tmp_path) as auth:
            tokens = await _log_in(auth, email="admin@example.com", password="admin-password")
            me = (await auth.get("/auth/me", headers=_bearer(tokens["access_token"]))).json()
            assert me["roles"] == ["customer", "admin"]
    assert await _user_count(tmp_path) == 1


async def test_login_upgrades_a_hash_made_with_weaker_parameters(tmp_path: Path) -> None:
    async with running(tmp_path, argon2_time_cost=1, argon2_memory_cost_kib=8192) as auth:
        await _register(auth)
    async with running(tmp_path) as auth:
        await _log_in(auth)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    try:
        async with engine.connect() as conn:
            stored = (
                await conn.execute(
                    select(users.c.password_hash).where(users.c.email == "ada@example.com")
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert "m=19456,t=2,p=1" in stored


def _production(
    tmp_path: Path, *, service_secret: str | None = SERVICE_SECRET, **overrides: Any
) -> None:
    build_app(
        platform=_platform(tmp_path, profile="production", service_secret=service_secret),
        settings=_settings(
            **{"login_throttle_storage_url": "redis://127.0.0.1:6379/0", **overrides}
        ),
    )


@pytest.mark.parametrize(
    ("clients", "refusal"),
    [
        ("", "the production profile needs AUTH_SERVICE_CLIENTS"),
        ('{"order-service": "too-short"}', "the secret of order-service is shorter than 32"),
        ('{"Order Service": "' + "s" * 32 + '"}', "'Order Service' is not a service name"),
    ],
)
def test_production_refuses_to_start_without_a_strong_client_table(
    tmp_path: Path, clients: str, refusal: str
) -> None:
    pem = private_pem(new_private_key()).decode()
    with pytest.raises(SettingsRefused, match=refusal):
        _production(
            tmp_path, service_clients=clients, signing_key=pem, admin_password="a-strong-secret"
        )


async def test_a_service_with_its_own_secret_gets_a_token_naming_it_for_internal_use(
    auth: httpx.AsyncClient,
) -> None:
    answer = await auth.post(
        "/internal/service-token",
        json={"service": "order-service", "secret": SERVICE_SECRET, "target": INVENTORY},
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    jwks = (await auth.get("/auth/.well-known/jwks.json")).json()
    internal = JwksVerifier(
        fetch_jwks=_constant(jwks),
        issuer="shop-auth",
        audience="shop",
        internal_audience="shop-internal",
    )
    principal = await internal.verify(token)
    assert principal.service_name == "order-service"
    assert principal.audience == "shop-internal"
    assert principal.roles == {"service"}
    assert principal.target == INVENTORY, "usable at the instance it was asked for only"
    users_only = JwksVerifier(fetch_jwks=_constant(jwks), issuer="shop-auth", audience="shop")
    with pytest.raises(InvalidToken):
        await users_only.verify(token)
    me = await auth.get("/auth/me", headers=_bearer(token))
    assert me.status_code == 401, "a service token is nobody's login"


@pytest.mark.parametrize(
    ("service", "secret"),
    [
        # One service's secret mints that service's name only.
        ("inventory-service", SERVICE_SECRET),
        ("notification-service", SERVICE_SECRET),
        ("order-service", NOTIFICATION_SECRET),
        ("auth-service", SERVICE_SECRET),
    ],
)
async def test_a_secret_mints_no_other_services_name(
    auth: httpx.AsyncClient, service: str, secret: str
) -> None:
    answer = await auth.post(
        "/internal/service-token", json={"service": service, "secret": secret, "target": INVENTORY}
    )
    assert answer.status_code == 401
    assert answer.json()["detail"] == "Unknown service credentials."


async def test_the_jwks_says_how_long_it_may_be_kept(tmp_path: Path) -> None:
    async with running(tmp_path) as auth:
        default = await auth.get("/auth/.well-known/jwks.json")
    async with running(tmp_path, jwks_max_age_s=30) as auth:
        shorter = await auth.get("/auth/.well-known/jwks.json")
    assert default.headers["cache-control"] == "public, max-age=300"
    assert shorter.headers["cache-control"] == "public, max-age=30"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"service": "order-service", "secret": "wrong", "target": INVENTORY}, 401),
        ({"service": "order-service", "target": INVENTORY}, 422),
        ({"service": "Order Service!", "secret": SERVICE_SECRET, "target": INVENTORY}, 422),
        ({"service": "order-service", "secret": "", "target": INVENTORY}, 422),
        # A token is for one instance: its base URL, nothing vaguer or more.
        ({"service": "order-service", "secret": SERVICE_SECRET}, 422),
        ({"service": "order-service", "secret": SERVICE_SECRET, "target": "*"}, 422),
        ({"service": "order-service", "secret": SERVICE_SECRET, "target": "http://a:1/x"}, 422),
        ({"service": "order-service", "secret": SERVICE_SECRET, "target": "ftp://a:21"}, 422),
        ({"service": "order-service", "secret": SERVICE_SECRET, "target": "http://u@a:1"}, 422),
    ],
)
async def test_service_tokens_need_the_secret_a_sane_name_and_one_target(
    auth: httpx.AsyncClient, body: dict[str, str], status: int
) -> None:
    answer = await auth.post("/internal/service-token", json=body)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    if status == 401:
        assert answer.json()["detail"] == "Unknown service credentials."


async def test_without_a_client_table_no_service_token_is_issued(tmp_path: Path) -> None:
    async with running(tmp_path, service_clients="") as auth:
        answer = await auth.post(
            "/internal/service-token",
            json={"service": "order-service", "secret": "anything", "target": INVENTORY},
        )
    assert answer.status_code == 401


def _constant(jwks: dict[str, Any]) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    async def fetch() -> Mapping[str, Any]:
        return jwks

    return fetch


def test_production_refuses_to_start_without_a_signing_key(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSettings, match="AUTH_SIGNING_KEY"):
        _production(tmp_path, admin_password="a-strong-secret")
    assert not (tmp_path / "auth" / "keys").exists()  # it did not quietly make one either


def test_production_refuses_to_count_failed_log_ins_in_one_process(tmp_path: Path) -> None:
    """Checked with the stores, before anything else (``python -m shop.auth``'s one line is
    in test_production_profile.py)."""
    platform = _platform(tmp_path, profile="production", service_secret=SERVICE_SECRET)
    settings = _settings(login_throttle_storage_url="")
    with pytest.raises(SettingsRefused, match="needs AUTH_LOGIN_THROTTLE_STORAGE_URL=redis://"):
        settings.check_stores(platform)


def test_production_refuses_the_dev_admin_password(tmp_path: Path) -> None:
    pem = private_pem(new_private_key()).decode()
    with pytest.raises(UnsafeSettings, match="default admin password"):
        _production(tmp_path, signing_key=pem)


def test_production_refuses_an_unusable_key_file(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSettings, match="cannot read key file"):
        _production(
            tmp_path, signing_key_file=tmp_path / "missing.pem", admin_password="a-strong-secret"
        )


async def test_production_signs_with_the_configured_key(tmp_path: Path) -> None:
    current, previous = new_private_key(), new_private_key()
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(private_pem(current))
    async with running(
        tmp_path,
        profile="production",
        signing_key_file=key_file,
        previous_signing_keys=private_pem(previous).decode(),
        admin_password="",
        login_throttle_storage_url="redis://127.0.0.1:6379/0",
        login_throttle_key_prefix=f"test-auth-{secrets.token_hex(4)}",
    ) as auth:
        assert (
            await auth.post("/auth/token", json={"email": "admin@example.com", "password": "x"})
        ).status_code == 401  # no admin when its password is empty
        await _register(auth)
        token = (await _log_in(auth))["access_token"]
        keys = (await auth.get("/auth/.well-known/jwks.json")).json()["keys"]
        assert len(keys) == 2
        assert jwt.get_unverified_header(token)["kid"] == keys[0]["kid"]
        claims = jwt.decode(token, current.public_key(), algorithms=["RS256"], audience="shop")
        assert claims["iss"] == "shop-auth"
    assert not (tmp_path / "auth" / "keys").exists()


async def test_openapi_shows_the_routes_and_their_models(auth: httpx.AsyncClient) -> None:
    spec = (await auth.get("/openapi.json")).json()
    for path in (
        "/auth/register",
        "/auth/token",
        "/auth/getToken",
        "/auth/refresh",
        "/auth/logout",
        "/auth/me",
        "/auth/.well-known/jwks.json",
    ):
        assert path in spec["paths"], path
    token_body = spec["paths"]["/auth/token"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-www-form-urlencoded"} <= set(token_body)
    assert {"RegisterRequest", "UserView", "TokenView"} <= set(spec["components"]["schemas"])
    assert (await auth.get("/docs")).status_code == 200


async def test_readiness_checks_the_database(auth: httpx.AsyncClient) -> None:
    answer = await auth.get("/health/ready")
    assert answer.status_code == 200
    assert answer.json()["checks"]["database"] == "UP"


def test_an_admin_password_breaking_the_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSettings, match="AUTH_ADMIN_PASSWORD must be at least 8"):
        build_app(
            platform=PlatformSettings(data_dir=tmp_path), settings=_settings(admin_password="short")
        )


async def test_basic_credentials_follow_the_json_log_in_rules(auth: httpx.AsyncClient) -> None:
    await _register(auth)
    too_long = "x" * 257
    for email, password in (("", PASSWORD), ("ada@example.com", ""), ("a@b.c", too_long)):
        basic = await auth.get("/auth/getToken", auth=(email, password))
        as_json = await auth.request(
            "GET", "/auth/getToken", json={"email": email, "password": password}
        )
        assert basic.status_code == as_json.status_code == 422, (email, basic.text)
        field = "email" if not email else "password"
        assert f"authorization.{field}" in basic.json()["errors"]
        assert field in as_json.json()["errors"]
    wrong = await auth.get("/auth/getToken", auth=("ada@example.com", "not the password"))
    assert wrong.status_code == 401


@pytest.mark.parametrize("char", ["\x00", "\u202e", "\u2066"], ids=["NUL", "RLO", "LRI"])
async def test_a_name_that_hides_or_reorders_text_is_422_and_creates_nothing(
    tmp_path: Path, auth: httpx.AsyncClient, char: str
) -> None:
    body = {"name": f"Ada{char}nimda", "email": "ada@example.com", "password": PASSWORD}
    refused = await auth.post("/auth/register", json=body)
    assert refused.status_code == 422, refused.text
    assert "name" in refused.json()["errors"]
    assert await _user_count(tmp_path) == 1  # the seeded admin only
