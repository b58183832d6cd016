"""HTTPS between the processes: a process given a certificate serves TLS, registers its secure
port, and its callers reach it over https, trusting the CA they are given."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shop.platform.discovery import Instance, Registration
from tests.support import free_port

_LISTENING = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA and a certificate for 127.0.0.1 it signed (an operator's own PKI)."""
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("shop-test-ca"))
        .issuer_name(_name("shop-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = Pki(ca=root / "ca.pem", cert=root / "cert.pem", key=root / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@asynccontextmanager
async def _process(module: str, env: dict[str, str]) -> AsyncIterator[str]:
    """``python -m module`` until the block ends; yields the URL it announced."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHOP_", "REGISTRY_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            while (match := _LISTENING.search("".join(seen))) is None:
                line = await process.stdout.readline()
                assert line, f"{module} exited:\n{''.join(seen)}"
                seen.append(line.decode(errors="replace"))
        drain = asyncio.create_task(process.stdout.read())
        yield f"{match.group(1)}://127.0.0.1:{match.group(2)}"
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
    drain.cancel()


def _trusting(ca: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca)),
        timeout=aiohttp.ClientTimeout(total=5),
    )


async def test_processes_serve_https_register_secure_ports_and_call_each_other_over_it(
    pki: Pki, tmp_path: Path
) -> None:
    tls = {
        "SHOP_TLS_CERTFILE": str(pki.cert),
        "SHOP_TLS_KEYFILE": str(pki.key),
        "SHOP_TLS_CAFILE": str(pki.ca),
        "SHOP_DATA_DIR": str(tmp_path),
        "SHOP_HEARTBEAT_INTERVAL_S": "0.5",
        "SHOP_LEASE_DURATION_S": "5",
        "SHOP_REGISTRY_CACHE_TTL_S": "0",
    }
    async with _process("shop.registry", {**tls, "REGISTRY_PORT": str(free_port())}) as registry:
        assert registry.startswith("https://"), "a process with a certificate serves TLS"
        env = {**tls, "SHOP_REGISTRY_URL": f"{registry}/eureka", "GATEWAY_PORT": "0"}
        async with (
            _process("shop.auth", {**env, "AUTH_PORT": "0"}),
            _process("shop.gateway", env) as gateway,
            _trusting(pki.ca) as client,
        ):
            # The gateway found auth through the registry and reached it over https.
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with client.get(f"{gateway}/auth/.well-known/jwks.json") as answer:
                            if answer.status == 200:
                                assert (await answer.json())["keys"]
                                break
                    except aiohttp.ClientConnectorError as exc:
                        # Announced, but still starting up; a certificate problem is not that.
                        assert not isinstance(exc, aiohttp.ClientConnectorCertificateError)
                    await asyncio.sleep(0.2)
            async with client.get(
                f"{registry}/eureka/apps/AUTH-SERVICE", headers={"Accept": "application/json"}
            ) as listed:
                [raw] = (await listed.json())["application"]["instance"]
            auth = Instance.from_eureka(raw)
            assert auth.secure and auth.base_url.startswith("https://127.0.0.1:")
            assert raw["homePageUrl"].startswith("https://")

            # Nobody who does not trust the CA gets an answer, and plain http gets none.
            async with aiohttp.ClientSession() as untrusting:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await untrusting.get(f"{gateway}/health/live")
                with pytest.raises(aiohttp.ClientError):
                    await untrusting.get(gateway.replace("https://", "http://") + "/health/live")


def test_a_plain_registration_stays_plain_and_a_secure_one_is_https() -> None:
    plain = Registration(app="order-service", host="10.0.0.5", port=8081).to_eureka()["instance"]
    secure = Registration(app="order-service", host="10.0.0.5", port=8443, secure=True).to_eureka()[
        "instance"
    ]
    assert Instance.from_eureka(plain).base_url == "http://10.0.0.5:8081"
    assert Instance.from_eureka(secure).base_url == "https://10.0.0.5:8443"
    assert secure["port"]["@enabled"] == "false" and secure["securePort"]["$"] == 8443


def test_tls_settings_are_refused_when_they_cannot_work(tmp_path: Path, pki: Pki) -> None:
    from shop.platform.settings import PlatformSettings

    with pytest.raises(ValueError, match="SHOP_TLS_CERTFILE and SHOP_TLS_KEYFILE go together"):
        PlatformSettings(tls_certfile=pki.cert)
    with pytest.raises(ValueError, match="SHOP_TLS_CAFILE: .* is not a readable file"):
        PlatformSettings(tls_cafile=tmp_path / "missing.pem")
