"""The registry attacks of issue 7, through the real processes: a registered impostor gains
nothing.

Registering needs a credential now, so each impostor here registers with the real
application's own registry credential and takes the real instances out of service: the
worst the registry can be made to say. Keys still come from the pinned JWKS URL, service
tokens from the pinned auth URL, and what an impostor inventory receives is a short-lived
token that opens internal routes of the impostor's own address only.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.shop_system import System

# On both profiles: the attacks must fail whichever engines and how many instances run.

JWKS_PATH = "/auth/.well-known/jwks.json"
JSON = {"Accept": "application/json"}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class Impostor:
    """An HTTP server of the attacker's: it publishes its own key as a JWKS, issues tokens
    signed with it to whoever asks, refuses reservations (503), and records every request."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = "impostor-key"
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def forge(self, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "sub": str(uuid.uuid4()),
            "email": "mallory@example.com",
            "roles": ["customer", "admin"],
            "iss": "shop-auth",
            "aud": "shop",
            "iat": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path.split("?")[0] == JWKS_PATH:
            return 200, self.jwks()
        if path.startswith("/internal/service-token"):
            return 200, {"access_token": self.forge(), "token_type": "bearer", "expires_in": 900}
        if path.startswith("/internal/reservations"):
            return 503, {"title": "Service Unavailable", "status": 503}
        return 200, {"status": "UP"}

    def paths(self) -> list[str]:
        return [s.path.split("?")[0] for s in self.seen]

    def everything_received(self) -> str:
        return "\n".join(f"{s.method} {s.path} {s.headers} {s.body}" for s in self.seen)

    @contextmanager
    def serving(self) -> Iterator[Impostor]:
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace") if length else ""
                impostor.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                status, answer = impostor.answer(self.command, self.path)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def _instances(system: System, app: str) -> list[dict[str, Any]]:
    listed = httpx.get(f"{system.registry}/eureka/apps/{app.upper()}", headers=JSON)
    assert listed.status_code == 200, listed.text
    instances = listed.json()["application"]["instance"]
    return instances if isinstance(instances, list) else [instances]


def _url(instance: dict[str, Any]) -> str:
    port = instance["port"]
    return f"http://{instance['ipAddr']}:{port['$'] if isinstance(port, dict) else port}"


def _wait(check: Callable[[], bool], *, what: str, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextmanager
def posing_as(system: System, app: str, impostor: Impostor) -> Iterator[None]:
    """``impostor`` registered as ``app`` with that application's own registry credential,
    and the real instances taken out of service: the registry names the impostor alone."""
    credential = (app, system.registry_clients[app])
    eureka = f"{system.registry}/eureka/apps/{app.upper()}"
    real = _instances(system, app)
    instance_id = f"127.0.0.1:{app}:{impostor.port}"
    registration = {
        **real[0],
        "instanceId": instance_id,
        "hostName": "127.0.0.1",
        "ipAddr": "127.0.0.1",
        "port": {"$": impostor.port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "status": "UP",
    }
    for stale in ("overriddenStatus", "overriddenstatus", "leaseInfo", "actionType"):
        registration.pop(stale, None)
    registered = httpx.post(eureka, json={"instance": registration}, auth=credential)
    assert registered.status_code == 204, registered.text
    try:
        for instance in real:
            taken_down = httpx.put(
                f"{eureka}/{instance['instanceId']}/status",
                params={"value": "OUT_OF_SERVICE"},
                auth=credential,
            )
            assert taken_down.status_code == 200, taken_down.text

        def impostor_alone() -> bool:
            up = [i["instanceId"] for i in _instances(system, app) if i["status"] == "UP"]
            return up == [instance_id]

        _wait(impostor_alone, what=f"the registry to name the impostor alone as {app}")
        time.sleep(2.0)  # every process's registry cache (SHOP_REGISTRY_CACHE_TTL_S=1) too
        yield
    finally:
        httpx.delete(f"{eureka}/{instance_id}", auth=credential)
        for instance in real:
            httpx.delete(f"{eureka}/{instance['instanceId']}/status", auth=credential)
        _wait(
            lambda: all(i["status"] == "UP" for i in _instances(system, app)),
            what=f"the real {app} to be back",
        )
        time.sleep(2.0)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(gateway: httpx.Client, email: str, password: str) -> str:
    answer = gateway.post("/auth/token", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def _customer(gateway: httpx.Client) -> str:
    email, password = f"trust-{uuid.uuid4().hex[:8]}@example.com", "a-long-password"
    registered = gateway.post(
        "/auth/register", json={"name": "Trusting", "email": email, "password": password}
    )
    assert registered.status_code == 201, registered.text
    return _login(gateway, email, password)


def _stock(gateway: httpx.Client, token: str, sku: str) -> int:
    answer = gateway.get("/api/inventory", params={"skuCode": sku}, headers=_bearer(token))
    assert answer.status_code == 200, answer.text
    quantity: int = answer.json()[0]["quantity"]
    return quantity


def test_a_registered_impostor_auth_service_gets_no_secret_and_its_tokens_fail(
    system: System, gateway: httpx.Client
) -> None:
    admin = _login(gateway, "admin@example.com", system.admin_password)  # before the attack
    inventory = _instances(system, "inventory-service")[0]
    stock_before = _stock(gateway, admin, "pixel_8")
    impostor = Impostor()
    outcomes: list[tuple[int, int, int]] = []
    with impostor.serving(), posing_as(system, "auth-service", impostor):
        forged_admin = _bearer(impostor.forge())
        forged_service = _bearer(
            impostor.forge(sub="service:order-service", roles=["service"], aud="shop-internal")
        )
        # Longer than any verifier's JWKS refetch interval (10 s): the attack in the issue
        # succeeded after about 11 s, once the verifiers had refetched from the impostor.
        deadline = time.monotonic() + 12.0
        while time.monotonic() < deadline:
            outcomes.append(
                (
                    gateway.post(
                        "/api/inventory",
                        headers=forged_admin,
                        json={"skuCode": "pixel_8", "quantity": 1000},
                    ).status_code,
                    httpx.post(
                        f"{_url(inventory)}/api/inventory",
                        headers=forged_admin,
                        json={"skuCode": "pixel_8", "quantity": 1000},
                    ).status_code,
                    httpx.post(
                        f"{_url(inventory)}/internal/reservations",
                        headers=forged_service,
                        json={
                            "orderNumber": str(uuid.uuid4()),
                            "lines": [{"skuCode": "pixel_8", "quantity": 1}],
                        },
                    ).status_code,
                )
            )
            time.sleep(1.0)
        # Real tokens still pass and orders still reach the real auth for service tokens.
        still_admin = gateway.get(
            "/api/inventory", params={"skuCode": "pixel_8"}, headers=_bearer(admin)
        )
        placed = gateway.post(
            "/api/order",
            headers=_bearer(admin),
            json={"items": [{"skuCode": "airpods_pro", "quantity": 1}]},
        )
    assert set(outcomes) == {(401, 401, 401)}, outcomes
    assert still_admin.status_code == 200, still_admin.text
    assert placed.status_code == 201, placed.text
    assert _stock(gateway, admin, "pixel_8") == stock_before
    # Nobody asked the impostor for keys, nor offered it a secret.
    assert JWKS_PATH not in impostor.paths()
    assert "/internal/service-token" not in impostor.paths()
    received = impostor.everything_received()
    for secret in system.service_clients.values():
        assert secret not in received


def test_a_registered_impostor_inventory_gets_a_short_lived_internal_token_only(
    system: System, gateway: httpx.Client
) -> None:
    customer = _customer(gateway)
    real_inventory = _instances(system, "inventory-service")[0]
    impostor = Impostor()
    with impostor.serving(), posing_as(system, "inventory-service", impostor):
        attempted = gateway.post(
            "/api/order",
            headers=_bearer(customer),
            json={"items": [{"skuCode": "pixel_8", "quantity": 1}]},
        )
    # The impostor refused the reservation: the order is not placed, honestly.
    assert attempted.status_code == 503, attempted.text
    calls = [s for s in impostor.seen if s.path.startswith("/internal/reservations")]
    assert calls, "the order service called the impostor: what did it hand over?"
    received = impostor.everything_received()
    for secret in system.service_clients.values():
        assert secret not in received, "a reusable secret reached an address the registry gave"
    assert customer not in received, "a user's token is never forwarded to a peer"
    captured = calls[0].headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(captured, options={"verify_signature": False})
    assert claims["sub"] == "service:order-service"
    assert claims["aud"] == "shop-internal"
    assert claims["roles"] == ["service"]
    assert claims["exp"] - claims["iat"] <= 900, "short-lived"
    assert claims["target"] == f"http://127.0.0.1:{impostor.port}", "good at the impostor only"
    # Replayed at the real inventory's internal route, it reserves nothing.
    admin = _login(gateway, "admin@example.com", system.admin_password)
    stock_before = _stock(gateway, admin, "pixel_8")
    order_number = str(uuid.uuid4())
    replayed = httpx.post(
        f"{_url(real_inventory)}/internal/reservations",
        headers=_bearer(captured),
        json={"orderNumber": order_number, "lines": [{"skuCode": "pixel_8", "quantity": 5}]},
    )
    assert replayed.status_code == 403, replayed.text
    assert "another instance" in replayed.json()["detail"]
    assert _stock(gateway, admin, "pixel_8") == stock_before
    # What it captured opens no user's door: not at the edge, not as a user at inventory.
    at_gateway = gateway.post(
        "/api/inventory", headers=_bearer(captured), json={"skuCode": "pixel_8", "quantity": 5}
    )
    as_user = httpx.post(
        f"{_url(real_inventory)}/api/inventory",
        headers=_bearer(captured),
        json={"skuCode": "pixel_8", "quantity": 5},
    )
    assert at_gateway.status_code == 401
    assert as_user.status_code == 403


def test_internal_reservations_refuse_users_and_other_services(
    system: System, gateway: httpx.Client
) -> None:
    inventory = _instances(system, "inventory-service")[0]
    auth = _instances(system, "auth-service")[0]
    # A genuine service token of notification-service, from the real auth: genuine, but not
    # the caller reservations accept. (`shop up` gives notification no secret at all.)
    issued = httpx.post(
        f"{_url(auth)}/internal/service-token",
        json={
            "service": "notification-service",
            "secret": system.service_clients["notification-service"],
            "target": _url(inventory),
        },
    )
    assert issued.status_code == 200, issued.text
    notification = issued.json()["access_token"]
    callers = {
        "customer": _customer(gateway),
        "admin": _login(gateway, "admin@example.com", system.admin_password),
        "notification-service": notification,
    }
    order_number = str(uuid.uuid4())
    body = {"orderNumber": order_number, "lines": [{"skuCode": "pixel_8", "quantity": 1}]}
    for name, token in callers.items():
        reserve = httpx.post(
            f"{_url(inventory)}/internal/reservations", headers=_bearer(token), json=body
        )
        release = httpx.delete(
            f"{_url(inventory)}/internal/reservations/{order_number}", headers=_bearer(token)
        )
        assert (reserve.status_code, release.status_code) == (403, 403), name
        assert reserve.headers["content-type"] == "application/problem+json"
