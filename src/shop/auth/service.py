"""Use cases of the auth service: one method per thing a user (or the start-up) does."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter

from shop.auth.domain import (
    ADMIN,
    CUSTOMER,
    BadCredentials,
    EmailTaken,
    InvalidRefreshToken,
    RefreshVerdict,
    TooManyAttempts,
    UnknownService,
    User,
    access_claims,
    hash_refresh_token,
    issue_refresh_token,
    judge_refresh,
    new_user_id,
    normalise_email,
    service_claims,
    with_role,
)
from shop.auth.keys import Keyring
from shop.auth.passwords import Passwords
from shop.auth.store import AuthStore
from shop.auth.throttle import Throttle
from shop.platform.tokens import InvalidToken, Principal, principal_from_claims

__all__ = ["AuthService", "LoginMetrics", "TokenPair"]

log = logging.getLogger("shop.auth")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str


class LoginMetrics:
    """``shop_auth_logins_total{outcome}``: ``success``, ``bad_credentials`` (a failure) or
    ``throttled`` (refused before any check); ``shop_auth_login_throttle_fallbacks_total``:
    attempts the shared (Redis) throttle judged in this process's memory, Redis failing."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        logins = Counter(
            "shop_auth_logins", "Log-in attempts, by outcome", ["outcome"], registry=registry
        )
        self.success = logins.labels("success")
        self.bad_credentials = logins.labels("bad_credentials")
        self.throttled = logins.labels("throttled")
        self.throttle_fallbacks = Counter(
            "shop_auth_login_throttle_fallbacks",
            "Log-in attempts throttled in this process's memory because Redis failed",
            registry=registry,
        )


