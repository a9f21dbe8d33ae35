"""A headless Chromium the tests drive through the DevTools protocol, standard library only.

``chromium --dump-dom`` / ``--screenshot`` act once the page's load event and a virtual
time budget have passed; MLflow's UI draws its charts and its HTML-artifact viewer after
that (a fetch, then a sandboxed frame parsing plotly.js), so such a screenshot can catch a
blank frame. This client waits instead, in real time, for what the test says the page
must show (:meth:`Browser.wait_for`), then reads the DOM or takes the screenshot.

It speaks the protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4,
NUL-separated JSON), so no WebDriver, websocket library or open port is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any


class BrowserError(RuntimeError):
    pass


def _above_4(fd: int) -> int:
    """``fd`` moved to a number above 4 (so moving the pipe to 3 and 4 in the child never
    overwrites its other end), closed on exec."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one page.

    >>> with Browser(chromium, flags, profile, size=(1400, 900)) as b:  # doctest: +SKIP
    ...     b.open("http://127.0.0.1:5000/")
    ...     b.wait_for("document.title.startsWith('Runs')")
    ...     b.screenshot(Path("runs.png"))
    """

    def __init__(self, binary: str, flags: tuple[str, ...], profile: Path, *, size: tuple[int, int]) -> None:
        to_chrome_r, self._w = map(_above_4, os.pipe())
        self._r, from_chrome_w = map(_above_4, os.pipe())
        args = [binary, *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={size[0]},{size[1]}", "about:blank"]
        self.log = Path(f"{profile}.log")  # Chromium's own chatter (dbus, GPU); read on failure
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        # posix_spawn puts the protocol's pipe at the child's fds 3 (commands in) and 4
        # (replies out); a Popen preexec_fn could do it too, but is unsafe with threads.
        self.pid = os.posix_spawn(binary, args, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log, 1),
            (os.POSIX_SPAWN_DUP2, log, 2),
            (os.POSIX_SPAWN_DUP2, to_chrome_r, 3),
            (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
        ])  # fmt: skip
        os.close(log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.size = size
        try:
            target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()  # no Chromium left behind
            raise

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._call("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        deadline = time.monotonic() + 20
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.1)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- protocol ----------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._w, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the protocol pipe; its log ends:\n{self.log.read_text(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None, timeout: float = 60) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:  # events and late replies are skipped
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60) -> dict[str, Any]:
        """A protocol command on the page."""
        return self._call(method, params, session=self._session, timeout=timeout)

    # -- what the tests use --------------------------------------------------------------

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """``expression``'s value in the page (JSON-able); JS exceptions become None."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return None if "exceptionDetails" in result else result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 60, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value. Fails with ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout:.0f}s for {what or expression}; the page says: {str(self.evaluate('document.body && document.body.innerText'))[:1500]}")
            time.sleep(0.25)

    def screenshot(self, path: Path, *, height: int | None = None) -> Path:
        """A PNG of the page's top ``height`` pixels (the window's height by default)."""
        clip = {"x": 0, "y": 0, "width": self.size[0], "height": height or self.size[1], "scale": 1}
        params = {"format": "png", "clip": clip, "captureBeyondViewport": height is not None}
        deadline = time.monotonic() + 30
        while True:
            try:
                data = self.call("Page.captureScreenshot", params)["data"]
                break
            except BrowserError as e:
                # Right after Page.navigate the tab may be between documents (a busy machine
                # shows it): Chromium answers "Not attached to an active page" until it commits.
                if "Not attached" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        path.write_bytes(base64.b64decode(data))
        return path
