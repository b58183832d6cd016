"""Access-token verification: pinned algorithm, issuer, audience, expiry, key rotation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.platform.tokens import FetchedJwks, InvalidToken, JwksVerifier, KeysUnavailable
from shop.platform.tokens import Jwks as JwksAnswer

ISSUER, AUDIENCE = "shop-auth", "shop"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def _token(key: Any, *, kid: str = "k1", alg: str = "RS256", **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": "42",
        "email": "ada@example.com",
        "roles": ["customer"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        **overrides,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


class Jwks:
    """A JWKS source that counts how often it is asked."""

    def __init__(self, *keys: Mapping[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0

    async def __call__(self) -> Mapping[str, Any]:
        self.fetches += 1
        return {"keys": self.keys}


KEY = _key()


def _verifier(jwks: Jwks, refetch_s: float = 10.0) -> JwksVerifier:
    return JwksVerifier(
        fetch_jwks=jwks, issuer=ISSUER, audience=AUDIENCE, min_refetch_interval_s=refetch_s
    )


async def test_valid_token_gives_principal_and_keys_are_fetched_once() -> None:
    jwks = Jwks(_jwk(KEY, "k1"))
    verifier = _verifier(jwks)
    for _ in range(3):
        principal = await verifier.verify(_token(KEY))
    assert principal.user_id == "42" and principal.roles == {"customer"}
    assert jwks.fetches == 1


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(time.time()) - 60},
        {"aud": "someone-else"},
        {"iss": "evil"},
        {"roles": "admin"},
    ],
    ids=["expired", "audience", "issuer", "roles-not-a-list"],
)
async def test_bad_claims_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        await _verifier(Jwks(_jwk(KEY, "k1"))).verify(_token(KEY, **claims))


async def test_symmetric_and_none_algorithms_are_refused() -> None:
    verifier = _verifier(Jwks(_jwk(KEY, "k1")))
    public_pem = jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())
    unsigned = _token(None, alg="none")
    with pytest.raises(InvalidToken):
        await verifier.verify(unsigned)
    with pytest.raises(InvalidToken):
        await verifier.verify(_token(public_pem.encode() * 2, alg="HS256"))


async def test_unknown_kid_refetches_once_then_accepts_the_rotated_key() -> None:
    jwks = Jwks(_jwk(KEY, "k1"))
    verifier = _verifier(jwks, refetch_s=0.0)
    await verifier.verify(_token(KEY))
    new_key = _key()
    jwks.keys.append(_jwk(new_key, "k2"))
    principal = await verifier.verify(_token(new_key, kid="k2"))
    assert principal.email == "ada@example.com" and jwks.fetches == 2


async def test_forged_kids_cannot_hammer_the_jwks_source() -> None:
    jwks = Jwks(_jwk(KEY, "k1"))
    verifier = _verifier(jwks, refetch_s=60.0)
    await verifier.verify(_token(KEY))
    for n in range(20):
        with pytest.raises(InvalidToken):
            await verifier.verify(_token(_key() if n == 0 else KEY, kid=f"forged-{n}"))
    assert jwks.fetches == 1


async def test_unreachable_jwks_is_not_reported_as_a_bad_token() -> None:
    async def down() -> Mapping[str, Any]:
        raise ConnectionError("auth-service is down")

    verifier = JwksVerifier(fetch_jwks=down, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(_token(KEY))


async def test_a_cached_token_still_expires() -> None:
    verifier = JwksVerifier(
        fetch_jwks=Jwks(_jwk(KEY, "k1")), issuer=ISSUER, audience=AUDIENCE, leeway_s=0.0
    )
    token = _token(KEY, exp=int(time.time()) + 1)
    await verifier.verify(token)
    await verifier.verify(token)
    await asyncio.sleep(1.1)
    with pytest.raises(InvalidToken):
        await verifier.verify(token)


async def test_after_a_failed_fetch_a_valid_token_is_unavailable_not_invalid() -> None:
    healthy = Jwks(_jwk(KEY, "k1"))
    calls = 0

    async def down_then_up() -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("auth-service is starting")
        return await healthy()

    verifier = JwksVerifier(
        fetch_jwks=down_then_up, issuer=ISSUER, audience=AUDIENCE, min_refetch_interval_s=60
    )
    for _ in range(2):
        with pytest.raises(KeysUnavailable):
            await verifier.verify(_token(KEY))
    assert calls == 1, "the refetch stays rate-limited while the source is down"


class Clock:
    """Monotonic time a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PublishedJwks:
    """A JWKS source answering with its publisher's max-age; its keys can be withdrawn."""

    def __init__(self, *keys: Mapping[str, Any], max_age_s: float | None) -> None:
        self.keys = list(keys)
        self.max_age_s = max_age_s
        self.down = False
        self.fetches = 0

    async def __call__(self) -> FetchedJwks:
        self.fetches += 1
        if self.down:
            raise ConnectionError("auth-service is down")
        return JwksAnswer(document={"keys": list(self.keys)}, max_age_s=self.max_age_s)


