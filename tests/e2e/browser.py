"""The real browser of the e2e tests: Debian's Chromium driven by Playwright (never a
downloaded browser), and tabs that may reach the system's own origin and nothing else."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.support import require_or_skip

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

CHROMIUM = "/usr/bin/chromium"  # Debian's package `chromium`: never a downloaded browser
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".artifacts" / "screenshots"


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's headless Chromium; skipped (failed under ``SHOP_REQUIRE_ALL=1``) without it
    or without the playwright package."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_or_skip("the Python package playwright is not installed")
    if shutil.which(CHROMIUM) is None:
        require_or_skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def home_tab(browser: Browser, home: str, **options: object) -> Iterator[Page]:
    """A fresh tab (a context of its own, made with ``options``) that may reach ``home``'s
    origin and nothing else: a request to any other host (a CDN) is aborted and remembered,
    and the test fails on it. Dialogs (a "are you sure") are accepted."""
    own = urlsplit(home).netloc
    elsewhere: list[str] = []

    def keep_home(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context = browser.new_context(**options)  # type: ignore[arg-type]
    context.route("**/*", keep_home)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    tab.on("dialog", lambda dialog: dialog.accept())
    try:
        yield tab
    finally:
        context.close()
    assert not elsewhere, f"the page tried to load from another origin: {elsewhere}"
