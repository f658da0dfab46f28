"""Progress bars and timings: live in JupyterLab, in a log file in a headless run.

In JupyterLab a sweep shows a widget bar (``tqdm.auto``). The headless runner
(``python -m hedging_utils.regenerate``, what ``make figures`` runs) sets ``$HEDGING_PROGRESS_LOG``
to a log file: every bar, and every timing, is drawn as text into that file (the runner echoes
it to its stderr), and the notebook keeps one line per sweep (``training.train_saes`` prints
what it trains and how many steps, the same whether the SAEs train or load from the cache; a
bar of its own prints ``summary``), so that an executed notebook whose numbers did not change
is byte-identical on a rerun.
A kernel's own stderr cannot serve as that log: ipykernel copies whatever the process writes
to its file descriptors into the notebook's outputs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import tqdm as tqdm_text
import tqdm.auto as tqdm_auto

TEXT_PROGRESS_ENV = "HEDGING_TEXT_PROGRESS"
"""Set to draw progress bars as text on stderr instead of widgets (a terminal or a plain log)."""

PROGRESS_LOG_ENV = "HEDGING_PROGRESS_LOG"
"""A file that progress bars and timings are appended to (set by the headless runner); the
notebook then keeps a one-line summary per bar and no timings."""


def progress_log() -> str | None:
    """The headless log file, or None when running interactively."""
    return os.environ.get(PROGRESS_LOG_ENV) or None


def log(message: str) -> None:
    """Append ``message`` (a line) to the headless log; a no-op interactively."""
    path = progress_log()
    if path:
        with open(path, "a") as f:
            f.write(message.rstrip("\n") + "\n")


class LoggedBar(tqdm_text.tqdm):
    """A text bar drawn into the headless log; on close it prints ``<desc>: <n> <unit>s`` to
    the notebook (stdout), the bar's one line there."""

    def __init__(self, *args: Any, log_path: str, summarise: bool = True, **kwargs: Any):
        self._log_file = open(log_path, "a")
        self._summarise = summarise
        kwargs.update(file=self._log_file, ascii=True, dynamic_ncols=False, ncols=100, leave=True)  # the log keeps each bar's last state
        super().__init__(*args, **kwargs)
        self._summarised = False

    def close(self) -> None:
        if getattr(self, "_summarised", True):
            return super().close()
        self._summarised = True
        disabled = self.disable
        super().close()
        if not self._log_file.closed:
            self._log_file.close()
        if self._summarise and not disabled:
            print(summary(self.desc, self.n, self.unit), flush=True)


def summary(desc: str | None, n: int, unit: str) -> str:
    """The notebook's line for a finished bar: ``P8 (a) detached: 24,415 steps``."""
    return f"{desc or 'done'}: {n:,} {unit}{'' if n == 1 or unit.endswith('s') else 's'}"


def progress_bar(total: int, desc: str | None, *, unit: str = "it", disable: bool = False,
                 mininterval: float = 2.0, leave: bool = False, summarise: bool = True) -> tqdm_text.tqdm:
    """A progress bar of ``total`` ``unit``s labelled ``desc``: into the headless log when
    ``$HEDGING_PROGRESS_LOG`` is set (with a summary line in the notebook, unless ``summarise`` is
    False because the caller prints its own), as text when ``$HEDGING_TEXT_PROGRESS`` is set, else
    a widget in a notebook (text in a terminal). ``disable`` draws nothing."""
    path = progress_log()
    kwargs = dict(total=total, desc=desc, unit=unit, disable=disable, mininterval=mininterval, leave=leave)
    if path and not disable:
        return LoggedBar(log_path=path, summarise=summarise, **kwargs)
    if path or os.environ.get(TEXT_PROGRESS_ENV):
        return tqdm_text.tqdm(**kwargs)
    return tqdm_auto.tqdm(**kwargs)


def library_bar(original: Any) -> Any:
    """What to put in place of a library's ``tqdm`` (SAELens' trainer): ``original`` itself
    interactively, a bar into the headless log (no summary line) in a headless run."""
    path = progress_log()
    if not path:
        return original
    return lambda *args, **kwargs: (original(*args, **kwargs) if kwargs.get("disable")
                                    else LoggedBar(*args, log_path=path, summarise=False, **kwargs))


def took(start: float, what: str = "") -> str:
    """`` in 12.3s`` since ``start`` (a ``time.perf_counter()``) for a printed line, interactively;
    in a headless run the line gets ``""`` and the timing goes to the log if ``what`` names it."""
    seconds = time.perf_counter() - start
    if progress_log():
        if what:
            log(f"{what}: {seconds:.1f}s")
        return ""
    return f" in {seconds:.1f}s" if seconds < 10 else f" in {seconds:.0f}s"


def echo(path: str | os.PathLike, stream=None, poll: float = 1.0):
    """Start a daemon thread that copies what is appended to ``path`` onto ``stream`` (default
    stderr) until the returned ``stop()`` is called (which copies what is left)."""
    import threading

    stream = stream or sys.stderr
    done = threading.Event()

    def follow() -> None:
        position = 0
        while True:
            finished = done.wait(poll)
            try:
                with open(path) as f:
                    f.seek(position)
                    chunk = f.read()
                    position = f.tell()
            except FileNotFoundError:
                chunk = ""
            if chunk:
                stream.write(chunk)
                stream.flush()
            if finished:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return stop
