"""Growing SAEs: extend an SAE by N latents, continue it beside an unchanged control on
identical batches, and grow an SAE group by group (paper §4 and A.7.1; the post's growing SAE).

Works on any SAELens training SAE whose latents are the columns of ``W_enc`` and rows of
``W_dec`` (standard, BatchTopK, and the balance-matryoshka variants of ``hedging_utils.variants``).
Training goes through ``hedging_utils.training``: every continued SAE is cached under its own
key, and the pairs of a sweep train together. The measurement these feed, the hedging
degree, is in ``hedging_utils.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from sae_lens.saes.sae import TrainingSAE

from hedging_utils.metrics import HedgingDegree, hedging_degree
from hedging_utils.profiles import ParameterError, check_positive_int
from hedging_utils.training import Job, Stream, TrainSettings, train_saes

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

    New latents start with encoder = decoder = a random direction of norm ``init_norm``, a
    zero encoder bias (and for JumpReLU SAELens' initial threshold); everything else is copied, so the original latents' activations are
    unchanged at initialisation. For L1 SAEs (``balance_matryoshka_standard``),
    ``l1_rewarmup_steps`` re-warms the L1 coefficient linearly from 0 with the floor
    ``l1_floor`` (lambda_min, A.7.1); if the coefficient is already <= lambda_min there is no warm-up.
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ParameterError(f"n_new={n_new!r}: an SAE is extended by at least 1 latent.")
    return _with_new_latents(sae, n_new, init_norm, seed, l1_rewarmup_steps, l1_floor)


def _with_new_latents(
    sae: TrainingSAE[Any], n_new: int, init_norm: float = 0.1, seed: int = 0, l1_rewarmup_steps: int | None = None,
    l1_floor: float | None = None,
) -> TrainingSAE[Any]:
    """``extend_sae`` without its check, so that ``n_new = 0`` gives a copy to continue (a
    control, with the same L1 re-warm-up and floor as its extended twin)."""
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
        elif name == "threshold":  # JumpReLU: the new latents start at SAELens' initial threshold
            value = torch.cat([value, value.new_full((n_new,), float(getattr(sae.cfg, "jumprelu_init_threshold", 0.01)))])
        elif value.ndim and value.shape[0] == old and name != "b_dec":
            raise NotImplementedError(f"don't know how to extend the per-latent tensor {name!r}")
        new_state[name] = value.clone()
    extended.load_state_dict(new_state)
    return extended


@dataclass
class ExtensionPair:
    """A base SAE continued unchanged (``control``) and with ``n_new`` latents (``extended``)."""

    control: TrainingSAE[Any]
    extended: TrainingSAE[Any]
    n_new: int


@dataclass
class PairSpec:
    """What a control/extended pair starts from: the base SAE, the stream it continues on
    from ``start_batch`` (identified by ``data``), and the seed of the new latents."""

    base: TrainingSAE[Any]
    stream: Stream
    data: dict[str, Any]
    start_batch: int = 0
    seed: int = 0


def extension_pairs(
    specs: Mapping[Any, PairSpec], n_new: int, settings: TrainSettings, *, cache: bool = True,
    progress: bool = True, **extend_kwargs: Any,
) -> dict[Any, ExtensionPair]:
    """Continue each base as a control and, on the same batches, as an extension by ``n_new``
    latents (``extend_sae`` with ``extend_kwargs``; an L1 re-warm-up and floor are given to the
    control too, so the new latents are the only difference). All pairs train together and
    every SAE is cached on its own (``data/cache/continued_saes``); ``progress``: their progress
    bars and timings."""
    jobs: dict[tuple[Any, str], Job] = {}
    for key, spec in specs.items():
        rewarm = {k: v for k, v in extend_kwargs.items() if k in ("l1_rewarmup_steps", "l1_floor")}
        control = _with_new_latents(spec.base, 0, **rewarm)
        extended = extend_sae(spec.base, n_new, seed=spec.seed, **extend_kwargs)
        for role, sae in (("control", control), ("extended", extended)):
            jobs[(key, role)] = Job(sae, spec.stream, spec.data, spec.start_batch, label=f"{role} {key}")
    trained = train_saes(jobs, settings, kind="continued_saes", cache=cache, progress=progress)
    return {key: ExtensionPair(trained[(key, "control")], trained[(key, "extended")], n_new) for key in specs}


def control_and_extended(
    base: TrainingSAE[Any], n_new: int, stream: Stream, settings: TrainSettings, *, data: dict[str, Any],
    start_batch: int = 0, seed: int = 0, cache: bool = True, **extend_kwargs: Any,
) -> ExtensionPair:
    """One pair of ``extension_pairs``: ``base`` continued for ``settings.steps`` steps from
    batch ``start_batch`` of ``stream`` as a control and extended by ``n_new`` latents. Any
    difference between the two is due only to the new latents."""
    spec = PairSpec(base, stream, data, start_batch, seed)
    return extension_pairs({"pair": spec}, n_new, settings, cache=cache, **extend_kwargs)["pair"]


def continue_training(
    sae: TrainingSAE[Any], stream: Stream, settings: TrainSettings, *, data: dict[str, Any], start_batch: int = 0,
    cache: bool = True,
) -> TrainingSAE[Any]:
    """A copy of ``sae`` trained further on ``stream`` from batch ``start_batch``."""
    job = Job(_with_new_latents(sae, 0), stream, data, start_batch)
    return train_saes({"sae": job}, settings, kind="continued_saes", cache=cache)["sae"]


def _continued_cfg(cfg: Any) -> Any:
    """The config for training further: an L1 warm-up already happened, so it is not repeated."""
    return replace(cfg, l1_warm_up_steps=0) if getattr(cfg, "l1_warm_up_steps", 0) else replace(cfg)


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
    data: dict[str, Any],
    seed: int = 0,
    **kwargs: Any,
) -> list[GrowthStep]:
    """Grow one SAE: ``grow_saes`` with a single chain (see there for the arguments)."""
    return grow_saes({"sae": PairSpec(base, stream, data, 0, seed)}, **kwargs)["sae"]


def grow_saes(
    starts: Mapping[Any, PairSpec],
    *,
    group_size: int,
    max_width: int,
    samples_per_group: int,
    total_samples: int,
    settings: TrainSettings,
    n_random_draws: int = 10,
    progress: Callable[[str], None] = print,
    **extend_kwargs: Any,
) -> dict[Any, list[GrowthStep]]:
    """Grow each start's ``base`` (trained on the first ``samples_per_group`` samples of its
    ``stream``) by ``group_size`` latents every ``samples_per_group`` samples up to
    ``max_width``, training every width to the same ``total_samples`` (the post's growing SAE).
    ``settings`` gives the batch size, learning rate and optimiser; its ``steps`` are replaced
    by each stage's. The chains (e.g. toys or seeds of an ablation) grow in lockstep, so the
    SAEs of each stage train together; each chain's ``seed`` seeds its new latents.
    ``extend_kwargs`` go to every extension (``extend_sae``), e.g. an L1 re-warm-up.

    Group k is added at sample k*T. Its measurement compares the SAE just before the group and
    the SAE with it, both continued from k*T to ``total_samples`` on identical batches (a
    control/extended pair), so every width is trained on the same total budget and the change
    of the existing latents is due to the group alone.
    """
    widths = {spec.base.cfg.d_sae for spec in starts.values()}
    if len(widths) != 1:
        raise ParameterError(f"the chains of grow_saes start at widths {sorted(widths)}; give bases of one width.")
    batch = settings.batch_size
    out: dict[Any, list[GrowthStep]] = {key: [] for key in starts}
    current = {key: spec.base for key, spec in starts.items()}
    width, k = widths.pop(), 1
    while width + group_size <= max_width:
        start = k * samples_per_group
        if start >= total_samples:
            raise ParameterError(
                f"total_samples={total_samples} ends before group {k} is added at sample {start}; raise it."
            )
        remaining = replace(settings, steps=max(1, (total_samples - start) // batch))
        specs = {key: PairSpec(current[key], spec.stream, spec.data, start // batch, spec.seed + k)
                 for key, spec in starts.items()}
        pairs = extension_pairs(specs, group_size, remaining, **extend_kwargs)
        for key, pair in pairs.items():
            degree = hedging_degree(pair.control, pair.extended, n_random_draws=n_random_draws, seed=specs[key].seed)
            out[key].append(GrowthStep(width, width + group_size, start, pair, degree))
            progress(f"  {'' if len(starts) == 1 else f'{key}: '}grew {width} -> {width + group_size} at sample "
                     f"{start:,}: portion of the change in the new latents' span {degree.portion_new:.3f} "
                     f"(random span {degree.portion_random:.3f})")
        if width + 2 * group_size > max_width:
            break
        # the growing SAEs themselves, trained until the next group: the same extension (same
        # seed) and batches as the extended SAE of this group's pair
        stages = {key: Job(extend_sae(current[key], group_size, seed=spec.seed, **extend_kwargs), spec.stream, spec.data,
                           start // batch)
                  for key, spec in specs.items()}
        stage_settings = replace(settings, steps=max(1, samples_per_group // batch))
        current = train_saes(stages, stage_settings, kind="continued_saes")
        width, k = width + group_size, k + 1
    return out


def grow_by_doubling(
    starts: Mapping[Any, PairSpec], *, doublings: int, samples_per_stage: int, settings: TrainSettings,
    double: bool = True, **extend_kwargs: Any,
) -> dict[Any, list[TrainingSAE[Any]]]:
    """Double each start's ``base`` ``doublings`` times (the post's growing SAE "extended by
    doubling"): each stage appends as many new latents as the SAE has (``extend_sae``, seeded
    by the start's ``seed`` plus the stage) and trains for ``samples_per_stage`` samples of the
    start's ``stream``, from its ``start_batch`` on. ``double=False`` gives the control: the
    same stages on the same batches without new latents. The starts (e.g. seeds) train in
    lockstep. ``extend_kwargs`` go to every extension (``extend_sae``), e.g. an L1 re-warm-up,
    which the control gets too. Returns, per start, the base and the SAE after every stage."""
    return _doubling_chains(starts, (double,), doublings, samples_per_stage, settings, extend_kwargs)[double]


def double_beside_control(
    starts: Mapping[Any, PairSpec], *, doublings: int, samples_per_stage: int, settings: TrainSettings, **extend_kwargs: Any,
) -> tuple[dict[Any, list[TrainingSAE[Any]]], dict[Any, list[TrainingSAE[Any]]]]:
    """``grow_by_doubling`` and its control (``double=False``: the same stages on the same
    batches without new latents, so that what more training alone does shows itself), both
    chains of every start trained together stage by stage. Returns (doubled, control), each as
    ``grow_by_doubling`` returns it; ``metrics.control_changes`` compares the two."""
    chains = _doubling_chains(starts, (True, False), doublings, samples_per_stage, settings, extend_kwargs)
    return chains[True], chains[False]


def _doubling_chains(
    starts: Mapping[Any, PairSpec], modes: tuple[bool, ...], doublings: int, samples_per_stage: int,
    settings: TrainSettings, extend_kwargs: dict[str, Any],
) -> dict[bool, dict[Any, list[TrainingSAE[Any]]]]:
    check_positive_int("doublings", doublings)
    steps = max(1, samples_per_stage // settings.batch_size)
    out = {double: {key: [spec.base] for key, spec in starts.items()} for double in modes}
    for stage in range(1, doublings + 1):
        jobs = {}
        for double in modes:
            for key, spec in starts.items():
                current = out[double][key][-1]
                n_new = current.cfg.d_sae if double else 0
                label = f"{key} stage {stage}, width {current.cfg.d_sae + n_new}{'' if double else ' (control)'}"
                jobs[(double, key)] = Job(_with_new_latents(current, n_new, seed=spec.seed + stage, **extend_kwargs), spec.stream,
                                          spec.data, spec.start_batch + (stage - 1) * steps, label=label)
        for (double, key), sae in train_saes(jobs, replace(settings, steps=steps), kind="continued_saes").items():
            out[double][key].append(sae)
    return out
