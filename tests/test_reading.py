"""The executed notebooks in git (deterministic, matching the committed figures) and their HTML copy."""

import json
import shutil

import nbformat
import pytest

from hedging_utils.figures import Check
from hedging_utils.profiles import REPO_ROOT, ParameterError
from hedging_utils.reading import (EXECUTED_DIR, export_html, normalize, printed_text, publish,
                                   unmatched_checks, verdict_rows)

FIGURES = REPO_ROOT / "figures"


def _executed(tmp_path, *, start="2026-12-01T06:00:00", took=12.5, path_root="/somewhere/repo", png="iVBORw0KGgo="):
    """A notebook as papermill leaves it: timestamps, durations, paths and kernel counts."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": start, "duration": took, "input_path": f"{path_root}/notebooks/01.ipynb"}
    nb.metadata["widgets"] = {"state": {}}
    params = nbformat.v4.new_code_cell("profile = 'small'", execution_count=7)
    params.metadata["tags"] = ["injected-parameters"]
    params["id"] = "random-1234"
    check = Check("(a) the minimum is between 0 and 0.5", "holds", 0.2324)
    cell = nbformat.v4.new_code_cell("run()", execution_count=9, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=f"{check}\nsaved P6: {path_root}/figures/P6.png\n"),
        nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure size 1100x400 with 2 Axes>"}),
        nbformat.v4.new_output("execute_result", data={"text/plain": "0.2324"}, execution_count=9),
        nbformat.v4.new_output("display_data", data={"text/plain": "  0%|  | 0/236", "application/vnd.jupyter.widget-view+json":
                                                     {"model_id": f"{took}", "version_major": 2, "version_minor": 0}}),
        nbformat.v4.new_output("stream", name="stdout", text="saved P7: figures/P7.png\n"),
    ])
    for c in (params, cell):
        c.metadata["papermill"] = {"start_time": start, "duration": took, "status": "completed"}
        c.metadata["execution"] = {"iopub.execute_input": start}
    nb.cells = [nbformat.v4.new_markdown_cell("# P6"), params, cell]
    nb.cells[0]["id"], cell["id"] = "cell-00", "cell-01"  # as in the notebooks (papermill's own cell gets a random one)
    return nb


def test_normalize_removes_what_differs_between_runs_of_the_same_numbers(tmp_path):
    first = normalize(_executed(tmp_path), roots=["/somewhere/repo"])
    second = normalize(_executed(tmp_path, start="2027-01-01T00:00:00", took=99.0), roots=["/somewhere/repo"])
    assert nbformat.writes(first) == nbformat.writes(second)
    assert "papermill" not in first.metadata and "widgets" not in first.metadata
    params, cell = first.cells[1], first.cells[2]
    assert (params.execution_count, cell.execution_count, cell.outputs[2].execution_count) == (1, 2, 2)
    assert len(cell.outputs) == 4 and "widget" not in nbformat.writes(first)  # a library's widget bar: no state, random id
    assert params["id"] == "injected-parameters" and params.metadata == {"tags": ["injected-parameters"]}
    assert "saved P6: figures/P6.png" in cell.outputs[0].text and "/somewhere" not in nbformat.writes(first)
    split = _executed(tmp_path)
    text = split.cells[2].outputs[0].text
    split.cells[2].outputs[0:1] = [nbformat.v4.new_output("stream", name="stdout", text=text[:10]),
                                   nbformat.v4.new_output("stream", name="stdout", text=text[10:])]
    assert nbformat.writes(normalize(split, roots=["/somewhere/repo"])) == nbformat.writes(first)  # flushes fell elsewhere
    changed = normalize(_executed(tmp_path, png="iVBORw0KGgoX"), roots=["/somewhere/repo"])
    assert nbformat.writes(changed) != nbformat.writes(first)  # a changed figure still shows


def test_publish_writes_once_and_refuses_a_notebook_too_large(tmp_path):
    source, target = tmp_path / "run.ipynb", tmp_path / "executed" / "01_x.ipynb"
    nbformat.write(_executed(tmp_path), str(source))
    size = publish(source, target)
    assert size == target.stat().st_size
    mtime = target.stat().st_mtime_ns
    publish(source, target)
    assert target.stat().st_mtime_ns == mtime  # unchanged numbers leave the file alone
    nbformat.write(_executed(tmp_path, png="A" * 5000), str(source))
    with pytest.raises(ValueError, match="over 0 MB"):
        publish(source, target, max_bytes=4000)


def _meta(value=0.2324):
    return {"id": "P6", "checks": [{"claim": "(a) the minimum is between 0 and 0.5", "verdict": "holds", "value": value}]}


def test_an_executed_notebook_that_departs_from_its_figure_data_is_caught(tmp_path):
    nb = normalize(_executed(tmp_path), roots=["/somewhere/repo"])
    assert "[holds] (a) the minimum" in printed_text(nb)
    assert unmatched_checks(nb, [_meta()]) == []
    assert unmatched_checks(nb, [_meta(0.2325)]) == ["P6: (a) the minimum is between 0 and 0.5 (0.2325)"]
    assert unmatched_checks(nb, [{**_meta(), "id": "P7", "checks": []}]) == []  # after a displayed result
    assert unmatched_checks(nb, [{**_meta(), "id": "P8"}])[0] == "P8: no 'saved P8' line"


@pytest.mark.parametrize("notebook", [nb.name for nb in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))])
def test_each_committed_executed_notebook_prints_its_figures_numbers(notebook):
    path = EXECUTED_DIR / notebook
    if not path.exists():
        pytest.skip(f"no executed copy of {notebook} in {EXECUTED_DIR.relative_to(REPO_ROOT)} (make figures writes it)")
    manifest = json.loads((FIGURES / "manifest.json").read_text())
    metas = [json.loads((FIGURES / e["meta"]).read_text()) for e in manifest.values() if e["notebook"] == path.stem]
    assert metas, f"no committed figure comes from {notebook}"
    nb = nbformat.read(str(path), as_version=4)
    assert unmatched_checks(nb, metas) == []
    assert sum(len(m["checks"]) for m in metas) > 0 or all(f"saved {m['id']}:" in printed_text(nb) for m in metas)
    assert path.stat().st_size < 5_000_000
    assert "papermill" not in nb.metadata and str(REPO_ROOT) not in path.read_text()


def test_html_pages_and_an_index_with_the_verdicts_and_the_gallery(tmp_path):
    executed, figures = tmp_path / "executed", tmp_path / "figures"
    executed.mkdir()
    figures.mkdir()
    nbformat.write(normalize(_executed(tmp_path), roots=["/somewhere/repo"]), str(executed / "01_toy_models.ipynb"))
    shutil.copyfile(FIGURES / "P6.png", figures / "P6.png")
    manifest = {"P6": {"image": "P6.png", "notebook": "01_toy_models", "verdict": "holds", "verdicts": {"holds": 1}},
                "P9": {"image": "P9.png", "notebook": "06_saebench", "verdict": "departs", "verdicts": {"departs": 2}},
                "LW-old": {"image": "x.png", "notebook": "02_snap_loss", "checks_hold": True}}
    (figures / "manifest.json").write_text(json.dumps(manifest))
    pages = export_html(executed, figures, tmp_path / "html")
    assert [p.name for p in pages] == ["index.html", "01_toy_models.html"]
    index = pages[0].read_text()
    assert '<tr class="departs"><td><a href="#P9">P9</a></td><td>06_saebench</td><td>departs</td><td>2 departs</td></tr>' in index
    assert '<a href="01_toy_models.html">01_toy_models</a>' in index and 'src="figures/P6.png"' in index
    assert (tmp_path / "html" / "figures" / "P6.png").exists()
    page = pages[1].read_text()
    assert "[holds] (a) the minimum" in page and "data:image/png;base64" in page
    assert verdict_rows(manifest)[2] == ("LW-old", "02_snap_loss", "holds", "")


def test_html_without_executed_notebooks_says_how_to_get_them(tmp_path):
    with pytest.raises(ParameterError, match="make figures"):
        export_html(tmp_path, tmp_path, tmp_path / "html")


def test_the_readme_table_counts_each_verdict_and_a_stale_one_is_rewritten(tmp_path):
    from hedging_utils.reading import README_END, README_START, readme_table, update_readme
    manifest = {"P1": {"notebook": "01_toy_models", "verdict": "holds"},
                "P2": {"notebook": "01_toy_models", "verdict": "departs"},
                "P7": {"notebook": "04_growing_and_hedging_degree", "verdict": "inconclusive"},
                "P21": {"notebook": "06_saebench", "verdict": "no claim"}}
    table = readme_table(manifest)
    assert "| [01_toy_models](notebooks/executed/01_toy_models.ipynb) | P1 holds, P2 **departs** | 1 | 1 | 0 | 0 |" in table
    assert table.splitlines()[-1] == "| all | 4 figures | 1 | 1 | 1 | 1 |"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nrest\n")
    assert update_readme(readme, tmp_path) and "old table" not in readme.read_text()
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
    assert not update_readme(readme, tmp_path)  # up to date: unchanged
