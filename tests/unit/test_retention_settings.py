"""Retention settings: each is configurable, and a bad value stops the process at start
with one line naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shop.auth.settings import AuthSettings
from shop.order.settings import OrderSettings
from shop.platform.settings import SettingsRefused, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.split("_", 1)[0] in {"SHOP", "AUTH", "ORDER"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHOP_DATA_DIR", str(tmp_path))


def _refusal(model: type[OrderSettings] | type[AuthSettings]) -> str:
    with pytest.raises(SettingsRefused) as refused:
        load_settings(model)
    line = str(refused.value)
    assert "\n" not in line, "one line an operator can act on"
    return line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHOP_RETENTION_INTERVAL_S", "0"),
        ("SHOP_RETENTION_BATCH", "0"),
        ("SHOP_EVENT_RETENTION_S", "-1"),
        ("SHOP_OUTBOX_RETENTION_S", "a week"),
        ("SHOP_IDEMPOTENCY_RETENTION_S", "-5"),
    ],
)
def test_a_bad_retention_value_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    line = _refusal(OrderSettings)
    assert name in line and repr(value) in line


def test_an_inbox_that_forgets_before_the_log_does_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOP_EVENT_RETENTION_S", "864000")
    monkeypatch.setenv("SHOP_INBOX_RETENTION_S", "86400")
    line = _refusal(OrderSettings)
    assert "SHOP_INBOX_RETENTION_S" in line and "SHOP_EVENT_RETENTION_S" in line
    monkeypatch.setenv("SHOP_EVENT_RETENTION_S", "0")  # the log keeps every event
    assert "SHOP_INBOX_RETENTION_S" in _refusal(OrderSettings)
    monkeypatch.setenv("SHOP_INBOX_RETENTION_S", "0")  # so must the inbox
    load_settings(OrderSettings)


def test_a_bad_refresh_token_retention_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_REFRESH_TOKEN_RETENTION_S", "-1")
    assert "AUTH_REFRESH_TOKEN_RETENTION_S" in _refusal(AuthSettings)


def test_the_defaults_and_overrides_reach_the_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    platform, auth = load_settings(AuthSettings)
    assert platform.event_retention_s == 7 * 86_400 <= platform.inbox_retention_s
    assert platform.outbox_retention_s == 7 * 86_400
    assert platform.idempotency_retention_s == 86_400
    monkeypatch.setenv("AUTH_REFRESH_TOKEN_RETENTION_S", "3600")
    monkeypatch.setenv("SHOP_RETENTION_INTERVAL_S", "60")
    monkeypatch.setenv("SHOP_RETENTION_BATCH", "50")
    platform, auth = load_settings(AuthSettings)
    policy = auth.refresh_token_retention(platform)
    assert (policy.keep_s, policy.interval_s, policy.batch) == (3600, 60, 50)
