"""The browser check's own logic (the check itself needs Chromium: make browser-check)."""

import pytest

from hedging_utils.browser_check import Missing, find_chromium, lab_findings, main


def test_without_chromium_it_stops_naming_what_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    with pytest.raises(Missing, match="apt-get install chromium"):
        find_chromium()
    monkeypatch.setenv("CHROMIUM", "no-such-browser")
    with pytest.raises(Missing, match="CHROMIUM"):
        find_chromium()
    with pytest.raises(SystemExit) as stopped:
        main(["--html", str(tmp_path)])
    assert stopped.value.code == 3 and "cannot run" in capsys.readouterr().err


def _state(images=0, progress=0, widget_errors=0, tracebacks=0):
    return {"images": images, "progress": progress, "widget_errors": widget_errors, "tracebacks": tracebacks}


def test_lab_findings_need_a_figure_and_a_widget_bar_and_no_widget_error():
    assert all(lab_findings([_state(), _state(images=1), _state(images=1, progress=1)]).values())
    no_bar = lab_findings([_state(images=2)])
    assert not no_bar["a widget progress bar rendered"] and no_bar["a figure rendered"]
    broken = lab_findings([_state(images=1, progress=1, widget_errors=1)])
    assert not broken["no 'Error displaying widget'"]
    assert not lab_findings([_state(images=1, progress=1, tracebacks=1)])["no traceback in the outputs"]
