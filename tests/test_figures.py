import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from hedging_utils.cache import source_hash
from hedging_utils.figures import (Check, FigureWriter, check, figure_verdict, main, notebook_code_version, notebooks, parallel_notebooks,
                                   parse_parameters, read_manifest, run_notebooks, verdict)
from hedging_utils.plotting import HEATMAP_COLUMNS, heatmap_grid, off_diagonal, similarity_frame, value_at
from hedging_utils.profiles import PROFILES, ParameterError
from hedging_utils.training import make_sae


def test_writer_saves_image_data_settings_and_manifest(tmp_path):
    writer = FigureWriter.for_notebook("01_toy_models", PROFILES["ci"], tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    writer.save("X-demo", fig, pd.DataFrame({"x": [0, 1]}), settings={"lr": 3e-4},
                checks=[check("a claim", True, 0.5)])
    for name in ("X-demo.png", "X-demo.pdf", "data/X-demo.csv", "data/X-demo.json"):
        assert (tmp_path / name).stat().st_size > 0
    entry = read_manifest(tmp_path)["X-demo"]
    assert entry["notebook"] == "01_toy_models" and entry["profile"] == "ci" and entry["verdict"] == "holds"
    meta = json.loads((tmp_path / "data/X-demo.json").read_text())
    assert meta["settings"] == {"lr": 3e-4} and meta["checks"][0]["value"] == 0.5
    writer.verify(["X-demo"])
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_verify_reports_missing_figures(tmp_path):
    writer = FigureWriter.for_notebook("01_toy_models", PROFILES["ci"], tmp_path)
    with pytest.raises(RuntimeError, match="P2"):
        writer.verify(["P2"])


def test_manifest_keeps_other_entries_in_figure_order(tmp_path):
    writer = FigureWriter.for_notebook("nb", PROFILES["ci"], tmp_path)
    for fid in ("X-theory", "P10", "P2", "LW-snap-single"):
        fig, _ = plt.subplots()
        writer.save(fid, fig, pd.DataFrame({"x": [1]}))
    assert list(read_manifest(tmp_path)) == ["P2", "P10", "LW-snap-single", "X-theory"]


def test_similarity_frame_has_the_tidy_schema():
    import torch

    features = torch.eye(4, 6)
    sae = make_sae(6, 3, l1_coefficient=1e-3)
    with torch.no_grad():
        sae.W_dec.copy_(features[[2, 0, 1]] * 2)  # latents out of order, norm 2
        sae.W_enc.copy_(features[[2, 0, 1]].T)
        sae.b_dec.copy_(0.2 * features[3])
    frame = similarity_frame(sae, features, "s")
    assert list(frame.columns) == HEATMAP_COLUMNS
    assert set(frame["vector"]) == {"encoder", "decoder", "b_dec"}
    assert frame[frame["vector"] == "b_dec"]["latent"].isna().all()
    # reordered: plotted latent i matches feature i
    assert value_at(frame, "s", "decoder", 0, 0) == pytest.approx(1.0)
    assert value_at(frame, "s", "decoder", 0, 0, "projection") == pytest.approx(2.0)
    assert value_at(frame, "s", "b_dec", None, 3, "projection") == pytest.approx(0.2)
    assert off_diagonal(frame, "s") == pytest.approx(0.0)
    fig = heatmap_grid(frame, ["s"], titles=["demo"])
    assert [ax.get_title() for ax in fig.axes] == ["demo: encoder", "demo: decoder"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["f1", "f2", "f3", "f4"]


def _save(tmp_path, checks, figure_id="X-demo"):
    writer = FigureWriter.for_notebook("01_toy_models", PROFILES["ci"], tmp_path)
    fig, _ = plt.subplots()
    writer.save(figure_id, fig, pd.DataFrame({"x": [0]}), checks=checks)
    return read_manifest(tmp_path)[figure_id], json.loads((tmp_path / f"data/{figure_id}.json").read_text())


@pytest.mark.parametrize("contradicted,printed", [
    pytest.param(lambda: check("h > 0", -0.2 > 0, -0.2), True, id="check() with a false comparison"),
    pytest.param(lambda: check("h > 0", np.float64(-0.2) > 0, np.float64(-0.2)), True, id="check() with a numpy bool"),
    pytest.param(lambda: check("h > 0", np.float64("nan") > 0, np.float64("nan")), True, id="check() with a NaN"),
    pytest.param(lambda: check("h > 0", None), True, id="check() with no verdict"),
    pytest.param(lambda: Check("h > 0", "departs", -0.2), False, id="a Check built directly"),
    pytest.param(lambda: verdict("h > 0", [-0.3, -0.2, -0.25]), True, id="verdict() beyond seed noise the other way"),
    pytest.param(lambda: verdict("h > 0", -0.3, 0.1), True, id="verdict() with a stated noise"),
])
def test_a_contradicted_claim_records_a_departure_in_the_data_and_the_manifest(tmp_path, capsys, contradicted, printed):
    departing = contradicted()
    assert ("[DEPARTS] h > 0" in capsys.readouterr().out) == printed and str(departing).startswith("[DEPARTS] h > 0")
    entry, meta = _save(tmp_path, [check("a claim that holds", True, 1.0), departing])
    assert entry["verdict"] == "departs" and entry["verdicts"] == {"holds": 1, "departs": 1, "inconclusive": 0}
    assert [c["verdict"] for c in meta["checks"]] == ["holds", "departs"]
    assert meta["checks"][1]["claim"] == "h > 0"


def test_claims_that_all_hold_say_so_and_a_figure_without_claims_says_no_claim(tmp_path):
    entry, meta = _save(tmp_path, [check("h > 0", np.float64(0.3) > 0, np.float64(0.3))])
    assert entry["verdict"] == "holds" and meta["checks"] == [{"claim": "h > 0", "verdict": "holds", "value": 0.3}]
    entry, _ = _save(tmp_path, [], "X-none")
    assert entry["verdict"] == "no claim" and entry["verdicts"] == {"holds": 0, "departs": 0, "inconclusive": 0}


@pytest.mark.parametrize("effect, noise, expected", [
    ([0.3, 0.32, 0.29], None, "holds"),        # mean 0.30, seed std 0.015: far beyond 2 std
    ([-0.3, -0.32, -0.29], None, "departs"),
    ([0.1, -0.05, 0.2], None, "inconclusive"),  # mean 0.083 < 2 x std 0.126
    ([0.3], None, "inconclusive"),              # one seed: the noise is unknown
    (0.3, 0.1, "holds"),
    (0.15, 0.1, "inconclusive"),
    (-0.25, 0.1, "departs"),
    (0.3, float("nan"), "inconclusive"),
])
def test_verdict_weighs_an_effect_against_its_seed_noise(effect, noise, expected):
    c = verdict("claim", effect, noise)
    assert c.verdict == expected and (c.holds == (expected == "holds"))
    assert c.value["effect"] == pytest.approx(np.mean(effect))


def test_verdict_records_its_detail_and_a_threshold_claim_passes_its_distance():
    # "x > 0.1" with x = 0.13 and seed noise 0.01: the effect is x - 0.1 = 0.03 > 2 x 0.01
    c = verdict("x > 0.1", 0.13 - 0.1, 0.01, detail={"x": 0.13})
    assert c.verdict == "holds" and c.value["detail"] == {"x": 0.13}
    assert verdict("x > 0.1", 0.11 - 0.1, 0.01).verdict == "inconclusive"  # within noise of the threshold
    assert verdict("x > 0.1", 0.07 - 0.1, 0.01).verdict == "departs"
    assert "detail" not in verdict("x > 0.1", 0.03, 0.01).value


def test_a_figure_is_as_good_as_its_worst_check():
    holds, departs, unsure = verdict("a", 1.0, 0.1), verdict("b", -1.0, 0.1), verdict("c", 0.0, 0.1)
    assert figure_verdict([holds]) == "holds" and figure_verdict([holds, unsure]) == "inconclusive"
    assert figure_verdict([holds, unsure, departs]) == "departs" and figure_verdict([]) == "no claim"


def test_a_rerun_that_departs_replaces_a_holding_entry(tmp_path):
    assert _save(tmp_path, [check("h > 0", True, 0.3)])[0]["verdict"] == "holds"
    assert _save(tmp_path, [check("h > 0", False, -0.3)])[0]["verdict"] == "departs"


def test_every_figure_records_its_provenance(tmp_path):
    entry, meta = _save(tmp_path, [])
    assert meta["profile_settings"] == json.loads(json.dumps(PROFILES["ci"].to_dict()))
    assert meta["code_version"] == entry["code_version"] == notebook_code_version("01_toy_models")
    assert notebook_code_version("01_toy_models") != source_hash()  # only the modules notebook 01 reaches
    # a notebook file that does not exist: the whole package
    writer = FigureWriter.for_notebook("99_elsewhere", PROFILES["ci"], tmp_path)
    writer.save("X-other", plt.subplots()[0], pd.DataFrame({"x": [0]}))
    assert read_manifest(tmp_path)["X-other"]["code_version"] == source_hash()


@pytest.fixture
def executed(monkeypatch):
    """papermill's execute_notebook replaced by a recorder: the runner's calls, no compute."""
    import papermill as pm
    monkeypatch.delenv("HEDGING_PROGRESS_LOG", raising=False)  # the runner sets it for its run only
    calls = []
    monkeypatch.setattr(pm, "execute_notebook", lambda source, target, parameters, **kw: calls.append(
        (Path(source).name, parameters, kw["cwd"])))
    return calls


def test_the_runner_executes_the_chosen_notebooks_in_order_with_their_parameters(tmp_path, executed):
    run_notebooks("ci", ["04", "01"], {"seed": 3}, out_dir=tmp_path)
    assert [(name, params) for name, params, _ in executed] == [
        ("01_toy_models.ipynb", {"seed": 3, "profile": "ci"}),
        ("04_growing_and_hedging_degree.ipynb", {"seed": 3, "profile": "ci"})]
    assert all(Path(cwd).name == "notebooks" for _, _, cwd in executed)  # run where the notebooks live
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"01_toy_models.ipynb", "04_growing_and_hedging_degree.ipynb"}
    executed.clear()
    run_notebooks("ci", out_dir=tmp_path)
    names = [name for name, _, _ in executed]
    toys = [nb.name for nb in parallel_notebooks(notebooks())]
    assert sorted(names) == [nb.name for nb in notebooks()] and len(names) >= 8
    # the toy notebooks first (side by side, so in any order), then the LLM notebooks in order
    assert set(names[:len(toys)]) == set(toys) and names[len(toys):] == [n for n in sorted(names) if n not in toys]


def test_the_toy_notebooks_are_those_that_never_reach_the_language_model():
    assert [nb.name[:2] for nb in parallel_notebooks(notebooks())] == ["01", "02", "03", "07", "08"]


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
    run_notebooks("ci", ["01", "02", "04"], out_dir=tmp_path, workers=2)
    assert seen == {"01_toy_models.ipynb": "1", "02_snap_loss.ipynb": "1", "04_growing_and_hedging_degree.ipynb": "7"}
    assert os.environ["OMP_NUM_THREADS"] == "7"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert list(timings) == ["01_toy_models.ipynb", "02_snap_loss.ipynb", "04_growing_and_hedging_degree.ipynb"]
    assert timings["01_toy_models.ipynb"]["threads"] == 1
    with pytest.raises(ParameterError, match="workers"):
        run_notebooks("ci", ["01"], out_dir=tmp_path, workers=0)


def test_notebooks_side_by_side_lose_no_manifest_entry(tmp_path):
    import threading

    from hedging_utils.figures import update_manifest

    def add(i):
        for j in range(20):
            update_manifest(tmp_path, {f"X-{i}-{j}": {"n": j}})

    threads = [threading.Thread(target=add, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(read_manifest(tmp_path)) == 60


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
    from hedging_utils import figures
    monkeypatch.setattr(figures, "REPO_ROOT", tmp_path / "repo")  # build/notebooks/ under tmp_path
    monkeypatch.setattr(figures, "notebooks", lambda: sorted((Path(__file__).parent.parent / "notebooks").glob("0[14]_*.ipynb")))
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
