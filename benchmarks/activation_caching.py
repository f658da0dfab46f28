"""Activation-caching throughput of the default model and layer in float32 and with bfloat16
products, against this machine's matmul speed.

    python benchmarks/activation_caching.py [--tokens 32768] [--layer 9]

Caches activations of the offline corpus with ``hedging_utils.activations.cache_activations`` (into a
temporary cache folder, so nothing is reused) once per precision, and prints tokens/s, the
model's arithmetic per token up to that layer, the FLOP/s this reaches, and its share of the
FLOP/s of a plain float32 and bfloat16 matrix multiply of similar shape measured on the same
machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from hedging_utils import activations
from hedging_utils.precision import fast_bf16
from hedging_utils.profiles import PROFILES
from hedging_utils.training import training_device


def precisions(force_bf16: bool = False) -> tuple[str, ...]:
    """The precisions to measure: bfloat16 only where the device multiplies it natively (or when
    asked), since elsewhere it is emulated and a single product takes tens of seconds (one
    4,096 x 640 x 2,048 product: 22 s against 0.16 s in float32 on an AVX2-only CPU), which is
    also why the LLM work runs in float32 there (``hedging_utils.precision``)."""
    device = training_device()
    if force_bf16 or fast_bf16(device):
        return ("float32", "bfloat16")
    print(f"bfloat16: not measured: {'this CPU' if device.type == 'cpu' else device} has no bfloat16 matrix units (emulated, far slower than float32; "
          "the LLM work runs in float32 here); --force-bf16 measures it anyway")
    return ("float32",)


def matmul_flops(n: int = 4096, d: int = 640, h: int = 2048, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, h, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n * d * h * repeats / (time.perf_counter() - start)


def flops_per_token(model, layer: int, context_size: int) -> float:
    """2 x the weights of blocks 0..layer (each weight is one multiply-add per token) plus the
    attention scores and mixing over an average causal context of context_size / 2."""
    weights = sum(p.numel() for block in model.blocks[: layer + 1] for name, p in block.named_parameters() if p.ndim >= 2)
    attention = (layer + 1) * 2 * 2 * (context_size / 2) * model.cfg.n_heads * model.cfg.d_head
    return 2 * weights + attention


def main() -> None:
    small = PROFILES["small"].llm
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=small.models[0].name)
    parser.add_argument("--layer", type=int, default=small.models[0].layer)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--context-size", type=int, default=small.context_size)
    parser.add_argument("--force-bf16", action="store_true", help="measure bfloat16 where it is emulated too")
    args = parser.parse_args()
    measured = precisions(args.force_bf16)

    print(f"torch threads: {torch.get_num_threads()}")
    model = activations.load_model(args.model)
    tokens = -(-args.tokens // (small.shard_sequences * args.context_size)) * small.shard_sequences * args.context_size
    per_token = flops_per_token(model, args.layer, args.context_size)
    peaks = {p: matmul_flops(d=model.cfg.d_model, dtype=getattr(torch, p)) for p in measured}
    print(f"{args.model} layer {args.layer}, context {args.context_size}, {tokens:,} tokens; model arithmetic "
          f"{per_token / 1e6:.1f} MFLOP/token; matmul here: " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in measured))
    rates = {}
    for precision in measured:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["HEDGING_CACHE_DIR"] = cache
            start = time.perf_counter()
            activations.cache_activations(args.model, [args.layer], "offline", context_size=args.context_size, n_tokens=args.tokens,
                                  shard_sequences=small.shard_sequences, loaded_model=model, precision=precision,
                                  progress=False)
            elapsed = time.perf_counter() - start
        rates[precision] = tokens / elapsed
        achieved = rates[precision] * per_token
        print(f"  {precision:9s} {rates[precision]:8,.0f} tokens/s = {achieved / 1e9:6.1f} GFLOP/s: "
              + ", ".join(f"{100 * achieved / peaks[p]:3.0f}% of {p}" for p in measured) + " matmul")
    if "bfloat16" in rates:
        print(f"  bfloat16 speed-up: {rates['bfloat16'] / rates['float32']:.2f}x")


if __name__ == "__main__":
    main()
