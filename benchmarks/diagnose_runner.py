"""The paper's SAE variants trained through SAELens' own ``LanguageModelSAETrainingRunner`` on the
offline model, saved, then diagnosed from the command line (issue 25's "done when").

Trains a balance-matryoshka BatchTopK SAE and a snap-loss BatchTopK SAE (``hedging_utils.variants``,
registered with SAELens when ``hedging_utils.diagnose`` is imported) on Gemma 3 270M's layer-6
residual stream and the offline corpus, for ``--tokens`` tokens each, and saves each where the runner
puts it (``--out``/<name>: inference weights, cfg.json and runner_cfg.json). Then, for each, prints
and times the command a user runs::

    python -m hedging_utils.diagnose --sae <out>/<name> --tokens 65536 --new-latents 16 --out <out>/<name>-diagnosis

Run: ``python benchmarks/diagnose_runner.py --out /tmp/diagnose-demo`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "balance-matryoshka-btk": {"architecture": "balance_matryoshka_batchtopk", "k": 32,
                               "matryoshka_widths": [64, 256, 512], "coefficient_multiplier": 0.5},
    "snap-btk": {"architecture": "balance_matryoshka_batchtopk", "k": 32, "reconstruction_loss": "snap"},
}


def train(out: Path, tokens: int, layer: int) -> dict[str, Path]:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.registry import get_sae_training_class

    import hedging_utils.diagnose  # noqa: F401  (registers the variants with SAELens)
    from hedging_utils.activations import load_model
    from hedging_utils.text import load_corpus

    started = time.perf_counter()
    model = load_model("gemma-3-270m")
    dataset = load_corpus("offline")
    print(f"model and corpus loaded in {time.perf_counter() - started:.0f}s", flush=True)
    batch = 1024
    steps = tokens // batch
    saved = {}
    for name, spec in VARIANTS.items():
        spec = dict(spec)
        arch = spec.pop("architecture")
        if spec.get("reconstruction_loss") == "snap":
            spec["snap_step"] = steps // 2
        cfg_cls = get_sae_training_class(arch)[1]
        # SAELens scales activations to mean norm sqrt(d_in) while training and folds the scale into the saved SAE
        sae_cfg = cfg_cls(d_in=640, d_sae=512, normalize_activations="expected_average_only_in", **spec)
        path = out / name
        cfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg, model_name="google/gemma-3-270m", hook_name=f"blocks.{layer}.hook_resid_post",
            dataset_path="offline", is_dataset_tokenized=False, streaming=False, context_size=128,
            training_tokens=tokens, train_batch_size_tokens=batch, store_batch_size_prompts=8, n_batches_in_buffer=16,
            lr=2e-3, lr_warm_up_steps=0, n_batches_for_norm_estimate=8, lr_decay_steps=0, dead_feature_window=max(1, steps // 10), device="cpu",
            exclude_special_tokens=True, prepend_bos=True, n_checkpoints=0, checkpoint_path=None,
            output_path=str(path), logger=LoggingConfig(log_to_wandb=False), verbose=False, seed=0,
        )
        t0 = time.perf_counter()
        LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
        print(f"trained {name} through SAELens' LanguageModelSAETrainingRunner ({steps} steps of {batch} tokens) "
              f"in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)
        saved[name] = path
    return saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/diagnose-demo")
    p.add_argument("--tokens", type=int, default=131_072, help="training tokens of each SAE")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--diagnose-tokens", type=int, default=65_536)
    args = p.parse_args()
    out = Path(args.out)
    saved = train(out, args.tokens, args.layer)
    for name, path in saved.items():
        command = [sys.executable, "-m", "hedging_utils.diagnose", "--sae", str(path), "--tokens", str(args.diagnose_tokens),
                   "--new-latents", "16", "--out", str(out / f"{name}-diagnosis")]
        print("$ " + " ".join(["python", *command[1:]]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "HEDGING_TEXT_PROGRESS": "1"})
        print(f"diagnosis of {name}: {time.perf_counter() - t0:.0f}s wall, load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
