"""``shop up``: starts every Shop service as its own process, waits until each is ready,
prints where to find them, and stops them all cleanly.

Usable from Python too (end-to-end tests)::

    async with shop_system(data_dir=tmp_path, registry_port=0, gateway_port=0) as shop:
        gateway = shop.url("gateway")
"""

from shop.launcher.services import SERVICES, ServiceSpec
from shop.launcher.supervisor import ServiceFailed, Supervisor, shop_system

__all__ = ["SERVICES", "ServiceFailed", "ServiceSpec", "Supervisor", "shop_system"]
