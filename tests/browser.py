"""Headless Chromium for the tests: open a page as a person would, then ask the page what it shows.

Debian's ``chromium`` is driven over the Chrome DevTools Protocol (a WebSocket, ``websocket-client``): no
WebDriver, no browser download. ``Browser.open(url)`` navigates and waits for the load event (and, for a
single-page app, for ``wait_for`` text to appear); ``evaluate(js)`` returns a JavaScript value;
``screenshot(path)`` writes the whole page as PNG.

    python -m tests.browser report/index.html --screenshot /tmp/report.png   # look at it yourself
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The browser binary (``$DSET_CHROMIUM`` or the first of ``CHROMIUM_NAMES`` on PATH), or None."""
    if os.environ.get("DSET_CHROMIUM"):
        return os.environ["DSET_CHROMIUM"]
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, for a ``with`` block."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.width, self.height, self.timeout = width, height, timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        import websocket  # websocket-client

        binary = chromium_path()
        if binary is None:
            raise BrowserError(f"no Chromium found (tried $DSET_CHROMIUM and {', '.join(CHROMIUM_NAMES)}); "
                               "on Debian: apt-get install chromium")
        self._profile = tempfile.mkdtemp(prefix="dset_chromium_")
        args = [binary, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}",
                "--hide-scrollbars", "--mute-audio", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (CI containers)
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if self._proc.poll() is not None:
                raise BrowserError(f"{binary} exited with {self._proc.returncode}: "
                                   f"{self._proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserError(f"{binary} did not open its DevTools port within {self.timeout:.0f} s")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t.get("type") == "page"]
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout,
                                               suppress_origin=True)
        self._events: list[dict] = []
        self.send("Page.enable")
        self.send("Runtime.enable")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._ws.close()
        finally:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def send(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (events that arrive meanwhile are kept)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._events.append(msg)

    def _wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(i)
            self._events.append(json.loads(self._ws.recv()))
        raise BrowserError(f"no {method} within {self.timeout:.0f} s")

    def open(self, url: str, wait_for: str | None = None) -> None:
        """Navigate to ``url`` and wait for its load event; then, if given, until the page's text holds ``wait_for``."""
        self._events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        if result.get("loaderId"):  # a new document; a change of the #fragment alone loads nothing
            self._wait_event("Page.loadEventFired")
        if wait_for is not None:
            deadline = time.monotonic() + self.timeout
            while wait_for not in (self.evaluate("document.body ? document.body.innerText : ''") or ""):
                if time.monotonic() > deadline:
                    raise BrowserError(f"{url}: {wait_for!r} did not appear within {self.timeout:.0f} s")
                time.sleep(0.25)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"JavaScript error: {result['exceptionDetails'].get('text')}: "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """The page as PNG (all of it with ``full_page``)."""
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                            "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path


# what a report page must satisfy: every image decoded, every link resolves
PAGE_CHECK_JS = """(() => ({
  images: Array.from(document.images).map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                                  width: i.naturalWidth, height: i.naturalHeight})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  title: document.title,
}))()"""


def broken_links(page: dict, folder: Path) -> list[str]:
    """The links of ``page`` (PAGE_CHECK_JS's result) that lead nowhere: an anchor with no element of that id, or a
    relative file that is not in ``folder``. Absolute URLs are not followed (a report has none)."""
    bad = []
    for href in page["links"]:
        if href.startswith("#"):
            if href[1:] not in page["ids"]:
                bad.append(href)
        elif "://" not in href and not href.startswith("mailto:"):
            if not (folder / href.split("#")[0]).is_file():
                bad.append(href)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.browser", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="an HTML file or a URL")
    parser.add_argument("--screenshot", help="write the whole page as PNG here")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--wait-for", help="text to wait for (single-page apps)")
    args = parser.parse_args(argv)
    url = args.page if "://" in args.page else Path(args.page).resolve().as_uri()
    with Browser(width=args.width) as browser:
        browser.open(url, args.wait_for)
        page = browser.evaluate(PAGE_CHECK_JS)
        if args.screenshot:
            print(f"screenshot: {browser.screenshot(args.screenshot)}")
    loaded = sum(i["loaded"] for i in page["images"])
    print(f"{page['title']}: {loaded} of {len(page['images'])} images loaded, {len(page['links'])} links")
    if "://" not in args.page:
        for href in broken_links(page, Path(args.page).resolve().parent):
            print(f"broken link: {href}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
