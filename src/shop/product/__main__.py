"""``python -m shop.product`` serves product-service."""

from __future__ import annotations

from shop.platform.serve import configure_logging, run
from shop.platform.settings import PlatformSettings
from shop.product.app import SERVICE_NAME, build_app
from shop.product.settings import ProductSettings

__all__ = ["main"]


def main() -> None:
    platform, settings = PlatformSettings(), ProductSettings()
    configure_logging(platform.log_level)
    app = build_app(platform=platform, settings=settings)
    run(
        app, name=SERVICE_NAME, host=settings.host, port=settings.port, log_level=platform.log_level
    )


if __name__ == "__main__":
    main()
