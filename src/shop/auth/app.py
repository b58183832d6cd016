"""Wiring of the auth service: the only place that picks implementations from settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from shop.auth.api import install_error_answers, internal, router
from shop.auth.domain import normalise_email
from shop.auth.keys import KeyProblem, Keyring, keyring_from_pems, load_or_create_keyring
from shop.auth.passwords import Passwords
from shop.auth.service import AuthService, LoginMetrics
from shop.auth.settings import DEV_ADMIN_PASSWORD, AuthSettings, UnsafeSettings
from shop.auth.store import SqlAuthStore
from shop.auth.throttle import LoginThrottle, SharedLoginThrottle, Throttle, redis_client
from shop.platform.addresses import TrustedAddresses
from shop.platform.app import Runtime, create_app, service_database
from shop.platform.retention import RetentionJob
from shop.platform.settings import PlatformSettings

__all__ = [
    "SERVICE_NAME",
    "build_app",
    "configured_keyring",
    "login_throttle",
    "passwords_from",
    "refuse_dev_admin",
]

SERVICE_NAME = "auth-service"


def configured_keyring(settings: AuthSettings) -> Keyring | None:
    """The keys given in settings (production), parsed once; None when none are given."""
    if settings.signing_key is not None:
        current, origin = settings.signing_key.get_secret_value().encode(), "AUTH_SIGNING_KEY"
    elif settings.signing_key_file is not None:
        current, origin = _read(settings.signing_key_file), "AUTH_SIGNING_KEY_FILE"
    else:
        return None
    previous = b""
    if settings.previous_signing_keys is not None:
        previous += settings.previous_signing_keys.get_secret_value().encode()
    if settings.previous_signing_keys_file is not None:
        previous += b"\n" + _read(settings.previous_signing_keys_file)
    try:
        return keyring_from_pems(current, previous, origin=origin)
    except KeyProblem as exc:
        raise UnsafeSettings(str(exc)) from exc


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise UnsafeSettings(f"cannot read key file {file}: {exc.strerror}") from exc


def login_throttle(settings: AuthSettings, metrics: LoginMetrics) -> Throttle:
    """Failed log-ins counted in Redis when AUTH_LOGIN_THROTTLE_STORAGE_URL is given (every
    instance shares them), else in this process's memory. No connection is made here."""
    per_pair, per_client = settings.max_failures_per_email, settings.max_failures_per_client
    if settings.login_throttle_storage_url is None:
        return LoginThrottle(
            max_failures_per_email=per_pair,
            max_failures_per_client=per_client,
            window_s=settings.login_window_s,
        )
    return SharedLoginThrottle(
        redis_client(settings.login_throttle_storage_url),
        max_failures_per_email=per_pair,
        max_failures_per_client=per_client,
        window_s=settings.login_window_s,
        key_prefix=settings.login_throttle_key_prefix,
        fallbacks=metrics.throttle_fallbacks,
    )


def passwords_from(settings: AuthSettings) -> Passwords:
    return Passwords(
        time_cost=settings.argon2_time_cost,
        memory_cost_kib=settings.argon2_memory_cost_kib,
        parallelism=settings.argon2_parallelism,
        max_concurrent=settings.max_concurrent_hashes,
    )


async def refuse_dev_admin(store: SqlAuthStore, passwords: Passwords, *, email: str) -> None:
    """Raises UnsafeSettings when the admin account still opens with the dev password: a
    database first used on the embedded profile keeps its admin whatever the settings say."""
    found = await store.credentials(normalise_email(email))
    if found is not None and await passwords.verify(found.password_hash, DEV_ADMIN_PASSWORD):
        raise UnsafeSettings(
            f"the admin account {found.user.email} still has the dev password; give it the "
            "one in AUTH_ADMIN_PASSWORD with `python -m shop.auth set-admin-password`"
        )


def build_app(*, platform: PlatformSettings, settings: AuthSettings) -> FastAPI:
    """Raises UnsafeSettings before anything starts when the settings are not safe to run."""
    settings.check_secrets(platform)
    admin_password = settings.admin_password.get_secret_value()
    keyring = configured_keyring(settings)
    service_clients = settings.service_secrets()

    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        keys = keyring
        if keys is None:
            keys = await asyncio.to_thread(
                load_or_create_keyring,
                settings.resolved_keys_dir(platform),
                key_size=settings.key_size,
                keep_previous=settings.published_previous_keys,
            )
        url = settings.resolved_database_url(platform=platform, service="auth")
        async with (
            service_database(runtime, url=url, package="shop.auth") as engine,
            aclosing(login_throttle(settings, login_metrics)) as throttle,
        ):
            passwords = passwords_from(settings)
            await passwords.prepare()
            store = SqlAuthStore(engine)
            if platform.is_production:
                # Checked before the port is bound too (preflight); this one closes the race.
                await refuse_dev_admin(store, passwords, email=settings.admin_email)
            auth = AuthService(
                store=store,
                passwords=passwords,
                keyring=keys,
                throttle=throttle,
                issuer=platform.auth_issuer,
                audience=platform.auth_audience,
                access_ttl=timedelta(seconds=settings.access_token_ttl_s),
                refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_s),
                internal_audience=platform.internal_audience,
                service_clients=service_clients,
                metrics=login_metrics,
            )
            if admin_password:
                await auth.ensure_admin(
                    email=settings.admin_email, name=settings.admin_name, password=admin_password
                )
            app.state.auth = auth
            async with RetentionJob(
                store.purge_expired_tokens,
                name="refresh-token-retention",
                policy=settings.refresh_token_retention(platform),
            ):
                yield

    app = create_app(
        name=SERVICE_NAME,
        title="Shop auth service",
        description="Users, log-in, refresh tokens and the JWKS that verifies access tokens.",
        platform=platform,
        routers=[router, internal],
        lifespan=lifespan,
    )
    app.state.trusted_proxies = TrustedAddresses(settings.trusted_proxies)
    app.state.jwks_max_age_s = settings.jwks_max_age_s
    install_error_answers(app)
    login_metrics = LoginMetrics(app.state.metrics.registry)
    return app
