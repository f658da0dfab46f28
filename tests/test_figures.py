import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from hedging_utils.figures import FigureWriter, check, read_manifest
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
    assert entry["notebook"] == "01_toy_models" and entry["profile"] == "ci" and entry["checks_hold"]
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
    heatmap_grid(frame, ["s"])
