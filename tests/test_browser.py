"""The report in a real browser: it opens offline, without errors, and shows what failed.

The report is rendered by the CLI and opened, unmodified, in headless Chromium driven over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no websocket, no extra
package). Every problem a person would see in the console is recorded from the protocol's
events: uncaught exceptions, ``console.error``, resource loads that fail, JavaScript dialogs,
and any request that is not for a local file. A control page that commits each of these on
purpose proves the recorder sees them, so "no problems" on the report means something.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from inferlink_audit.cli import main

from .specs import write_spec

pytestmark = pytest.mark.browser

# Markup in the model's name: a script that would alert, and an image whose load would fail
# and whose handler would alert. Escaped, it is only text.
HOSTILE_NAME = "<script>alert(1)</script><img src=x onerror=alert(2)>digits"
WINDOW = (1280, 2000)
LOAD_TIMEOUT_S = 15.0
# Schemes a self-contained report may load from; anything else would leave the machine.
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")

CONTROL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>control</title></head>
<body><p>control page: every line below is a problem the recorder must see</p>
<img src="missing-local-file.png" alt="">
<img src="http://inferlink-control.invalid/pixel.png" alt="">
<script>alert("control dialog");</script>
<script>console.error("control console error");</script>
<script>throw new Error("control uncaught error");</script>
</body></html>
"""


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "headless Chromium is not installed (Debian: apt-get install chromium; "
    ".ci/run installs it when apt is available)"
)


