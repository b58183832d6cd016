"""``python -m shop.registry``: run the discovery server."""

from __future__ import annotations

import sys

from shop.platform.serve import main
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings

if __name__ == "__main__":
    sys.exit(main(name="registry", settings=RegistrySettings, build_app=build_app))
