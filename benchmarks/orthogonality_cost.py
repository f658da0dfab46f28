"""Cost of the decoder-orthogonality penalty against the SAE's width: the post's pairwise form
(every pair, quadratic) and OrtSAE's chunked form (random chunks of ``chunk_size`` latents,
K = ceil(width / chunk_size); linear), forward and backward, on a random decoder.

Prints the time of one penalty evaluation plus its gradient per width, and the chunked form's
time per latent, which stays about flat once the width exceeds one chunk (linear cost), while
the pairwise form's grows with the width. OrtSAE's chunk size is 8,192; the default here is
1,024 so that several chunks fit in a CPU's memory and time (the scaling is the same; pass
``--chunk-size 8192 --widths 8192 16384 32768`` for theirs). Run with ``make benchmark`` or
``python benchmarks/orthogonality_cost.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from hedging_utils.orthogonality import chunk_partition, chunked_penalty, n_chunks_for, pairwise_penalty, step_generator


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--pairwise-max", type=int, default=8192, help="skip the pairwise form above this width (memory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"d_in {args.d_in}, chunk size {args.chunk_size}, {torch.get_num_threads()} thread(s)")
    print(f"{'width':>8} {'chunks':>7} {'chunked ms':>11} {'µs/latent':>10} {'pairwise ms':>12}")
    per_latent = []
    for width in args.widths:
        w = torch.randn(width, args.d_in, requires_grad=True)
        k = n_chunks_for(width, args.chunk_size)

        def chunked() -> None:
            chunked_penalty(w, chunk_partition(width, k, step_generator(0, 0))).backward()

        def pairwise() -> None:
            pairwise_penalty(w).backward()

        t_chunked = timed(chunked, args.repeats)
        t_pairwise = timed(pairwise, args.repeats) if width <= args.pairwise_max else float("nan")
        per_latent.append(t_chunked / width)
        print(f"{width:>8} {k:>7} {t_chunked * 1e3:>11.1f} {t_chunked / width * 1e6:>10.2f} {t_pairwise * 1e3:>12.1f}")
    growth = per_latent[-1] / per_latent[0]
    print(f"chunked cost per latent, widest vs narrowest: x{growth:.2f} (linear cost: about 1; quadratic: "
          f"x{args.widths[-1] / args.widths[0]:.0f})")


if __name__ == "__main__":
    main()
