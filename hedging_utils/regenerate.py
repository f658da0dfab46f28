"""Regenerating every figure: the notebooks executed headlessly by papermill (``make figures``).

``python -m hedging_utils.regenerate --profile small [-p NAME VALUE ...] [01 02 ...]`` executes
the notebooks (all, or those whose names start with the given prefixes) under a profile, with
notebook parameters given as ``-p NAME VALUE`` (checked against every notebook to run before any
starts). The toy notebooks run side by side, one torch thread each (the offline model converted
beside them when an LLM notebook follows), then the others one at a time with every core
(``parallel_notebooks``). On the default profile the executed notebooks are
published, normalised, to ``notebooks/executed/`` (``hedging_utils.reading``).

No notebook imports this module, so a change to how notebooks are run leaves every figure's
``code_version`` (``hedging_utils.figures``) as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from unittest import mock

from hedging_utils.profiles import REPO_ROOT, ParameterError, check_positive_int, figures_dir, resolve_profile
from hedging_utils.progress import PROGRESS_LOG_ENV, echo


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
        raise ParameterError(f"{lines}. Run only the notebooks that define it (e.g. `python -m hedging_utils.regenerate "
                             f"-p NAME VALUE 04`); their parameters are in each notebook's first code cell.")


PARALLEL_THREADS = 1
"""Torch threads of each notebook that runs beside another (``parallel_notebooks``)."""

THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""What sets a kernel's torch (and BLAS) threads at its start."""

ONE_AT_A_TIME = ("04", "05", "06", "07")
"""The notebooks (name prefixes) that run alone, with every core: their work is bound by large
matrix products, which a second thread speeds up. Notebooks 04-06 run the language model and its
SAEs; notebook 07 trains SAEs of up to 512 latents on a 1,024-feature synthetic model, and ran
2.4 times slower on one thread beside another notebook (420 s) than alone on two."""


LONGEST_FIRST = ("02", "08", "01")
"""The toy notebooks that take longest on ``small`` (one thread beside another on the 2-core
machine of the README: 02 160 s, 08 147 s, 01 132 s, 03 69 s), started first so that the two
lanes end close together (in file order the lane with 02 and 08 ended 106 s after the other)."""


def parallel_notebooks(todo: Sequence[Path]) -> list[Path]:
    """The notebooks of ``todo`` that run two (or as many as the machine has cores) at a time,
    one torch thread each: all but ``ONE_AT_A_TIME``, ``LONGEST_FIRST`` first, then the rest in
    file order. Their work is toy SAE training, bound by dispatching small tensor operations on
    one core, which a second thread does not speed up, and stacked training gives the same
    numbers with one thread as with two (a test checks it). The others run one at a time,
    afterwards, with every core."""
    toys = [nb for nb in todo if not nb.name.startswith(ONE_AT_A_TIME)]
    rank = {prefix: i for i, prefix in enumerate(LONGEST_FIRST)}
    return sorted(toys, key=lambda nb: rank.get(nb.name[:2], len(rank)))


LLM_NOTEBOOKS = ("04", "05", "06")
"""The notebooks that load the profile's language model."""


def runs_llm_notebook(todo: Sequence[Path]) -> bool:
    return any(nb.name.startswith(LLM_NOTEBOOKS) for nb in todo)


def needs_offline_model(profile: Any, todo: Sequence[Path]) -> bool:
    """Whether ``todo`` runs an LLM notebook (``LLM_NOTEBOOKS``) on a profile whose models include
    the offline one (converted from its GGUF file on first use)."""
    from hedging_utils.activations import MODELS

    return runs_llm_notebook(todo) and any(MODELS[m.name].offline for m in profile.llm.models if m.name in MODELS)


def prepare_offline_model(log: Path) -> float:
    """Convert the offline model's GGUF file into the cache (``activations.offline_model_dir``), in
    a process of its own that inherits the environment (one torch thread in the toy phase), its
    output appended to ``log``; returns the seconds it took. Notebook 04 would otherwise convert
    it on its first cell, single-threaded, for about 50 s while the second core waits; run beside
    the toy notebooks it fills the lane that ends first. A failure is only reported: the notebook
    converts the model itself and stops there with the error in context."""
    start = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-c", "from hedging_utils.activations import offline_model_dir; "
                               "offline_model_dir()"], stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    if done.returncode:
        print(f"converting the offline model beside the toy notebooks failed (exit {done.returncode}, see {log}); "
              "notebook 04 will convert it itself", flush=True)
    return time.perf_counter() - start


