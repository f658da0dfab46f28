"""Regenerating the figures: the notebook runner (``hedging_utils.regenerate``), its order, threads,
parameters, progress log and publishing, with papermill replaced by a recorder (no compute)."""

import json
import os
from pathlib import Path

import pytest

from hedging_utils import regenerate
from hedging_utils.profiles import ParameterError, resolve_profile
from hedging_utils.regenerate import main, notebooks, parallel_notebooks, parse_parameters, run_notebooks


@pytest.fixture
def executed(monkeypatch):
    """papermill's execute_notebook replaced by a recorder: the runner's calls, no compute."""
    import papermill as pm
    monkeypatch.delenv("HEDGING_PROGRESS_LOG", raising=False)  # the runner sets it for its run only
    calls = []
    monkeypatch.setattr(pm, "execute_notebook", lambda source, target, parameters, **kw: calls.append(
        (Path(source).name, parameters, kw["cwd"])))
    monkeypatch.setattr(regenerate, "prepare_offline_model", lambda log: calls.append(
        ("offline model", {"threads": os.environ.get("OMP_NUM_THREADS")}, None)) or 1.0)
    return calls


def test_the_offline_model_is_converted_beside_the_toy_notebooks_when_an_llm_notebook_follows(tmp_path, executed):
    run_notebooks("ci", ["01", "02", "04"], out_dir=tmp_path)
    names = [name for name, _, _ in executed]
    assert names.index("offline model") < names.index("04_growing_and_hedging_degree.ipynb")
    assert {name: params for name, params, _ in executed}["offline model"] == {"threads": "1"}  # toy phase, one thread
    assert "offline model (beside the toy notebooks)" in json.loads((tmp_path / "timings.json").read_text())
    executed.clear()
    run_notebooks("ci", ["01", "02"], out_dir=tmp_path)  # no LLM notebook: nothing to convert
    assert "offline model" not in [name for name, _, _ in executed]
    assert not regenerate.needs_offline_model(resolve_profile("paper"), notebooks())  # hub models only


@pytest.mark.parametrize("units, forced, expected", [
    (True, None, "bfloat16"), (False, None, "float32"), (False, "bfloat16", "bfloat16"), (True, "float32", "float32")])
