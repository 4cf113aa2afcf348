"""Browser fixtures: one headless Debian Chromium per module, a fresh context (tab) per test.

Playwright's own browser downloads are not used: the tests drive ``/usr/bin/chromium``. When it is
missing the tests fail (they are part of the required suite), they are never skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
VIEWPORT = {"width": 1024, "height": 800}


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"browser tests need Debian's Chromium at {CHROMIUM}, which is missing or not executable "
            "(apt-get install chromium); Playwright browser downloads are not used",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Tab:
    """A browser page plus what the test needs around it: screenshots and CSP/console problems."""

    def __init__(self, context, artifacts: Path):
        self.context = context
        self.artifacts = artifacts
        self.problems: list[str] = []
        self._shots = 0
        self.page = self.new_page()

    def new_page(self):
        page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        return page

    def _console(self, message) -> None:
        # Chromium reports every 4xx/5xx document as "Failed to load resource"; those statuses are asserted
        # by the tests. Anything else (a CSP refusal, a script error) is a problem.
        if message.type in ("error", "warning") and not message.text.startswith(
            "Failed to load resource: the server responded with a status of"
        ):
            self.problems.append(f"console {message.type}: {message.text}")

    def shot(self, name: str, page=None) -> Path:
        """Full-page screenshot under test-artifacts/browser/<test>/NN-<name>.png."""
        self._shots += 1
        path = self.artifacts / f"{self._shots:02d}-{name}.png"
        (page or self.page).screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser, request):
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    artifacts = ARTIFACTS / name
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("*.png"):
        old.unlink()
    context = browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(30_000)
    tab = Tab(context, artifacts)
    yield tab
    context.close()
    # a strict CSP must not break the page: no refused styles/scripts, no script errors
    assert not tab.problems, tab.problems
