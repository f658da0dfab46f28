"""Reading along without running: the executed notebooks in git, and a rendered HTML copy.

``make figures`` (the default profile, whose figures are committed in ``figures/``) leaves a
copy of every executed notebook in ``notebooks/executed/``, with its figures, printed numbers
and claim checks. They sit beside the notebooks rather than replacing them so that the
notebooks one edits and runs stay free of outputs (small diffs, no papermill parameters cell),
while a reader finds the executed copies one folder down, in JupyterLab or on the
repository's web page. Each copy is made deterministic by ``normalize``: papermill's and
nbclient's timestamps and durations are removed, execution counts renumbered in order, and the
repository's and the environment's paths cut out of the outputs, so a rerun whose numbers did
not change rewrites the same bytes.

``python -m hedging_utils.reading html`` (``make html``) renders each executed notebook to
``build/html/<notebook>.html`` with nbconvert, and an ``index.html`` with the verdict table
and the figure gallery from ``figures/manifest.json``; the folder is self-contained (figures
copied beside it, images embedded) and needs no Python to read.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from hedging_utils.profiles import REPO_ROOT, ParameterError

EXECUTED_DIR = REPO_ROOT / "notebooks" / "executed"
HTML_DIR = REPO_ROOT / "build" / "html"
MAX_NOTEBOOK_BYTES = 5_000_000
"""An executed notebook larger than this (its inline figures, mostly) is refused by ``publish``."""

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
"""A widget's output: in a headless run a library's ``tqdm.auto`` bar; its state is not saved,
so a reader would see "Error displaying widget", and its model id changes every run."""

_CELL_METADATA_DROPPED = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")
_NOTEBOOK_METADATA_DROPPED = ("papermill", "widgets")


def normalize(nb: Any, roots: Sequence[str | Path] | None = None) -> Any:
    """``nb`` (an ``nbformat`` notebook, changed in place and returned) with what differs between
    two runs of the same numbers removed: papermill's and nbclient's metadata (timestamps,
    durations, input and output paths), widget state, execution counts renumbered 1, 2, ... in
    cell order, widget outputs (a library's progress bar) dropped, consecutive stream outputs merged (the kernel splits them where its flushes fell), papermill's injected cell given a fixed id, and the paths in ``roots`` (default:
    the repository and the Python environment) cut from every text output."""
    roots = [str(r) for r in (roots if roots is not None else (REPO_ROOT, Path(sys.prefix)))]
    for key in _NOTEBOOK_METADATA_DROPPED:
        nb.metadata.pop(key, None)
    count = 0
    for cell in nb.cells:
        for key in _CELL_METADATA_DROPPED:
            cell.metadata.pop(key, None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = "injected-parameters"
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is not None or cell.outputs:
            count += 1
            cell.execution_count = count
        cell.outputs = _merge_streams([o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})])
        for output in cell.outputs:
            if "execution_count" in output:
                output.execution_count = cell.execution_count
            if output.output_type == "stream":
                output.text = _strip_paths(output.text, roots)
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output.data[mime] = _strip_paths(value, roots)
    return nb


def _merge_streams(outputs: list[Any]) -> list[Any]:
    """Consecutive stream outputs of one name as one (the kernel splits them where its flushes fell)."""
    merged: list[Any] = []
    for output in outputs:
        if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == output.name):
            merged[-1].text += output.text
        else:
            merged.append(output)
    return merged


def _strip_paths(text: str, roots: Sequence[str]) -> str:
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root.rstrip("/") + "/", "").replace(root.rstrip("/"), ".")
    return text


def publish(executed: str | Path, target: str | Path, max_bytes: int = MAX_NOTEBOOK_BYTES) -> int:
    """Write ``normalize``'d ``executed`` (a papermill output) to ``target``; returns its size
    in bytes. Raises if it exceeds ``max_bytes``, naming its largest outputs."""
    import nbformat

    nb = normalize(nbformat.read(str(executed), as_version=4))
    text = nbformat.writes(nb) + "\n"
    size = len(text.encode())
    if size > max_bytes:
        largest = sorted(((len(json.dumps(o)), i) for i, c in enumerate(nb.cells) if c.cell_type == "code"
                          for o in c.outputs), reverse=True)[:3]
        raise ValueError(f"{Path(target).name} would be {size / 1e6:.1f} MB, over {max_bytes / 1e6:.0f} MB; largest outputs "
                         f"(bytes, cell): {largest}. Lower the inline figures' dpi or size.")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != text:  # an unchanged notebook keeps its file
        target.write_text(text)
    return size


def executed_notebooks(directory: str | Path = EXECUTED_DIR) -> list[Path]:
    return sorted(Path(directory).glob("[0-9][0-9]_*.ipynb"))


def printed_text(nb: Any) -> str:
    """Everything a notebook printed to stdout and displayed as plain text, in cell order."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stdout":
                parts.append(output.text)
            elif "text/plain" in output.get("data", {}):
                parts.append(output.data["text/plain"] + "\n")  # a display has no newline of its own
    return "".join(parts)


def check_lines(meta: dict[str, Any]) -> list[tuple[str, str | None]]:
    """For a figure's data record (``figures/data/<id>.json``): each claim check as (claim, the
    ``(value)`` text the notebook printed after it, or None without a value)."""
    return [(c["claim"], None if c.get("value") is None else f"({c['value']})") for c in meta.get("checks", [])]


def unmatched_checks(nb: Any, metas: Iterable[dict[str, Any]]) -> list[str]:
    """The checks of ``metas`` whose claim and value the notebook did not print on one line
    (empty when the executed notebook matches its figures' data)."""
    lines = printed_text(nb).splitlines()
    missing = []
    for meta in metas:
        if not any(line.startswith(f"saved {meta['id']}:") for line in lines):
            missing.append(f"{meta['id']}: no 'saved {meta['id']}' line")
        for claim, value in check_lines(meta):
            if not any(claim in line and (value is None or value in line) for line in lines):
                missing.append(f"{meta['id']}: {claim} {value or ''}".rstrip())
    return missing


# ---------------------------------------------------------------------------------------
# HTML


def export_html(executed_dir: str | Path = EXECUTED_DIR, figures: str | Path = REPO_ROOT / "figures",
                out_dir: str | Path = HTML_DIR) -> list[Path]:
    """Render every executed notebook of ``executed_dir`` to ``out_dir/<name>.html`` (images
    embedded) and write ``out_dir/index.html`` (verdict table and figure gallery of
    ``figures/manifest.json``, its PNGs copied to ``out_dir/figures/``). Returns the pages."""
    from nbconvert import HTMLExporter
    import nbformat

    executed = executed_notebooks(executed_dir)
    if not executed:
        raise ParameterError(f"no executed notebooks in {executed_dir}; run `make figures` (the default profile "
                             f"writes them there) or pass the folder of executed notebooks.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    pages = []
    for path in executed:
        body, _ = exporter.from_notebook_node(nbformat.read(str(path), as_version=4))
        page = out / f"{path.stem}.html"
        page.write_text(body)
        pages.append(page)
    manifest_path = Path(figures) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    (out / "figures").mkdir(exist_ok=True)
    for entry in manifest.values():
        image = Path(figures) / entry["image"]
        if image.exists():
            shutil.copyfile(image, out / "figures" / image.name)
    index = out / "index.html"
    index.write_text(index_page(manifest, [p.stem for p in executed]))
    return [index, *pages]


def figure_verdict_of(entry: dict[str, Any]) -> str:
    """A manifest entry's verdict; an entry written before verdicts existed has ``checks_hold``."""
    if "verdict" in entry:
        return entry["verdict"]
    return {True: "holds", False: "departs"}.get(entry.get("checks_hold"), "no claim")


def verdict_rows(manifest: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, notebook, verdict, counts) per figure of the manifest, in its order."""
    rows = []
    for fid, entry in manifest.items():
        counts = entry.get("verdicts")
        counts_text = ", ".join(f"{n} {v}" for v, n in counts.items() if n) if counts else ""
        rows.append((fid, entry["notebook"], figure_verdict_of(entry), counts_text))
    return rows


def index_page(manifest: dict[str, Any], notebooks: Sequence[str]) -> str:
    """The index: links to the notebooks' pages, the verdict table, the figure gallery."""
    esc = html.escape
    links = "\n".join(f'<li><a href="{esc(n)}.html">{esc(n)}</a></li>' for n in notebooks)
    rows = "\n".join(
        f'<tr class="{esc(v.replace(" ", "-"))}"><td><a href="#{esc(f)}">{esc(f)}</a></td>'
        f'<td>{_notebook_link(nb, notebooks)}</td><td>{esc(v)}</td><td>{esc(c)}</td></tr>'
        for f, nb, v, c in verdict_rows(manifest))
    gallery = "\n".join(
        f'<figure id="{esc(fid)}"><a href="figures/{esc(e["image"])}"><img src="figures/{esc(e["image"])}" '
        f'alt="{esc(fid)}" loading="lazy"></a><figcaption>{esc(fid)} ({esc(figure_verdict_of(e))}), '
        f'{_notebook_link(e["notebook"], notebooks)}</figcaption></figure>'
        for fid, e in manifest.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Feature hedging: executed notebooks</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
tr.holds td:nth-child(3) {{ color: #176317; }} tr.departs td:nth-child(3) {{ color: #a11; font-weight: bold; }}
tr.inconclusive td:nth-child(3) {{ color: #8a6d00; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 1em; }} figure {{ width: 360px; margin: 0; }}
figure img {{ width: 100%; border: 1px solid #ddd; }} figcaption {{ font-size: 0.9em; }}
</style></head><body>
<h1>Feature hedging: the executed notebooks</h1>
<p>Each notebook as run by <code>make figures</code> (default profile), with its figures, numbers and claim checks.</p>
<ul>
{links}
</ul>
<h2>Verdicts</h2>
<p>For each figure, what its claim checks say of the paper's claims on this run's numbers: <em>holds</em>,
<em>departs</em> or <em>inconclusive</em> (within seed noise).</p>
<table><thead><tr><th>figure</th><th>notebook</th><th>verdict</th><th>checks</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<h2>Figures</h2>
<div class="gallery">
{gallery}
</div>
</body></html>
"""


README_START, README_END = "<!-- verdicts: start -->", "<!-- verdicts: end -->"


def readme_table(manifest: dict[str, Any]) -> str:
    """The verdict table at the top of the README, in Markdown: per notebook, its figures with
    their verdicts, a link to its executed copy, and the count of each verdict."""
    by_notebook: dict[str, list[tuple[str, str]]] = {}
    for fid, nb, v, _ in verdict_rows(manifest):
        by_notebook.setdefault(nb, []).append((fid, v))
    mark = {"holds": "holds", "departs": "**departs**", "inconclusive": "*inconclusive*", "no claim": "no claim"}
    lines = ["| notebook | figures and their verdicts | holds | departs | inconclusive | no claim |",
             "| --- | --- | --- | --- | --- | --- |"]
    for nb in sorted(by_notebook):
        figures = by_notebook[nb]
        counts = {v: sum(fv == v for _, fv in figures) for v in mark}
        link = f"[{nb}]({EXECUTED_DIR.relative_to(REPO_ROOT).as_posix()}/{nb}.ipynb)"
        cells = ", ".join(f"{fid} {mark[v]}" for fid, v in figures)
        lines.append(f"| {link} | {cells} | {counts['holds']} | {counts['departs']} | {counts['inconclusive']} | {counts['no claim']} |")
    total = {v: sum(v == fv for _, _, fv, _ in verdict_rows(manifest)) for v in mark}
    lines.append(f"| all | {len(manifest)} figures | {total['holds']} | {total['departs']} | {total['inconclusive']} | {total['no claim']} |")
    return "\n".join(lines)


def update_readme(readme: str | Path = REPO_ROOT / "README.md", figures: str | Path = REPO_ROOT / "figures") -> bool:
    """Rewrite the README's verdict table (between ``README_START`` and ``README_END``) from
    ``figures``' manifest; whether it changed."""
    path = Path(readme)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ParameterError(f"{path} has no verdict table markers ({README_START} ... {README_END}).")
    manifest = json.loads((Path(figures) / "manifest.json").read_text())
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{readme_table(manifest)}\n{README_END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def _notebook_link(notebook: str, pages: Sequence[str]) -> str:
    stem = Path(notebook).stem
    return f'<a href="{html.escape(stem)}.html">{html.escape(stem)}</a>' if stem in pages else html.escape(stem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the executed notebooks and the figure index as HTML.")
    parser.add_argument("command", choices=["html", "readme"],
                        help="html: render build/html; readme: rewrite the README's verdict table from the manifest")
    parser.add_argument("--executed", default=str(EXECUTED_DIR), help="folder of executed notebooks")
    parser.add_argument("--figures", default=str(REPO_ROOT / "figures"), help="folder with manifest.json")
    parser.add_argument("--out", default=str(HTML_DIR), help="output folder (default build/html)")
    args = parser.parse_args(argv)
    if args.command == "readme":
        print("README's verdict table " + ("rewritten" if update_readme(figures=args.figures) else "already up to date"))
        return 0
    try:
        pages = export_html(args.executed, args.figures, args.out)
    except ParameterError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"{len(pages)} pages in {args.out}; open {pages[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
