"""``python -m shop.order`` serves order-service."""

from __future__ import annotations

import sys

from shop.order.app import SERVICE_NAME, build_app
from shop.order.settings import OrderSettings
from shop.platform.serve import main

if __name__ == "__main__":
    sys.exit(main(name=SERVICE_NAME, settings=OrderSettings, build_app=build_app))
