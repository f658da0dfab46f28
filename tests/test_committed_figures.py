"""The default-profile figures committed in figures/ are complete, self-describing and current:
made by today's code under today's ``small`` profile."""

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from hedging_utils.figures import notebook_code_version
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


def changed_settings(recorded, today, prefix=""):
    """The settings a figure recorded that today's profile no longer has, or has with another
    value (dotted names). A setting added since (a newer notebook's scale) changes nothing."""
    changed = []
    for key, value in recorded.items():
        if key not in today:
            changed.append(prefix + key)
        elif isinstance(value, dict) and isinstance(today[key], dict):
            changed += changed_settings(value, today[key], f"{prefix}{key}.")
        elif value != today[key]:
            changed.append(prefix + key)
    return changed


PROFILE_NAME = "P"  # every notebook binds its resolved profile to this name


def profile_fields_read(code: str) -> set[str]:
    """The profile's top-level settings a notebook's code reads: every ``P.<field>``. The profile
    may go whole only to ``FigureWriter.for_notebook`` (which records it); anything else that takes
    ``P`` whole could read any setting, so it is refused rather than guessed."""
    tree = ast.parse(code)
    fields, allowed = {"name"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == PROFILE_NAME:
            fields.add(node.attr)
            allowed.add(id(node.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "for_notebook"):
            allowed.update(id(a) for a in node.args if isinstance(a, ast.Name) and a.id == PROFILE_NAME)
    whole = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == PROFILE_NAME
             and isinstance(n.ctx, ast.Load) and id(n) not in allowed]
    if whole:
        raise AssertionError(f"the profile {PROFILE_NAME} is used whole on line(s) {[n.lineno for n in whole]}, not only by "
                             "FigureWriter.for_notebook; read its settings as P.<field> so a figure's staleness can be judged")
    return fields


def notebook_code(notebook: str) -> str:
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def stale_figures(manifest, figures, settings, code_version, fields_read=None):
    """{figure id: why it is stale} for the figures whose record departs from ``settings`` (the
    profile's settings, as JSON) in a setting its notebook reads (``fields_read(notebook)``, a set
    of top-level names; None: every setting) or from ``code_version(notebook)`` (the source hash
    of the code its notebook runs)."""
    stale = {}
    for figure_id, entry in manifest.items():
        meta = json.loads((figures / entry["meta"]).read_text())
        reasons = []
        recorded = meta.get("profile_settings") or {}
        if fields_read is not None:
            read = fields_read(entry["notebook"])
            recorded = {k: v for k, v in recorded.items() if k in read}
        changed = changed_settings(recorded, settings) if meta.get("profile_settings") else ["all"]
        if changed:
            reasons.append(f"profile settings differ in {', '.join(changed)}")
        expected = code_version(entry["notebook"])
        if meta.get("code_version") != expected:
            reasons.append(f"code {meta.get('code_version') or 'not recorded'}, now {expected}")
        if reasons:
            stale[figure_id] = f"{figure_id} ({entry['notebook']}): {'; '.join(reasons)}"
    return stale


def test_every_committed_figure_was_made_by_todays_code_and_profile():
    settings = json.loads(json.dumps(resolve_profile("small").to_dict()))
    stale = stale_figures(MANIFEST, FIGURES, settings, notebook_code_version,
                          lambda notebook: profile_fields_read(notebook_code(notebook)))
    notebooks = sorted({MANIFEST[f]["notebook"][:2] for f in stale})
    assert not stale, (f"{len(stale)} of {len(MANIFEST)} committed figures are stale; regenerate them with `make figures` "
                       f"(or `python -m hedging_utils.regenerate {' '.join(notebooks)}`):\n  " + "\n  ".join(stale.values()))


def test_a_figure_from_other_settings_or_code_is_named_stale(tmp_path):
    settings = json.loads(json.dumps(resolve_profile("small").to_dict()))
    code = {"01_toy_models": "a" * 16, "07_ground_truth": "b" * 16}.__getitem__
    (tmp_path / "data").mkdir()
    nested = next(k for k, v in settings.items() if isinstance(v, dict))
    records = {"A": (settings, "a" * 16, "01_toy_models"),
               "B": ({**settings, "seeds": 99}, "a" * 16, "01_toy_models"),
               "C": (settings, "0" * 16, "01_toy_models"),
               "D": ({k: v for k, v in settings.items() if k != "matryoshka_llm"}, None, "01_toy_models"),
               "E": (settings, "a" * 16, "07_ground_truth"),
               "F": ({**settings, nested: {**settings[nested], "seeds_x": 1}}, "b" * 16, "07_ground_truth"),
               "G": ({**settings, "retired": 1}, "b" * 16, "07_ground_truth")}
    manifest = {}
    for figure_id, (recorded, version, notebook) in records.items():
        meta = {"id": figure_id, "profile_settings": recorded, **({"code_version": version} if version else {})}
        (tmp_path / "data" / f"{figure_id}.json").write_text(json.dumps(meta))
        manifest[figure_id] = {"meta": f"data/{figure_id}.json", "notebook": notebook}
    stale = stale_figures(manifest, tmp_path, settings, code)
    # D recorded fewer settings (one added since): stale only for its code
    assert sorted(stale) == ["B", "C", "D", "E", "F", "G"]
    assert "seeds" in stale["B"] and "now " + "a" * 16 in stale["C"]
    assert "not recorded" in stale["D"] and "profile settings" not in stale["D"]
    assert "now " + "b" * 16 in stale["E"] and "profile settings" not in stale["E"]
    assert f"{nested}.seeds_x" in stale["F"] and "retired" in stale["G"]


def test_a_setting_only_stales_the_notebooks_that_read_it(tmp_path):
    settings = json.loads(json.dumps(resolve_profile("small").to_dict()))
    (tmp_path / "data").mkdir()
    manifest = {}
    for figure_id, notebook in (("A", "01_toy_models"), ("B", "06_saebench")):
        (tmp_path / "data" / f"{figure_id}.json").write_text(json.dumps({"id": figure_id, "profile_settings": settings,
                                                                          "code_version": "a" * 16}))
        manifest[figure_id] = {"meta": f"data/{figure_id}.json", "notebook": notebook}
    reads = {"01_toy_models": {"name", "toy_steps"}, "06_saebench": {"name", "saebench"}}.__getitem__
    code = lambda notebook: "a" * 16
    today = {**settings, "saebench": {**settings["saebench"], "vocab_size": 1}}
    assert sorted(stale_figures(manifest, tmp_path, today, code, reads)) == ["B"]
    today = {**settings, "toy_steps": 1}
    assert sorted(stale_figures(manifest, tmp_path, today, code, reads)) == ["A"]
    assert sorted(stale_figures(manifest, tmp_path, today, code)) == ["A", "B"]  # without fields: every setting counts


def test_the_settings_a_notebook_reads_are_found_and_a_whole_profile_elsewhere_is_refused():
    code = 'P = resolve_profile(profile)\nout = FigureWriter.for_notebook("01", P, figures_dir)\nx = P.toy_steps + P.llm.k\n'
    assert profile_fields_read(code) == {"name", "toy_steps", "llm"}
    with pytest.raises(AssertionError, match="used whole"):
        profile_fields_read(code + "train(P)\n")
    for notebook in sorted({entry["notebook"] for entry in MANIFEST.values()}):
        assert "name" in profile_fields_read(notebook_code(notebook))


def test_readme_gallery_lists_every_figure():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| ([A-Za-z0-9-]+) \| \d\d_", readme, flags=re.M))
    assert set(MANIFEST) <= listed


LLM_FIGURES = ["LW-growing", "P7", "X-p7-training", "X-l1-continued", "P16", "P17", "P18", "P19"]


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
