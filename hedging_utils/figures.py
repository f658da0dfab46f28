"""Writing figures with the numbers behind them, and regenerating them all.

Each figure ``<id>`` (its id in FIGURES.md: P2, X-theory, LW-snap-single, ...) is written as
``<dir>/<id>.png`` and ``.pdf``, its data as ``<dir>/data/<id>.csv`` and its settings and
claim checks as ``<dir>/data/<id>.json``, and gets an entry in ``<dir>/manifest.json``. Every
file is written to a temporary name and renamed, so a reader never sees half a file.

``python -m hedging_utils.figures --profile small`` executes the notebooks in order with
papermill (what ``make figures`` runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from hedging_utils.profiles import REPO_ROOT, Profile, figures_dir, resolve_profile
from hedging_utils.training import TEXT_PROGRESS_ENV

MANIFEST = "manifest.json"


@dataclass
class Check:
    """A claim of the paper about a figure, and whether this run's numbers show it."""

    claim: str
    holds: bool
    value: Any = None

    def __str__(self) -> str:
        return f"[{'ok' if self.holds else 'DEPARTS'}] {self.claim}" + (f"  ({self.value})" if self.value is not None else "")


def check(claim: str, holds: bool, value: Any = None) -> Check:
    c = Check(claim, bool(holds), _jsonable(value))
    print(c)
    return c


@dataclass
class FigureWriter:
    """Writes one notebook's figures into ``out_dir`` (see ``figures_dir``)."""

    notebook: str
    profile: Profile
    out_dir: Path
    written: list[str] = field(default_factory=list)

    @classmethod
    def for_notebook(cls, notebook: str, profile: Profile, out_dir: str | os.PathLike | None = None) -> "FigureWriter":
        return cls(notebook, profile, figures_dir(profile, out_dir))

    def save(
        self,
        figure_id: str,
        fig: plt.Figure,
        data: pd.DataFrame,
        *,
        settings: dict[str, Any] | None = None,
        checks: Sequence[Check] = (),
    ) -> None:
        """Save ``fig`` and its ``data``; ``settings`` records chosen hyperparameters and the
        scale of the run, ``checks`` the paper's claims as shown (or not) by ``data``."""
        data_dir = self.out_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        image = self.out_dir / f"{figure_id}.png"
        pdf = self.out_dir / f"{figure_id}.pdf"
        csv = data_dir / f"{figure_id}.csv"
        meta = data_dir / f"{figure_id}.json"
        _atomic(image, lambda p: fig.savefig(p, dpi=130, bbox_inches="tight", format="png"))
        _atomic(pdf, lambda p: fig.savefig(p, bbox_inches="tight", format="pdf", metadata={"CreationDate": None}))
        _atomic(csv, lambda p: data.to_csv(p, index=False, float_format="%.6g"))
        record = {
            "id": figure_id,
            "notebook": self.notebook,
            "profile": self.profile.name,
            "profile_settings": self.profile.to_dict(),
            "settings": _jsonable(settings or {}),
            "checks": [asdict(c) for c in checks],
        }
        _atomic(meta, lambda p: Path(p).write_text(json.dumps(record, indent=1)))
        entry = {
            "image": image.name,
            "pdf": pdf.name,
            "data": f"data/{csv.name}",
            "meta": f"data/{meta.name}",
            "notebook": self.notebook,
            "profile": self.profile.name,
            "checks_hold": all(c.holds for c in checks),
        }
        update_manifest(self.out_dir, {figure_id: entry})
        self.written.append(figure_id)
        print(f"saved {figure_id}: {image}")

    def verify(self, figure_ids: Iterable[str]) -> None:
        """Raise unless every figure in ``figure_ids`` has its image, PDF, data and manifest entry."""
        figure_ids = list(figure_ids)
        manifest = read_manifest(self.out_dir)
        missing = []
        for fid in figure_ids:
            entry = manifest.get(fid)
            if entry is None:
                missing.append(f"{fid} (no manifest entry)")
                continue
            for key in ("image", "pdf", "data", "meta"):
                if not (self.out_dir / entry[key]).exists():
                    missing.append(f"{fid} ({entry[key]})")
        if missing:
            raise RuntimeError(f"figures not written in {self.out_dir}: {', '.join(missing)}")
        print(f"all {len(figure_ids)} figures written to {self.out_dir}")


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def update_manifest(out_dir: Path, entries: dict[str, Any]) -> None:
    manifest = read_manifest(out_dir)
    manifest.update(entries)
    ordered = dict(sorted(manifest.items(), key=lambda kv: _figure_sort_key(kv[0])))
    _atomic(Path(out_dir) / MANIFEST, lambda p: Path(p).write_text(json.dumps(ordered, indent=1) + "\n"))


def _figure_sort_key(figure_id: str) -> tuple[int, int, str]:
    """P1, P2, ..., P21, then LW-, C- and X- figures."""
    if figure_id.startswith("P") and figure_id[1:].isdigit():
        return (0, int(figure_id[1:]), "")
    return ({"LW": 1, "C": 2, "X": 3}.get(figure_id.split("-")[0], 4), 0, figure_id)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return str(value)


# ---------------------------------------------------------------------------------------
# Regenerating every figure


def notebooks() -> list[Path]:
    return sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run_notebooks(profile: str, only: Sequence[str] = ()) -> None:
    """Execute the notebooks in order with papermill under ``profile``; executed copies go
    to ``build/notebooks/<profile>/`` (kept out of git)."""
    import papermill as pm

    resolved = resolve_profile(profile)
    os.environ.setdefault(TEXT_PROGRESS_ENV, "1")  # progress bars as text, so the log shows them
    todo = [nb for nb in notebooks() if not only or any(nb.name.startswith(o) for o in only)]
    out = REPO_ROOT / "build" / "notebooks" / resolved.name
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for i, nb in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {nb.name} (profile {resolved.name})", flush=True)
        start = time.perf_counter()
        pm.execute_notebook(
            str(nb), str(out / nb.name), parameters={"profile": resolved.name},
            cwd=str(nb.parent), log_output=True, progress_bar=False, kernel_name="python3",
        )
        timings[nb.name] = round(time.perf_counter() - start, 1)
        print(f"[{i}/{len(todo)}] {nb.name} done in {timings[nb.name]:.0f}s", flush=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"figures in {figures_dir(resolved)}; executed notebooks in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the figures by executing the notebooks.")
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "small"), help="ci, small (default) or paper")
    parser.add_argument("only", nargs="*", help="notebook name prefixes, e.g. 01 (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs cell output at INFO
    for noisy in ("traitlets", "asyncio", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_notebooks(args.profile, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
