"""Shared plumbing for every Shop service: no business rules, and no service imported."""
