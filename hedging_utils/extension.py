"""Growing SAEs: extend an SAE by N latents, continue it beside an unchanged control on
identical batches, and grow an SAE group by group (paper §4 and A.7.1; the post's growing SAE).

Works on any SAELens training SAE whose latents are the columns of ``W_enc`` and rows of
``W_dec`` (standard, BatchTopK, and the balance-matryoshka variants of ``hedging_utils.variants``).
The measurement these feed, the hedging degree, is in ``hedging_utils.metrics``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from hedging_utils.cache import cached_dir
from hedging_utils.metrics import HedgingDegree, hedging_degree
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import Stream, quiet_progress, seeded

def extend_sae(
    sae: TrainingSAE[Any],
    n_new: int,
    *,
    init_norm: float = 0.1,
    seed: int = 0,
    l1_rewarmup_steps: int | None = None,
    l1_floor: float | None = None,
) -> TrainingSAE[Any]:
    """A copy of ``sae`` with ``n_new`` latents appended (to its outermost matryoshka level).

    New latents start with encoder = decoder = a random direction of norm ``init_norm`` and a
    zero encoder bias; everything else is copied, so the original latents' activations are
    unchanged at initialisation. For L1 SAEs (``balance_matryoshka_standard``),
    ``l1_rewarmup_steps`` re-warms the L1 coefficient linearly from 0 with the floor
    ``l1_floor`` (lambda_min, A.7.1); if the coefficient is already <= lambda_min there is no warm-up.
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ParameterError(f"n_new={n_new!r}: an SAE is extended by at least 1 latent.")
    old = sae.cfg.d_sae
    cfg = _continued_cfg(sae.cfg).to_dict()
    cfg["d_sae"] = old + n_new
    if cfg.get("matryoshka_widths"):
        cfg["matryoshka_widths"] = [*cfg["matryoshka_widths"][:-1], old + n_new]
    if l1_rewarmup_steps is not None:
        if "l1_floor" not in cfg:
            raise ParameterError(
                f"L1 re-warm-up needs an L1 SAE with a floor ('balance_matryoshka_standard'), not {sae.cfg.architecture()!r}."
            )
        floor = float(l1_floor or 0.0)
        if cfg["l1_coefficient"] > floor:
            cfg["l1_warm_up_steps"] = int(l1_rewarmup_steps)
            cfg["l1_floor"] = floor
    extended = type(sae)(type(sae.cfg).from_dict(cfg))

    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(n_new, sae.cfg.d_in, generator=generator)
    direction = init_norm * direction / direction.norm(dim=1, keepdim=True)
    new_state = {}
    for name, value in sae.state_dict().items():
        value = value.detach()
        if name == "W_enc":
            value = torch.cat([value, direction.T.to(value)], dim=1)
        elif name == "W_dec":
            value = torch.cat([value, direction.to(value)], dim=0)
        elif name == "b_enc":
            value = torch.cat([value, value.new_zeros(n_new)])
        elif value.ndim and value.shape[0] == old and name != "b_dec":
            raise NotImplementedError(f"don't know how to extend the per-latent tensor {name!r}")
        new_state[name] = value.clone()
    extended.load_state_dict(new_state)
    return extended


DEAD_FEATURE_WINDOW = 1000  # SAELens' default: steps without firing before a latent counts as dead


def trainer_config(
    training_samples: int, batch_size: int, lr: float, device: str = "cpu", dead_feature_window: int = DEAD_FEATURE_WINDOW
) -> SAETrainerConfig:
    """SAELens' trainer settings for continued training: constant learning rate, no logging
    (the same as SAELens' ``train_toy_sae``). A latent that has not fired for
    ``dead_feature_window`` steps counts as dead, which switches on the TopK/BatchTopK
    auxiliary loss (AuxK) that revives it; short runs need a short window."""
    return SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=training_samples, device=device, autocast=False,
        lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch_size,
        dead_feature_window=dead_feature_window, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )


