"""GPU smoke test: the CUDA and bfloat16 paths of ``hedging_utils``, in one short run.

    python benchmarks/cuda_smoke.py [--out build/cuda_smoke.json] [--quick]

Runs on ``hedging_utils.training.training_device()`` (CUDA when present; on a CPU with
``--quick`` so that the script itself can be tested). Stages, each timed and each recorded in the
JSON file (``--out``) with its traceback if it fails, the next one running regardless:

1. environment: torch, the device, ``precision.fast_bf16`` / ``matmul_precision``, and the measured
   float32 and bfloat16 matmul peak (8,192^3 on CUDA, 2,048^3 on a CPU), in TFLOP/s;
2. toy equivalence: tests/test_training.py's check (every stacked sweep and path against SAELens'
   ``SAETrainer`` in float64, tolerance ``EXACT``) with both paths on the device; and the same
   stacked toy sweeps trained on the CPU and on the device (float32, TF32 off), max |W_dec| difference;
3. paper-profile toy speed: notebook 01's correlation sweep (P12, ``sweep_points`` SAEs) and
   notebook 04's P15 base stack (widths 15-50 x ``seeds``) and its control/extended continuation,
   at the ``paper`` profile's batch size, for a capped number of steps; ms/step and the projection
   to the profile's step counts;
4. LLM SAE training (``train_together``, the stack ``train_llm_saes`` uses) on Gaussian activations
   at Gemma-2-2b's d_model, the paper's width, K and batch, ``--llm-saes`` SAEs in one stack with
   AuxK on after ``--llm-dead-window`` steps, in bfloat16 and float32 on the same data;
5. activation caching (``activations.cache_activations``) of a tiny randomly initialised Gemma 3
   (the 270M's shape, a few layers, a small vocabulary; no download) in float32 and bfloat16.

No network is used (``HF_HUB_OFFLINE=1``); SAEs are never written to the project's cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from unittest import mock
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_SCRATCH = tempfile.mkdtemp(prefix="cuda_smoke_")
os.environ.setdefault("HEDGING_CACHE_DIR", os.path.join(_SCRATCH, "cache"))  # nothing lands in data/cache

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import hedging_utils  # noqa: E402,F401  (registers the SAE variants)
from hedging_utils import training  # noqa: E402
from hedging_utils.precision import fast_bf16, matmul_precision  # noqa: E402
from hedging_utils.profiles import PROFILES  # noqa: E402
from hedging_utils.training import (  # noqa: E402
    ClosedFormStep, Job, StackedSAEs, TrainSettings, copy_sae, make_sae, sae_lens_trainer_config, seeded,
    train_together, training_device,
)

WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ---------------------------------------------------------------------------------------
# Small tools


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def max_difference(a: Any, b: Any, names: tuple[str, ...] = WEIGHTS) -> float:
    return max(float((getattr(a, n).detach().cpu().double() - getattr(b, n).detach().cpu().double()).abs().max()) for n in names)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Report:
    """The JSON report, rewritten after every stage so that a killed run leaves what finished."""

    def __init__(self, path: Path, args: argparse.Namespace):
        self.path = path
        self.data: dict[str, Any] = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(jsonable(self.data), indent=1))
        os.replace(tmp, self.path)

    def stage(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        say(f"\n=== {name}")
        result: dict[str, Any] = {}
        self.data["stages"][name] = result
        start = time.perf_counter()
        try:
            fn(result)
            result["ok"] = True
        except BaseException as error:  # noqa: BLE001  (recorded; KeyboardInterrupt too, then re-raised)
            result["ok"] = False
            result["error"] = f"{type(error).__name__}: {error}"
            result["traceback"] = traceback.format_exc()
            say(f"  FAILED: {result['error']}")
            say(result["traceback"])
            if isinstance(error, KeyboardInterrupt):
                raise
        finally:
            result["seconds"] = round(time.perf_counter() - start, 2)
            self.write()
        say(f"  ({name}: {result['seconds']:.1f}s)")


# ---------------------------------------------------------------------------------------
# 1. Environment


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e12


def stage_environment(r: dict[str, Any], args: argparse.Namespace, device: torch.device, peaks: dict[str, float]) -> None:
    r.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cuda_available=torch.cuda.is_available(), device=str(device), threads=torch.get_num_threads(),
             fast_bf16=fast_bf16(device), matmul_precision=matmul_precision(device),
             float32_matmul_precision=torch.get_float32_matmul_precision(),
             allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        import sae_lens
        import transformers
        r.update(sae_lens=sae_lens.__version__, transformers=transformers.__version__)
    except Exception as error:  # noqa: BLE001
        r["versions_error"] = repr(error)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        r.update(device_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                 memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    repeats = 10 if device.type == "cuda" else 3
    r["matmul_n"] = n
    with no_tf32():
        peaks["float32"] = r["matmul_tflops_float32"] = matmul_tflops(n, torch.float32, device, repeats)
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            r["matmul_tflops_tf32"] = matmul_tflops(n, torch.float32, device, repeats)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    peaks["bfloat16"] = r["matmul_tflops_bfloat16"] = matmul_tflops(n, torch.bfloat16, device, repeats)
    say(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), device {device} {r.get('device_name', platform.processor())}"
        f" capability {r.get('capability')}; fast_bf16={r['fast_bf16']} matmul_precision={r['matmul_precision']}")
    say(f"  matmul {n}^3: float32 {r['matmul_tflops_float32']:.1f} TFLOP/s, tf32 {r.get('matmul_tflops_tf32', float('nan')):.1f}, "
        f"bfloat16 {r['matmul_tflops_bfloat16']:.1f} TFLOP/s")


# ---------------------------------------------------------------------------------------
# 2. Toy equivalence on the device


def load_test_module():
    """tests/test_training.py, for its sweeps, tolerance and float64 jobs (the check it makes)."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_training  # noqa: PLC0415

    return test_training


