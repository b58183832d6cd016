"""``python -m shop.registry``: run the discovery server."""

from __future__ import annotations

from shop.platform.serve import configure_logging, run
from shop.platform.settings import PlatformSettings
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings


def main() -> None:
    platform, settings = PlatformSettings(), RegistrySettings()
    configure_logging(platform.log_level)
    app = build_app(platform=platform, settings=settings)
    run(
        app,
        name="registry",
        host=settings.host,
        port=settings.port,
        log_level=platform.log_level,
    )


if __name__ == "__main__":
    main()