async def test_a_key_withdrawn_from_the_jwks_stops_working_within_its_max_age() -> None:
    clock, old, new = Clock(), _key(), _key()
    jwks = PublishedJwks(_jwk(old, "old"), _jwk(new, "new"), max_age_s=60)
    verifier = JwksVerifier(
        fetch_jwks=jwks, issuer=ISSUER, audience=AUDIENCE, min_refetch_interval_s=10, clock=clock
    )
    signed_by_old = _token(old, kid="old")
    await verifier.verify(signed_by_old)  # verified, and now in the token cache
    jwks.keys = [_jwk(new, "new")]  # auth withdraws the old key (it leaked)
    clock.now += 59
    await verifier.verify(signed_by_old)  # within max-age: still trusted, as published
    clock.now += 2
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(signed_by_old)
    assert await verifier.verify(_token(new, kid="new"))
    assert jwks.fetches == 2


async def test_a_jwks_that_cannot_be_refetched_keeps_its_keys_until_it_answers() -> None:
    """Stale-if-error: an auth outage logs nobody out; only an answering JWKS drops a key."""
    clock = Clock()
    jwks = PublishedJwks(_jwk(KEY, "k1"), max_age_s=30)
    verifier = JwksVerifier(
        fetch_jwks=jwks, issuer=ISSUER, audience=AUDIENCE, min_refetch_interval_s=10, clock=clock
    )
    await verifier.verify(_token(KEY, kid="k1"))
    jwks.down = True
    clock.now += 31
    assert await verifier.verify(_token(KEY, kid="k1"))
    jwks.down, jwks.keys = False, []
    clock.now += 11
    with pytest.raises(InvalidToken):
        await verifier.verify(_token(KEY, kid="k1"))


async def test_a_jwks_max_age_is_capped_and_a_missing_one_defaults() -> None:
    clock = Clock()
    forever = PublishedJwks(_jwk(KEY, "k1"), max_age_s=10**9)
    verifier = JwksVerifier(fetch_jwks=forever, issuer=ISSUER, audience=AUDIENCE, clock=clock)
    await verifier.verify(_token(KEY, kid="k1"))
    clock.now += 3601
    await verifier.verify(_token(KEY, kid="k1"))
    assert forever.fetches == 2, "a year-long max-age is held an hour at most"

    unsaid = Jwks(_jwk(KEY, "k1"))
    verifier = JwksVerifier(fetch_jwks=unsaid, issuer=ISSUER, audience=AUDIENCE, clock=clock)
    await verifier.verify(_token(KEY, kid="k1"))
    clock.now += 301
    await verifier.verify(_token(KEY, kid="k1"))
    assert unsaid.fetches == 2