def sae_lens_on(job: Job, settings: TrainSettings, device: torch.device):
    """``training.train_with_sae_lens`` (SAELens' own trainer) on ``device``."""
    with mock.patch.dict(os.environ, {"HEDGING_DEVICE": str(device)}):
        return training.train_with_sae_lens(job, settings)


def correlation_sweep(points: int, batch_size: int, seed: int = 0):
    """Notebook 01's P12 sweep: 1-latent L1 SAEs on correlated pairs, one per rho (init true features)."""
    from hedging_utils.toys import correlated_pair, toy_job

    rhos = np.round(np.linspace(-0.5, 0.5, points), 4)
    return {float(rho): toy_job(correlated_pair(0.45, 0.25, float(rho), d_model=50), 1, batch_size=batch_size, seed=seed,
                                init="true_features", l1_coefficient=1e-3, label=f"P12 rho={rho:+.2f}") for rho in rhos}


def p15_toy(seed: int = 0, correlation_seed: int = 42):
    """Notebook 04's P14/P15 toy (50 correlated features in D = 100) and K = its measured L0."""
    from sae_lens.synthetic import generate_random_correlation_matrix
    from hedging_utils.toys import ToySetting

    n_features = 50
    correlation = generate_random_correlation_matrix(n_features, min_correlation_strength=0.3, max_correlation_strength=0.9,
                                                      uncorrelated_ratio=0.3, positive_ratio=0.5, seed=correlation_seed)
    probabilities = 0.345 * (n_features - 1 - np.arange(n_features)) / n_features + 0.05
    toy = ToySetting(probabilities.tolist(), correlation_matrix=correlation.tolist(), magnitude_std=0.15, d_model=100,
                     feature_seed=correlation_seed)
    l0 = float((toy.sample_feature_activations(100_000, seed=seed) > 0).float().sum(1).mean())
    return toy, l0


