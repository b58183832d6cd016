"""A user's ``requestId`` from an error body finds that request's log lines with one grep of
the ``shop up`` output: the gateway's access line and the service's, with the same trace id
(the body's ``traceId``), and the route's template rather than the path asked for."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.shop_system import System


def _grep(system: System, needle: str, *, services: set[str]) -> list[str]:
    """The lines holding ``needle``, once access lines of all ``services`` are among them
    (the writers batch for a few milliseconds, the launcher relays)."""
    deadline = time.monotonic() + 20
    while True:
        lines = [line for line in system.output().splitlines() if needle in line]
        if services <= {s for s in services for line in _access(lines) if _names(line, s)}:
            return lines
        if time.monotonic() > deadline:
            pytest.fail(f"no access lines of {services} for {needle} in:\n" + "\n".join(lines))
        time.sleep(0.05)


def _access(lines: list[str]) -> list[str]:
    """Access lines, in text (embedded) or JSON (production)."""
    return [line for line in lines if " access: " in line or '"logger": "access"' in line]


def _names(line: str, service: str) -> bool:
    return f"service={service} " in line or f'"service": "{service}"' in line


@pytest.fixture
def customer(gateway: httpx.Client) -> dict[str, str]:
    email = f"logs-{uuid.uuid4().hex[:10]}@example.com"
    registered = gateway.post(
        "/auth/register", json={"name": "Lin", "email": email, "password": "grep-for-it-1"}
    )
    assert registered.status_code == 201, registered.text
    login = gateway.get("/auth/getToken", auth=(email, "grep-for-it-1"))
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def test_a_problems_request_id_finds_the_gateways_and_the_services_access_lines(
    system: System, gateway: httpx.Client, customer: dict[str, str]
) -> None:
    # The order service's lean route (fastpath.py): a body that is no order is a 422.
    refused = gateway.post("/api/order", headers=customer, json={"orderLineItemDtoList": 7})
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    lines = _grep(system, problem["requestId"], services={"api-gateway", "order-service"})
    for service in ("api-gateway", "order-service"):
        (line,) = [line for line in _access(lines) if _names(line, service)]
        assert problem["traceId"] in line
        assert "POST" in line and "422" in line


def test_a_templated_route_is_logged_by_its_template_not_its_path(
    system: System, gateway: httpx.Client
) -> None:
    missing = f"no_such_{uuid.uuid4().hex[:8]}"
    refused = gateway.get(f"/api/product/{missing}")
    assert refused.status_code == 404, refused.text
    problem = refused.json()
    lines = _grep(system, problem["requestId"], services={"api-gateway", "product-service"})
    (line,) = [line for line in _access(lines) if _names(line, "product-service")]
    assert problem["traceId"] in line
    assert missing not in line  # the template, never the raw path (nor what the user typed)
