"""Persistence of users and refresh tokens: a small protocol and its SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB; times are stored as naive UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    and_,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.auth.domain import EmailTaken, RefreshToken, User
from shop.platform.db import Timestamp, from_db_time, to_db_time
from shop.platform.retention import KeysetSweep

__all__ = ["AuthStore", "Credentials", "SqlAuthStore", "metadata"]

# Microseconds on MySQL too: a token's order within a family must survive the round trip.

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("roles", String(200), nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

refresh_families = Table(
    "refresh_families",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Index("ix_refresh_families_user_id", "user_id"),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column(
        "family_id",
        String(36),
        ForeignKey("refresh_families.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("issued_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("spent_at", Timestamp, nullable=True),
    Index("ix_refresh_tokens_family_id", "family_id"),
)


@dataclass(frozen=True, slots=True)
class Credentials:
    user: User
    password_hash: str


class AuthStore(Protocol):
    async def add_user(self, user: User, *, password_hash: str, now: datetime) -> None:
        """Raises EmailTaken when the (normalised) email is already registered."""

    async def credentials(self, email: str) -> Credentials | None: ...

    async def user(self, user_id: str) -> User | None: ...

    async def set_password_hash(self, user_id: str, password_hash: str) -> None: ...

    async def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None: ...

    async def start_family(self, first: RefreshToken) -> None: ...

    async def refresh_token(self, token_hash: str) -> RefreshToken | None: ...

    async def rotate(self, *, spent_hash: str, successor: RefreshToken, now: datetime) -> bool:
        """Spend ``spent_hash`` and store its successor, atomically; False if it was not live."""

    async def revoke_family(self, family_id: str, *, now: datetime) -> None: ...


def _user(row: Any) -> User:
    return User(
        id=row.id,
        name=row.name,
        email=row.email,
        roles=tuple(r for r in row.roles.split(",") if r),
    )


def _db_time(epoch: float) -> datetime:
    return to_db_time(datetime.fromtimestamp(epoch, UTC))


class SqlAuthStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # Retention: refresh tokens expired before the cut-off, then the families left
        # without a token (swept in primary-key order: no index on the times needed).
        self._expired_tokens = KeysetSweep(
            engine,
            refresh_tokens,
            expired=lambda before: refresh_tokens.c.expires_at < before,
            time_of=_db_time,
        )
        self._empty_families = KeysetSweep(
            engine,
            refresh_families,
            expired=lambda before: and_(
                refresh_families.c.created_at < before,
                ~exists().where(refresh_tokens.c.family_id == refresh_families.c.id),
            ),
            time_of=_db_time,
        )
        self._sweeping_families = False

    async def purge_expired_tokens(self, before: float, limit: int) -> tuple[int, bool]:
        """Retention: refresh tokens that expired before ``before`` (epoch seconds), and
        the families they leave empty; at most ``limit`` rows of each per call."""
        # One sweep after the other: a pass over the tokens, then one over the families.
        if not self._sweeping_families:
            tokens, more = await self._expired_tokens(before, limit)
            self._sweeping_families = not more
            return tokens, True
        families, more = await self._empty_families(before, limit)
        self._sweeping_families = more
        return families, more

    async def add_user(self, user: User, *, password_hash: str, now: datetime) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    insert(users).values(
                        id=user.id,
                        email=user.email,
                        name=user.name,
                        password_hash=password_hash,
                        roles=",".join(user.roles),
                        created_at=to_db_time(now),
                    )
                )
        except IntegrityError as exc:
            raise EmailTaken(user.email) from exc

    async def credentials(self, email: str) -> Credentials | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.email == email))).first()
        return None if row is None else Credentials(_user(row), row.password_hash)

    async def user(self, user_id: str) -> User | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        return None if row is None else _user(row)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(users).where(users.c.id == user_id).values(password_hash=password_hash)
            )

    async def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(users).where(users.c.id == user_id).values(roles=",".join(roles))
            )

    async def start_family(self, first: RefreshToken) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(refresh_families).values(
                    id=first.family_id,
                    user_id=first.user_id,
                    created_at=to_db_time(first.issued_at),
                )
            )
            await self._insert_token(conn, first)

    @staticmethod
    async def _insert_token(conn: AsyncConnection, token: RefreshToken) -> None:
        await conn.execute(
            insert(refresh_tokens).values(
                token_hash=token.token_hash,
                family_id=token.family_id,
                issued_at=to_db_time(token.issued_at),
                expires_at=to_db_time(token.expires_at),
            )
        )

    async def refresh_token(self, token_hash: str) -> RefreshToken | None:
        query = (
            select(
                refresh_tokens,
                refresh_families.c.user_id,
                refresh_families.c.revoked_at,
            )
            .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return RefreshToken(
            token_hash=row.token_hash,
            family_id=row.family_id,
            user_id=row.user_id,
            issued_at=row.issued_at.replace(tzinfo=UTC),
            expires_at=row.expires_at.replace(tzinfo=UTC),
            spent_at=from_db_time(row.spent_at),
            family_revoked_at=from_db_time(row.revoked_at),
        )

    async def rotate(self, *, spent_hash: str, successor: RefreshToken, now: datetime) -> bool:
        async with self._engine.begin() as conn:
            # Lock the family first (MySQL): a concurrent revocation waits for this rotation,
            # or this rotation sees it, so no successor is born into a revoked family.
            family = (
                await conn.execute(
                    select(refresh_families.c.revoked_at)
                    .where(refresh_families.c.id == successor.family_id)
                    .with_for_update()
                )
            ).first()
            if family is None or family.revoked_at is not None:
                return False
            # One conditional statement spends the token: of two racing uses, one wins.
            spent = await conn.execute(
                update(refresh_tokens)
                .where(
                    and_(
                        refresh_tokens.c.token_hash == spent_hash,
                        refresh_tokens.c.family_id == successor.family_id,
                        refresh_tokens.c.spent_at.is_(None),
                        refresh_tokens.c.expires_at > to_db_time(now),
                        refresh_tokens.c.family_id.in_(
                            select(refresh_families.c.id).where(
                                refresh_families.c.revoked_at.is_(None)
                            )
                        ),
                    )
                )
                .values(spent_at=to_db_time(now))
            )
            if spent.rowcount != 1:
                return False
            await self._insert_token(conn, successor)
        return True

    async def revoke_family(self, family_id: str, *, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(refresh_families)
                .where(
                    and_(
                        refresh_families.c.id == family_id, refresh_families.c.revoked_at.is_(None)
                    )
                )
                .values(revoked_at=to_db_time(now))
            )
