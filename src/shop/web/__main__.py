"""``python -m shop.web`` serves web-service, the storefront."""

from __future__ import annotations

import sys

from shop.platform.serve import main
from shop.web.app import SERVICE_NAME, build_app
from shop.web.settings import WebSettings

if __name__ == "__main__":
    sys.exit(main(name=SERVICE_NAME, settings=WebSettings, build_app=build_app))
