"""``shop up``: the whole Shop on this machine until Ctrl-C (the work is in ``shop.launcher.up``).

The fork server starts first thing, so that its imports (3 s of CPU) run alongside the
launcher's own (pydantic: ~0.5 s) on another core instead of after them: this module
imports only the standard library and ``shop.launcher.zygote`` before it starts it.

Exit codes: 0 after Ctrl-C, SIGTERM or SIGHUP stopped everything cleanly; 1 when a service
could not start or be kept running (everything else is stopped too); 2 for bad usage.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from shop.launcher.zygote import Zygote, fork_server_wanted

__all__ = ["main"]


def _early_zygote(args: Sequence[str]) -> Zygote | None:
    """A fork server for ``shop up`` over the built-in table; none for help, another command
    or a ``--services-file`` (which may list no module at all): the supervisor starts its own
    if it needs one."""
    if not args or args[0] != "up" or not fork_server_wanted(os.environ):
        return None
    if any(a in ("-h", "--help") or a.startswith("--services-file") for a in args[1:]):
        return None
    try:
        return Zygote.begin(os.environ)
    except OSError:
        return None  # the supervisor tries again, and says why if it fails


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    zygote = _early_zygote(args)
    try:
        # Only now: the fork server has begun importing the same modules on another core.
        from shop.launcher import up

        return up.main(args, zygote=zygote)
    except KeyboardInterrupt:
        # Ctrl-C while importing: nothing was started but the fork server, stopped below.
        return 0
    finally:
        if zygote is not None:
            zygote.close()  # idempotent: the supervisor closed it if it ran


if __name__ == "__main__":
    sys.exit(main())
