"""The dashboard never runs what a caller puts in a request (issue 25): markup in a prompt, in a
request id (``X-Request-Id``, chosen by the caller) and in a key's name is shown as text, in
Debian's chromium driven by Playwright against the real service, engine and model.

Should some request data ever reach the page unescaped, its Content-Security-Policy still lets
no script run but the page's own: the second test injects markup itself to check that.
"""

from __future__ import annotations

import threading

import pytest
import requests

from tests.helpers import ServiceProcess

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
# Each payload sets a mark of its own when it runs; none may.
KEY_NAME = "<img src=x onerror=window.__xss_key=1>"
KEY = "sk-xss-25-4b9d"
REQUEST_ID = '<img src=x onerror="window.__xss_id=1;document.title=\'owned\'">'
PROMPT = "<img src=x onerror=window.__xss_prompt=1><script>window.__xss_script=1</script>"
MARKS = ["__xss_key", "__xss_id", "__xss_prompt", "__xss_script", "__csp"]
# True once the request (``id``) shows in ``where``, or markup became an element on the page.
SHOWN = """([where, id]) => [...document.querySelectorAll(`${where} [data-request-id]`)]
    .some(e => e.dataset.requestId === id) || document.querySelector("main img") !== null"""


@pytest.fixture(scope="module")
def xss_service(tmp_path_factory, real_models, engine_binary):
    """The real service with one API key whose name is markup."""
    tmp = tmp_path_factory.mktemp("xss")
    keyfile = tmp / "api-keys"
    keyfile.write_text(f"{KEY_NAME}: {KEY}\n")
    svc = ServiceProcess(tmp, real_models, extra_env={"OLLAMA_SERVER_API_KEYS": str(keyfile)})
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()


class Stream(threading.Thread):
    """A streamed chat with the markup prompt and request id, read to its end."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with requests.post(self.base_url + "/v1/chat/completions", stream=True,
                               timeout=300, headers={"Authorization": f"Bearer {KEY}",
                                                     "X-Request-Id": REQUEST_ID}, json={
                    "model": MODEL, "stream": True, "max_tokens": 16, "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPT}]}) as resp:
                self.status = resp.status_code
                for _ in resp.iter_lines():
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def open_dashboard(browser, base_url: str):
    """The dashboard, past its key form, polling live."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(base_url + "/dashboard")
    page.locator("#apikey").wait_for(state="visible", timeout=15000)
    page.fill("#apikey", KEY)
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                           timeout=15000)
    return page


def test_request_data_is_shown_as_text(xss_service, browser):
    base = xss_service.base_url
    # A model name cannot carry markup at all: names are checked before anything is stored.
    bad = requests.post(base + "/api/copy", headers={"Authorization": f"Bearer {KEY}"},
                        json={"source": MODEL, "destination": KEY_NAME}, timeout=30)
    assert bad.status_code == 400 and "invalid model name" in bad.text

    page = open_dashboard(browser, base)
    stream = Stream(base)
    stream.start()
    # The request shows, in flight or finished: found by its id as the page stored it (or,
    # should the page ever insert it as HTML, as an element).
    page.wait_for_function(SHOWN, arg=["main", REQUEST_ID], timeout=120000)
    shown = page.evaluate("""id => [...document.querySelectorAll('[data-request-id]')]
        .filter(e => e.dataset.requestId === id).map(e => e.textContent).join(' ')""",
                          REQUEST_ID)
    stream.join(timeout=300)
    assert stream.error is None and stream.status == 200, (stream.error, stream.status)
    # Its finished row too (the id cut to 12 characters there).
    page.wait_for_function(SHOWN, arg=["#recent", REQUEST_ID], timeout=30000)
    shown += page.evaluate("() => document.getElementById('recent').textContent")
    assert "key " + KEY_NAME in shown, shown
    assert REQUEST_ID[:12] in shown, shown
    # Nothing became an element, nothing ran, the title is the page's own.
    assert page.evaluate("() => document.querySelectorAll('img, main script').length") == 0
    assert page.evaluate("marks => marks.filter(m => m in window)", MARKS) == []
    assert page.title() == "ollama-server dashboard"
    page.close()


def test_the_page_runs_no_injected_script(xss_service, browser):
    """Markup that reached the page anyway (here put there by the test) runs nothing: the
    page's Content-Security-Policy allows its own script only."""
    page = open_dashboard(browser, xss_service.base_url)
    ran = page.evaluate("""() => new Promise(done => {
        document.getElementById("recent").insertAdjacentHTML("beforeend",
            '<img id="probe" src="x" onerror="window.__csp = 1">');
        // The inline handler, when allowed, runs before this listener, added after it.
        document.getElementById("probe").addEventListener("error",
            () => done("__csp" in window));
    })""")
    assert ran is False
    page.close()
