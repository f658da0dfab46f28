"""The default-profile figures committed in figures/ are complete, self-describing and current:
made by today's code under today's ``small`` profile."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from hedging_utils.cache import source_hash
from hedging_utils.profiles import resolve_profile

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


def stale_figures(manifest, figures, settings, code_version):
    """{figure id: why it is stale} for the figures whose record departs from ``settings`` (the
    profile's settings, as JSON) or ``code_version`` (the package's source hash)."""
    stale = {}
    for figure_id, entry in manifest.items():
        meta = json.loads((figures / entry["meta"]).read_text())
        reasons = []
        if meta.get("profile_settings") != settings:
            recorded = meta.get("profile_settings") or {}
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            reasons.append(f"profile settings differ in {', '.join(changed)}")
        if meta.get("code_version") != code_version:
            reasons.append(f"code {meta.get('code_version') or 'not recorded'}, now {code_version}")
        if reasons:
            stale[figure_id] = f"{figure_id} ({entry['notebook']}): {'; '.join(reasons)}"
    return stale


def test_every_committed_figure_was_made_by_todays_code_and_profile():
    settings = json.loads(json.dumps(resolve_profile("small").to_dict()))
    stale = stale_figures(MANIFEST, FIGURES, settings, source_hash())
    notebooks = sorted({MANIFEST[f]["notebook"][:2] for f in stale})
    assert not stale, (f"{len(stale)} of {len(MANIFEST)} committed figures are stale; regenerate them with `make figures` "
                       f"(or `python -m hedging_utils.figures {' '.join(notebooks)}`):\n  " + "\n  ".join(stale.values()))


def test_a_figure_from_other_settings_or_code_is_named_stale(tmp_path):
    settings, code = json.loads(json.dumps(resolve_profile("small").to_dict())), source_hash()
    (tmp_path / "data").mkdir()
    records = {"A": (settings, code), "B": ({**settings, "seeds": 99}, code), "C": (settings, "0" * 16),
               "D": ({k: v for k, v in settings.items() if k != "matryoshka_llm"}, None)}
    manifest = {}
    for figure_id, (recorded, version) in records.items():
        meta = {"id": figure_id, "profile_settings": recorded, **({"code_version": version} if version else {})}
        (tmp_path / "data" / f"{figure_id}.json").write_text(json.dumps(meta))
        manifest[figure_id] = {"meta": f"data/{figure_id}.json", "notebook": "01_toy_models"}
    stale = stale_figures(manifest, tmp_path, settings, code)
    assert sorted(stale) == ["B", "C", "D"]
    assert "seeds" in stale["B"] and "now " + code in stale["C"]
    assert "matryoshka_llm" in stale["D"] and "not recorded" in stale["D"]


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


def test_the_readme_verdict_table_is_the_committed_manifests():
    from hedging_utils.reading import README_END, README_START, readme_table
    readme = (ROOT / "README.md").read_text()
    table = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert table == readme_table(MANIFEST), "the README's verdict table is stale: run `python -m hedging_utils.reading readme`"
