"""``python -m shop.inventory`` serves inventory-service."""

from __future__ import annotations

from shop.inventory.app import SERVICE_NAME, build_app
from shop.inventory.settings import InventorySettings
from shop.platform.serve import configure_logging, run
from shop.platform.settings import PlatformSettings

__all__ = ["main"]


def main() -> None:
    platform, settings = PlatformSettings(), InventorySettings()
    configure_logging(platform.log_level)
    app = build_app(platform=platform, settings=settings)
    run(
        app, name=SERVICE_NAME, host=settings.host, port=settings.port, log_level=platform.log_level
    )


if __name__ == "__main__":
    main()
