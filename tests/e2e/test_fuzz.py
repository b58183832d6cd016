"""Schemathesis fuzzes the public API through the gateway, as any client could call it.

The document is the gateway's own ``/openapi.json`` (every routed operation of every
service). Each operation gets ``SHOP_FUZZ_EXAMPLES`` generated requests (10 in CI;
``make fuzz`` runs 1,000) with a customer's token, and the admin-only ones again with an
admin's: no answer may be a 5xx, and every answer must carry a documented status, the
documented media type and a body that fits the documented schema. Nothing is excluded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

from shop.gateway.domain import Access, Match, public_route_table
from tests.shop_system import System

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("system", ["embedded"], indirect=True),
]

EXAMPLES = int(os.environ.get("SHOP_FUZZ_EXAMPLES", "10"))
# CI draws the same examples every run (a red build is reproducible, never a coin toss);
# `make fuzz` draws new ones each time, to find what CI's fixed draw does not.
RANDOM = os.environ.get("SHOP_FUZZ_RANDOM") == "1"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# The fuzzer calls from an address of its own: its failed log-ins and its request rate
# count against it, as they would against any one client, and never against the other
# end-to-end tests' 127.0.0.1.
FUZZER_ADDRESS = "127.0.0.2"


class _FromAddress(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (FUZZER_ADDRESS, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture
def fuzzer_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.mount("http://", _FromAddress())
        yield session


def _token(system: System, email: str, password: str) -> str:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        if email != "admin@example.com":
            registered = gateway.post(
                "/auth/register",
                json={"name": "Fuzz Customer", "email": email, "password": password},
            )
            assert registered.status_code == 201, registered.text
        answer = gateway.post("/auth/token", json={"email": email, "password": password})
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token


# Negative cases may invent any header, these too. They frame the HTTP message rather than
# say anything to the API: a malformed one (``content-length: J^``) is refused by the HTTP
# parser with its plain-text 400 before any of Shop's code runs (the one documented
# exception to problem+json, docs/platform.md), so the fuzzer does not send them.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection"})


def _without_framing_headers(case: schemathesis.Case[Any]) -> None:
    if case.headers:
        for name in [n for n in case.headers if n.lower() in _FRAMING_HEADERS]:
            del case.headers[name]


def _for_admins_only(method: str, path: str) -> bool:
    """What the gateway's own route table keeps for admins (a template path matches too)."""
    outcome = public_route_table(dashboard_access=Access.ADMIN).match(method.upper(), path)
    return isinstance(outcome, Match) and outcome.access is Access.ADMIN


def _fuzz(
    schema: schemathesis.BaseSchema,
    *,
    token: str,
    session: requests.Session,
    admin_only: bool,
) -> list[str]:
    """Every failing operation with its first failure; hypothesis does not shrink (time)."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation the fuzzer cannot read is a failure too
            failures.append(f"unreadable operation: {result.err()}")
            continue
        operation = result.ok()
        if admin_only and not _for_admins_only(operation.method, operation.path):
            continue
        # Valid requests and invalid ones alike: refusals must be as documented as answers.
        strategy = operation.as_strategy(
            schemathesis.GenerationMode.POSITIVE
        ) | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            # Requests to a live system are slow next to hypothesis' expectations.
            suppress_health_check=list(HealthCheck),
            derandomize=not RANDOM,
        )
        @given(case=strategy)
        def call(case: schemathesis.Case[Any]) -> None:
            _without_framing_headers(case)
            case.call_and_validate(
                session=session,
                headers={"Authorization": f"Bearer {token}"},
                checks=CHECKS,
                timeout=30,
            )

        try:
            call()
        # A failing operation must not hide the next one's failures: all are reported.
        except (AssertionError, BaseExceptionGroup) as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    return failures


@pytest.fixture
def api_schema(system: System) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{system.gateway}/openapi.json")
    return schema


def test_every_public_operation_answers_as_documented_to_a_customer(
    system: System, api_schema: schemathesis.BaseSchema, fuzzer_session: requests.Session
) -> None:
    token = _token(system, "fuzz-customer@example.com", "fuzz-password-1")
    failures = _fuzz(api_schema, token=token, session=fuzzer_session, admin_only=False)
    assert not failures, "\n\n".join(failures)


def test_every_admin_operation_answers_as_documented_to_an_admin(
    system: System, api_schema: schemathesis.BaseSchema, fuzzer_session: requests.Session
) -> None:
    token = _token(system, "admin@example.com", system.admin_password)
    failures = _fuzz(api_schema, token=token, session=fuzzer_session, admin_only=True)
    assert not failures, "\n\n".join(failures)
