"""The real system: `shop up` started as a process on free ports, driven through the gateway.

Once per profile: ``embedded`` (SQLite files and the embedded event log, one process per
service) and ``production`` (MariaDB, a MongoDB-protocol server, a Kafka-protocol broker,
the registry's leases in etcd; two instances each of order, inventory and notification).
Tests that use ``system`` run on both; a module may pin one with
``pytest.mark.parametrize("system", [...], indirect=True)``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
PROFILES = ("embedded", "production")
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
# Services auth issues service tokens to (see the fixture).
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


def _wait_until_serving(system: System, proc: subprocess.Popen[bytes]) -> None:
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


def _signing_key_file(root: Path) -> Path:
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


def _production_environment(request: pytest.FixtureRequest, root: Path) -> dict[str, str]:
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
        "AUTH_DATABASE_URL": mysql.new_url(),
        "PRODUCT_DATABASE_URL": mongo,
        "INVENTORY_DATABASE_URL": mysql.new_url(),
        "ORDER_DATABASE_URL": mysql.new_url(),
        "NOTIFICATION_DATABASE_URL": mysql.new_url(),
        "AUTH_SIGNING_KEY_FILE": str(_signing_key_file(root)),
        "AUTH_ADMIN_PASSWORD": f"e2e-admin-{secrets.token_urlsafe(12)}",
    }


def _stock_the_demo_catalogue(system: System) -> None:
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


@pytest.fixture(scope="session", params=PROFILES)
def system(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    profile: str = request.param
    root = tmp_path_factory.mktemp(f"system-{profile}")
    registry_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "SHOP_HEARTBEAT_INTERVAL_S": "1",
        "SHOP_REGISTRY_CACHE_TTL_S": "1",
        "REGISTRY_EVICTION_INTERVAL_S": "1",
        # The console links each recent order to its trace (test_console.TRACE_UI).
        "GATEWAY_TRACE_URL_TEMPLATE": "http://127.0.0.1:9411/zipkin/traces/{traceId}",
        # A hung inventory must open the order service's breaker within a test's patience.
        "ORDER_INVENTORY_TIMEOUT_S": "0.5",
        "ORDER_BREAKER_FAILURE_THRESHOLD": "3",
        "ORDER_BREAKER_OPEN_S": "2",
        "ORDER_RELEASE_BACKOFF_MAX_S": "2",
    }
    registry_clients = {name: secrets.token_urlsafe(32) for name in REGISTRANTS}
    env["REGISTRY_CLIENTS"] = json.dumps(registry_clients)
    # `shop up` hands each caller its own (order-service); notification-service's entry is
    # never given to notification, which makes no internal call: tests use it to show that
    # another service's genuine token is refused where order-service's is expected.
    service_clients = {name: secrets.token_urlsafe(32) for name in SERVICE_CLIENTS}
    env["AUTH_SERVICE_CLIENTS"] = json.dumps(service_clients)
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
    ]
    admin_password = DEV_ADMIN_PASSWORD
    if profile == "production":
        production = _production_environment(request, root)
        env.update(production)
        admin_password = production["AUTH_ADMIN_PASSWORD"]
        command += ["--scale", ",".join(f"{name}={n}" for name, n in SCALE.items())]
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
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_serving(system, proc)
        if profile == "production":
            _stock_the_demo_catalogue(system)
        yield system
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("`shop up` did not stop within 30 s of Ctrl-C")


@pytest.fixture
def gateway(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as client:
        yield client
