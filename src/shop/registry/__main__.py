"""``python -m shop.registry``: run the discovery server."""

from __future__ import annotations

from shop.platform.serve import bind_socket, configure_logging, serve
from shop.platform.settings import PlatformSettings
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings


def main() -> None:
    platform = PlatformSettings()
    settings = RegistrySettings()
    configure_logging(platform.log_level)
    sock = bind_socket(settings.host, settings.port)
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name="registry", sock=sock, log_level=platform.log_level)


if __name__ == "__main__":
    main()
