"""The whole system in containers: the Kubernetes manifests played by podman (`make test-deploy`).

Not collected by `make test` (the file name does not start with ``test_``): it needs podman
and the image, which `deploy/build-image.sh` builds first. Run it by name:

    deploy/build-image.sh && .venv/bin/python -m pytest tests/deploy/system_in_containers.py

What runs is deploy/k8s/base as `kubectl kustomize` renders it, played by `podman kube play`:
the registry, the gateway and the five services, one pod each, with the manifests' own
environment, ConfigMaps, commands, volumes and container security context, on the production
profile against real servers (MariaDB and Redis as they run on this machine, the
Kafka-protocol and MongoDB-protocol servers the other suites start, tests/servers.py).
`for_podman` makes the few changes one host and podman 4.3 need; its docstring lists them and
says why. The test then plays the kubelet's part (each pod's startup, readiness and liveness
probe paths, asked on its port), drives the order flow through the gateway (an admin stocks a
product; a customer registers, gets a token, orders: exactly one notification) and stops
every container with SIGTERM, which must take less than 10 s each. Every pod it started is
removed whatever happens.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.conftest import MysqlDatabases
from tests.servers import Server
from tests.support import free_port, require_or_skip

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "k8s" / "base"
IMAGE = os.environ.get("SHOP_IMAGE", "localhost/shop:latest")
SERVICES = ("registry", "auth", "product", "inventory", "order", "notification", "gateway", "web")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
READY_TIMEOUT_S = 120.0
STOP_LIMIT_S = 10.0
LABEL = "shop-deploy-test"

T = TypeVar("T")
Manifest = dict[str, Any]


@dataclass
class Pod:
    """One played Deployment: where it listens, podman's name for its container, its probes."""

    port: int
    container: str
    probes: dict[str, str]  # probe kind -> HTTP path, as the manifest gives them


@dataclass
class Deployment:
    run_id: str
    ports: dict[str, int]
    admin_password: str
    pods: dict[str, Pod]

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


