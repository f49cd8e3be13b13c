"""The dashboard in a real browser: Debian's chromium (``make browser``) driven by Playwright.

Opens /dashboard on the real service, starts a streamed request, and watches its progress row
appear, move and finish; saves a screenshot with the request in flight (to images/dashboard.png with
UPDATE_SCREENSHOT=1).
Never downloads a browser.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# The README's image is refreshed only on request (UPDATE_SCREENSHOT=1), so that a test run
# never changes a tracked file; otherwise the screenshot goes to the test's temp folder.
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "images" / "dashboard.png"
MODEL = "smollm2:135m"
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Stream(threading.Thread):
    """A streamed chat request read to its end in the background."""

    def __init__(self, base_url: str, rid: str, model: str, max_tokens: int,
                 prompt: str = "Tell me a long story about a lighthouse keeper.") -> None:
        super().__init__(daemon=True)
        self.url = base_url + "/v1/chat/completions"
        self.rid = rid
        self.body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                     "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        self.chunks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with requests.post(self.url, json=self.body, headers={"X-Request-Id": self.rid},
                               stream=True, timeout=300) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                        self.chunks += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def data_tokens(locator) -> int:
    return int(locator.get_attribute("data-tokens") or 0)


@pytest.mark.timeout(900)  # the bounds below are for a loaded machine
def test_dashboard_follows_a_streamed_request(base_url, browser, tmp_path):
    # A finished request first: the model is loaded, and "recent" has a row.
    warm = requests.post(base_url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8})
    assert warm.status_code == 200

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(base_url + "/dashboard")
    page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                           timeout=15000)
    page.locator(f'#models tr[data-model="{MODEL}"]').wait_for(timeout=15000)

    rid = "dash-" + uuid.uuid4().hex[:10]
    stream = Stream(base_url, rid, MODEL, MAX_TOKENS)
    stream.start()
    row = page.locator(f'#active .req[data-request-id="{rid}"]')
    row.wait_for(timeout=60000)
    assert MODEL in row.inner_text() and "openai" in row.inner_text()

    # Its progress moves: the token count the page shows grows while the request runs.
    seen = [data_tokens(row)]
    # Bounds, not speeds: on a loaded machine 300 tokens can take minutes. The loop ends when
    # the stream does.
    deadline = time.monotonic() + 600
    shot = False
    while time.monotonic() < deadline and stream.is_alive():
        try:
            tokens = data_tokens(row) if row.count() else seen[-1]
        except Exception:  # noqa: BLE001 - the row was re-rendered between calls
            continue
        if tokens != seen[-1]:
            seen.append(tokens)
        if not shot and MAX_TOKENS * 0.3 <= tokens <= MAX_TOKENS * 0.8 and row.count():
            bar = row.locator(".bar span").evaluate("e => e.style.width")
            assert bar.endswith("%") and 0 < float(bar[:-1]) < 100
            assert "tok/s" in row.inner_text()
            target = (README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1"
                      else tmp_path / "dashboard.png")
            page.screenshot(path=str(target), full_page=True)
            shot = target.stat().st_size > 10_000
        page.wait_for_timeout(200)
    stream.join(timeout=600)
    assert not stream.is_alive(), "the stream did not end"
    assert stream.error is None, stream.error
    assert len(seen) >= 3, f"progress did not move on the page: {seen}"
    assert seen == sorted(seen) and 0 < seen[-1] <= MAX_TOKENS
    assert shot, f"no screenshot taken while in flight (tokens seen: {seen})"

    # It finishes: gone from "in flight", listed as completed with its tokens.
    done = page.locator(f'#recent tr[data-request-id="{rid}"][data-state="completed"]')
    done.wait_for(timeout=60000)
    assert row.count() == 0
    assert f"→ {MAX_TOKENS}" in done.inner_text().replace(",", "")
    page.close()


def test_dashboard_fits_a_phone(base_url, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True,
                            device_scale_factor=2)
    page.goto(base_url + "/dashboard")
    page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                           timeout=15000)
    page.locator("#recent tbody tr").first.wait_for(timeout=15000)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    # Tables turn into labelled cards on a narrow screen.
    assert page.locator("#recent thead").first.is_hidden()
    page.close()


def test_dashboard_asks_for_the_key_once_per_tab(keyed_service, browser):
    """With keys, the page asks for one, keeps it in the tab (sessionStorage, never in the
    URL) across reloads, asks again after a wrong key, and a new tab asks afresh."""
    from tests.conftest import SERVICE_KEYS

    key = SERVICE_KEYS["alice"]
    url = keyed_service.base_url + "/dashboard"
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    form = page.locator("#keyform")
    form.wait_for(state="visible", timeout=15000)
    assert page.locator("#conn").inner_text() == "API key needed"
    page.fill("#apikey", "not-the-key")
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('keyerr').textContent.includes('refused')",
                           timeout=15000)
    page.fill("#apikey", key)
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                           timeout=15000)
    assert form.is_hidden()
    assert key not in page.url and "key" not in page.url
    assert page.evaluate("sessionStorage.getItem('ollama-server-api-key')") == key
    assert page.evaluate("localStorage.length") == 0  # not kept beyond the tab
    # A reload in the same tab does not ask again.
    page.reload()
    page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                           timeout=15000)
    assert form.is_hidden()
    # Another tab (its own session storage) asks afresh.
    other = browser.new_context().new_page()
    other.goto(url)
    other.locator("#keyform").wait_for(state="visible", timeout=15000)
    other.close()
    context.close()