class AuthService:
    def __init__(
        self,
        *,
        store: AuthStore,
        passwords: Passwords,
        keyring: Keyring,
        throttle: Throttle,
        issuer: str,
        audience: str,
        access_ttl: timedelta,
        refresh_ttl: timedelta,
        internal_audience: str = "shop-internal",
        service_clients: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        metrics: LoginMetrics | None = None,
    ) -> None:
        metrics = metrics if metrics is not None else LoginMetrics()
        self._logged_in = metrics.success
        self._bad_credentials = metrics.bad_credentials
        self._throttled = metrics.throttled
        # Each calling service's own secret, by name: one secret mints one identity.
        self.service_clients = dict(service_clients or {})
        self.internal_audience = internal_audience
        self.store = store
        self.passwords = passwords
        self.keyring = keyring
        self.throttle = throttle
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.clock = clock

    async def register(self, *, name: str, email: str, password: str) -> User:
        user = User(id=new_user_id(), name=name.strip(), email=normalise_email(email))
        # Cheap look-up first: a taken email need not cost a hash (the insert still decides).
        if await self.store.credentials(user.email) is not None:
            raise EmailTaken(user.email)
        password_hash = await self.passwords.hash(password)
        await self.store.add_user(user, password_hash=password_hash, now=self.clock())
        return user

    async def log_in(self, *, email: str, password: str, client: str) -> TokenPair:
        email = normalise_email(email)
        try:
            attempt = await self.throttle.admit(email=email, client=client)
        except TooManyAttempts:
            self._throttled.inc()
            raise
        try:
            found = await self.store.credentials(email)
            if found is None:
                await self.passwords.verify_nobody(password)
                ok = False
            else:
                ok = await self.passwords.verify(found.password_hash, password)
        except Exception:
            # No verdict on the password. A cancelled request (BaseException) stays counted:
            # hanging up mid-check must not be a way to guess for free.
            await self.throttle.abandoned(attempt)
            raise
        if found is None or not ok:
            self._bad_credentials.inc()
            raise BadCredentials
        await self.throttle.succeeded(attempt)
        self._logged_in.inc()
        if self.passwords.needs_rehash(found.password_hash):
            await self.store.set_password_hash(found.user.id, await self.passwords.hash(password))
        now = self.clock()
        first = issue_refresh_token(user_id=found.user.id, now=now, ttl=self.refresh_ttl)
        await self.store.start_family(first.record)
        return self._pair(found.user, refresh_secret=first.secret, now=now)

    async def refresh(self, secret: str) -> TokenPair:
        now = self.clock()
        token = await self.store.refresh_token(hash_refresh_token(secret))
        verdict = judge_refresh(token, now=now)
        if token is not None and verdict.revokes_family:
            log.warning(
                "refresh token reused; revoking family %s of user %s",
                token.family_id,
                token.user_id,
            )
            await self.store.revoke_family(token.family_id, now=now)
        if token is None or verdict is not RefreshVerdict.USABLE:
            raise InvalidRefreshToken(verdict.value)
        user = await self.store.user(token.user_id)
        if user is None:
            raise InvalidRefreshToken("user is gone")
        successor = issue_refresh_token(
            user_id=user.id, now=now, ttl=self.refresh_ttl, family_id=token.family_id
        )
        if not await self.store.rotate(
            spent_hash=token.token_hash, successor=successor.record, now=now
        ):
            # Another request spent it between our read and our write: a concurrent reuse.
            await self.store.revoke_family(token.family_id, now=now)
            raise InvalidRefreshToken(RefreshVerdict.REUSED.value)
        return self._pair(user, refresh_secret=successor.secret, now=now)

    async def log_out(self, principal: Principal, *, refresh_secret: str) -> None:
        token = await self.store.refresh_token(hash_refresh_token(refresh_secret))
        # Someone else's token is left alone; the answer does not say whether it exists.
        if token is not None and token.user_id == principal.user_id:
            await self.store.revoke_family(token.family_id, now=self.clock())

    async def me(self, principal: Principal) -> User:
        user = await self.store.user(principal.user_id)
        if user is None:
            raise InvalidToken("the user no longer exists")
        return user

    def verify_access_token(self, token: str) -> Principal:
        claims = self.keyring.verify(token, issuer=self.issuer, audience=self.audience)
        return principal_from_claims(claims)

    async def ensure_admin(self, *, email: str, name: str, password: str) -> None:
        """Idempotent: creates the admin once; an existing account keeps its password."""
        email = normalise_email(email)
        found = await self.store.credentials(email)
        if found is None:
            admin = User(id=new_user_id(), name=name, email=email, roles=(CUSTOMER, ADMIN))
            try:
                await self.store.add_user(
                    admin, password_hash=await self.passwords.hash(password), now=self.clock()
                )
                log.info("created admin account %s", email)
            except EmailTaken:
                pass  # another instance created it at the same moment
            return
        if ADMIN not in found.user.roles:
            await self.store.set_roles(found.user.id, with_role(found.user.roles, ADMIN))

    def service_token(self, *, service: str, secret: str, target: str) -> tuple[str, int]:
        """An access token naming ``service``, for the caller holding that service's secret,
        usable at the instance ``target`` only.

        Its audience is the internal one: it opens internal routes, never a user's."""
        expected = self.service_clients.get(service)
        # Compared even for an unknown name, so timing does not tell which names exist.
        known = expected is not None
        if not hmac.compare_digest(secret.encode(), (expected or "\0").encode()) or not known:
            raise UnknownService
        claims = service_claims(
            service,
            target=target,
            issuer=self.issuer,
            audience=self.internal_audience,
            issued_at=self.clock(),
            ttl=self.access_ttl,
            token_id=uuid.uuid4().hex,
        )
        return self.keyring.sign(claims), int(self.access_ttl.total_seconds())

    def _pair(self, user: User, *, refresh_secret: str, now: datetime) -> TokenPair:
        claims = access_claims(
            user,
            issuer=self.issuer,
            audience=self.audience,
            issued_at=now,
            ttl=self.access_ttl,
            token_id=uuid.uuid4().hex,
        )
        return TokenPair(
            access_token=self.keyring.sign(claims),
            expires_in=int(self.access_ttl.total_seconds()),
            refresh_token=refresh_secret,
        )
