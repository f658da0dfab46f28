"""LLM SAE experiments on cached activations (``hedging_utils.activations``): SAEs trained
together on one activation stream (``train_llm_saes``), the recipes and matryoshka variants of
notebooks 04-06, the hedging-degree measurement of an SAE grown by a few latents, SAELens'
pretrained SAEs, and the latents' top examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from sae_lens.saes.sae import TrainingSAE

from hedging_utils.activations import ActivationSource
from hedging_utils.extension import ExtensionPair, GrowthStep, PairSpec, extension_pairs, grow_sae
from hedging_utils.metrics import HedgingDegree, hedging_degree
from hedging_utils.precision import matmul_precision
from hedging_utils.profiles import (LLMModel, LLMScale, MatryoshkaLLMScale, ParameterError, check_b_dec_init,
                                    check_positive_int)
from hedging_utils.training import (DEAD_FEATURE_WINDOW, Job, TrainSettings, make_sae, seeded, train_saes,
                                    training_device)


# ---------------------------------------------------------------------------------------
# SAE training on cached activations


def train_llm_sae(
    source: ActivationSource,
    d_sae: int,
    settings: TrainSettings,
    *,
    architecture: str = "standard",
    seed: int = 0,
    stream_seed: int = 0,
    label: str = "",
    window_bytes: int | None = None,
    b_dec_init: str = "zeros",
    **sae_cfg: Any,
) -> TrainingSAE[Any]:
    """Train a fresh SAE (any registered SAELens architecture, initialised with ``seed``, its
    decoder bias at ``b_dec_init``; ``sae_cfg`` goes to its config, e.g. ``k`` or
    ``l1_coefficient``) on the first ``settings.steps`` batches of
    ``source.stream(settings.batch_size, stream_seed, window_bytes=window_bytes)``.
    Cached on disk under every setting (``data/cache/llm_saes``), so reruns load it."""
    spec = LLMSAESpec(d_sae, architecture, seed, stream_seed, sae_cfg, label, b_dec_init)
    return train_llm_saes(source, {"sae": spec}, settings, window_bytes=window_bytes)["sae"]


@dataclass(frozen=True)
class LLMSAESpec:
    """A fresh SAE for ``train_llm_saes``: its width, SAELens architecture and config, the seed
    of its initialisation and the seed of its data stream (the order of the batches).

    ``b_dec_init`` is where its decoder bias starts: ``zeros`` (SAELens 6's trainer) or ``mean``,
    the mean of the first cached shard's training activations (SAELens 5's
    ``b_dec_init_method="mean"``); ``LLMScale.b_dec_init`` chooses it for notebooks 04 and 05,
    ``MatryoshkaLLMScale.b_dec_init`` for notebook 06."""

    d_sae: int
    architecture: str = "standard"
    seed: int = 0
    stream_seed: int = 0
    cfg: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    b_dec_init: str = "zeros"

    def __post_init__(self) -> None:
        check_b_dec_init(self.b_dec_init)


def train_llm_saes(
    source: ActivationSource, specs: Mapping[Any, LLMSAESpec], settings: TrainSettings, *,
    window_bytes: int | None = None, progress: bool = True,
) -> dict[Any, TrainingSAE[Any]]:
    """Train the fresh SAEs of ``specs`` on ``source`` (each on the first ``settings.steps``
    batches of its stream), a sweep at a time: SAEs of one shape train together as one stacked
    computation (``hedging_utils.training.train_saes``), those of one stream seed on the same
    batches. Each is cached on its own (``data/cache/llm_saes``), as ``train_llm_sae`` caches
    it, so reruns load it and an interrupted sweep resumes."""
    jobs = {name: llm_job(source, spec, settings.batch_size, window_bytes) for name, spec in specs.items()}
    return train_saes(jobs, settings, kind="llm_saes", progress=progress)


def llm_job(source: ActivationSource, spec: LLMSAESpec, batch_size: int, window_bytes: int | None = None) -> Job:
    """The training job of ``spec``'s fresh SAE on ``source`` (cached under ``llm_saes``)."""
    check_positive_int("d_sae", spec.d_sae)
    with seeded(spec.seed):
        sae = make_sae(source.d_model, spec.d_sae, spec.architecture, **spec.cfg)
    init: dict[str, Any] = {"seed": spec.seed}
    if spec.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(source.shard_training_tokens(0)[0].float().mean(0))
        init["b_dec"] = "mean of shard 0"
    stream = source.stream(batch_size, spec.stream_seed, window_bytes=window_bytes)
    return Job(sae, stream, stream.key(), init=init, label=spec.label or f"{spec.architecture} width {spec.d_sae}")


