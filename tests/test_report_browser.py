"""The guide report in a real browser: headless Chromium (Debian's ``chromium`` package)
loads the page over HTTP on loopback, every figure must load, and a screenshot is saved
beside the report (``screenshot.png``; a CI artifact when ``$HPOSVC_TEST_ARTIFACTS`` is
set, see tests/test_guide.py).

Without a Chromium on PATH these tests are SKIPPED, with the reason and the install command;
with ``HPOSVC_REQUIRE_BROWSER=1`` (``bash .ci/run`` sets it) they FAIL instead, so CI
always runs them.

The checks read the page's DOM after load through a small same-origin page that embeds
the report in an iframe and writes what it finds into its own DOM, which
``chromium --dump-dom`` prints: no WebDriver or DevTools client is needed.
"""

from __future__ import annotations

import html
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_guide import GuideRun, guide_outputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # None: not installed
REQUIRE_BROWSER_ENV = "HPOSVC_REQUIRE_BROWSER"  # set (not "" or "0"): no Chromium is a failure
_NO_CHROMIUM = (
    "no Chromium on PATH (chromium or chromium-browser): install one to run the browser tests, "
    "e.g. `apt-get install chromium fonts-dejavu-core` (bash .ci/run does it)"
)
pytestmark = [
    pytest.mark.slow,  # they need the guide's studies run and reported first
    # a skip marker, not a skip in a fixture: nothing (the guide's studies) runs before it
    pytest.mark.skipif(CHROMIUM is None and os.environ.get(REQUIRE_BROWSER_ENV, "") in ("", "0"), reason=_NO_CHROMIUM),
]
CHROMIUM_TIMEOUT = 120  # seconds; a cold start on a busy 2-core box takes a few
# The flags the project runs Chromium with: no sandbox (root in a container), no GPU, and
# nothing that phones home or updates itself during a test.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--hide-scrollbars",
)
CHECK_PAGE = "/__hposvc_check__.html"
# Loads the report in a same-origin iframe; on load (after every image has loaded or
# failed) writes the report's title, images and sections as JSON into <pre id="result">.
CHECK_HTML = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>check</title></head><body>
<pre id="result">pending</pre>
<iframe id="report" src="/index.html" style="width:1280px;height:900px"></iframe>
<script>
window.addEventListener("load", function () {
  var doc = document.getElementById("report").contentDocument;
  var result = {
    title: doc.title,
    images: Array.from(doc.images).map(function (img) {
      return {src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth, height: img.naturalHeight};
    }),
    sections: Array.from(doc.querySelectorAll("section.claim")).map(function (s) { return [s.id, s.dataset.verdict]; }),
    summaryRows: doc.querySelectorAll("#summary tbody tr").length
  };
  document.getElementById("result").textContent = JSON.stringify(result);
});
</script></body></html>"""


@pytest.fixture(scope="session")
def guide(tmp_path_factory: pytest.TempPathFactory) -> GuideRun:
    return guide_outputs(tmp_path_factory)


@pytest.fixture(scope="session")  # session, like `guide`, and first in each test: checked before the guide runs
def chromium() -> str:
    """Chromium's path; reached without one only under $HPOSVC_REQUIRE_BROWSER, which makes it a failure."""
    if CHROMIUM is None:
        pytest.fail(f"{REQUIRE_BROWSER_ENV} is set and there is {_NO_CHROMIUM}", pytrace=False)
    return CHROMIUM


class _Server:
    """http.server on 127.0.0.1 serving the report folder, plus the check page; it
    records every request's path and status."""

    def __init__(self, root: Path) -> None:
        requests: list[tuple[str, int]] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == CHECK_PAGE:
                    body = CHECK_HTML.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                requests.append((self.path, int(code) if str(code).isdigit() else 0))

            def log_message(self, *args) -> None:  # quiet: the test reads `requests`
                pass

        self.requests = requests
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(guide: GuideRun) -> Iterator[_Server]:
    with _Server(guide.report.out_dir) as server:
        yield server


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def test_report_page_and_every_figure_load_in_chromium(chromium: str, served: _Server, guide: GuideRun, tmp_path: Path):
    result = _chromium(chromium, tmp_path / "profile", "--virtual-time-budget=20000", "--dump-dom", served.url + CHECK_PAGE)
    match = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert match, result.stdout[-2000:]
    page = json.loads(html.unescape(match.group(1)))
    report = json.loads((guide.report.out_dir / "report.json").read_text())
    figures = [f["file"] for s in report["sections"] for f in s["figures"]]

    assert page["title"] == report["title"]
    assert [img["src"] for img in page["images"]] == figures
    broken = [img for img in page["images"] if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert not broken, broken
    assert page["sections"] == [[f"claim-{s['claim']['key']}", s["verdict"]] for s in report["sections"]]
    assert page["summaryRows"] == len(report["sections"])
    # the browser fetched the page and every figure from the server, and nothing failed
    fetched = dict(served.requests)
    assert fetched.get("/index.html") == 200
    assert all(fetched.get(f"/{name}") == 200 for name in figures), served.requests
    assert [r for r in served.requests if r[1] >= 400 and r[0] != "/favicon.ico"] == []


def test_screenshot_of_the_report(chromium: str, served: _Server, guide: GuideRun, tmp_path: Path):
    from PIL import Image

    shot = guide.report.out_dir / "screenshot.png"
    shot.unlink(missing_ok=True)
    _chromium(chromium, tmp_path / "profile", "--window-size=1280,4000", f"--screenshot={shot}", served.url + "/index.html")
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        gray = image.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100  # text and figures, not a blank page
        # the page rendered its content: dark text pixels in the top part (title, summary)
        top = gray.crop((0, 0, 1280, 600))
        assert sum(top.histogram()[:80]) > 500
