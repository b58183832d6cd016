"""The whole system in containers, from the image deploy/Dockerfile builds (`make test-deploy`).

Not collected by `make test` (the file name does not start with ``test_``): it needs podman
and the image, which `deploy/build-image.sh` builds first. Run it by name:

    deploy/build-image.sh && .venv/bin/python -m pytest tests/deploy/system_in_containers.py

The registry, the gateway and the five services each run in their own container (podman,
`--init`, read-only root, no capabilities, the secrets as read-only files) on the production
profile against real servers: MariaDB and Redis as they run on this machine, the
Kafka-protocol and MongoDB-protocol servers the other suites start (tests/servers.py). The
containers share the host's network, so each service listens on a port of its own and
advertises 127.0.0.1. The test drives the order flow through the gateway (an admin stocks a
product; a customer registers, gets a token, orders: exactly one notification) and then
stops every container with SIGTERM, which must take less than 10 s each. Every container it
started is removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import MysqlDatabases
from tests.servers import Server
from tests.support import free_port, require_or_skip

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = os.environ.get("SHOP_IMAGE", "localhost/shop:latest")
SECRETS = "/run/secrets/shop"
SERVICES = ("registry", "auth", "product", "inventory", "order", "notification", "gateway")
READY_TIMEOUT_S = 120.0
STOP_LIMIT_S = 10.0

T = TypeVar("T")


@dataclass
class Deployment:
    run_id: str
    ports: dict[str, int]
    admin_password: str
    containers: dict[str, str] = field(default_factory=dict)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"


def _podman(*args: str, check: bool = True, timeout: float = 60) -> str:
    env = {**os.environ}
    env.setdefault("CONTAINERS_CONF", str(DEPLOY / "podman" / "containers.conf"))
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])}: {result.stderr.strip()}")
    return result.stdout


def _environment(service: str, d: Deployment, kafka: Server, mongo: str) -> dict[str, str]:
    """What compose.yaml gives each process, with this machine's servers and ports."""
    prefix = service.upper()
    env = {"SERVICE": service, f"{prefix}_PORT": str(d.ports[service])}
    env["SHOP_ADVERTISE_HOST"] = "127.0.0.1"  # the host's network: this is what callers dial
    if service == "registry":
        return {**env, "REGISTRY_CLIENTS_FILE": f"{SECRETS}/registry-clients.json"}
    env |= {
        "SHOP_REGISTRY_URL_FILE": f"{SECRETS}/{service}-registry-url",
        "SHOP_JWKS_URL": f"{d.url('auth')}/auth/.well-known/jwks.json",
        "SHOP_AUTH_URL": d.url("auth"),
        "SHOP_EVENT_BUS_URL": kafka.url,
    }
    if service in ("auth", "inventory", "order", "notification"):
        env[f"{prefix}_DATABASE_URL_FILE"] = f"{SECRETS}/{service}-database-url"
    if service == "auth":
        env |= {
            "AUTH_SIGNING_KEY_FILE": f"{SECRETS}/auth-signing-key.pem",
            "AUTH_ADMIN_PASSWORD_FILE": f"{SECRETS}/auth-admin-password",
            "AUTH_SERVICE_CLIENTS_FILE": f"{SECRETS}/auth-service-clients.json",
        }
    if service == "order":
        env["SHOP_SERVICE_SECRET_FILE"] = f"{SECRETS}/order-service-secret"
    if service == "product":
        env["PRODUCT_DATABASE_URL"] = mongo
    if service == "gateway":
        env |= {
            "GATEWAY_RATE_LIMIT_STORAGE_URL": "redis://127.0.0.1:6379/0",
            "GATEWAY_RATE_LIMIT_KEY_PREFIX": f"shop-deploy-{d.run_id}",
        }
    return env


def _secrets(folder: Path, d: Deployment, mysql: MysqlDatabases) -> None:
    """make_secrets.py's files, with this machine's registry port and MariaDB databases."""
    env = {**os.environ, "SHOP_REGISTRY_HOST": f"127.0.0.1:{d.ports['registry']}"}
    script = str(DEPLOY / "make_secrets.py")
    subprocess.run([sys.executable, script, str(folder)], check=True, env=env, timeout=60)
    for service in ("auth", "inventory", "order", "notification"):
        path = folder / f"{service}-database-url"
        path.unlink()
        path.write_text(mysql.new_url())
        path.chmod(0o444)
    folder.chmod(0o755)  # the containers' user (10001) reads the mounted folder


def _logs(d: Deployment) -> str:
    parts = []
    for service, name in d.containers.items():
        out = subprocess.run(
            ["podman", "logs", "--tail", "30", name], capture_output=True, text=True, check=False
        )
        parts.append(f"--- {service}\n{out.stdout}{out.stderr}")
    return "\n".join(parts)


