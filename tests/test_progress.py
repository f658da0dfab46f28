"""Progress bars: into the headless log with one summary line in the notebook, widgets otherwise."""

import io
import time
from contextlib import redirect_stdout

import tqdm.auto as tqdm_auto
import tqdm.std

from hedging_utils import progress
from hedging_utils.progress import PROGRESS_LOG_ENV, TEXT_PROGRESS_ENV, LoggedBar, library_bar, progress_bar, summary, took


def _run_bar(n, **kwargs):
    out = io.StringIO()
    with redirect_stdout(out):
        bar = progress_bar(n, "P8 (a) detached", unit="step", mininterval=0, **kwargs)
        for _ in range(n):
            bar.update()
        bar.close()
    return bar, out.getvalue()


def test_headless_bars_go_to_the_log_and_leave_one_summary_line(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))
    bar, printed = _run_bar(1234)
    assert isinstance(bar, LoggedBar)
    assert printed == "P8 (a) detached: 1,234 steps\n"  # what trained, how many steps; no timing
    assert "1234/1234" in log.read_text()  # the bar itself is in the log
    _, again = _run_bar(1234)
    assert again == printed  # the same line on a rerun


def test_a_caller_with_its_own_line_gets_no_summary_and_a_disabled_bar_writes_nothing(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))
    assert _run_bar(10, summarise=False)[1] == ""
    assert "10/10" in log.read_text()
    log.write_text("")
    assert _run_bar(10, disable=True)[1] == "" and log.read_text() == ""


def test_interactive_bars_are_widgets_or_text(monkeypatch):
    monkeypatch.delenv(PROGRESS_LOG_ENV, raising=False)
    monkeypatch.delenv(TEXT_PROGRESS_ENV, raising=False)
    bar = progress_bar(3, "x", disable=True)
    assert not isinstance(bar, LoggedBar)
    assert progress_bar.__module__ == "hedging_utils.progress"
    monkeypatch.setenv(TEXT_PROGRESS_ENV, "1")
    bar = progress_bar(3, "x", disable=True)
    assert type(bar) is tqdm.std.tqdm
    monkeypatch.delenv(TEXT_PROGRESS_ENV)
    assert library_bar(tqdm_auto.tqdm) is tqdm_auto.tqdm  # SAELens keeps its own bar interactively


def test_a_library_bar_goes_to_the_log_headless(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))
    out = io.StringIO()
    with redirect_stdout(out):
        bar = library_bar(tqdm_auto.tqdm)(total=5, desc="Training SAE", mininterval=0)
        bar.update(5)
        bar.close()
    assert isinstance(bar, LoggedBar) and out.getvalue() == "" and "5/5" in log.read_text()


def test_timings_leave_the_notebook_in_a_headless_run(tmp_path, monkeypatch):
    start = time.perf_counter() - 12.3
    monkeypatch.delenv(PROGRESS_LOG_ENV, raising=False)
    assert took(start).startswith(" in 12")
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))
    assert took(start, "trained P8") == ""
    assert log.read_text().startswith("trained P8: 12.")


def test_summary_wording():
    assert summary("cached gemma layers [9]", 327680, "token") == "cached gemma layers [9]: 327,680 tokens"
    assert summary(None, 1, "step") == "done: 1 step"


def test_echo_copies_the_log_as_it_grows(tmp_path):
    log = tmp_path / "progress.log"
    log.write_text("")
    out = io.StringIO()
    stop = progress.echo(log, out, poll=0.05)
    with open(log, "a") as f:
        f.write("a bar at 50%\n")
    time.sleep(0.2)
    with open(log, "a") as f:
        f.write("done\n")
    stop()
    assert out.getvalue() == "a bar at 50%\ndone\n"


def test_a_headless_sweep_prints_the_same_line_whether_it_trains_or_loads(tmp_path, monkeypatch):
    from hedging_utils.toys import ToySetting, toy_job
    from hedging_utils.training import TrainSettings, train_saes

    monkeypatch.setenv(PROGRESS_LOG_ENV, str(tmp_path / "progress.log"))
    toy = ToySetting([0.25, 0.2], d_model=8)
    jobs = {w: toy_job(toy, w, batch_size=50, seed=0, label=f"X width {w}") for w in (1, 2)}
    settings = TrainSettings(steps=20, batch_size=50)
    lines = []
    for _ in range(2):  # trained, then loaded from the cache
        out = io.StringIO()
        with redirect_stdout(out):
            train_saes(jobs, settings)
        lines.append(out.getvalue())
    assert lines[0] == lines[1] == "  2 standard SAEs (X width 1, ...): 20 steps of 50\n"
    assert "trained 2 standard SAEs (X width 1, ...) (20 steps of 50) in " in (tmp_path / "progress.log").read_text()
