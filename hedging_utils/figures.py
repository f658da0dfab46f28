"""Writing figures with the numbers behind them.

Each figure ``<id>`` (its id in FIGURES.md: P2, X-theory, LW-snap-single, ...) is written as
``<dir>/<id>.png`` and ``.pdf``, its data as ``<dir>/data/<id>.csv`` and its settings and
claim checks as ``<dir>/data/<id>.json``, and gets an entry in ``<dir>/manifest.json``. Every
file is written to a temporary name and renamed, so a reader never sees half a file.

Each figure's record carries its provenance: the profile's full settings and
``code_version``, a hash of the source of every package module its notebook runs: those the
notebook's code imports and, transitively, everything they import, anywhere in their source
(``cache.code_version``; ``profiles`` aside, whose numbers are the recorded settings). An edit
to any module a notebook reaches makes its figures stale; a module it never imports (a newer
notebook's) does not. A test compares the committed figures' provenance with today's profile and
code: a recorded setting that differs, or code that does.

``hedging_utils.regenerate`` runs the notebooks that write them (``make figures``).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from hedging_utils.cache import code_version, notebook_source, source_hash
from hedging_utils.profiles import REPO_ROOT, Profile, figures_dir

MANIFEST = "manifest.json"


HOLDS, DEPARTS, INCONCLUSIVE = "holds", "departs", "inconclusive"
VERDICTS = (HOLDS, DEPARTS, INCONCLUSIVE)
NO_CLAIM = "no claim"


@dataclass
class Check:
    """A claim of the paper about a figure, and what this run's numbers say of it.

    ``verdict`` is ``holds`` (the claimed direction, beyond seed noise), ``departs`` (the other
    direction, beyond seed noise) or ``inconclusive`` (within noise, or too few seeds to tell);
    ``value`` is the number it rests on (for ``verdict``: the effect and its noise)."""

    claim: str
    verdict: str
    value: Any = None

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS

    def __str__(self) -> str:
        label = {HOLDS: "holds", DEPARTS: "DEPARTS", INCONCLUSIVE: "inconclusive"}[self.verdict]
        return f"[{label}] {self.claim}" + (f"  ({self.value})" if self.value is not None else "")


def check(claim: str, holds: bool, value: Any = None) -> Check:
    """Record (and print) a claim that has no seed noise to weigh: an exact or structural fact of
    this run (a closed-form curve, a latent's sign, a count). It holds or departs; ``holds`` is
    anything with a truth value (a NaN comparison is False: a departure). Claims about an effect
    that varies with the seed go through ``verdict``."""
    c = Check(claim, HOLDS if bool(holds) else DEPARTS, _jsonable(value))
    print(c)
    return c


def verdict(claim: str, effect: Any, noise: Any = None, *, n_sigma: float = 2.0, detail: Any = None) -> Check:
    """Record (and print) a claim about an effect, weighed against its seed noise.

    ``effect``: the effect, signed so that the claim's direction is positive, either one number
    (then ``noise`` is its seed standard deviation) or one number per seed (then ``noise``, if
    not given, is their standard deviation across seeds, ddof 1, and the effect their mean).
    The claim *holds* when effect > ``n_sigma`` × noise, *departs* when effect < -``n_sigma`` ×
    noise, and is *inconclusive* otherwise, and whenever the noise is unknown (fewer than two
    seeds, or NaN). ``detail``: the numbers the effect is computed from, recorded beside it.

    A claim with a stated threshold ("x > t") passes ``x - t`` as its effect, so the threshold
    stays the claim and the noise decides only how far from it the run must land."""
    import numpy as np

    values = np.atleast_1d(np.asarray(effect, dtype=float))
    mean = float(values.mean()) if values.size else float("nan")
    if noise is None:
        noise = float(values.std(ddof=1)) if values.size >= 2 else float("nan")
    noise = float(noise)
    if not np.isfinite(mean) or not np.isfinite(noise):
        outcome = INCONCLUSIVE
    elif mean > n_sigma * noise:
        outcome = HOLDS
    elif mean < -n_sigma * noise:
        outcome = DEPARTS
    else:
        outcome = INCONCLUSIVE
    value = {"effect": mean, "noise": noise, "n_sigma": n_sigma, "seeds": int(values.size) if values.size > 1 else None,
             "detail": detail}
    c = Check(claim, outcome, _jsonable({k: v for k, v in value.items() if v is not None}))
    print(c)
    return c


def figure_verdict(checks: Sequence[Check]) -> str:
    """One word for a figure: ``no claim`` without checks, else ``departs`` if any check
    departs, ``inconclusive`` if any is inconclusive, ``holds`` if all hold."""
    if not checks:
        return NO_CLAIM
    verdicts = {c.verdict for c in checks}
    return DEPARTS if DEPARTS in verdicts else INCONCLUSIVE if INCONCLUSIVE in verdicts else HOLDS


def count_verdicts(checks: Sequence[Check]) -> dict[str, int]:
    return {v: sum(c.verdict == v for c in checks) for v in VERDICTS}


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
            "code_version": notebook_code_version(self.notebook),
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
            "verdict": figure_verdict(checks),
            "verdicts": count_verdicts(checks),
            "code_version": record["code_version"],
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
    """Add ``entries`` to the manifest, under a lock: notebooks that run side by side
    (``run_notebooks``) each add their figures without losing the other's."""
    folder = os.open(out_dir, os.O_RDONLY)  # the lock is on the figures folder itself: no lock file
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        manifest = read_manifest(out_dir)
        manifest.update(entries)
        ordered = dict(sorted(manifest.items(), key=lambda kv: _figure_sort_key(kv[0])))
        _atomic(Path(out_dir) / MANIFEST, lambda p: Path(p).write_text(json.dumps(ordered, indent=1) + "\n"))
    finally:
        os.close(folder)  # releases the lock


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
# Provenance


def notebook_code_version(notebook: str) -> str:
    """The ``code_version`` of figures from notebook ``notebook`` (its name, e.g. ``01_toy_models``):
    ``cache.code_version`` of its code, or of the whole package for a name with no notebook file."""
    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    return code_version(notebook_source(path)) if path.is_file() else source_hash()
