"""The precision of the language-model work: bfloat16 matrix products where the hardware does
them fast, float32 everywhere numbers are read.

Two computations are matmul-bound: running the model to cache its activations, and training
LLM-sized SAEs on them. On hardware with bfloat16 matrix units (x86 CPUs with AVX512-BF16 or
AMX, NVIDIA GPUs from Ampere on) both run their products in bfloat16: the model under
``torch.autocast`` (weights, norms, softmax and the stored activations stay float32), the SAE's
encoder and decoder products from bfloat16 copies of float32 weights (``StackedSAEs``), with
float32 master weights, gradients, Adam state, loss sums and everything a metric reads.
Toy SAEs are dispatch-bound and always train in float32.

The choice is made once per machine from what the hardware reports, never from a timing, so
the same machine always makes the same choice (and the same numbers); it is recorded in every
activation and SAE cache key and in each LLM figure's data. ``$HEDGING_PRECISION`` overrides
it: ``float32``, ``bfloat16`` or ``auto`` (the default).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from hedging_utils.profiles import ParameterError

PRECISION_ENV = "HEDGING_PRECISION"
PRECISIONS = ("float32", "bfloat16")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16 in
    ``/proc/cpuinfo``) and torch's oneDNN can use them. Elsewhere bfloat16 is emulated and
    slower than float32."""
    return _cpu_flags() & {"avx512_bf16", "amx_bf16"} != set() and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` does bfloat16 matrix products faster than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_bf16_units()
    return False


def matmul_precision(device: torch.device | str) -> str:
    """``bfloat16`` or ``float32``: the precision of the LLM work's matrix products on ``device``
    (``$HEDGING_PRECISION``, else ``bfloat16`` where ``fast_bf16``)."""
    chosen = os.environ.get(PRECISION_ENV, "auto") or "auto"
    if chosen not in (*PRECISIONS, "auto"):
        raise ParameterError(f"{PRECISION_ENV}={chosen!r} must be 'float32', 'bfloat16' or 'auto' (the default).")
    if chosen != "auto":
        return chosen
    return "bfloat16" if fast_bf16(device) else "float32"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ParameterError(f"precision={precision!r} must be one of {list(PRECISIONS)}.")
    return precision


def dtype_of(precision: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[check_precision(precision)]
