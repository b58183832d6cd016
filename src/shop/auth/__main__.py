"""``python -m shop.auth`` serves auth-service; ``python -m shop.auth rotate-key`` adds a key."""

from __future__ import annotations

import sys

from shop.auth.app import SERVICE_NAME, build_app
from shop.auth.keys import add_key_file, keyring_from_dir
from shop.auth.settings import AuthSettings, UnsafeSettings
from shop.platform import serve as platform_serve
from shop.platform.serve import configure_logging
from shop.platform.settings import PlatformSettings

__all__ = ["main"]

USAGE = "usage: python -m shop.auth [serve | rotate-key]"


def rotate_key(platform: PlatformSettings, settings: AuthSettings) -> int:
    if platform.is_production or settings.has_configured_key():
        print(
            "the signing key comes from settings (AUTH_SIGNING_KEY[_FILE]); rotate it there and "
            "move the old one to AUTH_PREVIOUS_SIGNING_KEYS",
            file=sys.stderr,
        )
        return 2
    directory = settings.resolved_keys_dir(platform)
    path = add_key_file(directory, key_size=settings.key_size)
    keyring = keyring_from_dir(directory, keep_previous=settings.published_previous_keys)
    print(f"new signing key {keyring.current.kid} in {path}; restart auth-service to sign with it")
    return 0


def run(platform: PlatformSettings, settings: AuthSettings) -> int:
    configure_logging(platform.log_level)
    try:
        app = build_app(platform=platform, settings=settings)
    except UnsafeSettings as exc:
        print(f"{SERVICE_NAME} refuses to start: {exc}", file=sys.stderr)
        return 2
    platform_serve.run(
        app, name=SERVICE_NAME, host=settings.host, port=settings.port, log_level=platform.log_level
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "serve"
    platform, settings = PlatformSettings(), AuthSettings()
    if command == "serve":
        return run(platform, settings)
    if command == "rotate-key":
        return rotate_key(platform, settings)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
