"""Group commit: requests that arrive together are applied in one transaction.

Every commit costs a flush to disk (an fsync on MariaDB, a WAL append on SQLite), and
writers of one hot SKU wait for each other's row lock; a transaction per reservation spends
most of its time on both. Here a request joins the group waiting for the next transaction;
while one transaction runs, the next group collects, so under load each commit carries many
requests and at rest a lone request waits only ``window_s``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from shop.platform import context, telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["GroupCommit"]

Ask = TypeVar("Ask")
Answer = TypeVar("Answer")

# Applies a group in one transaction: one answer (or refusal) per request, in order.
Apply = Callable[[Sequence[Ask]], Awaitable[Sequence[Answer | Exception]]]


class GroupCommit(Generic[Ask, Answer]):
    """Hands requests to ``apply`` in groups of up to ``max_asks`` requests and ``max_weight``
    in total (a single heavier request goes alone), one group at a time."""

    def __init__(
        self,
        apply: Apply[Ask, Answer],
        *,
        weigh: Callable[[Ask], int],
        max_asks: int,
        max_weight: int,
        window_s: float,
    ) -> None:
        self._apply = apply
        self._weigh = weigh
        self._max_asks = max_asks
        self._max_weight = max_weight
        self._window_s = window_s
        self._waiting: deque[tuple[Ask, asyncio.Future[Answer]]] = deque()
        # While spans are exported: each waiting request's trace, to link the group's span to.
        self._traces: dict[asyncio.Future[Answer], context.TraceContext] = {}
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, ask: Ask) -> Answer:
        """The answer to ``ask`` once the transaction that applied it has committed."""
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((ask, answer))
        if context.spans_exported and (trace := context.current_trace()) is not None:
            self._traces[answer] = trace
        if self._runner is None:
            # A context of its own: the group's statements belong to no one request's trace
            # (while spans are exported, to the group's span, linked to each request's).
            self._runner = asyncio.create_task(self._run(), context=contextvars.Context())
        return await answer

    def _next_group(self) -> list[tuple[Ask, asyncio.Future[Answer]]]:
        group: list[tuple[Ask, asyncio.Future[Answer]]] = []
        weight = 0
        while self._waiting and len(group) < self._max_asks:
            ask, answer = self._waiting[0]
            if answer.done():  # its caller gave up before the group formed
                self._waiting.popleft()
                continue
            weight += self._weigh(ask)
            if group and weight > self._max_weight:
                break
            group.append(self._waiting.popleft())
        return group

    async def _run(self) -> None:
        """Apply groups until none waits; then end (the next request starts a new runner)."""
        group: list[tuple[Ask, asyncio.Future[Answer]]] = []
        try:
            # At rest, let the requests that arrive in the same moment join the first group.
            await asyncio.sleep(self._window_s)
            while group := self._next_group():
                span = self._group_span(group) if context.spans_exported else None
                try:
                    answers = await self._apply([ask for ask, _ in group])
                except Exception as exc:  # the transaction failed as a whole: so did each
                    answers = [exc] * len(group)
                finally:
                    if span is not None:
                        span.end()
                for (_, answer), outcome in zip(group, answers, strict=True):
                    if answer.done():
                        continue
                    if isinstance(outcome, Exception):
                        answer.set_exception(outcome)
                    else:
                        answer.set_result(outcome)
        finally:
            self._runner = None
            # Only when the runner itself was cancelled (the loop is closing): no one will
            # apply or answer what is left.
            for _, answer in [*group, *self._waiting]:
                answer.cancel()
            self._waiting.clear()
            self._traces.clear()

    def _group_span(self, group: list[tuple[Ask, asyncio.Future[Answer]]]) -> Span | None:
        """A span for the group's transaction, linked to the trace of each request in it and
        bound as the runner's trace, so the transaction's statements are its children (the
        OpenTelemetry way for work done for several traces at once)."""
        links = [trace for _, answer in group if (trace := self._traces.pop(answer, None))]
        span = telemetry.start_process_span(
            "reservation group",
            kind="internal",
            parent=None,
            links=links,
            attributes={"shop.group.size": len(group)},
        )
        if span is not None:
            trace = telemetry.span_trace(span)
            context.bind(request_id=f"group-{trace.span_id}", trace=trace)
        return span
