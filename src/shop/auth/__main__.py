"""``python -m shop.auth`` serves auth-service; ``rotate-key`` adds a signing key;
``set-admin-password`` gives the admin account the password in ``AUTH_ADMIN_PASSWORD``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shop.auth.app import SERVICE_NAME, build_app, passwords_from, refuse_dev_admin
from shop.auth.domain import normalise_email
from shop.auth.keys import add_key_file, keyring_from_dir
from shop.auth.settings import DEV_ADMIN_PASSWORD, AuthSettings
from shop.auth.store import SqlAuthStore
from shop.platform import serve as platform_serve
from shop.platform.db import create_engine, migrate
from shop.platform.settings import PlatformSettings, SettingsRefused, load_settings

__all__ = ["main"]

USAGE = "usage: python -m shop.auth [serve | rotate-key | set-admin-password]"
log = logging.getLogger("shop.auth")


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


@asynccontextmanager
async def _store(platform: PlatformSettings, settings: AuthSettings) -> AsyncIterator[SqlAuthStore]:
    engine = create_engine(settings.resolved_database_url(platform=platform, service="auth"))
    try:
        await migrate(engine, package="shop.auth", service="auth")
        yield SqlAuthStore(engine)
    finally:
        await engine.dispose()


def preflight(platform: PlatformSettings, settings: AuthSettings) -> None:
    """On the production profile, refuse an admin account that still has the dev password,
    before the port is bound. A database not reachable yet is the lifespan's to report."""
    if not platform.is_production:
        return

    async def check() -> None:
        async with _store(platform, settings) as store:
            await refuse_dev_admin(store, passwords_from(settings), email=settings.admin_email)

    try:
        asyncio.run(check())
    except SettingsRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - reported, and checked again at start-up
        log.warning("could not look at the admin account before starting: %r", exc)


def set_admin_password(platform: PlatformSettings, settings: AuthSettings) -> int:
    password = settings.admin_password.get_secret_value()
    if not password or password == DEV_ADMIN_PASSWORD:
        print("set AUTH_ADMIN_PASSWORD to the new password first", file=sys.stderr)
        return 2

    async def change() -> bool:
        async with _store(platform, settings) as store:
            found = await store.credentials(normalise_email(settings.admin_email))
            if found is None:
                return False
            await store.set_password_hash(
                found.user.id, await passwords_from(settings).hash(password)
            )
            return True

    if not asyncio.run(change()):
        print(f"there is no account {settings.admin_email}", file=sys.stderr)
        return 1
    print(f"the password of {settings.admin_email} is now the one in AUTH_ADMIN_PASSWORD")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "serve"
    if command == "serve":
        return platform_serve.main(
            name=SERVICE_NAME, settings=AuthSettings, build_app=build_app, preflight=preflight
        )
    if command not in ("rotate-key", "set-admin-password"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        platform, settings = load_settings(AuthSettings)
    except SettingsRefused as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    if command == "rotate-key":
        return rotate_key(platform, settings)
    return set_admin_password(platform, settings)


if __name__ == "__main__":
    sys.exit(main())
