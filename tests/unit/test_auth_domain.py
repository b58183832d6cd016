"""Rules of the auth service: password policy, claims, refresh-token rotation and reuse."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shop.auth.domain import (
    ADMIN,
    CUSTOMER,
    RefreshVerdict,
    User,
    access_claims,
    hash_refresh_token,
    issue_refresh_token,
    judge_refresh,
    normalise_email,
    password_problem,
    spend,
    with_role,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("password", "acceptable"),
    [
        ("1234567", False),
        ("12345678", True),
        ("        ", False),
        ("correct horse battery staple", True),
        ("x" * 256, True),
        ("x" * 257, False),
    ],
)
def test_password_policy(password: str, acceptable: bool) -> None:
    assert (password_problem(password) is None) is acceptable


def test_password_with_a_lone_surrogate_is_not_text() -> None:
    # JSON can spell "\ud800"; no byte encoding (so no hash) exists for it.
    assert password_problem("abcdefgh\ud800") == "must be valid text"


def test_short_password_is_explained() -> None:
    assert password_problem("short") == "must be at least 8 characters"


def test_emails_are_compared_lower_case_and_trimmed() -> None:
    assert normalise_email("  Ada.Lovelace@Example.COM ") == "ada.lovelace@example.com"


def test_admin_role_is_added_once_after_existing_roles() -> None:
    assert with_role((CUSTOMER,), ADMIN) == (CUSTOMER, ADMIN)
    assert with_role((CUSTOMER, ADMIN), ADMIN) == (CUSTOMER, ADMIN)


def test_access_claims_carry_identity_roles_and_a_fifteen_minute_life() -> None:
    user = User(id="u-1", name="Ada", email="ada@example.com", roles=(CUSTOMER, ADMIN))
    claims = access_claims(
        user,
        issuer="shop-auth",
        audience="shop",
        issued_at=NOW,
        ttl=timedelta(minutes=15),
        token_id="jti-1",
    )
    assert claims == {
        "sub": "u-1",
        "email": "ada@example.com",
        "roles": ["customer", "admin"],
        "iss": "shop-auth",
        "aud": "shop",
        "iat": int(NOW.timestamp()),
        "exp": int(NOW.timestamp()) + 900,
        "jti": "jti-1",
    }


def test_refresh_secret_is_random_and_only_its_hash_is_recorded() -> None:
    first = issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY)
    second = issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY)
    assert first.secret != second.secret
    assert len(first.secret) >= 43  # 256 bits, url-safe
    assert first.record.token_hash == hash_refresh_token(first.secret)
    assert first.secret not in first.record.token_hash
    assert first.record.family_id != second.record.family_id  # each login is its own family
    assert first.record.expires_at == NOW + DAY


def test_successor_stays_in_the_family() -> None:
    first = issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY)
    successor = issue_refresh_token(
        user_id="u-1", now=NOW + DAY / 2, ttl=DAY, family_id=first.record.family_id
    )
    assert successor.record.family_id == first.record.family_id
    assert successor.record.expires_at == NOW + DAY * 1.5


def test_a_fresh_token_is_usable() -> None:
    token = issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY).record
    assert judge_refresh(token, now=NOW + DAY / 2) is RefreshVerdict.USABLE


def test_a_spent_token_is_a_reuse_that_revokes_the_family() -> None:
    token = spend(issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY).record, now=NOW)
    verdict = judge_refresh(token, now=NOW)
    assert verdict is RefreshVerdict.REUSED
    assert verdict.revokes_family


def test_a_spent_token_replayed_after_expiry_is_still_a_reuse() -> None:
    token = spend(issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY).record, now=NOW)
    assert judge_refresh(token, now=NOW + 2 * DAY) is RefreshVerdict.REUSED


@pytest.mark.parametrize(
    ("verdict", "revokes"),
    [
        (RefreshVerdict.UNKNOWN, False),
        (RefreshVerdict.EXPIRED, False),
        (RefreshVerdict.REVOKED, False),
        (RefreshVerdict.USABLE, False),
        (RefreshVerdict.REUSED, True),
    ],
)
def test_only_reuse_revokes(verdict: RefreshVerdict, revokes: bool) -> None:
    assert verdict.revokes_family is revokes


def test_expired_unknown_and_revoked_tokens_are_refused() -> None:
    token = issue_refresh_token(user_id="u-1", now=NOW, ttl=DAY).record
    assert judge_refresh(token, now=NOW + DAY) is RefreshVerdict.EXPIRED
    assert judge_refresh(None, now=NOW) is RefreshVerdict.UNKNOWN
    revoked = replace(token, family_revoked_at=NOW)
    assert judge_refresh(revoked, now=NOW) is RefreshVerdict.REVOKED
