"""The deployment files (deploy/): valid for the tools that read them, and configuring every
process so that it passes its own production checks.

- the Kubernetes base and production overlay, rendered by kustomize (`kubectl kustomize`),
  every object validated against the Kubernetes schemas (kubernetes-validate, offline, strict)
  and held to what docs/deploy.md promises: probes, resources, non-root, read-only root;
- compose.yaml against the compose specification's schema (the copy check-jsonschema ships);
- the Dockerfile through hadolint;
- the secret files deploy/make_secrets.py makes, and the entrypoint that reads them;
- each process's environment, as compose and Kubernetes give it, loaded by the service's own
  settings class: `load_settings` refuses nothing on the production profile.

The image is built and run by `make test-deploy` (docs/deploy.md), not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from opentelemetry import environment_variables as otel_api_variables
from opentelemetry.sdk import environment_variables as otel_sdk_variables
from pydantic_settings import BaseSettings

from shop.auth.settings import AuthSettings
from shop.gateway.settings import GatewaySettings
from shop.inventory.settings import InventorySettings
from shop.notification.settings import NotificationSettings
from shop.order.settings import OrderSettings
from shop.platform.settings import PlatformSettings, ServiceSettings, load_settings
from shop.product.settings import ProductSettings
from shop.registry.settings import RegistrySettings
from shop.web.settings import WebSettings
from tests.deploy.system_in_containers import for_podman
from tests.support import require_or_skip

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SECRETS_MOUNT = "/run/secrets/shop"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to work on

SETTINGS: dict[str, type[ServiceSettings]] = {
    "registry": RegistrySettings,
    "gateway": GatewaySettings,
    "auth": AuthSettings,
    "product": ProductSettings,
    "inventory": InventorySettings,
    "order": OrderSettings,
    "notification": NotificationSettings,
    "web": WebSettings,
}
# Read from NAME_FILE by deploy/entrypoint.sh (Shop has no *_FILE form for them).
ENTRYPOINT_FILE_SETTINGS = {
    "SHOP_SERVICE_SECRET",
    "SHOP_REGISTRY_URL",
    "AUTH_SERVICE_CLIENTS",
    "AUTH_ADMIN_PASSWORD",
    "AUTH_DATABASE_URL",
    "PRODUCT_DATABASE_URL",
    "INVENTORY_DATABASE_URL",
    "ORDER_DATABASE_URL",
    "NOTIFICATION_DATABASE_URL",
    "SHOP_KAFKA_SASL_PASSWORD",
    "GATEWAY_RATE_LIMIT_STORAGE_URL",
    "AUTH_LOGIN_THROTTLE_STORAGE_URL",
}
# Read by the image, not by a settings class.
IMAGE_SETTINGS = {"SERVICE", "PORT"}
# The OpenTelemetry SDK's own variables (docs/telemetry.md): read by the SDK, not by Shop's
# settings classes; the names come from the SDK itself, so a misspelt one still fails.
OTEL_SETTINGS = {
    name
    for module in (otel_api_variables, otel_sdk_variables)
    for constant, name in vars(module).items()
    if constant.startswith("OTEL_") and isinstance(name, str)
}
# What the image's ENV sets for every process (deploy/Dockerfile).
IMAGE_DEFAULTS = {"SHOP_PROFILE": "production", "SHOP_DATA_DIR": "/tmp/shop"}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        require_or_skip(f"{name} is not installed")
        raise AssertionError  # unreachable: require_or_skip raises
    return path


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders (kustomize itself, built into kubectl)."""
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(folder)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _kustomize(K8S / request.param)


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secrets")
    subprocess.run(
        [sys.executable, str(DEPLOY / "make_secrets.py"), str(folder)], check=True, timeout=60
    )
    return folder


def _of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


# --- Kubernetes -------------------------------------------------------------------------------


