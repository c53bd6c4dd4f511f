"""Open report.html in a real headless Chromium (Debian's ``chromium`` package).

Drives the browser over the DevTools protocol (websocket-client, already a dependency of
the Kubernetes client that kfp pulls in): load the page from file://, log every network
request, failed load, console error and exception, check that the page rendered its
charts, and save a full-page screenshot to runs/test-artifacts/report.png (gitignored;
CI keeps it as an artifact). Skipped with a reason when /usr/bin/chromium is absent:
install it with ``apt-get install -y chromium``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from rephelpers import ROOT, Run

CHROMIUM = Path(os.environ.get("PLE_ADATT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("PLE_ADATT_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-allow-origins=*"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")


class Browser:
    """A headless Chromium and one DevTools page session; records the events it sees."""

    def __init__(self, user_data: Path):
        import websocket

        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_data}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = user_data / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"chromium did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        for method in ("Page.enable", "Network.enable", "Log.enable", "Runtime.enable"):
            self.call(method)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {method} within {timeout}s")
            self.events.append(json.loads(self.ws.recv()))

    def load(self, url: str) -> list[dict[str, Any]]:
        self.events = []
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        time.sleep(0.3)  # let late requests and console messages arrive
        self.call("Runtime.evaluate", expression="1")  # drains the event queue up to now
        return self.events

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser() -> Any:
    pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium over DevTools")
    d = tempfile.mkdtemp(prefix="ple-adatt-chromium-")
    b = Browser(Path(d))
    try:
        yield b
    finally:
        b.close()
        # Chromium's helper processes outlive the browser by a moment and may still write its
        # profile: retry the removal instead of failing the teardown on "Directory not empty"
        for _ in range(50):
            shutil.rmtree(d, ignore_errors=True)
            if not os.path.exists(d):
                break
            time.sleep(0.1)


def _requests(events: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    sent = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    failed = [e["params"].get("errorText", "?") for e in events if e.get("method") == "Network.loadingFailed"]
    errors = [e["params"]["entry"]["text"] for e in events
              if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [str(e["params"]) for e in events if e.get("method") == "Runtime.exceptionThrown"]
    return sent, failed, errors


def test_request_log_sees_external_fetches(browser: Browser, tmp_path: Path) -> None:
    """The detector works: a page with an external image shows the request and its failure."""
    page = tmp_path / "external.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    sent, failed, _ = _requests(browser.load(page.as_uri()))
    assert "http://127.0.0.1:9/x.png" in sent and failed


def test_report_renders_offline_and_is_screenshotted(browser: Browser, run: Run) -> None:
    page = (run.report_dir / "report.html").resolve()
    browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    sent, failed, errors = _requests(browser.load(page.as_uri()))
    assert sent == [page.as_uri()], f"the report made other requests: {sent}"
    assert failed == [] and errors == [], (failed, errors)
    assert browser.js("document.title").startswith("Task affinity report")
    assert browser.js("performance.getEntriesByType('resource').length") == 0
    assert browser.js("document.querySelector('h1').textContent") == "Task affinity and negative-transfer report"
    # every chart laid out with a real size, every section present
    sizes = browser.js("Array.from(document.querySelectorAll('svg')).map(s => s.getBoundingClientRect().width)")
    assert len(sizes) >= 5 and min(sizes) > 200, sizes
    ids = browser.js("Array.from(document.querySelectorAll('h2[id]')).map(h => h.id)")
    assert ids == ["affinity", "transfer", "negative", "trajectories", "conflict", "metrics", "availability"]
    n_tasks = len(run.report["run"]["tasks"])
    assert browser.js("document.querySelectorAll('svg')[0].querySelectorAll('rect > title').length") >= n_tasks ** 2
    height = browser.js("document.documentElement.scrollHeight")
    assert height > 2000
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": 1280, "height": min(height, 16000), "scale": 1})
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(png)