P15_WIDTHS = [15, 20, 25, 30, 35, 40, 45, 50]


def p15_base_jobs(toy, k: float, seeds: list[int], batch_size: int):
    from hedging_utils.toys import toy_job

    return {(s, w): toy_job(toy, w, batch_size=batch_size, seed=s, stream_seed=10_000 + s, init="random",
                            architecture="batchtopk", k=k, rescale_acts_by_decoder_norm=False,
                            label=f"P15 base width {w} seed {s}")
            for s in seeds for w in P15_WIDTHS}


def stage_equivalence(r: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    T = load_test_module()
    paths = list(T.PATHS)
    if args.equivalence_paths:
        paths = paths[:args.equivalence_paths]
    r["tolerance"] = T.EXACT
    r["device"] = str(device)
    results: dict[str, Any] = {}
    r["sae_lens_vs_stacked"] = results
    say(f"  tests/test_training.py's check on {device}: {len(paths)} sweep/path pairs, float64, tolerance {T.EXACT:g}")
    for name, path in paths:
        key = f"{name} [{path}]"
        entry: dict[str, Any] = {}
        results[key] = entry
        start = time.perf_counter()
        try:
            toy, width, common, variants = T.SWEEPS[name]
            jobs = {i: T.in_float64(T.toy_job(toy, width, batch_size=200, seed=i, **common, **v)) for i, v in enumerate(variants)}
            settings = TrainSettings(steps=80, batch_size=200, dead_feature_window=5)
            supports = staticmethod(lambda model: False) if path == "autograd" else ClosedFormStep.__dict__["supports"]
            with mock.patch.object(ClosedFormStep, "supports", supports), mock.patch.dict(os.environ, {"HEDGING_DEVICE": str(device)}):
                stacked = train_together(jobs, settings, progress=False)
            diffs, dec, enc, thresholds = [], [], [], []
            for i, job in jobs.items():
                reference = sae_lens_on(job, settings, device)
                diffs.append(max_difference(stacked[i], reference))
                dec.append(max_difference(stacked[i], reference, ("W_dec",)))
                enc.append(max_difference(stacked[i], reference, ("W_enc",)))
                if hasattr(reference, "topk_threshold"):
                    thresholds.append(abs(float(stacked[i].topk_threshold) - float(reference.topk_threshold))
                                      / max(abs(float(reference.topk_threshold)), 1e-30))
                entry["dtype"] = str(stacked[i].W_dec.dtype)
            entry.update(max_abs_W_dec_difference=max(dec), max_abs_W_enc_difference=max(enc))
            entry.update(max_abs_difference=max(diffs), within_tolerance=max(diffs) < T.EXACT and all(t < T.EXACT for t in thresholds))
            if thresholds:
                entry["topk_threshold_rel_difference"] = max(thresholds)
            say(f"  {'ok  ' if entry['within_tolerance'] else 'FAIL'} {key}: max |diff| {entry['max_abs_difference']:.2e}"
                + (f", threshold rel diff {max(thresholds):.1e}" if thresholds else ""))
        except Exception as error:  # noqa: BLE001
            entry.update(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(), within_tolerance=False)
            say(f"  ERROR {key}: {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - start, 2)
    r["all_within_tolerance"] = all(e.get("within_tolerance") for e in results.values())
    r["failed"] = [k for k, e in results.items() if not e.get("within_tolerance")]

    # the same stacked sweeps on the CPU and on the device, float32, TF32 off
    steps = args.cpu_cuda_steps
    settings = TrainSettings(steps=steps, batch_size=500, lr=3e-4, adam_betas=(0.0, 0.999))
    cross: dict[str, Any] = {}
    r["cpu_vs_device"] = cross
    toy, l0 = p15_toy()
    sweeps = {
        "01 correlation sweep (closed form)": (lambda: correlation_sweep(11, 500), "closed form"),
        "01 correlation sweep (autograd)": (lambda: correlation_sweep(11, 500), "autograd"),
        "04 P15 base stack, seed 0 (closed form BatchTopK)": (lambda: p15_base_jobs(toy, l0, [0], 500), "closed form"),
    }
    for name, (make, path) in sweeps.items():
        entry = {"steps": steps, "path": path}
        cross[name] = entry
        try:
            jobs = make()
            supports = staticmethod(lambda model: False) if path == "autograd" else ClosedFormStep.__dict__["supports"]
            runs = {}
            with no_tf32(), mock.patch.object(ClosedFormStep, "supports", supports):
                for where in ("cpu", str(device)):
                    with mock.patch.dict(os.environ, {"HEDGING_DEVICE": where}):
                        start = time.perf_counter()
                        runs[where] = train_together(jobs, settings, progress=False)
                        entry[f"seconds_{where}"] = round(time.perf_counter() - start, 2)
            a, b = runs["cpu"], runs[str(device)]
            entry["max_abs_W_dec_difference"] = max(max_difference(a[k], b[k], ("W_dec",)) for k in jobs)
            entry["max_abs_difference_all_weights"] = max(max_difference(a[k], b[k]) for k in jobs)
            entry["max_abs_W_dec"] = max(float(a[k].W_dec.detach().abs().max()) for k in jobs)
            say(f"  cpu vs {device}, {name}, {steps} steps: max |W_dec diff| {entry['max_abs_W_dec_difference']:.2e} "
                f"(all weights {entry['max_abs_difference_all_weights']:.2e}); {entry['seconds_cpu']}s vs {entry[f'seconds_{device}']}s")
        except Exception as error:  # noqa: BLE001
            entry.update(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            say(f"  ERROR cpu vs {device}, {name}: {entry['error']}")


# ---------------------------------------------------------------------------------------
# 3. Paper-profile toy speed


def time_training(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def data_seconds(jobs: dict[Any, Job], steps: int) -> float:
    """Seconds per step of drawing the stacked toy batches alone (``training._stacked_batches``: SAELens'
    sampler, on the CPU), measured over at most 256 steps."""
    steps = min(steps, 256)
    batches = training._stacked_batches(list(jobs.values()))
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return (time.perf_counter() - start) / steps


def stage_toy_speed(r: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    from hedging_utils.extension import PairSpec, extension_pairs
    from hedging_utils.toys import toy_training, train_toy_saes

    P = PROFILES["paper"]
    steps = args.toy_steps
    r.update(profile="paper", toy_steps=P.toy_steps, toy_batch_size=P.toy_batch_size, hedging_toy_steps=P.hedging_toy_steps,
             sweep_points=P.sweep_points, seeds=P.seeds, capped_steps=steps, device=str(device))
    warm = toy_training(min(20, steps), P.toy_batch_size)

    # (a) notebook 01's correlation sweep (P12), sweep_points SAEs, one stack of 11 streams
    jobs = correlation_sweep(P.sweep_points, P.toy_batch_size)
    train_toy_saes(jobs, warm, cache=False, progress=False)
    seconds = time_training(lambda: train_toy_saes(jobs, toy_training(steps, P.toy_batch_size), cache=False, progress=False), device)
    data = data_seconds(jobs, steps) * steps
    a = {"saes": len(jobs), "steps": steps, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
         "data_ms_per_step": 1e3 * data / steps, "data_share": data / seconds,
         "projected_seconds_full": seconds / steps * P.toy_steps, "full_steps": P.toy_steps}
    r["01_correlation_sweep"] = a
    say(f"  01 correlation sweep ({len(jobs)} SAEs, batch {P.toy_batch_size}): {a['ms_per_step']:.2f} ms/step "
        f"(drawing the batches alone {a['data_ms_per_step']:.2f} ms, {100 * a['data_share']:.0f}%); "
        f"{P.toy_steps:,} steps -> {a['projected_seconds_full']:.0f}s")

    # (b) notebook 04's P15: the base stack (widths 15-50 x seeds), then control and extended (+2 latents)
    toy, l0 = p15_toy()
    seeds = list(range(P.seeds))
    base_jobs = p15_base_jobs(toy, l0, seeds, P.toy_batch_size)
    train_toy_saes(base_jobs, warm, cache=False, progress=False)
    capped = toy_training(steps, P.toy_batch_size)
    holder: dict[str, Any] = {}
    seconds = time_training(lambda: holder.update(bases=train_toy_saes(base_jobs, capped, cache=False, progress=False)), device)
    data = data_seconds(base_jobs, steps) * steps
    b = {"saes": len(base_jobs), "k": l0, "widths": P15_WIDTHS, "seeds": seeds, "steps": steps, "seconds": seconds,
         "ms_per_step": 1e3 * seconds / steps, "data_ms_per_step": 1e3 * data / steps, "data_share": data / seconds,
         "projected_seconds_full_base": seconds / steps * P.hedging_toy_steps, "full_steps": P.hedging_toy_steps}
    say(f"  04 P15 base stack ({len(base_jobs)} BatchTopK SAEs, K={l0:.2f}): {b['ms_per_step']:.2f} ms/step "
        f"(drawing the batches alone {b['data_ms_per_step']:.2f} ms, {100 * b['data_share']:.0f}%); "
        f"{P.hedging_toy_steps:,} steps -> {b['projected_seconds_full_base']:.0f}s")
    bases = holder["bases"]
    specs = {key: PairSpec(bases[key], job.stream, job.data, start_batch=steps, seed=key[0]) for key, job in base_jobs.items()}
    cont_steps = max(1, steps // 2)
    seconds = time_training(lambda: extension_pairs(specs, 2, toy_training(cont_steps, P.toy_batch_size), cache=False,
                                                    progress=False), device)
    b.update(continued_saes=2 * len(specs), continued_steps=cont_steps, continued_ms_per_step=1e3 * seconds / cont_steps,
             projected_seconds_full_continued=seconds / cont_steps * P.hedging_toy_steps)
    b["projected_seconds_full_p15"] = b["projected_seconds_full_base"] + b["projected_seconds_full_continued"]
    r["04_p15"] = b
    say(f"  04 P15 control + extended ({2 * len(specs)} SAEs): {b['continued_ms_per_step']:.2f} ms/step; "
        f"P15 in all at paper settings -> {b['projected_seconds_full_p15']:.0f}s")


# ---------------------------------------------------------------------------------------
# 4. LLM SAE training in bfloat16 and float32


def device_pool_stream(pool: torch.Tensor) -> Callable[[int], Any]:
    """A ``Stream`` cycling through a fixed pool of batches already on the device (so that the
    CPU does not draw Gaussian batches while the device waits)."""
    def stream(start: int):
        i = start
        while True:
            yield pool[i % len(pool)]
            i += 1
    return stream


def stage_llm(r: dict[str, Any], args: argparse.Namespace, device: torch.device, peaks: dict[str, float]) -> None:
    L = PROFILES["paper"].llm
    d, width, k, batch, steps = args.llm_d_model, args.llm_width, L.k, args.llm_batch, args.llm_steps
    r.update(d_model=d, width=width, k=k, batch=batch, steps=steps, architecture="batchtopk", lr=L.lr_batchtopk,
             device=str(device), flop_per_step=12 * batch * d * width)
    generator = torch.Generator().manual_seed(1234)
    pool = torch.randn(args.llm_pool, batch, d, generator=generator).to(device)
    stream = device_pool_stream(pool)
    jobs = {}
    for i in range(args.llm_saes):  # one stack of several SAEs, as a sweep trains; AuxK on once latents die
        with seeded(i):
            sae = make_sae(d, width, "batchtopk", k=k)
        jobs[i] = Job(sae, stream, {"gaussian": d, "batch": batch, "pool": args.llm_pool}, init={"seed": i}, label="llm")
    job = jobs[0]
    r.update(saes=len(jobs), dead_feature_window=args.llm_dead_window, flop_per_step=12 * batch * d * width * len(jobs))
    dtypes: dict[str, Any] = {}
    original_unstack = StackedSAEs.unstack

    def recording_unstack(self):  # the stack's own parameters, as training leaves them
        dtypes.update({name: str(p.dtype) for name, p in self.named_parameters()}, product_dtype=str(self.product_dtype))
        return original_unstack(self)

    out: dict[str, Any] = {}
    for precision in ("bfloat16", "float32"):
        with mock.patch.dict(os.environ, {"HEDGING_DEVICE": str(device)}), mock.patch.object(StackedSAEs, "unstack", recording_unstack):
            train_together(jobs, TrainSettings(steps=3, batch_size=batch, lr=L.lr_batchtopk, precision=precision),
                           progress=False)  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            settings = TrainSettings(steps=steps, batch_size=batch, lr=L.lr_batchtopk, precision=precision,
                                     dead_feature_window=args.llm_dead_window)
            holder: dict[str, Any] = {}
            seconds = time_training(lambda: holder.update(t=train_together(jobs, settings, progress=False)), device)
        trained = holder["t"][0]
        rate = r["flop_per_step"] * steps / seconds / 1e12
        entry = {"seconds": seconds, "ms_per_step": 1e3 * seconds / steps, "tflops": rate,
                 "share_of_bf16_peak": rate / peaks["bfloat16"] if peaks.get("bfloat16") else None,
                 "share_of_fp32_peak": rate / peaks["float32"] if peaks.get("float32") else None,
                 "stack_parameter_dtypes": dict(dtypes), "trained_dtypes": {n: str(getattr(trained, n).dtype) for n in WEIGHTS}}
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        # the final loss, measured on the last training batch and on a fresh one, in float32
        with torch.no_grad():
            model = StackedSAEs([trained], "float32").to(device)
            for name, x in (("last_batch", pool[(steps - 1) % len(pool)]), ("fresh_batch", torch.randn(batch, d, generator=torch.Generator().manual_seed(99)).to(device))):
                loss, acts = model.loss(x[None], steps, None)
                entry[f"loss_{name}"] = float(loss[0])
            entry["l0_fresh_batch"] = float((acts > 0).float().sum(-1).mean())
        out[precision] = (entry, trained)
        say(f"  {precision:9s} {entry['ms_per_step']:7.2f} ms/step  {rate:7.2f} TFLOP/s"
            + (f" = {100 * entry['share_of_bf16_peak']:.0f}% of the bf16 matmul peak" if entry["share_of_bf16_peak"] else "")
            + f"; loss {entry['loss_last_batch']:.4f}; stack parameters {sorted(set(v for n, v in dtypes.items() if n != 'product_dtype'))}"
            + f" (products {dtypes.get('product_dtype')})")
    (bf, bf_sae), (fp, fp_sae) = out["bfloat16"], out["float32"]
    r["bfloat16"], r["float32"] = bf, fp
    r["speedup_bf16"] = fp["seconds"] / bf["seconds"]
    r["loss_rel_difference"] = abs(bf["loss_last_batch"] - fp["loss_last_batch"]) / abs(fp["loss_last_batch"])
    r["loss_rel_difference_fresh"] = abs(bf["loss_fresh_batch"] - fp["loss_fresh_batch"]) / abs(fp["loss_fresh_batch"])
    rel = (bf_sae.W_dec.detach() - fp_sae.W_dec.detach()).norm(dim=1) / fp_sae.W_dec.detach().norm(dim=1)
    r["decoder_rel_difference_max"], r["decoder_rel_difference_mean"] = float(rel.max()), float(rel.mean())
    r["master_weights_float32"] = all(v == "torch.float32" for n, v in bf["stack_parameter_dtypes"].items() if n != "product_dtype") \
        and all(v == "torch.float32" for v in bf["trained_dtypes"].values())
    say(f"  bf16 speed-up {r['speedup_bf16']:.2f}x; loss rel diff {r['loss_rel_difference']:.2e} "
        f"(fresh batch {r['loss_rel_difference_fresh']:.2e}); decoder rows rel diff max {r['decoder_rel_difference_max']:.2e} "
        f"mean {r['decoder_rel_difference_mean']:.2e}; float32 master weights: {r['master_weights_float32']}")


# ---------------------------------------------------------------------------------------
# 5. Activation caching of a tiny random Gemma 3


def tiny_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` ids (<pad>, <eos>, <bos>, <unk>, then w4, w5, ...), saved
    in ``folder`` and loaded back from it (a local name, so nothing reloads it from the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_gemma3(vocab_size: int, layers: int, device: torch.device, tokenizer: Any):
    """A randomly initialised Gemma 3 of the 270M's shape (d_model 640, 4 heads of 256, one KV head,
    MLP 2,048) with ``layers`` layers and a small vocabulary, wrapped as ``load_model`` wraps the
    offline model (TransformerLens' ``HookedTransformer``, float32)."""
    from transformer_lens import HookedTransformer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with seeded(0):
        hf_model = Gemma3ForCausalLM(config).eval()
    return HookedTransformer.from_pretrained_no_processing(
        "google/gemma-3-270m", hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=torch.float32,
        first_n_layers=layers)


def stage_caching(r: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    from hedging_utils import activations

    vocab, layers, context = 1024, args.cache_layers, 128
    layer = layers - 1
    folder = Path(_SCRATCH) / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer", vocab)
    model = tiny_gemma3(vocab, layers, device, tokenizer)
    # a corpus of random words (= random token ids), as a .jsonl file
    rng = np.random.default_rng(0)
    corpus = folder / "random_words.jsonl"
    with corpus.open("w") as f:
        for _ in range(max(8, args.cache_tokens // 400)):
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(4, vocab, 500))}) + "\n")
    shard_sequences = 16
    r.update(model="tiny random Gemma 3 (270M shape)", layers=layers, layer=layer, vocab=vocab, context_size=context,
             shard_sequences=shard_sequences, device=str(device))
    sources, rates = {}, {}
    for precision in ("float32", "bfloat16", "float32"):  # float32 first once to warm up, then timed
        with mock.patch.dict(os.environ, {"HEDGING_CACHE_DIR": str(folder / f"cache_{precision}_{len(rates)}")}):
            start = time.perf_counter()
            out = activations.cache_activations("gemma-3-270m", [layer], str(corpus), context_size=context,
                                                n_tokens=args.cache_tokens, shard_sequences=shard_sequences,
                                                model_batch_sequences=16, device=str(device), loaded_model=model,
                                                precision=precision, progress=False)
            sync(device)
            seconds = time.perf_counter() - start
        source = out[layer]
        tokens = source.n_shards * shard_sequences * context
        sources[precision] = source
        rates[precision] = tokens / seconds
        r[f"tokens_per_second_{precision}"] = rates[precision]
        r["tokens"] = tokens
    fp_tokens, fp_acts = sources["float32"].load_all()
    bf_tokens, bf_acts = sources["bfloat16"].load_all()
    r["same_tokens"] = bool(torch.equal(fp_tokens, bf_tokens))
    r["stored_dtype_bfloat16_run"] = str(bf_acts.dtype)
    fp_acts, bf_acts = fp_acts[:, 1:].double(), bf_acts[:, 1:].double()  # BOS positions dropped
    rel = (bf_acts - fp_acts).norm(dim=-1) / fp_acts.norm(dim=-1)
    r["rel_error_mean"], r["rel_error_max"] = float(rel.mean()), float(rel.max())
    r["rel_error_total"] = float((bf_acts - fp_acts).norm() / fp_acts.norm())
    r["scale_float32"], r["scale_bfloat16"] = sources["float32"].scale, sources["bfloat16"].scale
    r["speedup_bf16"] = rates["bfloat16"] / rates["float32"]
    say(f"  {r['tokens']:,} tokens, layer {layer}: float32 {rates['float32']:,.0f} tok/s, bfloat16 {rates['bfloat16']:,.0f} tok/s "
        f"({r['speedup_bf16']:.2f}x); bf16 vs fp32 activations: relative error mean {r['rel_error_mean']:.2e}, "
        f"max {r['rel_error_max']:.2e}, total {r['rel_error_total']:.2e}; same tokens {r['same_tokens']}")


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "build" / "cuda_smoke.json"), help="the JSON report")
    parser.add_argument("--quick", action="store_true", help="a few steps everywhere (a CPU test of the script)")
    parser.add_argument("--stages", default="environment,equivalence,toy_speed,llm,caching",
                        help="comma-separated stages to run")
    parser.add_argument("--matmul-n", type=int, default=None, help="square matmul size of the peak (default 8192 CUDA, 2048 CPU)")
    parser.add_argument("--equivalence-paths", type=int, default=None, help="only the first N sweep/path pairs of the test")
    parser.add_argument("--cpu-cuda-steps", type=int, default=300, help="steps of the CPU-vs-device toy sweeps")
    parser.add_argument("--toy-steps", type=int, default=2000, help="capped steps of the paper-profile toy timings")
    parser.add_argument("--llm-steps", type=int, default=200)
    parser.add_argument("--llm-saes", type=int, default=4, help="SAEs trained together (one stack on a GPU)")
    parser.add_argument("--llm-dead-window", type=int, default=50, help="steps before a latent counts dead (AuxK)")
    parser.add_argument("--llm-width", type=int, default=PROFILES["paper"].llm.width)
    parser.add_argument("--llm-d-model", type=int, default=2304, help="Gemma-2-2b's residual width")
    parser.add_argument("--llm-batch", type=int, default=PROFILES["paper"].llm.batch_size)
    parser.add_argument("--llm-pool", type=int, default=16, help="distinct Gaussian batches, cycled, kept on the device")
    parser.add_argument("--cache-tokens", type=int, default=65_536)
    parser.add_argument("--cache-layers", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.equivalence_paths = args.equivalence_paths or 3
        args.cpu_cuda_steps, args.toy_steps, args.llm_steps = 30, 40, 4
        args.llm_width, args.llm_d_model, args.llm_batch, args.llm_pool = 1024, 256, 512, 2
        args.cache_tokens, args.cache_layers = 4096, 2

    device = training_device()
    report = Report(Path(args.out), args)
    say(f"cuda_smoke: device {device}, report -> {args.out}{' (quick)' if args.quick else ''}")
    peaks: dict[str, float] = {}
    stages = {
        "environment": lambda r: stage_environment(r, args, device, peaks),
        "equivalence": lambda r: stage_equivalence(r, args, device),
        "toy_speed": lambda r: stage_toy_speed(r, args, device),
        "llm": lambda r: stage_llm(r, args, device, peaks),
        "caching": lambda r: stage_caching(r, args, device),
    }
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    start = time.perf_counter()
    for name in wanted:
        report.stage(name, stages[name])
    report.data["total_seconds"] = round(time.perf_counter() - start, 1)
    report.data["summary"] = {name: report.data["stages"][name].get("ok") for name in wanted}
    report.write()
    say(f"\ncuda_smoke done in {report.data['total_seconds']}s: "
        + ", ".join(f"{n} {'ok' if ok else 'FAILED'}" for n, ok in report.data["summary"].items()))


if __name__ == "__main__":
    main()
