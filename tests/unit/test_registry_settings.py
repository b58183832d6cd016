"""Which lease store the registry is given (REGISTRY_STORE_URL), and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from shop.gateway.settings import GatewaySettings
from shop.platform.settings import PlatformSettings, SettingsRefused, load_settings
from shop.registry.settings import DEFAULT_ETCD_PREFIX, RegistrySettings, parse_etcd_url


def test_unset_means_the_in_memory_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_STORE_URL", raising=False)
    assert RegistrySettings().store_url == ""
    monkeypatch.setenv("REGISTRY_STORE_URL", "  ")
    assert RegistrySettings().store_scheme == ""


def test_an_etcd_url_names_members_and_a_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_STORE_URL", "etcd://etcd-0:2379, etcd-1 ,[::1]:2380/shop/prod/")

    settings = RegistrySettings()

    assert settings.store_scheme == "etcd"
    assert settings.etcd.endpoints == (("etcd-0", 2379), ("etcd-1", 2379), ("::1", 2380))
    assert settings.etcd.prefix == "/shop/prod"
    settings.check_with(PlatformSettings(profile="embedded"))  # aetcd is installed


def test_without_a_prefix_the_default_one_is_used() -> None:
    assert parse_etcd_url("etcd://127.0.0.1").prefix == DEFAULT_ETCD_PREFIX
    assert parse_etcd_url("ETCD://127.0.0.1:1/").prefix == DEFAULT_ETCD_PREFIX


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://cache:6379", "must be etcd://"),
        ("http://etcd:2379", "must be etcd://"),
        ("etcd:/host", "must be etcd://"),
        ("etcd://", "is not a host"),
        ("etcd://a:2379,,b:2379", "is not a host"),
        ("etcd://a:0", "is not a port"),
        ("etcd://a:65536", "is not a port"),
        ("etcd://a:port", "is not a port"),
        ("etcd://root:secret@a:2379", "no credentials"),
        ("etcd://a:2379/shop registry", "prefix"),
        ("etcd://a:2379/x?timeout=1", "no query"),
        ("etcd://[::1:2379", "is not a host"),
    ],
)
def test_anything_else_is_refused_at_start(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        RegistrySettings(store_url=url)

    message = str(refused.value)
    assert says in message
    assert "secret" not in message.split("input_value")[0]


def test_the_gateway_shows_the_dashboard_of_the_first_registry_listed() -> None:
    platform = PlatformSettings(
        registry_url=" http://r1:8761/eureka/ , http://r2:8761/eureka,http://r3/eureka"
    )

    assert GatewaySettings().dashboard_url(platform) == "http://r1:8761"


CLIENT_SECRET = "c" * 32


def test_clients_are_read_from_json_and_from_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_file = tmp_path / "clients.json"
    secrets_file.write_text(json.dumps({"auth-service": "from-a-file-" + CLIENT_SECRET}))
    monkeypatch.setenv("REGISTRY_CLIENTS", json.dumps({"order-service": CLIENT_SECRET}))
    monkeypatch.setenv("REGISTRY_CLIENTS_FILE", str(secrets_file))

    settings = RegistrySettings()

    assert settings.client_secrets == {
        "ORDER-SERVICE": CLIENT_SECRET,
        "AUTH-SERVICE": "from-a-file-" + CLIENT_SECRET,
    }
    assert CLIENT_SECRET not in repr(settings)
    settings.check_with(PlatformSettings(profile="production"))


@pytest.mark.parametrize(
    ("clients", "says"),
    [
        ("{not json " + CLIENT_SECRET, "REGISTRY_CLIENTS is not JSON"),
        (json.dumps([CLIENT_SECRET]), "must be a JSON object"),
        (json.dumps({"order service": CLIENT_SECRET}), "application names are"),
        (
            json.dumps({"order-service": ""}),
            "the secret of 'order-service' must be a non-empty string",
        ),
        (json.dumps({"a": CLIENT_SECRET, "A": CLIENT_SECRET}), "names A twice"),
    ],
)
def test_bad_clients_are_refused_without_showing_a_secret(
    monkeypatch: pytest.MonkeyPatch, clients: str, says: str
) -> None:
    monkeypatch.setenv("REGISTRY_CLIENTS", clients)
    with pytest.raises(SettingsRefused) as refused:
        load_settings(RegistrySettings)
    assert says in str(refused.value)
    assert CLIENT_SECRET not in str(refused.value)


def test_an_unreadable_clients_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REGISTRY_CLIENTS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(SettingsRefused, match="REGISTRY_CLIENTS_FILE: cannot read it"):
        load_settings(RegistrySettings)


def test_production_refuses_an_open_registry_or_short_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOP_PROFILE", "production")
    monkeypatch.delenv("REGISTRY_CLIENTS", raising=False)
    with pytest.raises(SettingsRefused, match="the production profile needs REGISTRY_CLIENTS"):
        load_settings(RegistrySettings)
    monkeypatch.setenv("REGISTRY_CLIENTS", json.dumps({"order-service": "short-secret"}))
    with pytest.raises(SettingsRefused) as refused:
        load_settings(RegistrySettings)
    assert "the secret of ORDER-SERVICE is shorter than 32 characters" in str(refused.value)
    assert "short-secret" not in str(refused.value)


def test_the_embedded_registry_may_run_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_CLIENTS", raising=False)
    monkeypatch.setenv("SHOP_PROFILE", "embedded")
    _, settings = load_settings(RegistrySettings)
    assert settings.client_secrets == {}


def test_the_dashboard_url_never_carries_the_gateways_registry_credential() -> None:
    platform = PlatformSettings(registry_url="http://api-gateway:s3cret@r1:8761/eureka")
    assert GatewaySettings().dashboard_url(platform) == "http://r1:8761"
