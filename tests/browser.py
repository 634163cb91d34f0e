"""Debian's Chromium driven by Playwright, for the web console's tests (one browser per
module: ``async with chromium() as browser: yield browser`` in a module fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
#: Headless, no sandbox (root in CI), no GPU, no first-run pages.
BASIC_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run")


@asynccontextmanager
async def chromium(args: Sequence[str] = BASIC_ARGS) -> AsyncIterator[Any]:
    """A launched Chromium (Playwright's ``Browser``), closed on exit. Skips the test when
    Playwright or Debian's chromium is not installed (``python3 dev.py install`` installs
    both)."""
    playwright_api = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (python3 dev.py install)")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=list(args))
        try:
            yield browser
        finally:
            await browser.close()
