"""Which peers a process trusts to tell it the client's address (``X-Forwarded-For``): the
gateway's load balancers and the storefront (``GATEWAY_TRUSTED_PROXIES``), auth's gateway
(``AUTH_TRUSTED_PROXIES``).

Entries are addresses (``10.0.0.7``, ``::1``) or networks in CIDR form (``10.42.0.0/16``,
``fd00::/8``): pods, whose addresses change with every restart, are trusted by their
network. Anything else is refused when the settings are read, so a typo cannot quietly
trust nobody, or everybody.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["AddressEntries", "TrustedAddresses", "check_entries"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Peers whose verdict is kept when networks are given (bounded: a scan of many addresses
# must not grow it without end; past it, each new peer is parsed again).
_REMEMBERED = 4096


def _network(entry: str) -> _Network:
    """``entry`` as a network (an address is a network of one); ValueError names it."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{entry!r} is neither an IP address nor a network (CIDR, e.g. 10.42.0.0/16)"
        ) from None


def check_entries(entries: Iterable[str]) -> list[str]:
    """The entries, stripped, after checking that each is an address or a network (for a
    settings validator: raises ValueError naming the first that is not)."""
    out = [entry.strip() for entry in entries]
    for entry in out:
        _network(entry)
    return out


# A setting's list of addresses and networks, checked when the settings are read.
AddressEntries = Annotated[list[str], AfterValidator(check_entries)]


class TrustedAddresses:
    """``peer in trusted``: whether ``peer`` (an address as the server reports it) is one of
    the addresses or inside one of the networks given. A plain address is a set look-up, as
    before networks were allowed; a network costs one parse per new peer, then a look-up."""

    __slots__ = ("_exact", "_networks", "_seen")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        exact: set[str] = set()
        networks: list[_Network] = []
        for entry in entries:
            network = _network(entry)
            if network.num_addresses == 1:
                exact.add(str(network.network_address))
            else:
                networks.append(network)
        self._exact = frozenset(exact)
        self._networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._exact or self._networks)

    def __repr__(self) -> str:
        shown = sorted(self._exact) + [str(n) for n in self._networks]
        return f"TrustedAddresses({shown!r})"

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, str):
            return False
        if peer in self._exact:
            return True
        if not self._networks:
            return False
        known = self._seen.get(peer)
        if known is None:
            known = self._judge(peer)
            if len(self._seen) < _REMEMBERED:
                self._seen[peer] = known
        return known

    def _judge(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # "unknown", a Unix socket's path: not an address, not trusted
            return False
        # A dual-stack listener reports an IPv4 peer as ::ffff:a.b.c.d.
        mapped = getattr(address, "ipv4_mapped", None)
        candidates = (address,) if mapped is None else (address, mapped)
        if any(str(candidate) in self._exact for candidate in candidates[1:]):
            return True
        return any(
            candidate in network
            for candidate in candidates
            for network in self._networks
            if candidate.version == network.version
        )
