"""What ``shop up`` prints: every child's lines behind its name, the launcher's notes, banners."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TextIO

__all__ = ["LAUNCHER", "Console"]

LAUNCHER = "launcher"

_RESET = "\033[0m"
_BOLD = "\033[1m"
_RED = "\033[1;31m"
_GREEN = "\033[1;32m"
# Red is kept for failures, so no service is ever printed in it.
_PALETTE = ("\033[36m", "\033[32m", "\033[33m", "\033[35m", "\033[34m", "\033[96m", "\033[92m")


def wants_colour(stream: TextIO) -> bool:
    """Colour only for a person at a terminal, and never when NO_COLOR is set."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Console:
    def __init__(
        self, stream: TextIO, *, names: Sequence[str] = (), colour: bool | None = None
    ) -> None:
        self._stream = stream
        self.colour = wants_colour(stream) if colour is None else colour
        self._width = max([12, len(LAUNCHER), *(len(n) for n in names)])
        self._colours = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}
        self._broken = False

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def _write(self, lines: Iterable[str]) -> None:
        if self._broken:
            return
        try:
            self._stream.write("".join(f"{line}\n" for line in lines))
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # Whoever read our output went away (``shop up | head``): keep supervising.
            self._broken = True

    def prefix(self, name: str) -> str:
        label = name.ljust(self._width)
        code = _BOLD if name == LAUNCHER else self._colours.get(name, _PALETTE[0])
        return self._paint(code, f"{label} |")

    def service_lines(self, name: str, lines: Sequence[str]) -> None:
        """Several lines of one service, written out together."""
        prefix = self.prefix(name)
        self._write([f"{prefix} {line}" for line in lines])

    def note(self, text: str) -> None:
        self._write([f"{self.prefix(LAUNCHER)} {text}"])

    def banner(self, headline: str, details: Sequence[str] = ()) -> None:
        """A failure nobody can miss: red rules around the headline and the last output."""
        rule = self._paint(_RED, "=" * 72)
        body = [self._paint(_RED, f"!! {headline}")]
        body += [self._paint(_RED, "!! ") + d for d in details]
        self._write([rule, *body, rule])

    def summary(self, headline: str, rows: Sequence[tuple[str, str]], footer: str) -> None:
        width = max((len(k) for k, _ in rows), default=0)
        lines = [self._paint(_GREEN, headline)]
        lines += [f"  {self._paint(_BOLD, k.ljust(width))}  {v}" for k, v in rows]
        lines.append(footer)
        self._write(lines)
