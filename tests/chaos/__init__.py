"""Chaos tests (issue 11 point 4): the real processes killed, frozen and cut off mid-burst,
checked on invariants (docs/chaos.md)."""
