"""Password hashing: a string with no UTF-8 form is nobody's password, not a crash."""

from __future__ import annotations

from shop.auth.passwords import Passwords


async def test_a_lone_surrogate_never_verifies() -> None:
    passwords = Passwords(time_cost=1, memory_cost_kib=8, parallelism=1)
    stored = await passwords.hash("abcdefgh")
    assert await passwords.verify(stored, "abcdefgh")
    assert not await passwords.verify(stored, "abcdefgh\ud800")
    await passwords.verify_nobody("abcdefgh\ud800")
