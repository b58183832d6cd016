"""Through the gateway: HEAD where GET is, and input rules a client can notice (names that
hide or reorder text, Basic credentials held to the JSON log-in's rules)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.shop_system import System

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("system", ["embedded"], indirect=True),
]


def _admin(gateway: httpx.Client, system: System) -> dict[str, str]:
    login = gateway.get("/auth/getToken", auth=("admin@example.com", system.admin_password))
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def test_head_answers_like_get_without_a_body(gateway: httpx.Client, system: System) -> None:
    admin = _admin(gateway, system)
    for path, headers in (
        ("/api/product?limit=2", {}),
        ("/auth/.well-known/jwks.json", {}),
        ("/auth/me", admin),
        ("/api/inventory?skuCode=iphone_15", admin),
        ("/health/live", {}),  # the gateway's own
    ):
        get = gateway.get(path, headers=headers)
        head = gateway.head(path, headers=headers)
        assert (head.status_code, get.status_code) == (200, 200), (path, head.text)
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]
    # HEAD follows GET's rules: no token, no answer; no GET, no HEAD.
    assert gateway.head("/auth/me").status_code == 401
    refused = gateway.head("/auth/token")
    assert refused.status_code == 405 and "POST" in refused.headers["allow"]


@pytest.mark.parametrize("char", ["\x00", "\u202e", "\u2069"], ids=["NUL", "RLO", "PDI"])
def test_names_that_hide_or_reorder_text_are_422(
    gateway: httpx.Client, system: System, char: str
) -> None:
    user = gateway.post(
        "/auth/register",
        json={
            "name": f"Mallory{char}nimda",
            "email": f"mallory-{uuid.uuid4().hex[:8]}@example.com",
            "password": "correct horse",
        },
    )
    assert user.status_code == 422 and "name" in user.json()["errors"], user.text
    admin = _admin(gateway, system)
    for field in ("name", "description", "category"):
        body = {"name": "Phone", "description": "A phone", "price": "9.99", "category": "phones"}
        body[field] = f"Phone{char}exe.gpj"
        product = gateway.post("/api/product", headers=admin, json=body)
        assert product.status_code == 422 and field in product.json()["errors"], product.text


def test_basic_credentials_break_the_same_rules_as_json_ones(gateway: httpx.Client) -> None:
    basic = gateway.get("/auth/getToken", auth=("", "whatever-password"))
    as_json = gateway.request(
        "GET", "/auth/getToken", json={"email": "", "password": "whatever-password"}
    )
    assert basic.status_code == as_json.status_code == 422
    garbled = gateway.get("/auth/getToken", headers={"Authorization": "Basic !!!"})
    assert garbled.status_code == 422
    assert garbled.headers["content-type"] == "application/problem+json"
