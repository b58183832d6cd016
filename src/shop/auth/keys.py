"""The RSA keys access tokens are signed with, and the JWKS that publishes their public halves.

Keys are parsed once into key objects. Each key's ``kid`` is its RFC 7638 thumbprint, so
every instance given the same key names it the same way. The embedded profile keeps PEM
files (0600) in a directory, the newest being current; production passes PEMs in settings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from shop.platform.tokens import InvalidToken, decode

__all__ = [
    "ALGORITHM",
    "KeyProblem",
    "Keyring",
    "SigningKey",
    "VerificationKey",
    "add_key_file",
    "keyring_from_dir",
    "keyring_from_pems",
    "load_or_create_keyring",
    "new_private_key",
    "private_pem",
    "split_pems",
]

ALGORITHM = "RS256"
MIN_KEY_BITS = 2048
_PEM_RE = re.compile(rb"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


class KeyProblem(ValueError):
    """A configured key cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    public: rsa.RSAPublicKey
    jwk: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _verification_key(public: rsa.RSAPublicKey) -> VerificationKey:
    raw: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(public))
    thumbprint_input = json.dumps(
        {"e": raw["e"], "kty": "RSA", "n": raw["n"]}, separators=(",", ":"), sort_keys=True
    )
    kid = _b64(hashlib.sha256(thumbprint_input.encode()).digest())
    jwk = {"kty": "RSA", "n": raw["n"], "e": raw["e"], "kid": kid, "use": "sig", "alg": ALGORITHM}
    return VerificationKey(kid=kid, public=public, jwk=jwk)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The current signing key and the previous keys whose tokens are still accepted."""

    current: SigningKey
    verification: Mapping[str, VerificationKey]
    jwks: Mapping[str, Any] = field(default_factory=dict)

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims),
            self.current.private,
            algorithm=ALGORITHM,
            headers={"kid": self.current.kid},
        )

    def verify(self, token: str, *, issuer: str, audience: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        key = self.verification.get(str(header.get("kid")))
        if key is None:
            raise InvalidToken("unknown signing key")
        return decode(token, key=key.public, issuer=issuer, audience=audience)


def _make_keyring(current: rsa.RSAPrivateKey, previous: Sequence[rsa.RSAPublicKey]) -> Keyring:
    current_vk = _verification_key(current.public_key())
    keys = {current_vk.kid: current_vk}
    for public in previous:
        vk = _verification_key(public)
        keys.setdefault(vk.kid, vk)
    return Keyring(
        current=SigningKey(kid=current_vk.kid, private=current),
        verification=keys,
        jwks={"keys": [dict(k.jwk) for k in keys.values()]},
    )


def new_private_key(size: int = MIN_KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def split_pems(text: bytes) -> list[bytes]:
    return _PEM_RE.findall(text)


def _load_private(pem: bytes, *, origin: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{origin}: not an unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyProblem(f"{origin}: the key must be RSA (tokens are signed {ALGORITHM})")
    if key.key_size < MIN_KEY_BITS:
        raise KeyProblem(f"{origin}: the RSA key has {key.key_size} bits; at least 2048 needed")
    return key


def _load_public(pem: bytes, *, origin: str) -> rsa.RSAPublicKey:
    if b"PRIVATE KEY" in pem:
        return _load_private(pem, origin=origin).public_key()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{origin}: not a PEM key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyProblem(f"{origin}: the key must be RSA (tokens are signed {ALGORITHM})")
    return key


def keyring_from_pems(
    current: bytes, previous: bytes = b"", *, origin: str = "AUTH_SIGNING_KEY"
) -> Keyring:
    """From settings: one private key, then any previous keys (private or public PEMs)."""
    found = split_pems(current)
    if len(found) != 1:
        raise KeyProblem(f"{origin}: expected exactly one PEM private key, found {len(found)}")
    return _make_keyring(
        _load_private(found[0], origin=origin),
        [
            _load_public(pem, origin=f"previous signing key #{i + 1}")
            for i, pem in enumerate(split_pems(previous))
        ],
    )


def _key_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.pem") if p.is_file())


def add_key_file(directory: Path, *, key_size: int = MIN_KEY_BITS) -> Path:
    """Make a new key and store it as the newest (so current) file of ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = new_private_key(key_size)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"{stamp}-{_verification_key(key.public_key()).kid[:12]}.pem"
    # Created 0600 from the first byte: the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem(key))
    return path


def keyring_from_dir(directory: Path, *, keep_previous: int) -> Keyring:
    files = _key_files(directory)
    if not files:
        raise KeyProblem(f"no signing key in {directory}")
    newest, older = files[-1], files[:-1][::-1][:keep_previous]
    return _make_keyring(
        _load_private(newest.read_bytes(), origin=str(newest)),
        [_load_private(p.read_bytes(), origin=str(p)).public_key() for p in older],
    )


def load_or_create_keyring(directory: Path, *, key_size: int, keep_previous: int) -> Keyring:
    """The embedded profile: the first start makes a key, later starts reuse the files."""
    if not _key_files(directory):
        add_key_file(directory, key_size=key_size)
    # Read back from disk: two instances racing on a first start then agree on the newest.
    return keyring_from_dir(directory, keep_previous=keep_previous)
