"""The fast lane reads a bearer token without the platform's regex in the common form; every
form must come out exactly as ``bearer_token`` reads it (what the ASGI path and the services
use), or a token could pass one gate and not the other."""

from __future__ import annotations

import pytest

from shop.gateway.fastlane import _bearer
from shop.platform.security import bearer_token

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl-_~+/="


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"Bearer  {TOKEN}",
        f" Bearer {TOKEN}",
        f"Bearer {TOKEN} ",
        f"Bearer\t{TOKEN}",
        "Bearer ",
        "Bearer",
        f"Bearer {TOKEN} extra",
        f"Bearer {TOKEN[:10]},{TOKEN[10:]}",
        f"Bearer {TOKEN[:10]}\u017f{TOKEN[10:]}",
        f"Basic {TOKEN}",
        f"Bearerx {TOKEN}",
        "",
    ],
)
def test_the_fast_lane_reads_a_bearer_token_as_the_platform_does(header: str) -> None:
    raw = header.encode("utf-8")
    assert _bearer(raw) == bearer_token(raw.decode("latin-1"))


def test_the_plain_form_gives_the_token() -> None:
    assert _bearer(f"Bearer {TOKEN}".encode()) == TOKEN