def llm_settings(tokens: int, batch_size: int, **kwargs: Any) -> TrainSettings:
    """Settings that train an LLM SAE on ``tokens`` tokens (whole batches of ``batch_size``), its
    encoder and decoder products in ``matmul_precision`` of the training device (bfloat16 where
    the hardware has bfloat16 units, else float32; ``hedging_utils.precision``). ``kwargs`` go
    to ``TrainSettings`` (``lr``, ``dead_feature_window``...)."""
    kwargs.setdefault("precision", llm_precision())
    return TrainSettings.for_samples(tokens, batch_size, **kwargs)


def llm_precision() -> str:
    """The precision of the LLM work's matrix products on the training device (model forward
    passes when caching, SAE encoder/decoder products when training): ``bfloat16`` where the
    hardware has bfloat16 units, else ``float32`` (``hedging_utils.precision``). Every LLM
    figure records it."""
    return matmul_precision(training_device())


@dataclass(frozen=True)
class SAERecipe:
    """How the LLM figures train a BatchTopK ('btk') or L1 ('l1') SAE at a profile's scale:
    its SAELens architecture, base and continued learning rates, config, and where its decoder
    bias starts (``LLMSAESpec``)."""

    architecture: str
    lr: float
    continued_lr: float
    cfg: dict[str, Any]
    b_dec_init: str = "zeros"

    @classmethod
    def at_scale(cls, scale: LLMScale, model: LLMModel, arch: str, *, k: int | None = None,
                 l1_multiple: float = 1.0, l1_coefficient: float | None = None,
                 b_dec_init: str | None = None) -> "SAERecipe":
        """BatchTopK with K = ``k`` (default ``scale.k``), or L1 with ``l1_multiple`` times the
        model's coefficient (or ``l1_coefficient`` itself) and the scale's warm-up; the decoder
        bias starts at ``b_dec_init`` (default ``scale.b_dec_init``)."""
        start = scale.b_dec_init if b_dec_init is None else b_dec_init
        if arch == "btk":
            return cls("batchtopk", scale.lr_batchtopk, scale.continued_lr_batchtopk, {"k": k or scale.k}, start)
        if arch == "l1":
            coefficient = model.l1_coefficient * l1_multiple if l1_coefficient is None else l1_coefficient
            return cls("standard", scale.lr_l1, scale.continued_lr_l1,
                       {"l1_coefficient": coefficient, "l1_warm_up_steps": scale.l1_warm_up_steps}, start)
        raise ParameterError(f"arch={arch!r} is not 'btk' or 'l1'.")

    def base_settings(self, scale: LLMScale) -> TrainSettings:
        return llm_settings(scale.base_tokens, scale.batch_size, lr=self.lr, dead_feature_window=scale.dead_feature_window)

    def base_sae(self, source: "ActivationSource", scale: LLMScale, width: int, seed: int) -> TrainingSAE[Any]:
        """The base SAE of ``hedging_spec``'s measurement (the same cache entry)."""
        label = f"{self.architecture} width {width} seed {seed}" + (f", b_dec at {self.b_dec_init}" if self.b_dec_init != "zeros" else "")
        spec = LLMSAESpec(width, self.architecture, seed, seed, self.cfg, label, self.b_dec_init)
        return train_llm_saes(source, {"sae": spec}, self.base_settings(scale))["sae"]

    def hedging_spec(self, source: "ActivationSource", scale: LLMScale, width: int, seed: int,
                     n_new: int | None = None, **kwargs: Any) -> "HedgingSpec":
        """The paper's hedging-degree measurement with this recipe at ``scale``: a base SAE of
        ``width`` on ``base_tokens``, extended by ``n_new`` latents (default ``scale.n_new``) and
        continued at the recipe's continued rate; ``kwargs`` replace ``HedgingSpec`` fields."""
        fields = dict(base_tokens=scale.base_tokens, continued_tokens=scale.continued_tokens, batch_size=scale.batch_size,
                      lr=self.lr, continued_lr=self.continued_lr, seed=seed, dead_feature_window=scale.dead_feature_window,
                      cfg=self.cfg, b_dec_init=self.b_dec_init)
        return HedgingSpec(source, width, n_new or scale.n_new, self.architecture, **{**fields, **kwargs})


