"""The entry path end to end: real processes started by the launcher, driven via the gateway."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.integration.test_registry_eureka_client import DRIVER
from tests.shop_system import System

PROBLEM_JSON = "application/problem+json"

# The edge is the same code on either profile: once, on the quicker one, is enough.
pytestmark = pytest.mark.parametrize("system", ["embedded"], indirect=True)


def _new_user(gateway: httpx.Client) -> dict[str, str]:
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    user = {"name": "Ada Lovelace", "email": email, "password": "analytical-engine"}
    resp = gateway.post("/auth/register", json=user)
    assert resp.status_code == 201, resp.text
    return user


def _login(gateway: httpx.Client, user: dict[str, str]) -> dict[str, Any]:
    resp = gateway.post("/auth/token", json={"email": user["email"], "password": user["password"]})
    assert resp.status_code == 200, resp.text
    tokens: dict[str, Any] = resp.json()
    return tokens


def _bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def test_register_token_me(gateway: httpx.Client) -> None:
    user = _new_user(gateway)
    tokens = _login(gateway, user)
    me = gateway.get("/auth/me", headers=_bearer(tokens))
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] > 0
    assert me.status_code == 200
    assert me.json()["email"] == user["email"] and me.json()["roles"] == ["customer"]
    assert me.headers["x-request-id"]


def test_get_token_with_basic_as_the_reference_does(gateway: httpx.Client) -> None:
    user = _new_user(gateway)
    ok = gateway.get("/auth/getToken", auth=(user["email"], user["password"]))
    wrong = gateway.get("/auth/getToken", auth=(user["email"], "not-the-password"))
    assert ok.status_code == 200 and ok.json()["access_token"]
    assert wrong.status_code == 401 and wrong.headers["content-type"] == PROBLEM_JSON
    assert gateway.get("/auth/me", headers=_bearer(ok.json())).status_code == 200


def test_refresh_rotates_and_reuse_revokes_the_family(gateway: httpx.Client) -> None:
    first = _login(gateway, _new_user(gateway))
    second = gateway.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    reused = gateway.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    after_reuse = gateway.post(
        "/auth/refresh", json={"refresh_token": second.json()["refresh_token"]}
    )
    assert reused.status_code == 401
    assert after_reuse.status_code == 401, "the whole family must be revoked on reuse"


def test_jwks_verifies_the_tokens_the_gateway_accepts(gateway: httpx.Client) -> None:
    tokens = _login(gateway, _new_user(gateway))
    jwks = gateway.get("/auth/.well-known/jwks.json").json()
    kid = jwt.get_unverified_header(tokens["access_token"])["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(tokens["access_token"], key=key.key, algorithms=["RS256"], audience="shop")
    assert claims["email"] and claims["exp"] - claims["iat"] == 900
    assert all("d" not in k for k in jwks["keys"]), "private key material in the JWKS"


def test_bad_input_is_422_problem_and_creates_nothing(gateway: httpx.Client) -> None:
    email = f"bad-{uuid.uuid4().hex[:8]}@example.com"
    short = gateway.post("/auth/register", json={"name": "B", "email": email, "password": "x"})
    invalid = gateway.post(
        "/auth/register", json={"name": "B", "email": "not-an-email", "password": "long-enough"}
    )
    assert short.status_code == 422 and short.headers["content-type"] == PROBLEM_JSON
    assert "password" in short.json()["errors"]
    assert invalid.status_code == 422 and "email" in invalid.json()["errors"]
    login = gateway.post("/auth/token", json={"email": email, "password": "x"})
    assert login.status_code == 401, "a refused registration must not create the user"


@pytest.mark.parametrize(
    "path",
    [
        "/auth/me/..",
        "/auth/x/../me",
        "/auth/%2e%2e/auth/me",
        "/auth/%2E/me",
        "/api/order%2f..%2f..%2fauth%2fme",
        "/auth;/me",
        "/auth/me;jsessionid=1",
        "//auth/me",
        "/auth//me",
        "/AUTH/ME",
        "/Auth/Me",
        "/api/ORDER",
        "/internal/reservations",
        "/Internal/reservations",
        "/auth/../internal/reservations",
        "/auth/%2e%2e/internal/reservations",
        "/api/product/%2e%2e/%2e%2e/internal/reservations",
        "/api/product/..%2f..%2finternal%2freservations",
        "/auth\\..\\internal",
        "/auth/%5c..%5cinternal",
    ],
)
def test_path_tricks_never_reach_a_protected_or_internal_route(
    system: System, customer_token: str, path: str
) -> None:
    # Sent byte for byte: HTTP clients would tidy dot segments away before sending. With a
    # valid token, a trick that reached /auth/me would answer 200, one that reached an
    # internal route 401: only 404 (or the server's own 400) is right.
    status, content_type = _raw_get(system.gateway, path, token=customer_token)
    assert status in (400, 404), (path, status)
    if status == 404:
        assert content_type == PROBLEM_JSON


@pytest.fixture(scope="module")
def customer_token(system: System) -> str:
    with httpx.Client(base_url=system.gateway) as gateway:
        token: str = _login(gateway, _new_user(gateway))["access_token"]
    return token


def _raw_get(base_url: str, path: str, *, token: str) -> tuple[int, str]:
    host, port = base_url.removeprefix("http://").split(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request.encode("latin-1"))
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
    content_type = next((v.strip() for k, v in headers.items() if k.lower() == "content-type"), "")
    return int(head[0].split()[1]), content_type


def test_protected_routes_need_a_valid_token(gateway: httpx.Client) -> None:
    no_token = gateway.get("/auth/me")
    forged = gateway.get("/auth/me", headers={"Authorization": "Bearer a.b.c"})
    customer = _login(gateway, _new_user(gateway))
    not_admin = gateway.post(
        "/api/product",
        headers=_bearer(customer),
        json={"name": "x", "description": "x", "price": "1.00", "skuCode": "x"},
    )
    assert no_token.status_code == 401 and forged.status_code == 401
    assert no_token.headers["www-authenticate"].lower().startswith("bearer")
    assert not_admin.status_code == 403


def test_registry_lists_every_service_and_shows_the_dashboard(system: System) -> None:
    apps = httpx.get(f"{system.registry}/eureka/apps", headers={"Accept": "application/json"})
    names = {a["name"] for a in apps.json()["applications"]["application"]}
    dashboard = httpx.get(f"{system.registry}/eureka/web")
    assert {"API-GATEWAY", "AUTH-SERVICE"} <= names
    assert dashboard.status_code == 200 and "AUTH-SERVICE" in dashboard.text


def test_a_third_party_eureka_client_registers_renews_and_leaves(
    system: System, tmp_path: Path
) -> None:
    app_name = "legacy-client"
    url = f"{system.registry}/eureka/apps/{app_name.upper()}"
    report = tmp_path / "client.jsonl"
    # Its credential in the URL, as Eureka deployments give one to Spring's clients.
    secret = system.registry_clients[app_name]
    server = system.registry.replace("http://", f"http://{app_name}:{secret}@") + "/eureka"
    # py-eureka-client runs in a process of its own: its heartbeat thread outlives stop().
    client = subprocess.Popen(
        [sys.executable, "-c", DRIVER, server, app_name, "9999", str(report)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait(lambda: report.exists() and "started" in report.read_text(), what="the client")
        listed = httpx.get(url, headers={"Accept": "application/json"})
        assert listed.status_code == 200
        first = _renewed_at(listed.json())
        _wait(
            lambda: (
                _renewed_at(httpx.get(url, headers={"Accept": "application/json"}).json()) > first
            ),
            what="a heartbeat",
        )
        assert client.stdin is not None
        client.stdin.write("stop\n")
        client.stdin.flush()
        client.wait(timeout=10)
        assert httpx.get(url, headers={"Accept": "application/json"}).status_code == 404
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if client.stdin is not None:
            client.stdin.close()


def test_the_registry_refuses_a_rogue_auth_service_and_anonymous_changes(system: System) -> None:
    eureka = f"{system.registry}/eureka/apps/AUTH-SERVICE"
    listed = httpx.get(eureka, headers={"Accept": "application/json"})
    (real,) = listed.json()["application"]["instance"]
    rogue = {"instance": {**real, "instanceId": "10.6.6.6:auth-service:1", "ipAddr": "10.6.6.6"}}
    order = ("order-service", system.registry_clients["order-service"])

    anonymous = httpx.post(eureka, json=rogue)
    as_order = httpx.post(eureka, json=rogue, auth=order)
    cancel = httpx.delete(f"{eureka}/{real['instanceId']}")
    override = httpx.put(
        f"{eureka}/{real['instanceId']}/status", params={"value": "OUT_OF_SERVICE"}, auth=order
    )

    assert (anonymous.status_code, as_order.status_code) == (401, 403)
    assert (cancel.status_code, override.status_code) == (401, 403)
    after = httpx.get(eureka, headers={"Accept": "application/json"}).json()
    assert [(i["instanceId"], i["status"]) for i in after["application"]["instance"]] == [
        (real["instanceId"], "UP")
    ]


def _wait(check: Callable[[], bool], *, what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _renewed_at(body: dict[str, Any]) -> int:
    instance = body["application"]["instance"]
    instance = instance[0] if isinstance(instance, list) else instance
    return int(instance["leaseInfo"]["lastRenewalTimestamp"])


def test_each_answer_carries_a_request_id_through_the_gateway(gateway: httpx.Client) -> None:
    started = time.monotonic()
    resp = gateway.get("/auth/.well-known/jwks.json", headers={"X-Request-ID": "e2e-trace-1"})
    assert resp.headers["x-request-id"] == "e2e-trace-1"
    assert time.monotonic() - started < 5
