"""The console's pure parts: which paths the gateway keeps for itself, and the registry's
answer read in both of Eureka's JSON shapes."""

from __future__ import annotations

import pytest

from shop.gateway.console import _registered, serves


@pytest.mark.parametrize(
    "path", ["/console", "/console/api/services", "/console/assets/console.js", "/redoc"]
)
def test_the_console_and_docs_paths_are_the_gateways_own(path: str) -> None:
    assert serves(path)


@pytest.mark.parametrize(
    "path", ["/api/order", "/consoles", "/redocs", "/auth/token", "/documents", "/"]
)
def test_every_other_path_goes_to_the_proxy(path: str) -> None:
    assert not serves(path)


def _instance(app: str, port: int, status: str = "UP") -> dict[str, object]:
    return {
        "instanceId": f"127.0.0.1:{app}:{port}",
        "app": app.upper(),
        "ipAddr": "127.0.0.1",
        "status": status,
        "port": {"$": port, "@enabled": "true"},
    }


def test_a_list_of_one_written_as_the_item_alone_is_read() -> None:
    body = {
        "applications": {
            "application": {"name": "ORDER-SERVICE", "instance": _instance("order-service", 1)}
        }
    }
    [only] = _registered(body)
    assert (only.app, only.port, only.status) == ("order-service", 1, "UP")


def test_every_instance_of_every_application_is_read() -> None:
    body = {
        "applications": {
            "application": [
                {"name": "A", "instance": [_instance("a", 1), _instance("a", 2, "DOWN")]},
                {"name": "B", "instance": [_instance("b", 3)]},
            ]
        }
    }
    found = _registered(body)
    assert [(i.app, i.port, i.status) for i in found] == [
        ("a", 1, "UP"),
        ("a", 2, "DOWN"),
        ("b", 3, "UP"),
    ]


@pytest.mark.parametrize("body", [None, [], {}, {"applications": []}, {"applications": {}}])
def test_an_empty_or_odd_answer_is_no_instance(body: object) -> None:
    assert _registered(body) == []
