"""Signing keys: parsed once, named by thumbprint, 0600 files, rotated with a JWKS overlap."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shop.auth.keys import (
    KeyProblem,
    add_key_file,
    keyring_from_dir,
    keyring_from_pems,
    load_or_create_keyring,
    new_private_key,
    private_pem,
)
from shop.platform.tokens import InvalidToken

ISSUER, AUDIENCE = "shop-auth", "shop"


def _claims() -> dict[str, object]:
    now = int(time.time())
    return {
        "sub": "u-1",
        "email": "a@x.io",
        "roles": ["customer"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 60,
        "jti": "j",
    }


@pytest.fixture(scope="module")
def pems() -> list[bytes]:
    return [private_pem(new_private_key()) for _ in range(3)]


def test_first_start_makes_a_private_0600_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = load_or_create_keyring(directory, key_size=2048, keep_previous=1)
    again = load_or_create_keyring(directory, key_size=2048, keep_previous=1)
    assert first.current.kid == again.current.kid
    [file] = directory.glob("*.pem")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_rotation_signs_with_the_new_key_and_still_accepts_the_previous(tmp_path: Path) -> None:
    old = load_or_create_keyring(tmp_path, key_size=2048, keep_previous=1)
    old_token = old.sign(_claims())
    add_key_file(tmp_path)
    new = keyring_from_dir(tmp_path, keep_previous=1)
    assert new.current.kid != old.current.kid
    assert [k["kid"] for k in new.jwks["keys"]] == [new.current.kid, old.current.kid]
    assert new.verify(old_token, issuer=ISSUER, audience=AUDIENCE)["sub"] == "u-1"
    assert jwt.get_unverified_header(new.sign(_claims()))["kid"] == new.current.kid


def test_only_the_configured_number_of_previous_keys_is_published(tmp_path: Path) -> None:
    oldest = load_or_create_keyring(tmp_path, key_size=2048, keep_previous=1)
    token = oldest.sign(_claims())
    add_key_file(tmp_path)
    add_key_file(tmp_path)
    keyring = keyring_from_dir(tmp_path, keep_previous=1)
    assert len(keyring.jwks["keys"]) == 2
    with pytest.raises(InvalidToken, match="unknown signing key"):
        keyring.verify(token, issuer=ISSUER, audience=AUDIENCE)


def test_jwks_publishes_public_parts_only(pems: list[bytes]) -> None:
    keyring = keyring_from_pems(pems[0], pems[1])
    for jwk in keyring.jwks["keys"]:
        assert set(jwk) == {"kty", "n", "e", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["use"], jwk["alg"]) == ("RSA", "sig", "RS256")


def test_kid_is_the_rfc7638_thumbprint_so_instances_agree(pems: list[bytes]) -> None:
    a = keyring_from_pems(pems[0])
    b = keyring_from_pems(pems[0])
    assert a.current.kid == b.current.kid
    expected = jwt.PyJWK(dict(a.jwks["keys"][0])).key  # the JWK round-trips to the same key
    assert expected.public_numbers() == a.current.private.public_key().public_numbers()


def test_previous_keys_may_be_given_as_public_pems(pems: list[bytes]) -> None:
    old = keyring_from_pems(pems[1])
    public = (
        serialization.load_pem_private_key(pems[1], None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    keyring = keyring_from_pems(pems[0], public + b"\n" + pems[2])
    assert len(keyring.jwks["keys"]) == 3
    token = old.sign(_claims())
    assert keyring.verify(token, issuer=ISSUER, audience=AUDIENCE)["jti"] == "j"


def test_tokens_not_signed_rs256_by_a_known_key_are_refused(pems: list[bytes]) -> None:
    keyring = keyring_from_pems(pems[0])
    kid = keyring.current.kid
    forged = [
        jwt.encode(_claims(), "secret-secret-secret-secret-32by", "HS256", headers={"kid": kid}),
        jwt.encode(_claims(), None, "none", headers={"kid": kid}),  # type: ignore[arg-type]
        keyring_from_pems(pems[1]).sign(_claims()),
        "not-a-token",
    ]
    for token in forged:
        with pytest.raises(InvalidToken):
            keyring.verify(token, issuer=ISSUER, audience=AUDIENCE)


def test_wrong_audience_is_refused(pems: list[bytes]) -> None:
    keyring = keyring_from_pems(pems[0])
    with pytest.raises(InvalidToken):
        keyring.verify(keyring.sign(_claims()), issuer=ISSUER, audience="elsewhere")


def test_unusable_configured_keys_are_explained() -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyProblem, match="must be RSA"):
        keyring_from_pems(ec_pem)
    with pytest.raises(KeyProblem, match="exactly one PEM"):
        keyring_from_pems(b"not a pem")
    with pytest.raises(KeyProblem, match="not an unencrypted PEM"):
        keyring_from_pems(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
