"""Writing figures with the numbers behind them, and regenerating them all.

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

``python -m hedging_utils.figures --profile small [-p NAME VALUE ...] [01 02 ...]`` executes
the notebooks in order with papermill (what ``make figures`` runs).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from hedging_utils.cache import code_version, imported_modules, module_closure, notebook_source, source_hash
from hedging_utils.profiles import REPO_ROOT, ParameterError, Profile, check_positive_int, figures_dir, resolve_profile
from hedging_utils.progress import PROGRESS_LOG_ENV, echo

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
# Regenerating every figure


def notebook_code_version(notebook: str) -> str:
    """The ``code_version`` of figures from notebook ``notebook`` (its name, e.g. ``01_toy_models``):
    ``cache.code_version`` of its code, or of the whole package for a name with no notebook file."""
    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    return code_version(notebook_source(path)) if path.is_file() else source_hash()


def notebooks() -> list[Path]:
    return sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def check_parameters(todo: Sequence[Path], parameters: Mapping[str, Any]) -> None:
    """Raise a ParameterError, naming them, for any of ``parameters`` that a notebook of ``todo``
    does not define in its parameters cell (papermill would only warn and run on with its
    defaults). ``profile`` is the runner's own ``--profile``."""
    import papermill as pm

    if "profile" in parameters:
        raise ParameterError("set the profile with --profile, not -p profile.")
    unknown = {nb.name: sorted(set(parameters) - set(pm.inspect_notebook(str(nb)))) for nb in todo}
    unknown = {name: names for name, names in unknown.items() if names}
    if unknown:
        lines = "; ".join(f"{', '.join(names)} is not a parameter of {name}" for name, names in unknown.items())
        raise ParameterError(f"{lines}. Run only the notebooks that define it (e.g. `python -m hedging_utils.figures "
                             f"-p NAME VALUE 04`); their parameters are in each notebook's first code cell.")


PARALLEL_THREADS = 1
"""Torch threads of each notebook that runs beside another (``parallel_notebooks``)."""


def parallel_notebooks(todo: Sequence[Path]) -> list[Path]:
    """The notebooks of ``todo`` that run two (or as many as the machine has cores) at a time,
    one torch thread each: those whose code never reaches the language-model modules (``llm``).
    Their work is toy SAE training, bound by dispatching small tensor operations on one core,
    which a second thread does not speed up, and stacked training gives the same numbers with
    one thread as with two (a test checks it). The LLM notebooks are matmul-bound: they run one
    at a time, afterwards, with every core."""
    return [nb for nb in todo if "llm" not in module_closure(imported_modules(notebook_source(nb)))]