async def test_service_tokens_pass_only_a_verifier_told_the_internal_audience() -> None:
    service = _token(KEY, sub="service:order-service", roles=["service"], aud="shop-internal")
    users_only = _verifier(Jwks(_jwk(KEY, "k1")))
    with pytest.raises(InvalidToken):
        await users_only.verify(service)
    both = JwksVerifier(
        fetch_jwks=Jwks(_jwk(KEY, "k1")),
        issuer=ISSUER,
        audience=AUDIENCE,
        internal_audience="shop-internal",
    )
    principal = await both.verify(service)
    assert (principal.service_name, principal.audience) == ("order-service", "shop-internal")
    user = await both.verify(_token(KEY))
    assert (user.service_name, user.audience) == (None, AUDIENCE)


# --- cached: the decision without waiting (the gateway's fast lane) ----------------------


async def test_cached_decides_only_with_keys_already_held() -> None:
    jwks = Jwks(_jwk(KEY, "k1"))
    verifier = _verifier(jwks)
    token = _token(KEY)
    assert verifier.cached(token) is None, "no keys yet: only verify may fetch them"
    assert jwks.fetches == 0
    await verifier.verify(_token(KEY))  # the keys are fetched once
    principal = verifier.cached(token)  # a token never seen, signed by a key held
    assert principal is not None and principal.user_id == "42"
    assert verifier.cached(token) == principal
    other = _key()
    assert verifier.cached(_token(other, kid="k2")) is None, "an unknown kid needs a refetch"
    assert jwks.fetches == 1


async def test_cached_steps_aside_once_the_keys_are_past_their_max_age() -> None:
    clock = Clock()
    jwks = PublishedJwks(_jwk(KEY, "k1"), max_age_s=60)
    verifier = JwksVerifier(fetch_jwks=jwks, issuer=ISSUER, audience=AUDIENCE, clock=clock)
    token = _token(KEY)
    await verifier.verify(token)
    clock.now += 59
    assert verifier.cached(token) is not None
    clock.now += 2
    assert verifier.cached(token) is None, "past max-age the JWKS is asked again first"
    assert await verifier.verify(token)
    assert verifier.cached(token) is not None
    assert jwks.fetches == 2


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(time.time()) - 60},
        {"aud": "someone-else"},
        {"roles": "admin"},
        {"sub": "service:order-service", "roles": ["service"], "aud": "shop-internal"},
    ],
    ids=["expired", "audience", "roles-not-a-list", "service-token"],
)
async def test_a_token_cached_refuses_is_refused_by_verify_with_the_same_reason(
    claims: dict[str, Any],
) -> None:
    token = _token(KEY, **claims)
    plain = _verifier(Jwks(_jwk(KEY, "k1")))
    await plain.verify(_token(KEY))
    with pytest.raises(InvalidToken) as never_cached:
        await plain.verify(token)

    verifier = _verifier(Jwks(_jwk(KEY, "k1")))
    await verifier.verify(_token(KEY))
    assert verifier.cached(token) is None
    with pytest.raises(InvalidToken) as after_cached:
        await verifier.verify(token)
    assert str(after_cached.value) == str(never_cached.value)
    # Said once: asked again, verify checks it afresh (and refuses it again).
    with pytest.raises(InvalidToken, match=str(never_cached.value)):
        await verifier.verify(token)


async def test_a_forged_signature_is_never_accepted_by_cached() -> None:
    verifier = _verifier(Jwks(_jwk(KEY, "k1")))
    await verifier.verify(_token(KEY))
    rogue = _token(_key(), kid="k1", roles=["admin"])
    assert verifier.cached(rogue) is None
    with pytest.raises(InvalidToken):
        await verifier.verify(rogue)
    assert verifier.cached(rogue) is None


async def test_a_token_accepted_by_cached_still_expires() -> None:
    verifier = JwksVerifier(
        fetch_jwks=Jwks(_jwk(KEY, "k1")), issuer=ISSUER, audience=AUDIENCE, leeway_s=0.0
    )
    await verifier.verify(_token(KEY))
    token = _token(KEY, exp=int(time.time()) + 1)
    assert verifier.cached(token) is not None
    await asyncio.sleep(1.1)
    assert verifier.cached(token) is None
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)
