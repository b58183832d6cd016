"""``python -m shop.launcher up`` is ``shop up``."""

from shop.launcher.cli import main

raise SystemExit(main())
