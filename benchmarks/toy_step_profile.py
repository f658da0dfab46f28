"""Per-step cost of stacked toy training (``hedging_utils.training._train_stacked``) on the toy
sweeps the notebooks train, and where it goes.

For each sweep it prints the milliseconds per optimiser step and per SAE-step (the best of
``--repeats`` runs of ``--steps`` steps, after a warm-up run), the share of a step spent drawing
the toy batches (``_stacked_batches`` alone, SAELens' synthetic sampler), and with ``--profile``
a cProfile top list of one run. The sweeps (``SWEEPS``), built with ``hedging_utils.toys.toy_job``
as the notebooks build them, at the ``small`` profile's batch sizes:

- ``01-four-feature``: notebook 01's P2-P5 toys x widths 3, 4; standard ReLU + L1 SAEs, D = 50,
  batches of 500 (8 SAEs, 4 data streams).
- ``01-l1-warm-up``: notebook 01's P11 L1 sweep (1 latent on the correlated pair), with an L1
  warm-up as the growing SAEs of notebook 04 use (4 SAEs, 1 stream).
- ``03-beta-sweep``: notebook 03's X-beta-sweep: balance-matryoshka standard SAEs (widths [1, 4]),
  7 betas x the P8 and P20 toys, batches of 128 (14 SAEs, 2 streams).
- ``02-snap``: notebook 02's single-latent pairs, MSE and snap loss (6 SAEs, 3 streams).
- ``04-p15-batchtopk``: notebook 04's P15 sweep: BatchTopK (K ~ 11) on the 50-feature correlated
  toy (D = 100), widths 15-50 x 2 seeds, batches of 500 (16 SAEs, 2 streams).

``benchmarks/toy_training.py`` compares the stacked path against SAELens' trainer end to end;
this one looks inside a step. Compare two versions of the package by running this script with
``PYTHONPATH`` set to each checkout, interleaved, on an otherwise idle machine::

    python benchmarks/toy_step_profile.py [--steps 300 --repeats 3 --profile --sweeps 01-four-feature]

Measured on the 2-core development machine (shared with other jobs, so +-20%; ``--threads 1``,
as two torch threads on a loaded 2-core machine made every step several times slower), 300
steps, best of 3, two interleaved rounds; before: the autograd loss, torch's Adam and the
per-SAE clip; after: closed-form gradients and a flat Adam for ReLU + L1 stacks
(``hedging_utils.training.ClosedFormStep``). ms per step / per SAE-step (share of the step
spent drawing the toy batches):

    sweep              SAEs   before              after               per SAE-step
    01-four-feature      8    2.67 / 0.334 (16%)  1.05 / 0.131 (48%)  2.5x  (4.1x without the data)
    01-l1-warm-up        4    1.42 / 0.354 ( 5%)  0.41 / 0.102 (25%)  3.5x
    03-beta-sweep       14    2.01 / 0.143 ( 3%)  0.76 / 0.054 ( 8%)  2.6x
    02-snap              6    2.02 / 0.337 (13%)  0.75 / 0.126 (43%)  2.7x  (4.0x without the data)
    04-p15-batchtopk    16    38 / 2.4 (12%)      unchanged at the time (BatchTopK kept the autograd loss)

The BatchTopK stacks without decoder-norm rescaling (P15's) later took the closed-form step too
(``ClosedFormStep`` with BatchTopK's kept entries, AuxK and the running threshold). Measured
interleaved against the autograd loss on an AVX2-only 2-core machine while another job ran at
low priority, 200 steps, best of 2: one thread 45.0 and 39.6 ms per step before, 35.9 and 34.6
after; two threads 21.8 and 18.1 before, 18.2 and 16.1 after (1.1-1.3x). Its step is bound by
arithmetic on [16, 500, 100] and [16, 50, 500] tensors and by the k-th value search (kthvalue,
2.7 ms of a step on two threads), not by autograd; in notebook 04 P15's base, pair and longer
runs took 806 s in all (``make figures`` on that machine).

cProfile of 01-four-feature (300 steps), top entries by own time: before, autograd's
``run_backward`` 0.34 s of 1.0 s, ``StackedSAEs.loss`` 0.07 s own (0.21 s with its ops),
``baddbmm`` 0.06 s, SAELens' ``FeatureDictionary.forward`` 0.03 s, ``bernoulli`` 0.025 s,
``torch.stack`` 0.023 s; after, SAELens' sampler leads (``FeatureDictionary.forward`` 0.06 s,
``bernoulli`` 0.026 s, ``nonzero`` 0.018 s), then ``baddbmm`` 0.053 s, ``bmm`` 0.029 s, and
``ClosedFormStep.__call__`` 0.175 s in all (0.58 ms a step under the profiler). The toy data is now
close to half of a step for sweeps of batch 500 with one stream per two SAEs; it is SAELens'
sampling, left as it is so that every batch stays bit-identical.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Callable

import numpy as np
import torch

import hedging_utils  # noqa: F401  (registers the SAE variants)
from hedging_utils import training
from hedging_utils.toys import ConditionalFiring, Hierarchy, ToySetting, conditional_pair, toy_job, toy_training
from hedging_utils.training import Job, TrainSettings

SMALL_TOY_BATCH, SMALL_BALANCE_BATCH = 500, 128


def four_feature() -> tuple[dict, TrainSettings]:
    probs = [0.25, 0.25, 0.25, 0.2]
    toys = {
        "P2": ToySetting(probs, d_model=50),
        "P3": ToySetting(probs, hierarchies=[Hierarchy(2, (3,))], d_model=50),
        "P4": ToySetting(probs, conditionals=[ConditionalFiring(3, 2, 0.2, 0.1)], d_model=50),
        "P5": ToySetting(probs, conditionals=[ConditionalFiring(3, 2, 0.1, 0.2)], d_model=50),
    }
    jobs = {(name, w): toy_job(toy, w, batch_size=SMALL_TOY_BATCH, l1_coefficient=1e-3) for name, toy in toys.items() for w in (3, 4)}
    return jobs, toy_training(1, SMALL_TOY_BATCH)


def l1_warm_up() -> tuple[dict, TrainSettings]:
    toy = conditional_pair(0.25, 0.2, 0.1, d_model=50)
    jobs = {float(c): toy_job(toy, 1, batch_size=SMALL_TOY_BATCH, l1_coefficient=float(c), l1_warm_up_steps=10_000)
            for c in np.geomspace(1e-3, 0.3, 4)}
    return jobs, toy_training(1, SMALL_TOY_BATCH)


def beta_sweep() -> tuple[dict, TrainSettings]:
    def children(probs):
        return ToySetting([0.25, *probs], hierarchies=[Hierarchy(0, tuple(range(1, len(probs) + 1)))], d_model=50)

    toys = {"P8": children([0.15, 0.15, 0.15]), "P20": children([0.02, 0.2, 0.5])}
    jobs = {(name, float(b)): toy_job(toy, 4, batch_size=SMALL_BALANCE_BATCH, architecture="balance_matryoshka_standard",
                                      l1_coefficient=3e-2, matryoshka_widths=[1], level_coefficients=[float(b)])
            for name, toy in toys.items() for b in np.round(np.linspace(0, 0.5, 7), 4)}
    return jobs, toy_training(1, SMALL_BALANCE_BATCH)


def snap() -> tuple[dict, TrainSettings]:
    toys = {name: conditional_pair(0.25, *ps, d_model=50) for name, ps in
            {"hierarchical": (0.2, 0.0), "correlated": (0.2, 0.1), "anti-correlated": (0.1, 0.2)}.items()}
    losses = {"MSE": dict(reconstruction_loss="mse"), "snap": dict(reconstruction_loss="snap", snap_step=0)}
    jobs = {(name, loss): toy_job(toy, 1, batch_size=SMALL_TOY_BATCH, architecture="balance_matryoshka_standard",
                                  l1_coefficient=1e-3, **cfg)
            for name, toy in toys.items() for loss, cfg in losses.items()}
    return jobs, toy_training(1, SMALL_TOY_BATCH)


def p15_batchtopk() -> tuple[dict, TrainSettings]:
    from sae_lens.synthetic import generate_random_correlation_matrix

    n = 50
    correlation = generate_random_correlation_matrix(n, min_correlation_strength=0.3, max_correlation_strength=0.9,
                                                     uncorrelated_ratio=0.3, positive_ratio=0.5, seed=42)
    probabilities = 0.345 * (n - 1 - np.arange(n)) / n + 0.05
    toy = ToySetting(probabilities.tolist(), correlation_matrix=correlation.tolist(), magnitude_std=0.15, d_model=100,
                     feature_seed=42)
    jobs = {(s, w): toy_job(toy, w, batch_size=SMALL_TOY_BATCH, seed=s, stream_seed=10_000 + s, init="random",
                            architecture="batchtopk", k=11.0, rescale_acts_by_decoder_norm=False)
            for s in (0, 1) for w in (15, 20, 25, 30, 35, 40, 45, 50)}
    return jobs, toy_training(1, SMALL_TOY_BATCH)


SWEEPS: dict[str, Callable[[], tuple[dict, TrainSettings]]] = {
    "01-four-feature": four_feature,
    "01-l1-warm-up": l1_warm_up,
    "03-beta-sweep": beta_sweep,
    "02-snap": snap,
    "04-p15-batchtopk": p15_batchtopk,
}


def train_seconds(jobs: list[Job], settings: TrainSettings) -> float:
    start = time.perf_counter()
    training._train_stacked(jobs, settings, None)
    return time.perf_counter() - start


def data_seconds(jobs: list[Job], steps: int) -> float:
    start = time.perf_counter()
    batches = training._stacked_batches(jobs)
    for _ in range(steps):
        next(batches)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweeps", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--profile", action="store_true", help="print a cProfile top list of one run per sweep")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hedging_utils from {training.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.steps} steps, best of {args.repeats}")
    for name in args.sweeps:
        by_name, base = SWEEPS[name]()
        settings = TrainSettings(steps=args.steps, batch_size=base.batch_size, lr=base.lr, adam_betas=base.adam_betas)
        jobs = list(by_name.values())
        train_seconds(jobs, TrainSettings(steps=20, batch_size=base.batch_size, adam_betas=base.adam_betas))  # warm-up
        best = min(train_seconds(jobs, settings) for _ in range(args.repeats))
        data = min(data_seconds(jobs, args.steps) for _ in range(args.repeats))
        per_step = 1e3 * best / args.steps
        print(f"{name:18s} {len(jobs):2d} SAEs  {per_step:6.2f} ms/step  {per_step / len(jobs):6.3f} ms/SAE-step  "
              f"(data {1e3 * data / args.steps:5.2f} ms/step, {data / best:4.0%})", flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            training._train_stacked(jobs, settings, None)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
            lines = out.getvalue().splitlines()
            start = next(i for i, line in enumerate(lines) if "ncalls" in line)
            print("\n".join(["   " + line for line in lines[start - 4:start + args.top + 1] if line.strip()]), flush=True)


if __name__ == "__main__":
    main()
