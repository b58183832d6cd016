"""``python -m shop.product`` serves product-service."""

from __future__ import annotations

import sys

from shop.platform.serve import main
from shop.product.app import SERVICE_NAME, build_app
from shop.product.settings import ProductSettings

if __name__ == "__main__":
    sys.exit(main(name=SERVICE_NAME, settings=ProductSettings, build_app=build_app))