@dataclass(frozen=True)
class MatryoshkaVariant:
    """One of notebook 06's LLM SAEs: a balance matryoshka BatchTopK SAE (``variants``) at the
    levels of a ``MatryoshkaLLMScale``, with balance ``multiplier`` (0: a standard BatchTopK SAE,
    whose loss is the outer level's alone; 1: a standard matryoshka SAE), ``loss`` ("mse",
    "l2" or "snap", on every level) and BatchTopK ``k``."""

    multiplier: float
    loss: str = "mse"
    k: int = 40

    @property
    def name(self) -> str:
        kind = "BatchTopK" if self.multiplier == 0 else ("matryoshka" if self.multiplier == 1 else f"balance x{self.multiplier:g}")
        return f"{kind} {self.loss.upper() if self.loss != 'snap' else 'snap'}"

    def spec(self, scale: MatryoshkaLLMScale, steps: int, seed: int) -> LLMSAESpec:
        """The SAE at ``scale``'s width and levels, initialised with ``seed`` (its decoder bias at
        ``scale.b_dec_init``) and trained on stream ``seed``; snap loss switches to L2 after
        ``scale.snap_fraction`` of ``steps``."""
        cfg: dict[str, Any] = {"k": self.k, "matryoshka_widths": scale.levels, "coefficient_multiplier": float(self.multiplier),
                               "reconstruction_loss": self.loss}
        if self.loss == "snap":
            cfg["snap_step"] = int(scale.snap_fraction * steps)
        return LLMSAESpec(scale.width, "balance_matryoshka_batchtopk", seed, seed, cfg,
                          label=f"{self.name} k {self.k} seed {seed}", b_dec_init=scale.b_dec_init)


def matryoshka_settings(scale: MatryoshkaLLMScale, batch_size: int, dead_feature_window: int) -> TrainSettings:
    """Notebook 06's training settings: ``scale.tokens`` in batches of ``batch_size`` at ``scale.lr``."""
    return llm_settings(scale.tokens, batch_size, lr=scale.lr, dead_feature_window=dead_feature_window)


def stream_key(source: ActivationSource, batch_size: int, stream_seed: int, *, window_bytes: int | None = None) -> dict[str, Any]:
    """What identifies ``source.stream(batch_size, stream_seed, window_bytes=...)`` in a cache key."""
    return source.stream(batch_size, stream_seed, window_bytes=window_bytes).key()


