"""GATEWAY_TRUSTED_PROXIES and AUTH_TRUSTED_PROXIES: addresses and networks (CIDR)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shop.auth.settings import AuthSettings
from shop.gateway.settings import GatewaySettings
from shop.platform.addresses import TrustedAddresses, check_entries


def test_addresses_are_trusted_exactly() -> None:
    trusted = TrustedAddresses(["127.0.0.1", "::1", " 10.0.0.7 "])
    for peer in ("127.0.0.1", "::1", "10.0.0.7"):
        assert peer in trusted, peer
    for peer in ("127.0.0.2", "10.0.0.70", "::2", "unknown", ""):
        assert peer not in trusted


def test_pods_are_trusted_by_their_network() -> None:
    trusted = TrustedAddresses(["10.42.0.0/16", "fd00:42::/64", "192.0.2.1"])
    for peer in ("10.42.0.1", "10.42.255.254", "fd00:42::17", "192.0.2.1"):
        assert peer in trusted, peer
    for peer in ("10.43.0.1", "10.4.0.1", "fd00:43::17", "192.0.2.2", "unknown", "/run/x.sock"):
        assert peer not in trusted, peer
    # The same verdict the second time (remembered), and for a dual-stack listener's form of
    # an IPv4 peer.
    assert "10.42.0.1" in trusted
    assert "::ffff:10.42.3.4" in trusted
    assert "::ffff:192.0.2.1" in trusted
    assert "::ffff:10.43.3.4" not in trusted


def test_a_network_written_with_host_bits_means_its_network() -> None:
    assert "10.42.9.9" in TrustedAddresses(["10.42.1.1/16"])


def test_nobody_is_trusted_by_default() -> None:
    trusted = TrustedAddresses()
    assert not trusted
    assert "127.0.0.1" not in trusted
    assert TrustedAddresses(["10.0.0.0/8"])


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "gateway", "10.0.0", "", "fd00::/129", "*"])
def test_anything_else_is_refused_with_its_name(entry: str) -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a network"):
        check_entries(["127.0.0.1", entry])
    with pytest.raises(ValidationError, match="neither an IP address nor a network"):
        GatewaySettings(_env_file=None, trusted_proxies=[entry])
    with pytest.raises(ValidationError, match="neither an IP address nor a network"):
        AuthSettings(_env_file=None, trusted_proxies=[entry])


def test_the_settings_take_networks() -> None:
    gateway = GatewaySettings(_env_file=None, trusted_proxies=["10.42.0.0/16"])
    auth = AuthSettings(_env_file=None, trusted_proxies=["10.42.0.0/16", "127.0.0.1"])
    assert "10.42.7.7" in TrustedAddresses(gateway.trusted_proxies)
    assert "10.42.7.7" in TrustedAddresses(auth.trusted_proxies)
