"""``shop up``: starts every Shop service as its own process, waits until each is ready,
prints where to find them, and stops them all cleanly.

Usable from Python too (end-to-end tests)::

    async with shop_system(data_dir=tmp_path, registry_port=0, gateway_port=0) as shop:
        gateway = shop.url("gateway")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shop.launcher.services import SERVICES, ServiceSpec
    from shop.launcher.supervisor import ServiceFailed, Supervisor, shop_system

__all__ = ["SERVICES", "ServiceFailed", "ServiceSpec", "Supervisor", "shop_system"]

# Imported when first asked for: ``shop up`` starts its fork server before it imports
# pydantic (shop.launcher.cli), and importing this package comes first.
_HOMES = {
    "SERVICES": "shop.launcher.services",
    "ServiceSpec": "shop.launcher.services",
    "ServiceFailed": "shop.launcher.supervisor",
    "Supervisor": "shop.launcher.supervisor",
    "shop_system": "shop.launcher.supervisor",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