def test_every_rendered_object_is_valid_kubernetes(rendered: list[dict[str, Any]]) -> None:
    assert rendered
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field(rendered: list[dict[str, Any]]) -> None:
    """Strict validation is on: an unknown field (a typo) fails, it is not ignored."""
    deployment = json.loads(json.dumps(_of_kind(rendered, "Deployment")["order"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_service_runs_from_the_image_with_probes_and_limits(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = _of_kind(rendered, "Deployment")
    assert set(deployments) == set(SETTINGS)
    for name, deployment in deployments.items():
        container = _container(deployment)
        env = {e["name"]: e for e in container["env"]}
        assert env["SERVICE"]["value"] == name
        assert env["SHOP_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, name


def test_every_pod_is_non_root_with_a_read_only_root(rendered: list[dict[str, Any]]) -> None:
    for name, deployment in _of_kind(rendered, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        security = _container(deployment)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be writable"


def test_stateless_services_have_two_replicas_and_a_disruption_budget(
    rendered: list[dict[str, Any]],
) -> None:
    budgets = _of_kind(rendered, "PodDisruptionBudget")
    for name, deployment in _of_kind(rendered, "Deployment").items():
        if name == "registry":  # its memory store is state: one replica (docs/deploy.md)
            assert deployment["spec"]["replicas"] == 1
            assert name not in budgets
            continue
        assert deployment["spec"]["replicas"] >= 2, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name


def test_services_select_pods_on_a_named_port(rendered: list[dict[str, Any]]) -> None:
    deployments = _of_kind(rendered, "Deployment")
    services = _of_kind(rendered, "Service")
    # Callers address these by name; the rest are found through the registry at pod addresses.
    assert set(services) == {"registry", "auth", "gateway"}
    for name, service in services.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        ports = {p["name"] for p in _container(deployments[name])["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name


def test_every_reference_names_an_existing_config_or_secret_key(
    rendered: list[dict[str, Any]], secret_files: Path
) -> None:
    """ConfigMaps are in the manifests; the Secret is made from make_secrets.py's files."""
    config_maps = _of_kind(rendered, "ConfigMap")
    secret_keys = {p.name for p in secret_files.iterdir()}
    assert not _of_kind(rendered, "Secret"), "secrets are the operator's, never in manifests"
    for name, deployment in _of_kind(rendered, "Deployment").items():
        container = _container(deployment)
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps, name
        for env in container["env"]:
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps[ref["name"]]["data"], (name, ref)
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "shop-secrets"
                assert {i["key"] for i in volume["secret"]["items"]} <= secret_keys, name


def _kubernetes_environment(
    deployment: dict[str, Any], config_maps: dict[str, dict[str, Any]]
) -> dict[str, str]:
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif ref := item["valueFrom"].get("configMapKeyRef"):
            env[item["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
        else:  # the pod's own address
            env[item["name"]] = "10.1.2.3"
    return env


def test_each_pod_environment_passes_its_production_checks(
    rendered: list[dict[str, Any]], secret_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_maps = _of_kind(rendered, "ConfigMap")
    for name, deployment in _of_kind(rendered, "Deployment").items():
        env = _kubernetes_environment(deployment, config_maps)
        _load_as_the_entrypoint_would(name, env, secret_files, monkeypatch)


# --- compose ----------------------------------------------------------------------------------


def test_the_deploy_test_plays_the_manifests_as_written(secret_files: Path, tmp_path: Path) -> None:
    """`make test-deploy` plays the base through for_podman: only the changes it lists."""
    base = _kustomize(K8S / "base")
    secrets = tmp_path / "played"
    (secrets / "shop-secrets").mkdir(parents=True)
    shutil.copytree(secret_files, secrets / "shop-secrets", dirs_exist_ok=True)
    ports = {name: 20000 + i for i, name in enumerate(_of_kind(base, "Deployment"))}
    config = {("shop-config", "SHOP_EVENT_BUS_URL"): "kafka://127.0.0.1:1"}
    played = for_podman(base, run_id="r", ports=ports, config=config, secrets=secrets, extra_env={})

    assert {o["kind"] for o in played} == {"ConfigMap", "Deployment"}
    assert _of_kind(played, "ConfigMap")["shop-config"]["data"]["SHOP_EVENT_BUS_URL"] == (
        "kafka://127.0.0.1:1"
    )
    for name, original in _of_kind(base, "Deployment").items():
        deployment = _of_kind(played, "Deployment")[f"shop-r-{name}"]
        pod, was = deployment["spec"]["template"]["spec"], original["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True
        assert pod["securityContext"] == was["securityContext"]
        container, before = _container(deployment), _container(original)
        for key in ("command", "args", "envFrom", "resources", "securityContext", "volumeMounts"):
            assert container.get(key) == before.get(key), (name, key)
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        env_before = {e["name"]: e.get("value", e.get("valueFrom")) for e in before["env"]}
        assert env.pop("SHOP_ADVERTISE_HOST") == "127.0.0.1"
        assert env.pop("PORT") == str(ports[name])
        env_before.pop("SHOP_ADVERTISE_HOST")
        assert env == env_before, name
        # The Secret's items, in a folder of the pod's own: nothing more, nothing less.
        [secret] = [v for v in was["volumes"] if "secret" in v]
        [folder] = [v["hostPath"]["path"] for v in pod["volumes"] if v["name"] == secret["name"]]
        items = {i["path"] for i in secret["secret"]["items"]}
        assert {p.name for p in Path(folder).iterdir()} == items
        assert all(
            (Path(folder) / i).stat().st_mode & 0o777 == secret["secret"]["defaultMode"]
            for i in items
        )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_starts_each_process_after_what_it_needs_is_healthy(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in SETTINGS:
        service = services[name]
        assert service["environment"]["SERVICE"] == name
        assert service["read_only"] is True and service["init"] is True, name
        for needed, condition in service["depends_on"].items():
            expected = (
                "service_completed_successfully" if needed == "secrets" else "service_healthy"
            )
            assert condition["condition"] == expected, (name, needed)
            if expected == "service_healthy":
                assert "healthcheck" in services[needed] or needed in SETTINGS, needed
    for server in ("mysql", "mongo", "kafka", "redis", "zipkin"):
        assert server in services, server


def test_each_compose_environment_passes_its_production_checks(
    compose: dict[str, Any], secret_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SETTINGS:
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items()}
        _load_as_the_entrypoint_would(name, env, secret_files, monkeypatch)


# --- what both share: the secret files, the entrypoint, the settings --------------------------


def _known_settings(model: type[BaseSettings]) -> set[str]:
    prefix = str(model.model_config.get("env_prefix", ""))
    return {f"{prefix}{field}".upper() for field in model.model_fields}


def _load_as_the_entrypoint_would(
    service: str, env: dict[str, str], secret_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variable is one Shop reads, and the service's settings refuse none of it."""
    model = SETTINGS[service]
    known = (
        _known_settings(PlatformSettings) | _known_settings(model) | IMAGE_SETTINGS | OTEL_SETTINGS
    )
    for key in list(os.environ):
        if key.startswith(("SHOP_", f"{service.upper()}_")):
            monkeypatch.delenv(key)
    for key, value in {**IMAGE_DEFAULTS, **env}.items():
        path = value.replace(SECRETS_MOUNT, str(secret_files))
        if key.endswith("_FILE") and key.removesuffix("_FILE") in ENTRYPOINT_FILE_SETTINGS:
            key, value = key.removesuffix("_FILE"), Path(path).read_text()
        elif value.startswith(SECRETS_MOUNT):
            value = path
        assert key in known, f"{service}: {key} is no setting of Shop's"
        monkeypatch.setenv(key, value)
    platform, _ = load_settings(model)
    assert platform.profile == "production", service


def test_make_secrets_makes_matching_credentials_once(secret_files: Path, tmp_path: Path) -> None:
    clients = json.loads((secret_files / "registry-clients.json").read_text())
    for service in SETTINGS.keys() - {"registry"}:
        url = (secret_files / f"{service}-registry-url").read_text()
        app, secret = url.removeprefix("http://").split("@")[0].split(":")
        assert clients[app] == secret, service
    order_secret = (secret_files / "order-service-secret").read_text()
    auth_clients = json.loads((secret_files / "auth-service-clients.json").read_text())
    assert auth_clients == {"order-service": order_secret}
    key = load_pem_private_key((secret_files / "auth-signing-key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048
    password = (secret_files / "mysql-password").read_text()
    assert f"shop:{password}@" in (secret_files / "order-database-url").read_text()

    again = tmp_path / "again"
    shutil.copytree(secret_files, again)
    before = {p.name: p.read_text() for p in again.iterdir()}
    subprocess.run([sys.executable, str(DEPLOY / "make_secrets.py"), str(again)], check=True)
    assert {p.name: p.read_text() for p in again.iterdir()} == before


@pytest.fixture
def fake_python(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A PATH whose `python` prints the command and the environment it was started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(
        '#!/bin/sh\nif [ "$1" = -c ]; then exec "' + sys.executable + '" "$@"; fi\n'
        'echo "ARGS $*"; env\n'
    )
    stub.chmod(0o755)
    yield {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def _entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_runs_the_service_on_every_interface_with_secrets_from_files(
    fake_python: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    result = _entrypoint(
        {**fake_python, "SERVICE": "order", "SHOP_SERVICE_SECRET_FILE": str(secret)}
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ARGS -m shop.order"
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert env["ORDER_HOST"] == "0.0.0.0"  # noqa: S104 (a container listens on every interface)
    assert env["ORDER_PORT"] == "8080"
    assert env["SHOP_SERVICE_SECRET"] == "s" * 40  # the file's trailing newline is not kept
    assert "SHOP_SERVICE_SECRET_FILE" not in env
    assert env["SHOP_ADVERTISE_HOST"] not in ("", "0.0.0.0")  # noqa: S104 (never advertised)


def test_entrypoint_keeps_what_the_operator_set(fake_python: dict[str, str]) -> None:
    result = _entrypoint(
        {**fake_python, "SERVICE": "gateway", "GATEWAY_PORT": "9000", "SHOP_ADVERTISE_HOST": "gw"}
    )
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert (env["GATEWAY_PORT"], env["SHOP_ADVERTISE_HOST"]) == ("9000", "gw")
    registry = _entrypoint({**fake_python, "SERVICE": "registry"})
    assert "REGISTRY_PORT=8761" in registry.stdout.splitlines()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SERVICE": "shop"}, "SERVICE must be one of"),
        ({"SERVICE": "order", "SHOP_SERVICE_SECRET_FILE": "/nonexistent"}, "cannot read"),
        (
            {
                "SERVICE": "order",
                "SHOP_SERVICE_SECRET_FILE": "/dev/null",
                "SHOP_SERVICE_SECRET": "x",
            },
            "both SHOP_SERVICE_SECRET and SHOP_SERVICE_SECRET_FILE",
        ),
    ],
)
def test_entrypoint_refuses_with_one_line_and_exit_code_2(
    fake_python: dict[str, str], extra: dict[str, str], message: str
) -> None:
    result = _entrypoint({**fake_python, **extra})
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert "ARGS" not in result.stdout


# --- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_sets_what_the_launcher_gives_every_service() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    settings = ["MALLOC_ARENA_MAX=2", "MALLOC_MMAP_THRESHOLD_=1048576", "USER 10001:10001"]
    settings += [f"{key}={value}" for key, value in IMAGE_DEFAULTS.items()]
    for setting in settings:
        assert setting in text, setting