def in_ci() -> bool:
    """CI services set ``CI=true``; there a missing browser must not pass as a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    if in_ci():
        pytest.fail(f"CI=true but {INSTALL_HINT}; the browser tests must run in CI")
    pytest.skip(INSTALL_HINT)


@dataclass
class PageLoad:
    """What happened while one page loaded, and what it showed afterwards."""

    url: str
    session: str
    requests: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    failed_loads: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    text: str = ""
    scripts: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    title: str = ""

    @property
    def external_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]

    @property
    def problems(self) -> list[str]:
        """Everything that would show as an error in the console, or as a dialog."""
        return [
            *(f"uncaught exception: {e}" for e in self.exceptions),
            *(f"console.error: {e}" for e in self.console_errors),
            *(f"console log error: {e}" for e in self.log_errors),
            *(f"failed load: {e}" for e in self.failed_loads),
            *(f"dialog: {e}" for e in self.dialogs),
            *(f"network request: {u}" for u in self.external_requests),
        ]


class Browser:
    """Headless Chromium and the DevTools protocol over fds 3 (commands) and 4 (replies)."""

    def __init__(self, executable: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "chromium.log"
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The protocol wants the pipes on fds 3 and 4. bash puts them there just before exec
        # (no preexec_fn: pytest-xdist workers have threads). Copies on fds >= 10 first, so
        # neither source is itself 3 or 4 and gets overwritten by the other redirection.
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        launcher = f'exec "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-'
        args = [
            "bash",
            "-c",
            launcher,
            "chromium",
            executable,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--no-first-run",
            "--mute-audio",
            # Belt and braces: even a request the page should never make cannot resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={workdir / 'profile'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child_r, child_w),
            )
        os.close(child_r)
        os.close(child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _send(self, method: str, params: dict[str, Any] | None, session: str | None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None once ``deadline`` passes."""
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe; its log:\n{self.log_tail()}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        if message.get("method") == "Page.javascriptDialogOpening":
            # A dialog blocks the page until answered: record it (it is an event) and dismiss.
            self._send("Page.handleJavaScriptDialog", {"accept": True}, message.get("sessionId"))
        if "method" in message:
            self.events.append(message)
        return message

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            message = self._receive(deadline)
            if message is None:
                raise TimeoutError(f"{method}: no reply; Chromium's log:\n{self.log_tail()}")
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def wait_for(self, session: str, name: str, loader: str, timeout: float) -> bool:
        """Wait for the lifecycle event ``name`` of navigation ``loader``; False on timeout."""

        def seen() -> bool:
            return any(
                e["method"] == "Page.lifecycleEvent"
                and e.get("sessionId") == session
                and e["params"]["name"] == name
                and e["params"].get("loaderId") == loader
                for e in self.events
            )

        deadline = time.monotonic() + timeout
        while not seen():
            if self._receive(deadline) is None:
                return False
        return True

    def drain(self, seconds: float) -> None:
        """Collect events for a little longer: late errors from timers or async loads."""
        deadline = time.monotonic() + seconds
        while self._receive(deadline) is not None:
            pass

    def load(self, path: Path) -> PageLoad:
        """Open ``path`` in a fresh tab and record everything that happens until it settles."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.setLifecycleEventsEnabled", {"enabled": True}, session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        first_event = len(self.events)
        page = PageLoad(url=path.as_uri(), session=session)
        navigation = self.call("Page.navigate", {"url": page.url}, session)
        if "errorText" in navigation:
            raise RuntimeError(f"navigation to {page.url} failed: {navigation['errorText']}")
        loader = navigation["loaderId"]
        if not self.wait_for(session, "load", loader, LOAD_TIMEOUT_S):
            raise TimeoutError(f"{page.url} did not finish loading; log:\n{self.log_tail()}")
        # networkIdle: no request for 500 ms. A page with nothing pending gets it at once.
        self.wait_for(session, "networkIdle", loader, 3.0)
        self.drain(0.3)
        self._record(page, [e for e in self.events[first_event:] if e.get("sessionId") == session])
        page.text = self._evaluate("document.body.innerText", session)
        page.title = self._evaluate("document.title", session)
        page.scripts = self._evaluate(
            "Array.from(document.scripts, s => s.src || s.textContent)", session
        )
        page.images = self._evaluate(
            "Array.from(document.images, i => i.getAttribute('src'))", session
        )
        return page

    def _evaluate(self, expression: str, session: str) -> Any:
        reply = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, page: PageLoad) -> bytes:
        """A PNG of a loaded page's viewport, at the window size."""
        shot = self.call("Page.captureScreenshot", {"format": "png"}, page.session)
        return base64.b64decode(shot["data"])

    @staticmethod
    def _record(page: PageLoad, events: list[dict[str, Any]]) -> None:
        urls: dict[str, str] = {}
        for event in events:
            method, params = event["method"], event["params"]
            if method == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
                page.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                url = urls.get(params["requestId"], "?")
                page.failed_loads.append(f"{url}: {params.get('errorText', '')}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                exception = details.get("exception", {})
                page.exceptions.append(exception.get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                page.console_errors.append(
                    " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                page.log_errors.append(f"{entry.get('url', '')}: {entry['text']}")
            elif method == "Page.javascriptDialogOpening":
                page.dialogs.append(f"{params['type']}: {params['message']}")

    def close(self) -> None:
        try:
            self._send("Browser.close", None, None)
            self._process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


def _png_size_and_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, width, height, idat = 8, 0, 0, b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    instance = Browser(_chromium(), tmp_path / "chromium")
    try:
        instance.call("Browser.getVersion")
        yield instance
    finally:
        instance.close()


def test_the_recorder_sees_every_kind_of_problem_on_a_control_page(
    browser: Browser, tmp_path: Path
) -> None:
    path = tmp_path / "control.html"
    path.write_text(CONTROL_PAGE)
    control = browser.load(path)
    assert any("control uncaught error" in e for e in control.exceptions), control.problems
    assert any("control console error" in e for e in control.console_errors), control.problems
    assert any("missing-local-file.png" in e for e in control.failed_loads), control.problems
    assert any("inferlink-control.invalid" in u for u in control.external_requests)
    assert control.dialogs == ["alert: control dialog"]
    assert "control page" in control.text


# One test, not one per property: under ``pytest -n 2`` tests of a module are spread over both
# workers, and each would pay for its own audit.
def test_report_opens_offline_without_errors_and_shows_the_failure(
    browser: Browser, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path,
        name=HOSTILE_NAME,
        filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["local", "global"]},
        checks={"min_clean_accuracy": 0.99},
    )
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out), "--quiet"]) == 1
    results = json.loads((out / "results.json").read_text())
    failed = [c["id"] for m in results["models"] for c in m["checks"] if not c["passed"]]
    assert failed == ["min_clean_accuracy"]

    report = browser.load(out / "report.html")

    # Opens offline and cleanly: no console error of any kind, nothing fetched but itself.
    assert report.problems == []
    assert [u for u in report.requests if not u.startswith("data:")] == [report.url]

    # The verdict and the failing check are in the rendered text (innerText: what is shown).
    assert "FAIL" in report.text.split()
    assert report.title.startswith("FAIL")
    for check_id in failed:
        assert check_id in report.text, f"failing check {check_id} is not visible"

    # The hostile name is text; its markup became no element and ran nothing.
    assert HOSTILE_NAME in report.text
    assert HOSTILE_NAME in report.title
    assert report.dialogs == []
    assert "x" not in report.images, report.images
    assert not any("alert(" in script for script in report.scripts), report.scripts

    shot = tmp_path / "shot.png"
    shot.write_bytes(browser.screenshot(report))
    width, height, pixels = _png_size_and_pixels(shot.read_bytes())
    assert (width, height) == WINDOW
    assert shot.stat().st_size > 20_000, "a blank page compresses to almost nothing"
    # Text, a coloured verdict and plots: many distinct byte values, not one background colour.
    assert len(set(pixels)) > 64


# --------------------------------------------------------------------------- no silent skip
@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_a_missing_chromium_fails_in_ci_and_skips_with_the_reason_elsewhere(
    ci: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"apt-get install chromium") as raised:
        _chromium()
    assert raised.type is outcome