def train_in_lockstep(
    saes: dict[str, TrainingSAE[Any]], batches: Iterator[torch.Tensor], training_samples: int, batch_size: int, lr: float,
    dead_feature_window: int = DEAD_FEATURE_WINDOW,
) -> dict[str, TrainingSAE[Any]]:
    """Train several SAEs on one shared stream (SAELens' ``MultiSAETrainer``): every batch
    goes to every SAE, each with its own optimizer."""
    import sae_lens.training.multi_sae_trainer as trainer_module

    with quiet_progress(trainer_module):
        trainer = MultiSAETrainer(
            cfg=trainer_config(training_samples, batch_size, lr, dead_feature_window=dead_feature_window),
            saes=saes,
            hook_names={name: "x" for name in saes},
            data_provider=({"x": batch} for batch in batches),
        )
        return trainer.fit()


@dataclass
class ExtensionPair:
    """A base SAE continued unchanged (``control``) and with ``n_new`` latents (``extended``)."""

    control: TrainingSAE[Any]
    extended: TrainingSAE[Any]
    n_new: int


def control_and_extended(
    base: TrainingSAE[Any],
    n_new: int,
    stream: Stream,
    *,
    training_samples: int,
    start_batch: int = 0,
    batch_size: int = 1024,
    lr: float = 3e-4,
    seed: int = 0,
    cache_key: dict[str, Any] | None = None,
    dead_feature_window: int = DEAD_FEATURE_WINDOW,
    **extend_kwargs: Any,
) -> ExtensionPair:
    """Continue ``base`` as a control and, in lockstep on the same batches, an extension of it
    by ``n_new`` latents, for ``training_samples`` samples from batch ``start_batch`` of
    ``stream``. Any difference between the two is due only to the new latents.

    With ``cache_key`` (the settings that identify ``stream``), the pair is cached on disk in
    SAELens format under that key, the base SAE's weights and these arguments, so a rerun or an
    interrupted run resumes from the pairs already trained.
    """
    def train() -> dict[str, TrainingSAE[Any]]:
        saes = {"control": _copy(base), "extended": extend_sae(base, n_new, seed=seed, **extend_kwargs)}
        with seeded(seed):
            return train_in_lockstep(saes, stream(start_batch), training_samples, batch_size, lr, dead_feature_window)

    if cache_key is None:
        trained = train()
        return ExtensionPair(trained["control"], trained["extended"], n_new)

    def build(path: Path) -> None:
        for name, sae in train().items():
            sae.save_model(path / name)

    settings = {"stream": cache_key, "base": weights_hash(base), "n_new": n_new, "samples": training_samples,
                "start_batch": start_batch, "batch_size": batch_size, "lr": lr, "seed": seed, "extend": extend_kwargs}
    if dead_feature_window != DEAD_FEATURE_WINDOW:
        settings["dead_feature_window"] = dead_feature_window
    path = cached_dir("extension_pairs", settings, build)
    return ExtensionPair(TrainingSAE.load_from_disk(path / "control"), TrainingSAE.load_from_disk(path / "extended"), n_new)


def continue_training(
    sae: TrainingSAE[Any], stream: Stream, *, training_samples: int, start_batch: int = 0, batch_size: int = 1024,
    lr: float = 3e-4, seed: int = 0,
) -> TrainingSAE[Any]:
    """Train a copy of ``sae`` further on ``stream`` from batch ``start_batch``."""
    with seeded(seed):
        return train_in_lockstep({"sae": _copy(sae)}, stream(start_batch), training_samples, batch_size, lr)["sae"]


def weights_hash(sae: TrainingSAE[Any]) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _continued_cfg(cfg: Any) -> Any:
    """The config for training further: an L1 warm-up already happened, so it is not repeated."""
    return replace(cfg, l1_warm_up_steps=0) if getattr(cfg, "l1_warm_up_steps", 0) else replace(cfg)