@torch.no_grad()
def latent_activations(sae: TrainingSAE[Any], source: ActivationSource, latents: Sequence[int], batch_size: int = 8192) -> torch.Tensor:
    """Activations [n_seq, ctx, len(latents)] of ``latents`` on every cached position
    (special tokens get 0), for top-activating examples. A cache larger than a stream's window
    is read shard by shard."""
    idx = torch.tensor(list(latents))
    shard_positions = int(source.settings["shard_sequences"]) * source.context_size
    full = torch.zeros(source.n_shards * shard_positions, len(latents))
    if source.window_shards() >= source.n_shards:
        parts = [(0, *source.training_tokens)]
    else:
        parts = ((i * shard_positions, *source.shard_training_tokens(i)) for i in range(source.n_shards))
    for offset, acts, positions in parts:
        out = torch.zeros(len(acts), len(latents))
        for i in range(0, len(acts), batch_size):
            out[i:i + batch_size] = sae.encode(acts[i:i + batch_size])[:, idx]
        full[offset + positions] = out
    return full.reshape(-1, source.context_size, len(latents))


def top_examples(
    values: torch.Tensor, tokens: torch.Tensor, tokenizer: Any, *, k: int = 10, window: int = 12
) -> list[dict[str, Any]]:
    """The ``k`` highest values [n_seq, ctx] of one latent, each with the text around it:
    ``before`` (up to ``window`` tokens), the ``token`` itself, ``after`` (4 tokens), and
    per-token activations of that window for a dashboard."""
    flat = values.reshape(-1)
    rows = []
    for rank, index in enumerate(torch.topk(flat, k).indices.tolist()):
        seq, pos = divmod(index, values.shape[1])
        lo, hi = max(1, pos - window), min(values.shape[1], pos + 5)
        ids = tokens[seq, lo:hi].tolist()
        pieces = [tokenizer.decode([t]) for t in ids]
        rows.append({"rank": rank, "sequence": seq, "position": pos, "activation": float(flat[index]),
                     "before": "".join(pieces[:pos - lo]), "token": pieces[pos - lo], "after": "".join(pieces[pos - lo + 1:]),
                     "window_tokens": pieces, "window_values": values[seq, lo:hi].tolist()})
    return rows


@dataclass
class HedgingMeasurement:
    """A base SAE, its control/extended pair and their hedging degree."""

    base: TrainingSAE[Any]
    pair: ExtensionPair
    degree: HedgingDegree
    l0: float


@dataclass(frozen=True)
class HedgingSpec:
    """One hedging-degree measurement of ``measure_hedgings`` (the paper's §4 procedure): a base
    SAE of ``width`` trained on ``base_tokens`` of ``source`` (initialisation and batch order
    from ``seed``), then a control and an extension by ``n_new`` latents continued on the next
    ``continued_tokens`` at ``continued_lr`` (default ``lr``). ``cfg`` goes to the SAE's config
    (e.g. ``k``, ``l1_coefficient``), ``extend_kwargs`` to ``extend_sae``; ``window_bytes`` bounds
    the activations a stream holds; ``b_dec_init`` where the base SAE's decoder bias starts
    (``LLMSAESpec``: ``zeros`` or ``mean``). ``SAERecipe.hedging_spec`` fills it at a profile's scale."""

    source: ActivationSource
    width: int
    n_new: int
    architecture: str
    base_tokens: int
    continued_tokens: int
    batch_size: int
    lr: float
    continued_lr: float | None = None
    seed: int = 0
    dead_feature_window: int = DEAD_FEATURE_WINDOW
    cfg: Mapping[str, Any] = field(default_factory=dict)
    extend_kwargs: Mapping[str, Any] = field(default_factory=dict)
    window_bytes: int | None = None
    b_dec_init: str = "zeros"

    def base_settings(self) -> TrainSettings:
        return llm_settings(self.base_tokens, self.batch_size, lr=self.lr, dead_feature_window=self.dead_feature_window)

    def continued_settings(self) -> TrainSettings:
        lr = self.lr if self.continued_lr is None else self.continued_lr
        return llm_settings(self.continued_tokens, self.batch_size, lr=lr, dead_feature_window=self.dead_feature_window)

    def base_spec(self) -> LLMSAESpec:
        return LLMSAESpec(self.width, self.architecture, self.seed, self.seed, dict(self.cfg),
                          label=f"{self.architecture} width {self.width} seed {self.seed}", b_dec_init=self.b_dec_init)


