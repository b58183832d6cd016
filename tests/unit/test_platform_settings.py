"""Settings that make no sense, or that the production profile forbids, stop a process at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from shop.auth.settings import AuthSettings
from shop.gateway.settings import GatewaySettings
from shop.notification.settings import NotificationSettings
from shop.order.settings import OrderSettings
from shop.platform.settings import (
    PlatformSettings,
    SettingsRefused,
    check_url,
    load_settings,
)
from shop.product.settings import ProductSettings

SECRET = "s" * 32
KAFKA = "kafka://127.0.0.1:9092"
MYSQL = "mysql://shop:secret@db:3306/shop"
REGISTRY_WITH_CREDENTIALS = f"http://order-service:{SECRET}@registry:8761/eureka"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets: the developer's own SHOP_* variables must not leak in."""
    import os

    for name in list(os.environ):
        if name.split("_", 1)[0] in {"SHOP", "AUTH", "ORDER", "PRODUCT", "GATEWAY", "NOTIFICATION"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHOP_DATA_DIR", str(tmp_path))


def _refusal(model: type[OrderSettings] | type[ProductSettings] | type[GatewaySettings]) -> str:
    with pytest.raises(SettingsRefused) as refused:
        load_settings(model)
    line = str(refused.value)
    assert "\n" not in line, "one line an operator can act on"
    return line


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SHOP_HEARTBEAT_INTERVAL_S", "0", "SHOP_HEARTBEAT_INTERVAL_S"),
        ("SHOP_HEARTBEAT_INTERVAL_S", "120", "shorter than SHOP_LEASE_DURATION_S"),
        ("SHOP_LEASE_DURATION_S", "0", "SHOP_LEASE_DURATION_S"),
        ("SHOP_REGISTRY_CACHE_TTL_S", "-1", "SHOP_REGISTRY_CACHE_TTL_S"),
        ("SHOP_MAX_BODY_BYTES", "0", "SHOP_MAX_BODY_BYTES"),
        ("SHOP_LOG_LEVEL", "LOUD", "SHOP_LOG_LEVEL"),
        ("SHOP_REGISTRY_URL", "registry:8761", "not an http(s) URL"),
        ("SHOP_EVENT_RETRY_BACKOFF_MAX_S", "0.01", "at least SHOP_EVENT_RETRY_BACKOFF_S"),
        ("SHOP_KAFKA_SASL_USERNAME", "order-service", "but the protocol is PLAINTEXT"),
        ("ORDER_PORT", "70000", "ORDER_PORT"),
        ("ORDER_BREAKER_OPEN_S", "0", "ORDER_BREAKER_OPEN_S"),
        ("ORDER_PRICE_SOURCE", "cache", "ORDER_PRICE_SOURCE"),
    ],
)
def test_nonsense_is_refused_on_every_profile(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    line = _refusal(OrderSettings)
    assert expected in line
    if name != expected:  # a rule between two settings names both
        assert "SHOP_" in line
    else:
        assert repr(value) in line, "the value given is shown"


def test_a_sane_embedded_environment_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_LOG_LEVEL", "debug")
    monkeypatch.setenv("SHOP_REGISTRY_URL", "http://r1:8761/eureka, http://r2:8761/eureka")
    platform, settings = load_settings(OrderSettings)
    assert platform.log_level == "DEBUG" and settings.database_url is None
    assert platform.registry_urls == ["http://r1:8761/eureka", "http://r2:8761/eureka"]


def test_orders_are_priced_from_the_price_list_unless_told_the_catalogue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(OrderSettings)[1].price_source == "price-list"
    monkeypatch.setenv("ORDER_PRICE_SOURCE", "catalogue")
    assert load_settings(OrderSettings)[1].price_source == "catalogue"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://db/shop", "ORDER_DATABASE_URL names 'postgres', which Shop cannot use"),
        ("postgresql+asyncpg://db/shop", "names 'postgresql+asyncpg'"),
        ("db.example.com/shop", "ORDER_DATABASE_URL is not a URL"),
        ("mongodb://db/shop", "names 'mongodb'"),  # only the catalogue lives in MongoDB
    ],
)
def test_a_database_shop_cannot_use_is_refused_on_any_profile(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("ORDER_DATABASE_URL", url)
    assert expected in _refusal(OrderSettings)


def test_a_driver_that_is_not_installed_is_named_with_its_install_command() -> None:
    with pytest.raises(SettingsRefused) as refused:
        check_url(
            "cockroach://db/shop",
            setting="ORDER_DATABASE_URL",
            schemes={"cockroach": ("shop_no_such_driver", "shop[cockroach]")},
            production=False,
        )
    assert str(refused.value) == (
        "ORDER_DATABASE_URL needs the shop_no_such_driver driver, which is not installed:"
        " pip install 'shop[cockroach]'"
    )


def test_the_catalogue_may_live_in_mongodb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCT_DATABASE_URL", "mongodb://db:27017/catalogue")
    assert load_settings(ProductSettings)[1].database_url == "mongodb://db:27017/catalogue"


def _production(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    settings = {
        "SHOP_PROFILE": "production",
        "SHOP_EVENT_BUS_URL": KAFKA,
        "SHOP_SERVICE_SECRET": SECRET,
        "ORDER_DATABASE_URL": MYSQL,
        "NOTIFICATION_DATABASE_URL": MYSQL,
        "PRODUCT_DATABASE_URL": "mongodb://db:27017/catalogue",
        "AUTH_DATABASE_URL": MYSQL,
        "SHOP_REGISTRY_URL": REGISTRY_WITH_CREDENTIALS,
        "GATEWAY_RATE_LIMIT_STORAGE_URL": "redis://cache:6379/0",
        "AUTH_LOGIN_THROTTLE_STORAGE_URL": "redis://cache:6379/0",
        "SHOP_JWKS_URL": "https://auth.internal/auth/.well-known/jwks.json",
        "SHOP_AUTH_URL": "https://auth.internal",
        "AUTH_SERVICE_CLIENTS": f'{{"order-service": "{SECRET}"}}',
        **env,
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


def test_production_with_real_engines_and_secrets_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    _production(monkeypatch)
    for model in (OrderSettings, ProductSettings, NotificationSettings, GatewaySettings):
        platform, _ = load_settings(model)
        assert platform.is_production


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ORDER_DATABASE_URL": ""}, "the production profile needs ORDER_DATABASE_URL"),
        ({"ORDER_DATABASE_URL": "sqlite:///orders.db"}, "ORDER_DATABASE_URL points at SQLite"),
        ({"SHOP_EVENT_BUS_URL": ""}, "the production profile needs SHOP_EVENT_BUS_URL"),
        ({"SHOP_EVENT_BUS_URL": "sqlite:///events.db"}, "SHOP_EVENT_BUS_URL points at SQLite"),
        ({"SHOP_EVENT_BUS_URL": "amqp://mq"}, "SHOP_EVENT_BUS_URL names 'amqp'"),
        ({"SHOP_SERVICE_SECRET": ""}, "SHOP_SERVICE_SECRET of at least 32 characters"),
        ({"SHOP_SERVICE_SECRET": "short"}, "SHOP_SERVICE_SECRET of at least 32 characters"),
        ({"SHOP_AUTH_URL": ""}, "the production profile needs SHOP_AUTH_URL"),
        ({"SHOP_JWKS_URL": ""}, "the production profile needs SHOP_JWKS_URL"),
        ({"SHOP_JWKS_URL": "http://auth.internal/jwks"}, "SHOP_JWKS_URL must be https"),
        ({"SHOP_AUTH_URL": "http://10.0.0.5:8080"}, "SHOP_AUTH_URL must be https"),
        ({"SHOP_JWKS_URL": "file:///etc/jwks.json"}, "SHOP_JWKS_URL: 'file:///etc/jwks.json' is"),
    ],
)
def test_production_fails_closed(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    _production(monkeypatch, **env)
    assert expected in _refusal(OrderSettings)


def test_production_asks_each_process_only_for_what_it_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway has no database or bus; notification holds no service secret."""
    _production(monkeypatch, SHOP_SERVICE_SECRET="", SHOP_EVENT_BUS_URL="")
    load_settings(GatewaySettings)
    _production(monkeypatch, SHOP_SERVICE_SECRET="")
    load_settings(NotificationSettings)
    _production(monkeypatch, PRODUCT_DATABASE_URL="sqlite:///catalogue.db")
    assert "PRODUCT_DATABASE_URL points at SQLite" in _refusal(ProductSettings)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "needs a signing key"),
        ({"AUTH_SIGNING_KEY": "-----BEGIN…"}, "refuses the default admin password"),
        (
            {"AUTH_SIGNING_KEY": "-----BEGIN…", "AUTH_ADMIN_PASSWORD": "short"},
            "AUTH_ADMIN_PASSWORD must be at least 8 characters",
        ),
        (
            {
                "AUTH_SIGNING_KEY": "-----BEGIN…",
                "AUTH_ADMIN_PASSWORD": "a-strong-secret",
                "AUTH_SERVICE_CLIENTS": "",
            },
            "the production profile needs AUTH_SERVICE_CLIENTS",
        ),
        (
            {
                "AUTH_SIGNING_KEY": "-----BEGIN…",
                "AUTH_ADMIN_PASSWORD": "a-strong-secret",
                "AUTH_SERVICE_CLIENTS": '{"order-service": "short"}',
            },
            "the secret of order-service is shorter than 32",
        ),
        (
            {
                "AUTH_SIGNING_KEY": "-----BEGIN…",
                "AUTH_ADMIN_PASSWORD": "a-strong-secret",
                "AUTH_SERVICE_CLIENTS": '["order-service"]',
            },
            "AUTH_SERVICE_CLIENTS must be a JSON object",
        ),
        (
            {
                "AUTH_SIGNING_KEY": "-----BEGIN…",
                "AUTH_ADMIN_PASSWORD": "a-strong-secret",
                "AUTH_DATABASE_URL": "",
            },
            "the production profile needs AUTH_DATABASE_URL",
        ),
    ],
)
def test_production_auth_refuses_missing_or_default_secrets(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    _production(monkeypatch, **env)
    with pytest.raises(SettingsRefused, match=expected):
        load_settings(AuthSettings)


def test_production_trusts_plain_http_to_auth_only_on_loopback_or_when_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _production(
        monkeypatch,
        SHOP_JWKS_URL="http://127.0.0.1:9000/auth/.well-known/jwks.json",
        SHOP_AUTH_URL="http://[::1]:9000",
    )
    load_settings(OrderSettings)
    _production(
        monkeypatch,
        SHOP_JWKS_URL="http://auth.internal/auth/.well-known/jwks.json",
        SHOP_AUTH_URL="http://auth.internal",
        SHOP_JWKS_ALLOW_HTTP="true",
    )
    load_settings(OrderSettings)
    load_settings(GatewaySettings)


def test_production_asks_for_the_auth_url_only_where_internal_calls_are_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _production(monkeypatch, SHOP_AUTH_URL="", SHOP_SERVICE_SECRET="")
    for model in (ProductSettings, NotificationSettings, GatewaySettings):
        load_settings(model)
    # Auth verifies with its own keys: it needs no JWKS URL.
    _production(
        monkeypatch,
        SHOP_JWKS_URL="",
        AUTH_SIGNING_KEY="-----BEGIN…",
        AUTH_ADMIN_PASSWORD="a-strong-secret",
    )
    load_settings(AuthSettings)


def test_one_audience_for_users_and_another_for_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_INTERNAL_AUDIENCE", "shop")
    assert "must differ from SHOP_AUTH_AUDIENCE" in _refusal(OrderSettings)


def test_the_platform_alone_reads_its_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_EVENT_BUS_URL", " ")
    assert PlatformSettings().event_bus_url is None, "an empty variable is an unset one"


def test_a_refused_url_never_shows_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_REGISTRY_URL", "ftp://admin:hunter2@registry:21/eureka")
    line = _refusal(OrderSettings)
    assert "hunter2" not in line and "//***@registry" in line


@pytest.mark.parametrize(
    "url",
    [
        "http://registry:8761/eureka",
        f"http://order-service:{SECRET}@r1:8761/eureka,http://r2:8761/eureka",
        "http://order-service@registry:8761/eureka",
    ],
)
def test_production_refuses_a_registry_url_without_the_services_credentials(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    _production(monkeypatch, SHOP_REGISTRY_URL=url)
    for model in (OrderSettings, ProductSettings):
        line = _refusal(model)
        assert "needs this service's registry credentials in SHOP_REGISTRY_URL" in line
        assert SECRET not in line


def test_the_embedded_profile_registers_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOP_REGISTRY_URL", "http://registry:8761/eureka")
    load_settings(OrderSettings)