def run_notebooks(profile: str, only: Sequence[str] = (), parameters: Mapping[str, Any] | None = None,
                  out_dir: str | os.PathLike | None = None, workers: int | None = None) -> None:
    """Execute the notebooks with papermill under ``profile``.

    ``only``: notebook name prefixes (e.g. ``["01", "04"]``; empty: all). ``parameters``: values
    for the notebooks' parameters cells, checked against every notebook to run before any of
    them starts (``check_parameters``). The toy notebooks (``parallel_notebooks``) run first,
    ``workers`` at a time (default: the machine's cores), each with ``PARALLEL_THREADS`` torch
    thread; then the others in order, one at a time with every core. Executed copies and
    ``timings.json`` (each notebook's wall time and torch threads) go to ``out_dir`` (default
    ``build/notebooks/<profile>/``, kept out of git)."""
    import papermill as pm

    resolved = resolve_profile(profile)
    todo = [nb for nb in notebooks() if not only or any(nb.name.startswith(o) for o in only)]
    if not todo:
        raise ParameterError(f"no notebook starts with {list(only)}; the notebooks are {[nb.name for nb in notebooks()]}.")
    parameters = dict(parameters or {})
    check_parameters(todo, parameters)
    workers = workers if workers is not None else max(1, os.cpu_count() or 1)
    check_positive_int("workers", workers)
    from hedging_utils.reading import EXECUTED_DIR, publish

    out = Path(out_dir) if out_dir is not None else REPO_ROOT / "build" / "notebooks" / resolved.name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "progress.log"
    log.write_text("")
    published = figures_dir(resolved) == REPO_ROOT / "figures"
    timings: dict[str, dict[str, Any]] = {}
    parallel = parallel_notebooks(todo)
    phases = [(parallel, workers, PARALLEL_THREADS), ([nb for nb in todo if nb not in parallel], 1, None)]

    def say(line: str) -> None:  # one write per line: notebooks side by side never interleave within a line
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def execute(nb: Path, threads: int | None) -> None:
        say(f"[{todo.index(nb) + 1}/{len(todo)}] {nb.name} (profile {resolved.name}{f', {threads} thread' if threads else ''})")
        start = time.perf_counter()
        pm.execute_notebook(
            str(nb), str(out / nb.name), parameters={**parameters, "profile": resolved.name},
            cwd=str(nb.parent), log_output=True, progress_bar=False, kernel_name="python3",
        )
        timings[nb.name] = {"seconds": round(time.perf_counter() - start, 1), "threads": threads or os.cpu_count()}
        if published:
            size = publish(out / nb.name, EXECUTED_DIR / nb.name)
            say(f"  {nb.name}: {size / 1e6:.1f} MB in {EXECUTED_DIR.relative_to(REPO_ROOT)}")
        say(f"[{todo.index(nb) + 1}/{len(todo)}] {nb.name} done in {timings[nb.name]['seconds']:.0f}s")

    # the kernels inherit the environment: the progress log (bars there, one line in the notebook) and the threads
    saved = {name: os.environ.get(name) for name in (PROGRESS_LOG_ENV, *THREAD_ENVS)}
    os.environ[PROGRESS_LOG_ENV] = str(log)
    stop_echo = echo(log)
    try:
        for batch, n_workers, threads in phases:
            for name in THREAD_ENVS:
                if threads:
                    os.environ[name] = str(threads)
                elif saved[name] is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = saved[name]  # type: ignore[assignment]
            if n_workers == 1 or len(batch) < 2:
                for nb in batch:
                    execute(nb, threads)
            else:
                with ThreadPoolExecutor(max_workers=n_workers) as pool:
                    for future in [pool.submit(execute, nb, threads) for nb in batch]:
                        future.result()
    finally:
        stop_echo()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    ordered = {nb.name: timings[nb.name] for nb in todo if nb.name in timings}
    (out / "timings.json").write_text(json.dumps(ordered, indent=1) + "\n")
    print(f"figures in {figures_dir(resolved)}; executed notebooks in {out}" + (f" and {EXECUTED_DIR}" if published else ""))


THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""What sets a kernel's torch (and BLAS) threads at its start."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the figures by executing the notebooks.")
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "small"), help="ci, small (default) or paper")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, its value read as YAML (-p seed 3, -p widths '[16, 32]', -p k null); "
                             "a name the notebooks to run do not define stops the run before any compute")
    parser.add_argument("only", nargs="*", help="notebook name prefixes, e.g. 01 (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs cell output at INFO
    for noisy in ("traitlets", "asyncio", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_notebooks(args.profile, args.only, parse_parameters(args.parameter))
    except ParameterError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


def parse_parameters(pairs: Iterable[Sequence[str]]) -> dict[str, Any]:
    """``{name: value}`` from ``-p NAME VALUE`` pairs, each value read as YAML (``3`` an int,
    ``0.5`` and ``1e-3`` floats, ``[1, 2]`` a list, ``null`` None, ``abc`` a string); a name given
    twice is refused."""
    import yaml

    parameters: dict[str, Any] = {}
    for name, value in pairs:
        if name in parameters:
            raise ParameterError(f"-p {name} is given twice.")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _EXPONENT_FLOAT.fullmatch(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as a string
        parameters[name] = parsed
    return parameters


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


if __name__ == "__main__":
    sys.exit(main())