def measure_hedgings(specs: Mapping[Any, HedgingSpec], *, n_random_draws: int = 10,
                     progress: bool = True) -> dict[Any, "HedgingMeasurement"]:
    """Every measurement of ``specs`` (see ``HedgingSpec``), a sweep at a time: all base SAEs
    that share their training settings train together (stacked by shape, ``train_saes``), then
    all control/extended pairs that share theirs (``extension_pairs``), then each pair's hedging
    degree (``hedging_degree``). Every SAE is cached under the same key as when it is measured
    alone (``measure_hedging``)."""
    bases: dict[Any, TrainingSAE[Any]] = {}
    by_settings: dict[str, list[Any]] = {}
    for key, spec in specs.items():
        by_settings.setdefault(json.dumps(spec.base_settings().to_dict()), []).append(key)
    for keys in by_settings.values():
        settings = specs[keys[0]].base_settings()
        jobs = {key: llm_job(specs[key].source, specs[key].base_spec(), specs[key].batch_size, specs[key].window_bytes)
                for key in keys}
        bases.update(train_saes(jobs, settings, kind="llm_saes", progress=progress))
    pairs: dict[Any, ExtensionPair] = {}
    by_pair: dict[str, list[Any]] = {}
    for key, spec in specs.items():
        group = {"settings": spec.continued_settings().to_dict(), "n_new": spec.n_new, "extend": dict(spec.extend_kwargs)}
        by_pair.setdefault(json.dumps(group, sort_keys=True, default=str), []).append(key)
    for keys in by_pair.values():
        first = specs[keys[0]]
        pair_specs = {}
        for key in keys:
            spec = specs[key]
            stream = spec.source.stream(spec.batch_size, spec.seed, window_bytes=spec.window_bytes)
            pair_specs[key] = PairSpec(bases[key], stream, stream.key(), spec.base_settings().steps, spec.seed)
        pairs.update(extension_pairs(pair_specs, first.n_new, first.continued_settings(), **dict(first.extend_kwargs)))
    out = {}
    for key, spec in specs.items():
        pair = pairs[key]
        degree = hedging_degree(pair.control, pair.extended, n_random_draws=n_random_draws, seed=spec.seed)
        out[key] = HedgingMeasurement(bases[key], pair, degree, mean_l0(pair.control, spec.source))
    return out


def measure_hedging(
    source: ActivationSource,
    width: int,
    n_new: int,
    *,
    architecture: str,
    base_tokens: int,
    continued_tokens: int,
    batch_size: int,
    lr: float,
    continued_lr: float | None = None,
    seed: int = 0,
    n_random_draws: int = 10,
    dead_feature_window: int = DEAD_FEATURE_WINDOW,
    extend_kwargs: dict[str, Any] | None = None,
    window_bytes: int | None = None,
    b_dec_init: str = "zeros",
    **sae_cfg: Any,
) -> HedgingMeasurement:
    """One measurement of ``measure_hedgings``: train a base SAE on ``base_tokens``, then a
    control and an extension by ``n_new`` latents on the next ``continued_tokens`` (the same
    batches for both, at ``continued_lr``, default ``lr``), and measure the hedging degree.
    Token counts are used in whole batches. Every SAE is cached. ``window_bytes`` bounds the
    activations the stream holds (``ActivationSource.stream``); ``b_dec_init`` where the base SAE's
    decoder bias starts (``LLMSAESpec``)."""
    spec = HedgingSpec(source, width, n_new, architecture, base_tokens, continued_tokens, batch_size, lr, continued_lr, seed,
                       dead_feature_window, sae_cfg, extend_kwargs or {}, window_bytes, b_dec_init)
    return measure_hedgings({"m": spec}, n_random_draws=n_random_draws)["m"]


