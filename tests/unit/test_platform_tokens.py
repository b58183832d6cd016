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

from shop.platform.tokens import InvalidToken, JwksVerifier, KeysUnavailable

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
