"""The real system as `shop up` runs it, for the tests that start it whole (tests/e2e's
``system`` fixture, tests/e2e/test_tracing.py's traced system, tests/chaos' ``running_shop``):
what they start it with, how they wait for it and what they know of it afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import MysqlDatabases
from tests.servers import Server
from tests.support import free_port

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
DEV_ADMIN_PASSWORD = "admin-password"
# Scaled on the production profile: every instance shares the work.
SCALE = {"order": 2, "inventory": 2, "notification": 2}
# Registered by the launcher's services, plus a third-party client the tests run.
REGISTRANTS = (
    "api-gateway",
    "auth-service",
    "product-service",
    "inventory-service",
    "order-service",
    "notification-service",
    "web-service",
    "legacy-client",
)
# Services auth issues service tokens to (see tests/e2e/conftest.py's `system`).
SERVICE_CLIENTS = ("order-service", "notification-service")
# What the embedded profile seeds by itself; production's catalogue is made through the API.
DEMO = (
    ("iphone_15", "iPhone 15", "1299.00", "phones"),
    ("pixel_8", "Pixel 8", "899.00", "phones"),
    ("galaxy_s24", "Galaxy S24", "999.00", "phones"),
    ("airpods_pro", "AirPods Pro (2nd generation)", "249.00", "audio"),
    ("kindle_paperwhite", "Kindle Paperwhite", "139.99", "e-readers"),
)


@dataclass(frozen=True)
class System:
    profile: str
    gateway: str
    registry: str
    log: Path
    data_dir: Path
    admin_password: str
    # Application name -> its registry credential, as the operator gave them to `shop up`.
    registry_clients: dict[str, str]
    # Service name -> its secret for service tokens (AUTH_SERVICE_CLIENTS), likewise.
    service_clients: dict[str, str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self, service: str) -> list[int]:
        """Every running instance of ``service`` (``inventory``, or ``inventory-1``...)."""
        pattern = rf"^{re.escape(service)}(?:-\d+)?\s+\|.*Started server process \[(\d+)\]"
        return [int(pid) for pid in re.findall(pattern, self.output(), re.M)]


def wait_until_serving(system: System, proc: subprocess.Popen[bytes]) -> None:
    """Return once every service is ready (the launcher says so) and auth's keys are
    served through the gateway; fail the test with the log's end if `shop up` exits or is
    not serving within ``READY_TIMEOUT_S``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"`shop up` exited with {proc.returncode}:\n{system.output()[-4000:]}")
            if "Press Ctrl-C to stop." not in system.output():
                time.sleep(0.2)  # the launcher says so once every service is ready
                continue
            try:
                jwks = client.get(f"{system.gateway}/auth/.well-known/jwks.json")
                if jwks.status_code == 200 and jwks.json()["keys"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    pytest.fail(f"the system was not serving within {READY_TIMEOUT_S}s:\n{system.output()[-4000:]}")


def signing_key_file(root: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = root / "signing-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def production_environment(request: pytest.FixtureRequest, root: Path) -> dict[str, str]:
    """URLs of real servers and secrets of this run: what an operator would give."""
    mysql: MysqlDatabases = request.getfixturevalue("session_mysql")
    kafka: Server = request.getfixturevalue("kafka_server")
    mongo_base, _, mongo_query = str(request.getfixturevalue("mongo_server_url")).partition("?")
    mongo = f"{mongo_base.rstrip('/')}/shop_e2e_{secrets.token_hex(4)}?{mongo_query}"
    etcd = f"{request.getfixturevalue('etcd_server_url')}/shop-e2e-{secrets.token_hex(4)}"
    return {
        "REGISTRY_STORE_URL": etcd,
        "SHOP_EVENT_BUS_URL": kafka.url,
        # The gateways' rate limits are shared through Redis (the one running on this machine).
        "GATEWAY_RATE_LIMIT_STORAGE_URL": "redis://127.0.0.1:6379/0",
        "GATEWAY_RATE_LIMIT_KEY_PREFIX": f"shop-e2e-{secrets.token_hex(4)}",
        # So are auth's counts of failed log-ins, over both of its instances' attempts.
        "AUTH_LOGIN_THROTTLE_STORAGE_URL": "redis://127.0.0.1:6379/0",
        "AUTH_LOGIN_THROTTLE_KEY_PREFIX": f"shop-e2e-auth-{secrets.token_hex(4)}",
        "AUTH_DATABASE_URL": mysql.new_url(),
        "PRODUCT_DATABASE_URL": mongo,
        "INVENTORY_DATABASE_URL": mysql.new_url(),
        "ORDER_DATABASE_URL": mysql.new_url(),
        "NOTIFICATION_DATABASE_URL": mysql.new_url(),
        "AUTH_SIGNING_KEY_FILE": str(signing_key_file(root)),
        "AUTH_ADMIN_PASSWORD": f"e2e-admin-{secrets.token_urlsafe(12)}",
    }


def stock_the_demo_catalogue(system: System) -> None:
    """The production profile never invents a catalogue: an admin creates it, as in real life."""
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        login = gateway.get("/auth/getToken", auth=("admin@example.com", system.admin_password))
        assert login.status_code == 200, login.text
        admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
        for sku, name, price, category in DEMO:
            body = {"name": name, "description": name, "price": price, "skuCode": sku}
            created = gateway.post(
                "/api/product", headers=admin, json={**body, "category": category}
            )
            assert created.status_code == 201, created.text
            stocked = gateway.post(
                "/api/inventory", headers=admin, json={"skuCode": sku, "quantity": 100}
            )
            assert stocked.status_code == 200, stocked.text


@dataclass(frozen=True)
class Running:
    """A started `shop up`: what the tests know of it, its process, and the environment it
    was given (on production, the URLs of its databases among them)."""

    system: System
    process: subprocess.Popen[bytes]
    environment: Mapping[str, str]


@contextlib.contextmanager
def running_system(
    root: Path,
    *,
    profile: str = "embedded",
    environment: Mapping[str, str] | None = None,
    arguments: Sequence[str] = (),
    scale: Mapping[str, int] | None = None,
    request: pytest.FixtureRequest | None = None,
) -> Iterator[Running]:
    """`shop up` on free ports with its data under ``root``, ready and serving, stopped with
    Ctrl-C on the way out (the test fails if it takes longer than ``STOP_TIMEOUT_S``).

    Every application gets a registry credential and order/notification a service-token
    secret of their own; ``environment`` comes on top of the operator's (``os.environ``), and
    on the production profile the real servers' URLs and fresh secrets
    (``production_environment``, which needs the test's ``request``) on top of that."""
    registry_port, gateway_port = free_port(), free_port()
    registry_clients = {name: secrets.token_urlsafe(32) for name in REGISTRANTS}
    service_clients = {name: secrets.token_urlsafe(32) for name in SERVICE_CLIENTS}
    env = {
        **os.environ,
        "REGISTRY_CLIENTS": json.dumps(registry_clients),
        "AUTH_SERVICE_CLIENTS": json.dumps(service_clients),
        **(environment or {}),
    }
    command = [
        sys.executable,
        "-m",
        "shop.launcher.cli",
        "up",
        "--profile",
        profile,
        "--registry-port",
        str(registry_port),
        "--gateway-port",
        str(gateway_port),
        "--data-dir",
        str(root / "data"),
        *arguments,
    ]
    admin_password = DEV_ADMIN_PASSWORD
    if profile == "production":
        assert request is not None, "the production profile's servers are fixtures"  # noqa: S101
        production = production_environment(request, root)
        env.update(production)
        admin_password = production["AUTH_ADMIN_PASSWORD"]
    if scale:
        command += ["--scale", ",".join(f"{name}={n}" for name, n in scale.items())]
    system = System(
        profile=profile,
        gateway=f"http://127.0.0.1:{gateway_port}",
        registry=f"http://127.0.0.1:{registry_port}",
        log=root / "shop-up.log",
        data_dir=root / "data",
        admin_password=admin_password,
        registry_clients=registry_clients,
        service_clients=service_clients,
    )
    with system.log.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(system, process)
        yield Running(system=system, process=process, environment=env)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"`shop up` did not stop within {STOP_TIMEOUT_S:g} s of Ctrl-C")