def grow_llm_sae(source: ActivationSource, scale: LLMScale, *, seed: int = 0, n_random_draws: int = 10) -> list[GrowthStep]:
    """The post's growing L1 SAE on ``source`` at the widths and tokens of ``scale`` (an
    ``LLMScale``): ``growing_start`` latents, a group of ``growing_group`` more every
    ``growing_group_tokens`` tokens up to ``growing_max``, every width trained to
    ``growing_total_tokens`` (``grow_sae``), at ``growing_lr``, its decoder bias started at
    ``b_dec_init``. Its L1 coefficient warms up from 0 over the first group and restarts at
    ``growing_l1_floor`` of itself over each later group (``growing_extension``), without which
    the added latents die. Every SAE is cached."""
    training = llm_settings(scale.growing_group_tokens, scale.batch_size, lr=scale.growing_lr)
    start = train_llm_sae(source, scale.growing_start, training, architecture="balance_matryoshka_standard", seed=seed,
                          stream_seed=seed, label="growing SAE start", b_dec_init=scale.b_dec_init,
                          l1_coefficient=scale.growing_l1_coefficient, l1_warm_up_steps=training.steps)
    return grow_sae(start, source.stream(scale.batch_size, seed), data=stream_key(source, scale.batch_size, seed),
                    group_size=scale.growing_group, max_width=scale.growing_max,
                    samples_per_group=scale.growing_group_tokens, total_samples=scale.growing_total_tokens,
                    settings=training, seed=seed, n_random_draws=n_random_draws, **growing_extension(scale))


def growing_extension(scale: LLMScale, steps: int | None = None) -> dict[str, Any]:
    """How the growing SAE adds latents (``extend_sae`` options): the L1 coefficient restarts at
    ``growing_l1_floor`` of itself and rises back over ``steps`` steps (default: one group's)."""
    steps = steps or max(1, scale.growing_group_tokens // scale.batch_size)
    return {"l1_rewarmup_steps": steps, "l1_floor": scale.growing_l1_floor * scale.growing_l1_coefficient}


def pretrained_sae_ids(release: str, prefix: str = "") -> list[str]:
    """The SAE ids of a release in SAELens' pretrained registry that start with ``prefix``
    (e.g. ``gemma-scope-2b-pt-res`` and ``layer_12/``), sorted by width then L0 where the ids
    say them (Gemma Scope's ``width_16k/average_l0_82``)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ParameterError(f"release={release!r} is not in SAELens' pretrained registry; see "
                             "sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory().")
    ids = [i for i in directory[release].saes_map if i.startswith(prefix)]
    if not ids:
        raise ParameterError(f"release {release!r} has no SAE id starting with {prefix!r}.")
    return sorted(ids, key=lambda i: (sae_id_width(i) or 0, sae_id_l0(i) or 0, i))


def sae_id_width(sae_id: str) -> int | None:
    """The width an SAE id states (``width_16k`` -> 16,384, ``width_1m`` -> 1,048,576), if any."""
    for part in sae_id.split("/"):
        if part.startswith("width_"):
            size = part[len("width_"):]
            unit = {"k": 2**10, "m": 2**20}.get(size[-1:].lower(), 1)
            return int(size.rstrip("kKmM")) * unit
    return None


def sae_id_l0(sae_id: str) -> float | None:
    """The average L0 an SAE id states (``average_l0_82`` -> 82), if any."""
    for part in sae_id.split("/"):
        if part.startswith("average_l0_"):
            return float(part[len("average_l0_"):])
    return None


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu") -> Any:
    """A published SAE through SAELens' pretrained registry (downloads it from the model hub)."""
    from sae_lens import SAE

    return SAE.from_pretrained(release, sae_id, device=device)


@torch.no_grad()
def mean_l0(sae: TrainingSAE[Any], source: ActivationSource, n_tokens: int = 16_384) -> float:
    """Mean number of active latents per token on the last ``n_tokens`` cached tokens."""
    return float((sae.encode(source.tail(n_tokens)) > 0).float().sum(1).mean())