def _copy(sae: TrainingSAE[Any]) -> TrainingSAE[Any]:
    clone = type(sae)(_continued_cfg(sae.cfg))
    clone.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    return clone


@dataclass
class GrowthStep:
    """One added group of a growing SAE: the SAE before the group (continued to the end of the
    budget) and after it (trained on the same batches), with their hedging measurement."""

    width_before: int
    width_after: int
    added_at_sample: int
    pair: ExtensionPair
    degree: HedgingDegree


def grow_sae(
    base: TrainingSAE[Any],
    stream: Stream,
    *,
    group_size: int,
    max_width: int,
    samples_per_group: int,
    total_samples: int,
    batch_size: int = 1024,
    lr: float = 3e-4,
    seed: int = 0,
    cache_key: dict[str, Any] | None = None,
    n_random_draws: int = 10,
    progress: Callable[[str], None] = print,
    dead_feature_window: int = DEAD_FEATURE_WINDOW,
) -> list[GrowthStep]:
    """Grow ``base`` (trained on the first ``samples_per_group`` samples of ``stream``) by
    ``group_size`` latents every ``samples_per_group`` samples up to ``max_width``, training
    every width to the same ``total_samples`` (the post's growing SAE).

    Group k is added at sample k*T. Its measurement compares the SAE just before the group and
    the SAE with it, both continued from k*T to ``total_samples`` on identical batches (a
    control/extended pair), so every width is trained on the same total budget and the change
    of the existing latents is due to the group alone.
    """
    steps: list[GrowthStep] = []
    current, k = base, 1
    while current.cfg.d_sae + group_size <= max_width:
        start = k * samples_per_group
        if start >= total_samples:
            raise ParameterError(
                f"total_samples={total_samples} ends before group {k} is added at sample {start}; raise it."
            )
        width = current.cfg.d_sae
        pair = control_and_extended(
            current, group_size, stream, training_samples=total_samples - start, start_batch=start // batch_size,
            batch_size=batch_size, lr=lr, seed=seed + k, cache_key=cache_key, dead_feature_window=dead_feature_window,
        )
        degree = hedging_degree(pair.control, pair.extended, n_random_draws=n_random_draws, seed=seed + k)
        steps.append(GrowthStep(width, width + group_size, start, pair, degree))
        progress(f"  grew {width} -> {width + group_size} at sample {start:,}: portion of the change in the new "
                 f"latents' span {degree.portion_new:.3f} (random span {degree.portion_random:.3f})")
        if width + 2 * group_size <= max_width:  # the growing SAE itself, trained until the next group
            current = _next_stage(current, group_size, stream, start, samples_per_group, batch_size, lr, seed + k, cache_key,
                                  dead_feature_window)
        else:
            break
        k += 1
    return steps


def _next_stage(
    sae: TrainingSAE[Any], group_size: int, stream: Stream, start: int, samples: int, batch_size: int, lr: float,
    seed: int, cache_key: dict[str, Any] | None, dead_feature_window: int = DEAD_FEATURE_WINDOW,
) -> TrainingSAE[Any]:
    """The growing SAE after adding a group at ``start`` and training it for ``samples``: the
    same extension (same seed) and batches as the extended SAE of that group's pair."""
    def train() -> TrainingSAE[Any]:
        extended = extend_sae(sae, group_size, seed=seed)
        with seeded(seed):
            return train_in_lockstep({"extended": extended}, stream(start // batch_size), samples, batch_size, lr,
                                     dead_feature_window)["extended"]

    if cache_key is None:
        return train()
    settings = {"stream": cache_key, "base": weights_hash(sae), "group": group_size, "start": start, "samples": samples,
                "batch_size": batch_size, "lr": lr, "seed": seed}
    if dead_feature_window != DEAD_FEATURE_WINDOW:
        settings["dead_feature_window"] = dead_feature_window
    path = cached_dir("growing_stages", settings, lambda p: train().save_model(p))
    return TrainingSAE.load_from_disk(path)
