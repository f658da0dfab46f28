"""The default-profile figures committed in figures/ are complete and self-describing."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"
MANIFEST = json.loads((FIGURES / "manifest.json").read_text()) if (FIGURES / "manifest.json").exists() else {}
HEATMAP_SCHEMA = ["setting", "n_latents", "vector", "latent", "feature", "cos_sim"]


def test_there_is_a_manifest():
    assert MANIFEST, "figures/manifest.json is missing: run `make figures`"


@pytest.mark.parametrize("figure_id", sorted(MANIFEST))
def test_every_figure_has_its_files_and_numbers(figure_id):
    entry = MANIFEST[figure_id]
    assert entry["profile"] == "small"
    for key in ("image", "pdf", "data", "meta"):
        assert (FIGURES / entry[key]).stat().st_size > 0, entry[key]
    assert (ROOT / "notebooks" / f"{entry['notebook']}.ipynb").exists()
    meta = json.loads((FIGURES / entry["meta"]).read_text())
    assert meta["id"] == figure_id and meta["checks"] is not None
    data = pd.read_csv(FIGURES / entry["data"])
    assert len(data) > 0
    if "vector" in data.columns:  # heatmap-style data: the shared tidy schema
        assert list(data.columns[: len(HEATMAP_SCHEMA)]) == HEATMAP_SCHEMA
        assert set(data["vector"]) <= {"encoder", "decoder", "b_dec"}
        assert data.loc[data["vector"] == "b_dec", "latent"].isna().all()


def test_readme_gallery_lists_every_figure():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| ([A-Za-z0-9-]+) \| \d\d_", readme, flags=re.M))
    assert set(MANIFEST) <= listed


LLM_FIGURES = ["LW-growing", "P7", "X-l1-continued", "P16", "P17", "P18", "P19"]


@pytest.mark.parametrize("figure_id", LLM_FIGURES)
def test_llm_figures_state_their_scale(figure_id):
    assert figure_id in MANIFEST, f"{figure_id} missing from figures/manifest.json: run `make figures`"
    settings = json.loads((FIGURES / MANIFEST[figure_id]["meta"]).read_text())["settings"]
    for key in ("corpus", "context_size", "cached_tokens", "base_tokens", "continued_tokens", "batch_size"):
        assert key in settings, key
    assert "model" in settings or "models" in settings
