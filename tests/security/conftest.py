"""Fixtures of the attack tests: Debian's chromium driven by Playwright, with a name that an
attacker owns (``evil.example``) resolved to loopback inside the browser only, so that a page
"from" that site can be loaded from this machine without any DNS or outside traffic.

Chromium's Local Network Access checks (a public page may not call loopback) are turned off:
Firefox and Safari have none, and the service must hold on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

EVIL = "evil.example"  # reserved for documentation (RFC 2606): never a real site


@pytest.fixture(scope="module")
def browser():
    """Chromium, with ``evil.example`` resolving to 127.0.0.1 in the browser."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--host-resolver-rules=MAP {EVIL} 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks"])
        try:
            yield chromium
        finally:
            chromium.close()