def rendered() -> list[Manifest]:
    """The base as a cluster would get it (`kubectl apply -k` renders the same)."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def for_podman(
    manifests: list[Manifest],
    *,
    run_id: str,
    ports: dict[str, int],
    config: dict[tuple[str, str], str],
    secrets: Path,
    extra_env: dict[str, dict[str, str]],
) -> list[Manifest]:
    """The rendered manifests as `podman kube play` (4.3) runs them on one host.

    Everything else (env, envFrom, ConfigMaps, command, image, volumes and their mounts,
    resources, the pod's and the containers' securityContext) is played as written. The
    differences, each because of one host or of podman 4.3:

    - Services and PodDisruptionBudgets are left out: podman ignores Services (no cluster
      DNS or virtual IPs) and has no disruption budgets. Callers reach each pod on its host
      port instead; services find each other through the registry, as in the cluster.
    - `config`: the ConfigMap values that name in-cluster servers (auth:8080, kafka:9092,
      mongo, redis) point at this machine's servers, as an overlay does for a real cluster.
    - host networking, one replica and one port per pod: the real servers are host
      processes here, and pods on one network namespace cannot all listen on 8080. The
      port is given as `PORT` (the image's entry point reads it) and `ports` is dropped
      (podman turns a containerPort into a port mapping, refused with host networking).
      `status.podIP` (what the service advertises) is 127.0.0.1: podman 4.3 resolves no
      `status.*` field, and on the host network the pod's address is the host's.
    - the probes are removed and the test asks their paths itself (the kubelet's part):
      podman 4.3 ignores readiness and startup probes and turns an httpGet liveness probe
      into `curl` against port 0 for a named port (and the image has no curl).
    - the Secret `shop-secrets` (made by `kubectl create secret`, not in the manifests)
      becomes a host folder per pod holding the same items, with the volume's defaultMode and
      the pod's fsGroup as group, which podman does not apply itself.
    - `secrets` is a folder holding `<secretName>/` with the Secret's files (make_secrets.py's);
      each pod's folder is made beside it.
    - `extra_env`: settings this test adds to keep runs apart (the gateway's and auth's Redis
      key prefixes).
    - names carry the run's id and a label, so that cleaning up finds exactly this run's pods.
    """
    played: list[Manifest] = []
    kept = copy.deepcopy(manifests)
    wanted = dict(config)
    for doc in kept:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Service", "PodDisruptionBudget"):
            continue
        if kind == "ConfigMap":
            for key in list(doc["data"]):
                if (name, key) in wanted:
                    doc["data"][key] = wanted.pop((name, key))
        elif kind == "Deployment":
            _deployment_for_podman(doc, run_id, ports[name], secrets, extra_env.get(name, {}))
        else:
            raise AssertionError(f"{kind} {name}: a kind this test does not know how to play")
        played.append(doc)
    assert not wanted, f"ConfigMap keys the manifests no longer have: {sorted(wanted)}"
    return played


def _deployment_for_podman(
    doc: Manifest, run_id: str, port: int, secrets: Path, extra_env: dict[str, str]
) -> None:
    service = doc["metadata"]["name"]
    doc["metadata"]["name"] = f"shop-{run_id}-{service}"
    doc["spec"]["replicas"] = 1
    template = doc["spec"]["template"]
    template["metadata"]["labels"][LABEL] = run_id
    pod = template["spec"]
    pod["hostNetwork"] = True
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    for container in pod["containers"]:
        container["image"] = IMAGE
        container.pop("ports")
        for probe in PROBES:
            container.pop(probe)
        env = container.setdefault("env", [])
        for var in env:
            if var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
                del var["valueFrom"]
                var["value"] = "127.0.0.1"
        env += [{"name": "PORT", "value": str(port)}]
        env += [{"name": k, "value": v} for k, v in extra_env.items()]
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            secret = volume.pop("secret")
            folder = secrets / service
            folder.mkdir(mode=0o755)
            for item in secret["items"]:
                path = folder / item["path"]
                shutil.copyfile(secrets / secret["secretName"] / item["key"], path)
                path.chmod(item.get("mode", secret.get("defaultMode", 0o644)))
                if fs_group is not None and os.geteuid() == 0:  # rootful podman runs as root
                    os.chown(path, -1, fs_group)
            volume["hostPath"] = {"path": str(folder), "type": "Directory"}


def _pods(manifests: list[Manifest], ports: dict[str, int], run_id: str) -> dict[str, Pod]:
    """Each Deployment's probe paths (all on its one port) and podman's container name."""
    pods = {}
    for doc in manifests:
        if doc["kind"] != "Deployment":
            continue
        service = doc["metadata"]["name"]
        [container] = doc["spec"]["template"]["spec"]["containers"]
        [port] = container["ports"]
        assert all(container[kind]["httpGet"]["port"] == port["name"] for kind in PROBES)
        probes = {kind: container[kind]["httpGet"]["path"] for kind in PROBES}
        # podman kube play names a Deployment's pod <name>-pod-0 and its containers <pod>-<c>.
        name = f"shop-{run_id}-{service}-pod-0-{container['name']}"
        pods[service] = Pod(port=ports[service], container=name, probes=probes)
    return pods


def _secrets(folder: Path, d: Deployment, mysql: MysqlDatabases) -> None:
    """make_secrets.py's files, with this machine's registry port and MariaDB databases."""
    env = {**os.environ, "SHOP_REGISTRY_HOST": f"127.0.0.1:{d.ports['registry']}"}
    script = str(DEPLOY / "make_secrets.py")
    subprocess.run([sys.executable, script, str(folder)], check=True, env=env, timeout=60)
    for service in ("auth", "inventory", "order", "notification"):
        path = folder / f"{service}-database-url"
        path.unlink()
        path.write_text(mysql.new_url())


def _logs(d: Deployment) -> str:
    parts = []
    for service, pod in d.pods.items():
        out = subprocess.run(
            ["podman", "logs", "--tail", "30", pod.container],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        parts.append(f"--- {service}\n{out.stdout}{out.stderr}")
    return "\n".join(parts)


def _wait_ready(d: Deployment, service: str) -> None:
    """The kubelet's part: started (startup probe), then ready, then live, on the pod's port."""
    pod = d.pods[service]
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=d.url(service), timeout=2.0) as client:
        for kind in PROBES:
            while True:
                state = _podman("inspect", "--format", "{{.State.Status}}", pod.container)
                if state.strip() != "running":
                    pytest.fail(f"{service} is {state.strip()}:\n{_logs(d)}")
                try:
                    if client.get(pod.probes[kind]).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    late = f"{service}: {kind} not 200 within {READY_TIMEOUT_S} s"
                    pytest.fail(f"{late}:\n{_logs(d)}")
                time.sleep(0.25)  # polling a process in another container: no event to wait on


@pytest.fixture(scope="module")
def deployment(
    session_mysql: MysqlDatabases,
    kafka_server: Server,
    mongo_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    for tool in ("podman", "kubectl"):
        if shutil.which(tool) is None:
            require_or_skip(f"{tool} is not installed (docs/deploy.md: the machine)")
    if subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: run deploy/build-image.sh first", pytrace=False)
    run_id = uuid.uuid4().hex[:8]
    ports = {s: free_port() for s in SERVICES}
    manifests = rendered()
    d = Deployment(run_id, ports, admin_password="", pods=_pods(manifests, ports, run_id))
    secrets = tmp_path_factory.mktemp("secrets")
    _secrets(secrets / "shop-secrets", d, session_mysql)
    d.admin_password = (secrets / "shop-secrets" / "auth-admin-password").read_text()
    base, _, query = mongo_server_url.partition("?")
    config = {
        ("shop-config", "SHOP_JWKS_URL"): f"{d.url('auth')}/auth/.well-known/jwks.json",
        ("shop-config", "SHOP_AUTH_URL"): d.url("auth"),
        ("shop-config", "SHOP_EVENT_BUS_URL"): kafka_server.url,
        ("shop-endpoints", "product-database-url"): f"{base.rstrip('/')}/shop_{run_id}?{query}",
        ("shop-endpoints", "gateway-rate-limit-storage-url"): "redis://127.0.0.1:6379/0",
        ("shop-endpoints", "auth-login-throttle-storage-url"): "redis://127.0.0.1:6379/0",
    }
    extra_env = {
        "gateway": {"GATEWAY_RATE_LIMIT_KEY_PREFIX": f"shop-deploy-{run_id}"},
        "auth": {"AUTH_LOGIN_THROTTLE_KEY_PREFIX": f"shop-deploy-auth-{run_id}"},
    }
    played = for_podman(
        manifests, run_id=run_id, ports=ports, config=config, secrets=secrets,
        extra_env=extra_env,
    )  # fmt: skip
    kube = secrets / "played.yaml"
    kube.write_text(yaml.safe_dump_all(played, sort_keys=False))
    try:
        _podman("kube", "play", str(kube), timeout=180)
        for service in SERVICES:
            _wait_ready(d, service)
        yield d
    finally:
        # Whatever happened: nothing this run started outlives it.
        _podman("kube", "down", str(kube), check=False, timeout=120)
        left = _podman("pod", "ps", "--quiet", "--filter", f"label={LABEL}={run_id}", check=False)
        if left.split():
            _podman("pod", "rm", "--force", "--time", "0", *left.split(), check=False)


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
    """The image's HEALTHCHECK command, run in each container (kube play drops image checks)."""
    check = _podman("image", "inspect", "--format", "{{json .HealthCheck.Test}}", IMAGE)
    assert check.strip() == '["CMD","/usr/local/bin/shop-entrypoint","healthcheck"]', check
    for service in SERVICES:
        _podman("exec", deployment.pods[service].container, "shop-entrypoint", "healthcheck")


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


def test_the_storefront_is_served_through_the_gateway(deployment: Deployment) -> None:
    """The web pod, found through the registry by the gateway, renders the catalogue it
    reads from the gateway's public API (docs/storefront.md)."""
    with httpx.Client(base_url=deployment.url("gateway"), timeout=10.0) as gateway:
        page = gateway.get("/", headers={"Accept": "text/html"})
        script = gateway.get("/shop/static/app.js")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="result-summary"' in page.text
    assert script.status_code == 200


def test_sigterm_stops_every_container_within_10_s(deployment: Deployment) -> None:
    """Stopped in reverse order, as `shop up` does: each must exit on SIGTERM, not SIGKILL."""
    for service in reversed(SERVICES):
        name = deployment.pods[service].container
        started = time.monotonic()
        _podman("stop", "--time", str(int(STOP_LIMIT_S)), name, timeout=STOP_LIMIT_S + 20)
        took = time.monotonic() - started
        code = int(_podman("inspect", "--format", "{{.State.ExitCode}}", name).strip())
        # 143: uvicorn re-raises the SIGTERM it handled once it has shut down; 137 = SIGKILL.
        assert code in (0, 143), f"{service} exited {code}:\n{_logs(deployment)}"
        assert took < STOP_LIMIT_S, f"{service} took {took:.1f} s to stop"
