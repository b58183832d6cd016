"""The order service's breaker around the inventory is the platform's
(``shop.platform.breaker``; the gateway uses the same one per service it routes to)."""

from __future__ import annotations

from shop.platform.breaker import BreakerState, CircuitBreaker, CircuitOpen

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpen"]
