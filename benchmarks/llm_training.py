"""LLM-sized SAE training in float32 and bfloat16, against this machine's own matmul speed.

    python benchmarks/llm_training.py [--steps 12]

Trains stacks of SAEs of the LLM notebooks' shapes (d_model 640, Gemma 3 270M's) with
``hedging_utils.training.train_together`` on Gaussian batches, once with float32 products and
once with bfloat16 products (``TrainSettings.precision``), and prints for each the time per step,
tokens x SAEs per second, the arithmetic rate (12 x batch x d_in x width FLOP per SAE and step:
encoder and decoder products forward, and their two gradients each backward) and its share of
the float32 and bfloat16 matrix-product throughput measured here on a square 2,048 product.
"""

from __future__ import annotations

import argparse
import time

import torch

import hedging_utils  # noqa: F401  (registers the SAE variants)
from activation_caching import matmul_flops, precisions  # benchmarks/ is on the path when a script here runs
from hedging_utils.training import Job, TrainSettings, make_sae, seeded, train_together

CONFIGS = {
    # name: (architecture, width, batch, SAEs in the stack, config)
    "issue shape: L1, width 2,048, batch 4,096": ("standard", 2048, 4096, 1, {"l1_coefficient": 1.0}),
    "notebook 04: BatchTopK, width 256, batch 1,024 x 4": ("batchtopk", 256, 1024, 4, {"k": 25}),
    "notebook 06: matryoshka BatchTopK, width 512, batch 1,024 x 6": (
        "balance_matryoshka_batchtopk", 512, 1024, 6, {"k": 40, "matryoshka_widths": [2, 8, 32, 128],
                                                        "coefficient_multiplier": 0.5}),
}


def gaussian_stream(d: int, batch: int):
    def stream(start: int):
        generator = torch.Generator().manual_seed(start)
        while True:
            yield torch.randn(batch, d, generator=generator)
    return stream


def time_config(arch: str, width: int, batch: int, n_saes: int, cfg: dict, precision: str, steps: int) -> float:
    d = 640
    jobs = {}
    for i in range(n_saes):
        with seeded(i):
            sae = make_sae(d, width, arch, **cfg)
        jobs[i] = Job(sae, gaussian_stream(d, batch), {"gaussian": d, "batch": batch}, init={"seed": i})
    settings = TrainSettings(steps=2, batch_size=batch, precision=precision)
    train_together(jobs, settings, progress=False)  # warm-up (oneDNN primitives, allocator)
    settings = TrainSettings(steps=steps, batch_size=batch, precision=precision)
    start = time.perf_counter()
    train_together(jobs, settings, progress=False)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--force-bf16", action="store_true", help="measure bfloat16 where it is emulated too")
    args = parser.parse_args()
    measured = precisions(args.force_bf16)
    peaks = {p: matmul_flops(2048, 2048, 2048, repeats=10, dtype=getattr(torch, p)) for p in measured}
    print(f"torch threads: {torch.get_num_threads()}; matmul 2048^3: " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in measured))
    for name, (arch, width, batch, n_saes, cfg) in CONFIGS.items():
        flop = 12 * batch * 640 * width * n_saes
        times = {p: time_config(arch, width, batch, n_saes, cfg, p, args.steps) for p in measured}
        print(name)
        for p, t in times.items():
            rate = flop / t
            print(f"  {p:9s} {1e3 * t:7.1f} ms/step  {batch * n_saes / t:10,.0f} tokens x SAEs/s  {rate / 1e9:6.1f} GFLOP/s "
                  "= " + ", ".join(f"{100 * rate / peaks[q]:3.0f}% of {q}" for q in measured) + " matmul")
        if "bfloat16" in times:
            print(f"  bfloat16 speed-up: {times['float32'] / times['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()