def recorded_precisions(figures: Path) -> set[str]:
    """The precisions the LLM figures in ``figures`` record (their data's ``settings.precision``)."""
    manifest = figures / "manifest.json"
    entries = json.loads(manifest.read_text()).values() if manifest.exists() else []
    found = set()
    for entry in entries:
        meta = figures / entry["meta"]
        if entry["notebook"].startswith(LLM_NOTEBOOKS) and meta.exists():
            found.add(json.loads(meta.read_text()).get("settings", {}).get("precision"))
    return found - {None}


def llm_precision_line(todo: Sequence[Path], figures: Path) -> str | None:
    """One line, for the start of a run that has an LLM notebook (``LLM_NOTEBOOKS``): the
    precision its matrix products will take here (``llm.llm_precision``); where the LLM figures
    already in ``figures`` record another, that their numbers will differ by rounding; and where
    it is float32 because the device has no fast bfloat16 products, that the run takes longer."""
    if not runs_llm_notebook(todo):
        return None
    from hedging_utils.llm import llm_precision
    from hedging_utils.precision import fast_bf16
    from hedging_utils.training import training_device

    device, precision = training_device(), llm_precision()
    line = f"LLM notebooks: matrix products in {precision} ({device.type})"
    if precision == "float32" and not fast_bf16(device):
        line += f"; no bfloat16 units on this {device.type}, so the run takes longer (README: 'On a CPU without bfloat16 units')"
    if others := recorded_precisions(figures) - {precision}:
        line += (f"; the LLM figures in {figures} were made with {' and '.join(sorted(others))} products: "
                 "expect their numbers to differ by rounding")
    return line + "."


def run_notebooks(profile: str, only: Sequence[str] = (), parameters: Mapping[str, Any] | None = None,
                  out_dir: str | os.PathLike | None = None, workers: int | None = None) -> None:
    """Execute the notebooks with papermill under ``profile``.

    ``only``: notebook name prefixes (e.g. ``["01", "04"]``; empty: all). ``parameters``: values
    for the notebooks' parameters cells, checked against every notebook to run before any of
    them starts (``check_parameters``). The toy notebooks (``parallel_notebooks``) run first,
    ``workers`` at a time (default: the machine's cores), each with ``PARALLEL_THREADS`` torch
    thread, and beside them, last, the offline model's conversion when an LLM notebook will need
    it (``prepare_offline_model``); then the others in order, one at a time with every core.
    Executed copies and
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
    prepared: dict[str, Any] = {}
    prepare = needs_offline_model(resolved, todo)
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
    if (line := llm_precision_line(todo, figures_dir(resolved))) is not None:
        say(line)
    stop_echo = echo(log)
    try:
        for batch, n_workers, threads in phases:
            with mock.patch.dict(os.environ, {PROGRESS_LOG_ENV: str(log),
                                              **{name: str(threads) for name in THREAD_ENVS if threads}}):
                if n_workers == 1 or len(batch) < 2:
                    for nb in batch:
                        execute(nb, threads)
                else:
                    with ThreadPoolExecutor(max_workers=n_workers) as pool:
                        futures = [pool.submit(execute, nb, threads) for nb in batch]
                        model = pool.submit(prepare_offline_model, log) if prepare else None
                        for future in futures:
                            future.result()
                        if model is not None:
                            prepared = {"seconds": round(model.result(), 1), "threads": threads}
    finally:
        stop_echo()
    ordered = {nb.name: timings[nb.name] for nb in todo if nb.name in timings}
    if prepared:
        ordered["offline model (beside the toy notebooks)"] = prepared
    (out / "timings.json").write_text(json.dumps(ordered, indent=1) + "\n")
    print(f"figures in {figures_dir(resolved)}; executed notebooks in {out}" + (f" and {EXECUTED_DIR}" if published else ""))


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