def _wait_ready(d: Deployment, service: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            state = _podman("inspect", "--format", "{{.State.Status}}", d.containers[service])
            if state.strip() != "running":
                pytest.fail(f"{service} is {state.strip()}:\n{_logs(d)}")
            try:
                if client.get(f"{d.url(service)}/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)  # polling a process in another container: no event to wait on
    pytest.fail(f"{service} not ready within {READY_TIMEOUT_S} s:\n{_logs(d)}")


@pytest.fixture(scope="module")
def deployment(
    session_mysql: MysqlDatabases,
    kafka_server: Server,
    mongo_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    if shutil.which("podman") is None:
        require_or_skip("podman is not installed (apt-get install podman runc mmdebstrap)")
    if subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: run deploy/build-image.sh first", pytrace=False)
    run_id = uuid.uuid4().hex[:8]
    folder = tmp_path_factory.mktemp("secrets")
    d = Deployment(run_id=run_id, ports={s: free_port() for s in SERVICES}, admin_password="")
    _secrets(folder, d, session_mysql)
    d.admin_password = (folder / "auth-admin-password").read_text()
    base, _, query = mongo_server_url.partition("?")
    mongo = f"{base.rstrip('/')}/shop_deploy_{run_id}?{query}"
    try:
        for service in SERVICES:
            name = f"shop-deploy-{run_id}-{service}"
            env = _environment(service, d, kafka_server, mongo)
            # Each started as soon as the last one runs: they retry the registry until it is up.
            _podman(
                "run", "--detach", "--init", "--network", "host", "--name", name,
                "--label", f"shop-deploy-test={run_id}",
                "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges",
                "--volume", f"{folder}:{SECRETS}:ro",
                *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
                IMAGE,
            )  # fmt: skip
            d.containers[service] = name
        for service in SERVICES:
            _wait_ready(d, service)
        yield d
    finally:
        # Whatever happened: nothing this run started outlives it.
        names = _podman("ps", "--all", "--quiet", "--filter", f"label=shop-deploy-test={run_id}")
        if names.split():
            _podman("rm", "--force", "--time", "0", *names.split(), check=False)


def _eventually(probe: Callable[[], T | None], *, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.2)  # another process's outcome, seen only by asking again


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(gateway: httpx.Client, email: str, password: str) -> str:
    resp = gateway.get("/auth/getToken", auth=(email, password))
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


def test_the_image_health_check_answers(deployment: Deployment) -> None:
    for service in SERVICES:
        _podman("healthcheck", "run", deployment.containers[service])


def test_an_order_through_the_gateway_gets_exactly_one_notification(
    deployment: Deployment,
) -> None:
    with httpx.Client(base_url=deployment.url("gateway"), timeout=10.0) as gateway:
        admin = _bearer(_token(gateway, "admin@example.com", deployment.admin_password))
        sku = f"sku_{uuid.uuid4().hex[:10]}"
        product = {"name": "Kettle", "description": "Kettle", "price": "24.50", "skuCode": sku}
        created = gateway.post("/api/product", headers=admin, json=product)
        assert created.status_code == 201, created.text
        stocked = gateway.post(
            "/api/inventory", headers=admin, json={"skuCode": sku, "quantity": 3}
        )
        assert stocked.status_code == 200, stocked.text

        email = f"buyer-{uuid.uuid4().hex[:10]}@example.com"
        account = {"name": "Ada", "email": email, "password": "analytical-1843"}
        registered = gateway.post("/auth/register", json=account)
        assert registered.status_code == 201, registered.text
        customer = _bearer(_token(gateway, email, "analytical-1843"))

        placed = gateway.post(
            "/api/order",
            headers={**customer, "Idempotency-Key": uuid.uuid4().hex},
            json={"orderLineItemDtoList": [{"skuCode": sku, "quantity": 1}]},
        )
        assert placed.status_code == 201, placed.text
        number = placed.json()["orderNumber"]

        def notes() -> list[dict[str, Any]]:
            resp = gateway.get(
                "/api/notifications", params={"orderNumber": number}, headers=customer
            )
            assert resp.status_code == 200, resp.text
            return [n for n in resp.json() if n["type"] == "ORDER_PLACED"]

        [note] = _eventually(notes)
        assert note["orderNumber"] == number
        time.sleep(1.0)  # a duplicate would arrive by now; no event says "none will come"
        assert len(notes()) == 1, "exactly one notification per order"


def test_sigterm_stops_every_container_within_10_s(deployment: Deployment) -> None:
    """Stopped in reverse order, as `shop up` does: each must exit on SIGTERM, not SIGKILL."""
    for service in reversed(SERVICES):
        name = deployment.containers[service]
        started = time.monotonic()
        _podman("stop", "--time", str(int(STOP_LIMIT_S)), name, timeout=STOP_LIMIT_S + 20)
        took = time.monotonic() - started
        code = int(_podman("inspect", "--format", "{{.State.ExitCode}}", name).strip())
        # 143: uvicorn re-raises the SIGTERM it handled once it has shut down; 137 = SIGKILL.
        assert code in (0, 143), f"{service} exited {code}:\n{_logs(deployment)}"
        assert took < STOP_LIMIT_S, f"{service} took {took:.1f} s to stop"
