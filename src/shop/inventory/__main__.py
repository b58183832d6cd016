"""``python -m shop.inventory`` serves inventory-service."""

from __future__ import annotations

import sys

from shop.inventory.app import SERVICE_NAME, build_app
from shop.inventory.settings import InventorySettings
from shop.platform.serve import main

if __name__ == "__main__":
    sys.exit(main(name=SERVICE_NAME, settings=InventorySettings, build_app=build_app))
