"""The auth store contract, run against SQLite and MariaDB alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from shop.auth.domain import (
    ADMIN,
    CUSTOMER,
    EmailTaken,
    RefreshVerdict,
    User,
    issue_refresh_token,
    judge_refresh,
    new_user_id,
)
from shop.auth.store import SqlAuthStore
from shop.platform.db import create_engine, migrate

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
TTL = timedelta(days=14)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlAuthStore]:
    engine = create_engine(database_url)
    try:
        await migrate(engine, package="shop.auth", service="auth")
        await migrate(engine, package="shop.auth", service="auth")  # a restart changes nothing
        yield SqlAuthStore(engine)
    finally:
        await engine.dispose()


async def _user(store: SqlAuthStore, email: str = "ada@example.com") -> User:
    user = User(id=new_user_id(), name="Ada", email=email)
    await store.add_user(user, password_hash="$argon2id$fake", now=NOW)
    return user


async def test_user_round_trip(store: SqlAuthStore) -> None:
    user = await _user(store)
    found = await store.credentials("ada@example.com")
    assert found is not None
    assert found.user == user
    assert found.password_hash == "$argon2id$fake"
    assert await store.user(user.id) == user
    assert await store.user(new_user_id()) is None
    assert await store.credentials("nobody@example.com") is None


async def test_an_email_belongs_to_one_user(store: SqlAuthStore) -> None:
    await _user(store)
    with pytest.raises(EmailTaken):
        await _user(store)


async def test_concurrent_sign_ups_with_one_email_create_one_user(store: SqlAuthStore) -> None:
    outcomes = await asyncio.gather(
        *(_user(store, "race@example.com") for _ in range(4)), return_exceptions=True
    )
    assert sum(isinstance(o, User) for o in outcomes) == 1
    assert all(isinstance(o, (User, EmailTaken)) for o in outcomes)


async def test_roles_and_password_hash_can_change(store: SqlAuthStore) -> None:
    user = await _user(store)
    await store.set_roles(user.id, (CUSTOMER, ADMIN))
    await store.set_password_hash(user.id, "$argon2id$new")
    found = await store.credentials(user.email)
    assert found is not None
    assert found.user.roles == (CUSTOMER, ADMIN)
    assert found.password_hash == "$argon2id$new"


async def test_rotation_spends_the_old_token_and_keeps_the_family(store: SqlAuthStore) -> None:
    user = await _user(store)
    first = issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL)
    await store.start_family(first.record)
    stored = await store.refresh_token(first.record.token_hash)
    assert stored == first.record
    later = NOW + timedelta(minutes=5)
    successor = issue_refresh_token(
        user_id=user.id, now=later, ttl=TTL, family_id=first.record.family_id
    )
    assert await store.rotate(
        spent_hash=first.record.token_hash, successor=successor.record, now=later
    )
    spent = await store.refresh_token(first.record.token_hash)
    assert spent is not None and spent.spent_at == later
    assert judge_refresh(spent, now=later) is RefreshVerdict.REUSED
    fresh = await store.refresh_token(successor.record.token_hash)
    assert judge_refresh(fresh, now=later) is RefreshVerdict.USABLE


async def test_a_token_is_spent_once_even_by_racing_requests(store: SqlAuthStore) -> None:
    user = await _user(store)
    first = issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL)
    await store.start_family(first.record)
    successors = [
        issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL, family_id=first.record.family_id)
        for _ in range(4)
    ]
    won = await asyncio.gather(
        *(
            store.rotate(spent_hash=first.record.token_hash, successor=s.record, now=NOW)
            for s in successors
        )
    )
    assert won.count(True) == 1
    born = [await store.refresh_token(s.record.token_hash) for s in successors]
    assert sum(b is not None for b in born) == 1


async def test_revoking_a_family_kills_every_token_in_it_and_no_other(store: SqlAuthStore) -> None:
    user = await _user(store)
    first = issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL)
    other_login = issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL)
    await store.start_family(first.record)
    await store.start_family(other_login.record)
    successor = issue_refresh_token(
        user_id=user.id, now=NOW, ttl=TTL, family_id=first.record.family_id
    )
    assert await store.rotate(
        spent_hash=first.record.token_hash, successor=successor.record, now=NOW
    )
    await store.revoke_family(first.record.family_id, now=NOW)
    newest = await store.refresh_token(successor.record.token_hash)
    assert judge_refresh(newest, now=NOW) is RefreshVerdict.REVOKED
    untouched = await store.refresh_token(other_login.record.token_hash)
    assert judge_refresh(untouched, now=NOW) is RefreshVerdict.USABLE
    # And the revoked family cannot be rotated onward.
    after = issue_refresh_token(user_id=user.id, now=NOW, ttl=TTL, family_id=first.record.family_id)
    assert not await store.rotate(
        spent_hash=successor.record.token_hash, successor=after.record, now=NOW
    )


async def test_an_expired_token_cannot_be_rotated(store: SqlAuthStore) -> None:
    user = await _user(store)
    first = issue_refresh_token(user_id=user.id, now=NOW, ttl=timedelta(minutes=1))
    await store.start_family(first.record)
    later = NOW + timedelta(minutes=2)
    successor = issue_refresh_token(
        user_id=user.id, now=later, ttl=TTL, family_id=first.record.family_id
    )
    assert not await store.rotate(
        spent_hash=first.record.token_hash, successor=successor.record, now=later
    )
    assert await store.refresh_token(successor.record.token_hash) is None
