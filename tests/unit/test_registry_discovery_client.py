"""The platform's registry client: credentials taken from its URLs, IPv6 hosts in URLs."""

from __future__ import annotations

import aiohttp
import pytest

from shop.platform.discovery import Instance, Registration, RegistryClient


def test_an_ipv6_advertise_host_is_bracketed_in_every_url() -> None:
    document = Registration(app="order-service", host="fd00::5", port=8081).to_eureka()
    instance = document["instance"]
    assert instance["homePageUrl"] == "http://[fd00::5]:8081/"
    assert instance["healthCheckUrl"] == "http://[fd00::5]:8081/health/ready"
    assert instance["statusPageUrl"] == "http://[fd00::5]:8081/health/live"
    assert instance["ipAddr"] == "fd00::5"


def test_an_instance_on_ipv6_is_reached_at_a_bracketed_url() -> None:
    found = Instance.from_eureka({"app": "X", "ipAddr": "::1", "port": {"$": 81}})
    assert found.base_url == "http://[::1]:81"
    assert Instance("x", "i", "10.0.0.5", 81).base_url == "http://10.0.0.5:81"


async def test_credentials_are_taken_out_of_the_urls_it_keeps() -> None:
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(
            base_url="http://order-service:s%40cret@r1:8761/eureka/, http://r2:8761/eureka",
            session=session,
        )
    assert client.base_urls == ["http://r1:8761/eureka", "http://r2:8761/eureka"]


async def test_a_url_that_is_not_one_is_refused_without_echoing_it() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError) as refused:
            RegistryClient(base_url="http://u:secret@[::1", session=session)
    assert "secret" not in str(refused.value)
