"""What a reader sees, checked in a real browser (``make browser-check``; not part of ``make test``).

1. Opens every page of ``build/html/`` (``make html``) in headless Chromium, saves a screenshot
   of each to ``build/browser-check/`` and checks that the index shows the verdict table and
   the gallery's images, and that each notebook page shows figures and printed claim checks.
2. Starts JupyterLab (as ``make lab`` does) on a free local port, on a copy of notebook 01 in a
   temporary folder (so nothing the browser does can touch the repository's notebooks, cache
   or figures), with ``HEDGING_PROFILE=ci`` and an empty cache; runs its first cells (parameters,
   imports, P1's training and figure) in the browser, then one cell that draws a progress bar
   the way the sweeps do, and checks that a figure and a widget progress bar render, and that
   no output reads "Error displaying widget". Screenshots go to the same folder.

It drives Chromium through its DevTools protocol (``websocket-client``, installed with
JupyterLab). It needs Debian's ``chromium`` (``apt-get install chromium``) or ``$CHROMIUM``, and
stops with a message naming what is missing otherwise. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from hedging_utils.profiles import REPO_ROOT
from hedging_utils.reading import HTML_DIR

SHOT_DIR = REPO_ROOT / "build" / "browser-check"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LAB_NOTEBOOK = "01_toy_models.ipynb"
LAB_CELLS = 5
"""Notebook 01's first cells run in the browser: title, parameters, imports, P1's heading, and
P1's training and figure."""

WIDGET_CELL = """from hedging_utils.progress import progress_bar
bar = progress_bar(100, "browser check", unit="step", mininterval=0)
bar.update(40);  # left open: the widget stays on the page"""

DOM_STATE = """(() => {
  const outputs = [...document.querySelectorAll('.jp-OutputArea-output')];
  return {
    images: document.querySelectorAll('.jp-OutputArea-output img').length,
    progress: document.querySelectorAll('.jp-OutputArea .widget-progress, .jp-OutputArea progress, .jp-OutputArea .progress-bar').length,
    classes: [...new Set([...document.querySelectorAll('.jp-OutputArea [class*="widget"]')].map(e => e.className))].slice(0, 20),
    widget_errors: outputs.filter(o => o.textContent.includes('Error displaying widget')).length,
    errors: document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').length,
    tracebacks: outputs.filter(o => o.textContent.includes('Traceback')).length,
    text: outputs.map(o => o.textContent).join('\\n').slice(0, 2000),
  };
})()"""


class Missing(RuntimeError):
    """Something the check needs is not installed."""


def find_chromium() -> str:
    """The Chromium executable: ``$CHROMIUM`` or the first of ``CHROMIUM_NAMES`` on the PATH."""
    chosen = os.environ.get("CHROMIUM")
    if chosen:
        if shutil.which(chosen) is None:
            raise Missing(f"$CHROMIUM is {chosen!r}, which is not an executable; unset it or point it at Chromium.")
        return shutil.which(chosen)  # type: ignore[return-value]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise Missing("no Chromium found (tried " + ", ".join(CHROMIUM_NAMES) + " on the PATH, and $CHROMIUM): install "
                  "Debian's `apt-get install chromium`, or set CHROMIUM=/path/to/chrome; make browser-check needs it.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read() or b"null")
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
            time.sleep(0.5)


class Browser:
    """A headless Chromium page driven through the DevTools protocol."""

    def __init__(self, executable: str, profile_dir: str):
        import websocket

        port = free_port()
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir}", "--window-size=1280,1600", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = [t for t in _wait_for(f"http://127.0.0.1:{port}/json/list", 30) if t["type"] == "page"]
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def open(self, url: str, settle: float = 1.0) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while self.evaluate("document.readyState") != "complete" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Report:
    """What the check saw: one line per check, and the screenshots it saved."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: Any = "") -> None:
        self.lines.append(f"[{'ok' if ok else 'FAILED'}] {what}" + (f" ({detail})" if detail != "" else ""))
        if not ok:
            self.failures.append(what)
        print(self.lines[-1], flush=True)


def lab_findings(states: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """From DOM states polled while notebook 01 ran in JupyterLab (``DOM_STATE``): whether a
    figure and a widget progress bar rendered at some point, and whether no widget failed."""
    return {
        "a figure rendered": any(s["images"] > 0 for s in states),
        "a widget progress bar rendered": any(s["progress"] > 0 for s in states),
        "no 'Error displaying widget'": all(s["widget_errors"] == 0 for s in states),
        "no traceback in the outputs": all(s["tracebacks"] == 0 for s in states),
    }


def check_html(browser: Browser, html_dir: Path, shots: Path, report: Report) -> None:
    index = html_dir / "index.html"
    if not index.exists():
        report.check(f"{index} exists (make html)", False)
        return
    pages = [index, *sorted(p for p in html_dir.glob("[0-9][0-9]_*.html"))]
    for page in pages:
        browser.open(page.resolve().as_uri())
        if page == index:
            rows = browser.evaluate("document.querySelectorAll('tbody tr').length")
            images = browser.evaluate("[...document.querySelectorAll('.gallery img')].filter(i => i.complete && i.naturalWidth > 0).length")
            report.check("index: verdict table has rows", rows > 0, f"{rows} figures")
            report.check("index: gallery images load", images > 0 and images == rows, f"{images} of {rows}")
        else:
            images = browser.evaluate("[...document.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.naturalWidth > 0).length")
            checks = browser.evaluate("(document.body.innerText.match(/\\[(holds|DEPARTS|inconclusive)\\]/g) || []).length")
            report.check(f"{page.name}: figures and printed checks", images > 0 and checks > 0, f"{images} figures, {checks} checks")
        report.shots.append(browser.screenshot(shots / f"html_{page.stem}.png"))


@contextlib.contextmanager
def jupyter_lab(root: Path, port: int, token: str, env: dict[str, str]) -> Iterator[str]:
    """JupyterLab serving ``root`` on ``port`` (``window.jupyterapp`` exposed for the check)."""
    log = open(root.parent / "lab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            _wait_for(f"http://127.0.0.1:{port}/api/status?token={token}", 120)
        except TimeoutError as error:
            tail = (root.parent / "lab.log").read_text()[-2000:]
            raise RuntimeError(f"JupyterLab did not start ({error}); its log ends:\n{tail}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


PANEL = "[...window.jupyterapp.shell.widgets('main')].find(w => w.sessionContext && w.content)"
"""The notebook's panel (``shell.currentWidget`` follows the focus, which a headless page lacks)."""

