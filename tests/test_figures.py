import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from hedging_utils.cache import source_hash
from hedging_utils.figures import (Check, FigureWriter, check, figure_verdict, notebook_code_version, read_manifest,
                                   verdict)
from hedging_utils.plotting import HEATMAP_COLUMNS, heatmap_grid, off_diagonal, similarity_frame, value_at
from hedging_utils.profiles import PROFILES
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