def test_a_run_with_an_llm_notebook_says_its_precision_and_warns_where_bfloat16_units_are_missing(
        tmp_path, executed, capsys, monkeypatch, units, forced, expected):
    from hedging_utils import precision
    monkeypatch.setenv("HEDGING_DEVICE", "cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    if forced:
        monkeypatch.setenv(precision.PRECISION_ENV, forced)
    else:
        monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    run_notebooks("ci", ["04"], out_dir=tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LLM notebooks:")]
    assert len(lines) == 1 and f"matrix products in {expected} (cpu)" in lines[0]
    assert ("no bfloat16 units" in lines[0]) == (not units and expected == "float32")  # chosen by the flags, not forced
    run_notebooks("ci", ["01"], out_dir=tmp_path)  # no LLM notebook: no line
    assert "LLM notebooks:" not in capsys.readouterr().out


def test_the_precision_line_names_the_precision_the_existing_llm_figures_record(tmp_path, monkeypatch):
    """Where the LLM figures already there were made in another precision, the line says their
    numbers will differ; a toy figure's record, or the same precision, says nothing of it."""
    from hedging_utils import precision

    monkeypatch.setenv("HEDGING_DEVICE", "cpu")
    monkeypatch.setenv(precision.PRECISION_ENV, "float32")
    (tmp_path / "data").mkdir()
    manifest = {"P7": {"meta": "data/P7.json", "notebook": "04_growing_and_hedging_degree"},
                "P1": {"meta": "data/P1.json", "notebook": "01_toy_models"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "data" / "P1.json").write_text(json.dumps({"settings": {"precision": "float64"}}))
    (tmp_path / "data" / "P7.json").write_text(json.dumps({"settings": {"precision": "bfloat16"}}))
    assert regenerate.recorded_precisions(tmp_path) == {"bfloat16"}
    assert "made with bfloat16 products" in regenerate.llm_precision_line(notebooks(), tmp_path)
    (tmp_path / "data" / "P7.json").write_text(json.dumps({"settings": {"precision": "float32"}}))
    assert "differ" not in regenerate.llm_precision_line(notebooks(), tmp_path)
    assert regenerate.recorded_precisions(tmp_path / "none") == set()
    assert regenerate.llm_precision_line([nb for nb in notebooks() if nb.name.startswith("01")], tmp_path) is None


def test_the_runner_executes_the_chosen_notebooks_in_order_with_their_parameters(tmp_path, executed):
    run_notebooks("ci", ["04", "01"], {"seed": 3}, out_dir=tmp_path)
    assert [(name, params) for name, params, _ in executed] == [
        ("01_toy_models.ipynb", {"seed": 3, "profile": "ci"}),
        ("04_growing_and_hedging_degree.ipynb", {"seed": 3, "profile": "ci"})]  # one toy notebook: no pool
    assert all(Path(cwd).name == "notebooks" for _, _, cwd in executed)  # run where the notebooks live
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"01_toy_models.ipynb", "04_growing_and_hedging_degree.ipynb"}
    executed.clear()
    run_notebooks("ci", out_dir=tmp_path)
    names = [name for name, _, _ in executed if name != "offline model"]
    toys = [nb.name for nb in parallel_notebooks(notebooks())]
    assert sorted(names) == [nb.name for nb in notebooks()] and len(names) >= 8
    # the toy notebooks first (side by side, so in any order), then the LLM notebooks in order
    assert set(names[:len(toys)]) == set(toys) and names[len(toys):] == [n for n in sorted(names) if n not in toys]


def test_the_toy_notebooks_run_side_by_side_and_the_matmul_bound_ones_alone():
    assert [nb.name[:2] for nb in parallel_notebooks(notebooks())] == ["02", "08", "01", "03"]  # longest first
    assert [nb.name[:2] for nb in parallel_notebooks([nb for nb in notebooks() if nb.name[:2] in ("01", "03", "04")])] == [
        "01", "03"]


def test_toy_notebooks_run_side_by_side_with_one_thread_and_the_others_alone_with_every_core(tmp_path, monkeypatch):
    """Two toy notebooks are inside papermill at once (a barrier they both must reach), their
    kernels start with one thread; the LLM notebooks start with the caller's environment, which
    the runner restores."""
    import threading

    import papermill as pm

    monkeypatch.delenv("HEDGING_PROGRESS_LOG", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    barrier, seen = threading.Barrier(2, timeout=20), {}

    def execute(source, target, parameters, **kw):
        name = Path(source).name
        seen[name] = os.environ.get("OMP_NUM_THREADS")
        if name[:2] in ("01", "02"):
            barrier.wait()  # raises BrokenBarrierError if the two never run at the same time

    monkeypatch.setattr(pm, "execute_notebook", execute)
    monkeypatch.setattr(regenerate, "prepare_offline_model", lambda log: 1.0)
    run_notebooks("ci", ["01", "02", "04"], out_dir=tmp_path, workers=2)
    assert seen == {"01_toy_models.ipynb": "1", "02_snap_loss.ipynb": "1", "04_growing_and_hedging_degree.ipynb": "7"}
    assert os.environ["OMP_NUM_THREADS"] == "7"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert list(timings) == ["01_toy_models.ipynb", "02_snap_loss.ipynb", "04_growing_and_hedging_degree.ipynb",
                             "offline model (beside the toy notebooks)"]
    assert timings["01_toy_models.ipynb"]["threads"] == 1
    with pytest.raises(ParameterError, match="workers"):
        run_notebooks("ci", ["01"], out_dir=tmp_path, workers=0)


@pytest.mark.parametrize("only,parameters,message", [
    (["01"], {"seeds": 3}, "seeds is not a parameter of 01_toy_models.ipynb"),
    ([], {"n_new": 4}, "n_new is not a parameter of 01_toy_models.ipynb"),  # only notebook 04 has it
    (["04"], {"profile": "paper"}, "--profile"),
    (["99"], {}, "no notebook starts with"),
])
def test_the_runner_refuses_a_parameter_no_notebook_defines_before_running_any(tmp_path, executed, only, parameters, message):
    with pytest.raises(ParameterError, match=message):
        run_notebooks("ci", only, parameters, out_dir=tmp_path)
    assert executed == []


def test_the_command_line_reads_parameters_as_yaml_and_stops_on_an_unknown_name(tmp_path, executed, capsys, monkeypatch):
    from hedging_utils import regenerate
    monkeypatch.setattr(regenerate, "REPO_ROOT", tmp_path / "repo")  # build/notebooks/ under tmp_path
    monkeypatch.setattr(regenerate, "notebooks", lambda: sorted((Path(__file__).parent.parent / "notebooks").glob("0[14]_*.ipynb")))
    assert main(["--profile", "ci", "-p", "widths", "[16, 32]", "-p", "k", "null", "-p", "n_new", "1e-3", "04"]) == 0
    assert executed[0][1] == {"widths": [16, 32], "k": None, "n_new": 0.001, "profile": "ci"}
    assert (tmp_path / "repo" / "build" / "notebooks" / "ci" / "timings.json").exists()
    executed.clear()
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "ci", "-p", "seeds", "3", "01"])
    assert stop.value.code == 2 and executed == []
    assert "seeds is not a parameter of 01_toy_models.ipynb" in capsys.readouterr().err


def test_parameters_are_read_as_yaml_and_a_repeated_name_is_refused():
    assert parse_parameters([("a", "3"), ("b", "0.5"), ("c", "2e-4"), ("d", "true_features"), ("e", "[1, 2]"),
                             ("f", "null"), ("g", "true")]) == {"a": 3, "b": 0.5, "c": 2e-4, "d": "true_features",
                                                                 "e": [1, 2], "f": None, "g": True}
    with pytest.raises(ParameterError, match="-p a is given twice"):
        parse_parameters([("a", "1"), ("a", "2")])


def test_the_runner_sends_progress_to_its_log_while_it_runs_and_restores_the_environment(tmp_path, monkeypatch):
    import papermill as pm

    from hedging_utils.progress import PROGRESS_LOG_ENV

    monkeypatch.delenv(PROGRESS_LOG_ENV, raising=False)
    seen = []

    def execute(source, target, parameters, **kw):
        seen.append(os.environ.get(PROGRESS_LOG_ENV))
        with open(seen[-1], "a") as f:
            f.write("a sweep: 100%\n")

    monkeypatch.setattr(pm, "execute_notebook", execute)
    run_notebooks("ci", ["01"], out_dir=tmp_path)
    assert seen == [str(tmp_path / "progress.log")]  # the kernel inherits it
    assert (tmp_path / "progress.log").read_text() == "a sweep: 100%\n"
    assert PROGRESS_LOG_ENV not in os.environ


def test_the_default_profile_publishes_its_executed_notebooks_and_ci_does_not(tmp_path, monkeypatch):
    import papermill as pm

    import hedging_utils.reading as reading

    monkeypatch.delenv("HEDGING_FIGURES_DIR", raising=False)
    published = []
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **kw: None)
    monkeypatch.setattr(reading, "publish", lambda source, target: published.append((Path(source).name, target)) or 1000)
    run_notebooks("ci", ["01"], out_dir=tmp_path)
    assert published == []  # figures/ci/ is not committed, nor are its notebooks
    run_notebooks("small", ["01", "02"], out_dir=tmp_path)
    assert sorted(published) == [("01_toy_models.ipynb", reading.EXECUTED_DIR / "01_toy_models.ipynb"),
                         ("02_snap_loss.ipynb", reading.EXECUTED_DIR / "02_snap_loss.ipynb")]


def test_preparing_the_offline_model_converts_it_into_the_cache(tmp_path):
    """The real thing, in its own process: afterwards the converted model is in the cache (the
    tests share one model cache, so this usually finds it there)."""
    from hedging_utils.activations import offline_model_dir

    log = tmp_path / "progress.log"
    log.write_text("")
    assert regenerate.prepare_offline_model(log) > 0
    assert (offline_model_dir() / "complete.json").exists()
    assert "failed" not in log.read_text()
