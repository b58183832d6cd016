"""Which lease store the registry is given (REGISTRY_STORE_URL), and what it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shop.gateway.settings import GatewaySettings
from shop.platform.settings import PlatformSettings
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