RUN_CELL = """(async () => {
  const panel = %s;
  window.jupyterapp.shell.activateById(panel.id);
  await panel.sessionContext.ready;
  panel.content.activeCellIndex = %d;
  await window.jupyterapp.commands.execute('notebook:run-cell');
  return true;
})()"""

ADD_CELL = """(async () => {
  const panel = %s;
  window.jupyterapp.shell.activateById(panel.id);
  panel.content.activeCellIndex = %d;
  await window.jupyterapp.commands.execute('notebook:insert-cell-below');
  panel.content.activeCell.model.sharedModel.setSource(%s);
  return panel.content.activeCellIndex;
})()"""


def check_lab(browser: Browser, shots: Path, report: Report, work: Path, timeout: float) -> None:
    root = work / "lab"
    root.mkdir()
    shutil.copyfile(REPO_ROOT / "notebooks" / LAB_NOTEBOOK, root / LAB_NOTEBOOK)
    env = {**os.environ, "HEDGING_PROFILE": "ci", "HEDGING_CACHE_DIR": str(work / "cache"),
           "HEDGING_FIGURES_DIR": str(work / "figures"), "PYTHONPATH": os.pathsep.join(
               [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for variable in ("HEDGING_PROGRESS_LOG", "HEDGING_TEXT_PROGRESS"):
        env.pop(variable, None)  # an interactive session: widget bars
    token = base64.b32encode(os.urandom(15)).decode().lower()
    port = free_port()
    with jupyter_lab(root, port, token, env) as url:
        browser.open(f"{url}/lab/tree/{LAB_NOTEBOOK}?token={token}", settle=2)
        deadline = time.monotonic() + 120
        while not browser.evaluate(f"!!(window.jupyterapp && {PANEL})"):
            if time.monotonic() > deadline:
                report.check("JupyterLab opened notebook 01", False, "no notebook panel within 120s")
                report.shots.append(browser.screenshot(shots / "lab_01_failed.png", full_page=False))
                return
            time.sleep(0.5)
        report.check("JupyterLab opened notebook 01", True, f"port {port}")
        states = []
        for index in range(LAB_CELLS):
            browser.evaluate(RUN_CELL % (PANEL, index), await_promise=True)
            states.append(browser.evaluate(DOM_STATE))
        added = browser.evaluate(ADD_CELL % (PANEL, LAB_CELLS - 1, json.dumps(WIDGET_CELL)), await_promise=True)
        browser.evaluate(RUN_CELL % (PANEL, added), await_promise=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            states.append(browser.evaluate(DOM_STATE))
            if states[-1]["progress"] > 0:
                break
            time.sleep(0.5)
        time.sleep(1)
        states.append(browser.evaluate(DOM_STATE))
        for what, ok in lab_findings(states).items():
            report.check(f"JupyterLab, notebook 01 on ci: {what}", ok)
        if report.failures:
            print(states[-1]["text"][-1500:], states[-1]["classes"])
        browser.evaluate(f"{PANEL}.content.activeCell.node.scrollIntoView()")
        time.sleep(0.5)
        report.shots.append(browser.screenshot(shots / "lab_01_toy_models.png", full_page=False))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the HTML pages and JupyterLab in headless Chromium.")
    parser.add_argument("--html", default=str(HTML_DIR), help="folder written by make html")
    parser.add_argument("--out", default=str(SHOT_DIR), help="where screenshots go")
    parser.add_argument("--skip-lab", action="store_true", help="only the HTML pages")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the widget bar")
    args = parser.parse_args(argv)
    try:
        executable = find_chromium()
        import websocket  # noqa: F401
    except Missing as error:
        parser.exit(3, f"{parser.prog}: cannot run: {error}\n")
    except ImportError:
        parser.exit(3, f"{parser.prog}: cannot run: the Python package websocket-client is missing (pip install websocket-client).\n")
    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="browser-check-") as work:
        browser = Browser(executable, str(Path(work) / "chromium-profile"))
        try:
            check_html(browser, Path(args.html), shots, report)
            if not args.skip_lab:
                check_lab(browser, shots, report, Path(work), args.timeout)
        finally:
            browser.close()
    print(f"screenshots: {', '.join(str(p) for p in report.shots)}")
    if report.failures:
        print(f"{len(report.failures)} check(s) failed: {'; '.join(report.failures)}")
        return 1
    print(f"all {len(report.lines)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
