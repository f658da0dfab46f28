"""Toy-training throughput: a sweep of toy SAEs trained one at a time with SAELens' own
trainer, and the same sweep trained together as one stacked computation
(``hedging_utils.training``), in the same run, on the same batches.

Prints both throughputs in samples x SAEs per second, their ratio (goal: at least 5x), and how
far the batched SAEs are from the one-at-a-time ones next to how far an SAE trained on another
data seed is (training noise). Run with ``make benchmark`` or
``python benchmarks/toy_training.py [--saes 16 --steps 2000]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hedging_utils  # noqa: F401  (registers the SAE variants)
from hedging_utils.toys import ConditionalFiring, ToySetting, toy_job
from hedging_utils.training import TrainSettings, train_together, train_with_sae_lens


def decoder_cosines(a, b) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.W_dec, b.W_dec, dim=1).detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=int, default=16, help="SAEs in the sweep (an L1-coefficient sweep)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per SAE")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    # notebook 01's P4 toy: 4 features, f4 more likely when f3 fires; 4-latent L1 SAEs
    toy = ToySetting([0.25, 0.25, 0.25, 0.2], conditionals=[ConditionalFiring(3, 2, 0.2, 0.1)], d_model=50)
    coefficients = np.geomspace(1e-3, 3e-2, args.saes)
    jobs = {float(c): toy_job(toy, 4, batch_size=args.batch_size, seed=0, l1_coefficient=float(c)) for c in coefficients}
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size)
    work = args.saes * settings.samples
    print(f"{args.saes} toy SAEs (4 latents, D = 50, L1 sweep), {args.steps:,} steps of {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")

    start = time.perf_counter()
    one_at_a_time = {c: train_with_sae_lens(job, settings) for c, job in jobs.items()}
    sae_lens_seconds = time.perf_counter() - start
    start = time.perf_counter()
    together = train_together(jobs, settings, progress=False)
    batched_seconds = time.perf_counter() - start

    other_seed = toy_job(toy, 4, batch_size=args.batch_size, seed=1, stream_seed=1, l1_coefficient=float(coefficients[0]))
    noise = train_with_sae_lens(other_seed, settings)
    difference = max(float((together[c].W_dec - one_at_a_time[c].W_dec).detach().abs().max()) for c in jobs)
    seed_difference = float((noise.W_dec - one_at_a_time[float(coefficients[0])].W_dec).detach().abs().max())
    worst_cos = min(float(decoder_cosines(together[c], one_at_a_time[c]).min()) for c in jobs)

    ratio = sae_lens_seconds / batched_seconds
    print(f"one at a time (SAELens SAETrainer): {sae_lens_seconds:6.1f} s  {work / sae_lens_seconds:12,.0f} samples x SAEs / s")
    print(f"batched (hedging_utils.training):   {batched_seconds:6.1f} s  {work / batched_seconds:12,.0f} samples x SAEs / s")
    print(f"ratio: {ratio:.1f}x (goal >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    print(f"batched vs one at a time: max |W_dec difference| {difference:.2e}, min decoder cosine {worst_cos:.6f}; "
          f"training noise (another seed): max |W_dec difference| {seed_difference:.2e}")
    if not difference < seed_difference:
        raise SystemExit("batched SAEs differ from the one-at-a-time ones by more than another data seed does")


if __name__ == "__main__":
    main()
