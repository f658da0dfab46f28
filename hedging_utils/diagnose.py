"""How much does *this* SAE hedge? Eq. 7's hedging degree for any SAELens SAE, in one call or one command.

``diagnose(sae, activations, n_new_latents=..., tokens=..., seeds=...)`` takes any SAELens SAE
(standard, TopK, BatchTopK, JumpReLU, matryoshka and this project's balance-matryoshka,
snap-loss and orthogonality-penalised variants; training or inference form) and activations in the units it was trained on,
and runs the paper's §4 procedure on it:

1. the SAE's *training form* (``training_form``): an inference SAE is converted back to the
   SAELens training architecture it came from (a saved runner config says which; else a
   JumpReLU SAE whose latents share one threshold is a saved BatchTopK SAE, with K its mean L0
   on the activations; else the inference architecture's own training class), so that it
   continues with its own loss;
2. for each seed, a control (the SAE continued unchanged) and a copy extended by
   ``n_new_latents`` latents continue on the same ``tokens`` activations, batch for batch, at a
   stated learning rate (``hedging_utils.extension.extension_pairs``; the seed draws the new
   latents and the order of the batches);
3. the hedging degree of each pair (``hedging_utils.metrics.hedging_degree``): eq. 7's h, the
   authors' clamped rate and the post's portion, and every original latent's projection.

The result (``Diagnosis``) holds a summary (``HedgingSummary``: h ± its spread over seeds, the
random-span baseline's spread, the clamped rate, the portion, and a three-valued verdict on
"this SAE hedges") and tidy tables (one row per seed; one row per seed and original latent).

From a shell (offline by default, on the packaged Gemma 3 270M and the offline corpus)::

    python -m hedging_utils.diagnose --sae PATH --layer 6 --tokens 65536 --new-latents 16 --out DIR
    python -m hedging_utils.diagnose --release R --sae-id ID --model NAME --layer L --corpus PATH ...

writes ``diagnosis.json``, ``seeds.csv``, ``latents.csv`` and ``diagnosis.png`` into ``DIR``.
Every argument is checked before anything is computed (``check_cli``).

Call it as ``hedging_utils.diagnose(sae, activations, ...)`` (this module is callable as its
``diagnose`` function, and loads on first use) or ``from hedging_utils.diagnose import diagnose``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class
from sae_lens.saes.sae import SAE, TrainingSAE

from hedging_utils import orthogonality as _orthogonality  # noqa: F401  (registers the orthogonality-penalised SAEs)
from hedging_utils import variants as _variants  # noqa: F401  (registers the paper's architectures with SAELens)
from hedging_utils.extension import ExtensionPair, PairSpec, extension_pairs
from hedging_utils.figures import Check, verdict
from hedging_utils.metrics import HedgingDegree, hedging_degree
from hedging_utils.precision import check_precision
from hedging_utils.profiles import ParameterError, check_positive_int, check_seed
from hedging_utils.training import Stream, TrainSettings

# ---------------------------------------------------------------------------------------
# Settings


DEFAULT_LR = 1e-3
"""The continued learning rate unless told otherwise: the ``small`` profile's continued rate for
BatchTopK SAEs (``profiles.SMALL_LLM``), large enough for a change to show in tens of thousands of
tokens. The paper's is 3e-4 (BatchTopK) or 7e-5 (L1) over 250M tokens; pass ``lr`` to match it."""

HEDGES_CLAIM = "the SAE hedges: h > 0 beyond its noise (spread over seeds, or the random-span noise if larger)"


@dataclass(frozen=True)
class DiagnoseSettings:
    """How a diagnosis continues the SAE.

    Attributes:
        n_new_latents: N, the latents the extended copy gets (the paper: 64 at width 8,192).
        tokens: activations (samples) each control and extended SAE continues on, in whole batches.
        seeds: one control/extended pair per seed; a seed draws the new latents and the order of
            the batches. The spread of h over seeds is its noise; one seed has no spread.
        batch_size: activations per training step.
        lr: Adam's constant learning rate for the continued training (``DEFAULT_LR``).
        dead_feature_window: steps without firing before a latent counts as dead, which switches
            on TopK/BatchTopK's auxiliary loss that revives it (the new latents start small and
            need it); None: a tenth of the steps, at least 1, at most SAELens' 1,000.
        init_norm: the new latents' encoder and decoder norm at the start (``extend_sae``).
        n_random_draws: random N-dimensional spans of eq. 7's baseline, per seed.
        precision: ``float32`` or ``bfloat16`` encoder/decoder products (``hedging_utils.precision``).
    """

    n_new_latents: int = 16
    tokens: int = 65_536
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 1024
    lr: float = DEFAULT_LR
    dead_feature_window: int | None = None
    init_norm: float = 0.1
    n_random_draws: int = 10
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_positive_int("n_new_latents", self.n_new_latents)
        check_positive_int("tokens", self.tokens)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("n_random_draws", self.n_random_draws)
        seeds = self.seeds
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = tuple(range(check_positive_int("seeds", seeds)))
        seeds = tuple(seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ParameterError(f"seeds={self.seeds!r}: give a number of seeds or distinct seeds, at least one.")
        for s in seeds:
            check_seed("seeds", s)
        object.__setattr__(self, "seeds", seeds)
        if self.tokens < self.batch_size:
            raise ParameterError(f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size}); "
                                 "raise tokens or lower batch_size.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ParameterError(f"lr={self.lr!r} must be a positive learning rate.")
        if not (isinstance(self.init_norm, (int, float)) and self.init_norm > 0):
            raise ParameterError(f"init_norm={self.init_norm!r} must be > 0.")
        if self.dead_feature_window is not None:
            check_positive_int("dead_feature_window", self.dead_feature_window)
        check_precision(self.precision)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def window(self) -> int:
        return self.dead_feature_window or min(1000, max(1, self.steps // 10))

    def train_settings(self) -> TrainSettings:
        return TrainSettings(steps=self.steps, batch_size=self.batch_size, lr=float(self.lr),
                             dead_feature_window=self.window, precision=self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds), "steps": self.steps,
                "dead_feature_window": self.window}


# ---------------------------------------------------------------------------------------
# The SAE's training form


_WARM_UPS = ("l1_warm_up_steps", "l0_warm_up_steps", "lr_warm_up_steps")


def training_form(
    sae: SAE[Any] | TrainingSAE[Any], training_cfg: Mapping[str, Any] | None = None, activations: torch.Tensor | None = None,
) -> tuple[TrainingSAE[Any], list[str]]:
    """A SAELens training SAE with ``sae``'s weights, ready to continue training with its own
    loss, and notes saying every choice made on the way.

    ``training_cfg``: the training config it was trained with (a runner config's ``sae`` entry,
    or any fields to set, e.g. ``{"architecture": "batchtopk", "k": 40}``); its ``architecture``
    picks the training class. Without it a training SAE is copied as it is, and an inference
    SAE takes the training class of its architecture, except that a JumpReLU SAE whose latents
    share one threshold is taken for a saved BatchTopK SAE (SAELens saves BatchTopK so), with K
    its mean L0 on ``activations``.

    For continued training every warm-up is off (it happened), activations are not normalised
    (``activations`` are in the SAE's units) and a snap-loss SAE continues with the L2 loss it
    ended training on (snap step 0)."""
    notes: list[str] = []
    given = dict(training_cfg or {})
    source_arch = sae.cfg.architecture()
    if isinstance(sae, TrainingSAE) and not given:
        arch = source_arch
        base = sae.cfg.to_dict()
    else:
        base = sae.cfg.to_dict()
        arch = given.get("architecture")
        if arch is None:
            arch = source_arch
            threshold = getattr(sae, "threshold", None)
            threshold = threshold.detach() if threshold is not None else None
            if source_arch == "jumprelu" and threshold is not None and threshold.numel() > 1 \
                    and bool((threshold == threshold.flatten()[0]).all()) and float(threshold.flatten()[0]) > 0:
                if activations is None:
                    raise ParameterError("sae: a JumpReLU SAE with one shared threshold (a saved BatchTopK SAE) needs "
                                         "activations to estimate its K; pass training_cfg={'architecture': 'batchtopk', 'k': K}.")
                with torch.no_grad():
                    l0 = float((sae.encode(activations[:4096].to(sae.W_dec.dtype)) > 0).float().sum(1).mean())
                arch = "batchtopk"
                given["k"] = max(1.0, round(l0, 2))
                notes.append(f"a JumpReLU SAE whose latents share one threshold ({float(threshold.flatten()[0]):.4g}) is "
                             f"taken for a saved BatchTopK SAE and continued as one, with K = its mean L0 {given['k']:g}")
        if arch not in SAE_TRAINING_CLASS_REGISTRY:
            raise ParameterError(
                f"sae: architecture {arch!r} has no SAELens training class; pass training_cfg with an 'architecture' "
                f"among {sorted(SAE_TRAINING_CLASS_REGISTRY)}.")
        if arch != source_arch:
            notes.append(f"{source_arch} SAE continued as a {arch} training SAE")
    _, cfg_cls = get_sae_training_class(arch)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    cfg = {k: v for k, v in {**base, **given}.items() if k in names}
    cfg["d_in"], cfg["d_sae"] = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    for name in ("device", "dtype"):
        cfg.pop(name, None)
    for name in _WARM_UPS:
        if cfg.get(name):
            notes.append(f"{name} {cfg[name]} -> 0 (the warm-up happened in training)")
            cfg[name] = 0
    if cfg.get("normalize_activations", "none") != "none":
        notes.append(f"normalize_activations {cfg['normalize_activations']!r} -> 'none' (activations are given in the SAE's units)")
        cfg["normalize_activations"] = "none"
    if cfg.get("reconstruction_loss") == "snap" and cfg.get("snap_step"):
        notes.append(f"snap loss continues with the L2 loss it ended training on (snap_step {cfg['snap_step']} -> 0)")
        cfg["snap_step"] = 0
    if "matryoshka_widths" in cfg and cfg["matryoshka_widths"] and cfg["matryoshka_widths"][-1] != cfg["d_sae"]:
        raise ParameterError(f"training_cfg: matryoshka_widths {cfg['matryoshka_widths']} do not end at the SAE's "
                             f"width {cfg['d_sae']}.")
    sae_cls, cfg_cls = get_sae_training_class(arch)
    out = sae_cls(cfg_cls.from_dict({**cfg, "architecture": arch}))
    state = {k: v.detach().float().cpu().clone() for k, v in sae.state_dict().items()}
    target = out.state_dict()
    if "topk_threshold" in target and "topk_threshold" not in state:
        shared = state.pop("threshold", None)
        state["topk_threshold"] = (shared.flatten()[0] if shared is not None else torch.tensor(0.0)).double()
    for name in list(state):
        if name not in target:
            notes.append(f"{name} dropped (the {arch} training SAE has none)")
            del state[name]
    missing = [k for k in target if k not in state]
    if missing:
        raise ParameterError(f"sae: its weights lack {missing} that a {arch} training SAE needs; pass a training_cfg "
                             "whose architecture matches the SAE.")
    out.load_state_dict({k: state[k].to(target[k].dtype) for k in target})
    return out, notes


# ---------------------------------------------------------------------------------------
# Activations


@dataclass
class TensorStream:
    """A ``Stream`` over activations held in memory: epoch e is one shuffle of the rows with the
    generator seeded (``seed``, e), cut into whole batches, so batch b is always the same."""

    activations: torch.Tensor
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.per_epoch = len(self.activations) // self.batch_size

    def __call__(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        epoch, j = divmod(start_batch, self.per_epoch)
        while True:
            order = torch.randperm(len(self.activations), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for i in range(j, self.per_epoch):
                yield self.activations[order[i * self.batch_size:(i + 1) * self.batch_size]]
            epoch, j = epoch + 1, 0


StreamFactory = Callable[[int, int], Stream]
"""``factory(batch_size, seed)``: a ``Stream`` of the SAE's activations whose batch order follows ``seed``."""


def _streams(activations: Any, batch_size: int) -> tuple[StreamFactory, dict[str, Any], int, torch.Tensor]:
    """(stream factory, what identifies the activations, their width, an evaluation sample)."""
    from hedging_utils.activations import ActivationSource

    if isinstance(activations, ActivationSource):
        source = activations
        sample = source.tail(min(8192, source.n_training_tokens))
        return (lambda b, s: source.stream(b, s)), {"activations": source.settings}, source.d_model, sample
    if callable(activations) and not isinstance(activations, (torch.Tensor, np.ndarray)):
        factory = activations
        sample = next(iter(factory(batch_size, 1_000_003)(0)))
        return factory, {"stream_factory": getattr(factory, "__qualname__", repr(factory))}, int(sample.shape[-1]), sample
    x = torch.as_tensor(np.asarray(activations) if isinstance(activations, np.ndarray) else activations).detach().float().cpu()
    if x.ndim != 2:
        raise ParameterError(f"activations have shape {tuple(x.shape)}; give a [n, d_in] matrix (flatten batch and position).")
    if len(x) < batch_size:
        raise ParameterError(f"activations hold {len(x)} rows, fewer than batch_size={batch_size}; give more or lower batch_size.")
    digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
    return (lambda b, s: TensorStream(x, b, s)), {"activations": digest, "rows": len(x)}, int(x.shape[1]), x[-8192:]


# ---------------------------------------------------------------------------------------
# The diagnosis


@dataclass
class HedgingSummary:
    """The headline numbers of a diagnosis.

    Attributes:
        h: eq. 7's hedging degree, mean over seeds.
        h_spread: its standard deviation over seeds (NaN with one seed).
        h_random_spread: the spread of eq. 7's random-span baseline (mean over seeds of the std
            over random draws), the noise floor of a single measurement.
        hedging_rate, hedging_rate_spread: the authors' clamped, normalised rate (their Figure 15's
            "hedging degree"), mean and std over seeds.
        portion_new, portion_new_spread: the post's portion, the share of the original latents'
            squared change inside the new latents' span; ``portion_random`` the same for random
            spans (about N / d_in).
        new_latents_alive: the share of new latents that fire on the evaluation sample, mean over
            seeds (0: they never learned anything, and h says nothing).
        verdict: ``holds`` / ``departs`` / ``inconclusive`` for ``HEDGES_CLAIM``: h beyond twice its
            noise (the larger of ``h_spread`` and ``h_random_spread``); inconclusive with one seed,
            and when no new latent fires (``new_latents_alive`` 0);
            ``check`` has the numbers.
        settings: the ``DiagnoseSettings`` used; ``sae``: the SAE's architecture, training form,
            widths and the notes of ``training_form``.
    """

    h: float
    h_spread: float
    h_random_spread: float
    hedging_rate: float
    hedging_rate_spread: float
    portion_new: float
    portion_new_spread: float
    portion_random: float
    new_latents_alive: float
    verdict: str
    check: dict[str, Any]
    settings: dict[str, Any]
    sae: dict[str, Any]

    def line(self) -> str:
        s = self.settings
        return (f"h = {self.h:.4f} ± {self.h_spread:.4f} (spread over {len(s['seeds'])} seeds; random-span noise "
                f"{self.h_random_spread:.4f}) | clamped rate {self.hedging_rate:.4f} ± {self.hedging_rate_spread:.4f} | "
                f"portion {self.portion_new:.4f} (random spans {self.portion_random:.4f}) | new latents alive "
                f"{self.new_latents_alive:.0%} | hedges (h > 2 x noise): {self.verdict}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Diagnosis:
    """A diagnosis: its ``summary``, one row per seed (``seeds``), one row per seed and original
    latent (``latents``: ``projection_new``, ``projection_random``, their difference ``excess``
    and the latent's change ``delta_norm``), the SAE's training form and each seed's pair."""

    summary: HedgingSummary
    seeds: pd.DataFrame
    latents: pd.DataFrame
    training_sae: TrainingSAE[Any]
    pairs: dict[int, ExtensionPair] = field(repr=False, default_factory=dict)

    def __str__(self) -> str:
        return self.summary.line()

    def save(self, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write ``diagnosis.json`` (summary, settings and ``extra``), ``seeds.csv``,
        ``latents.csv`` and ``diagnosis.png`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "diagnosis.json", "seeds": out / "seeds.csv", "latents": out / "latents.csv",
                 "plot": out / "diagnosis.png"}
        record = {"summary": self.summary.to_dict(), "line": self.summary.line(), **dict(extra or {})}
        paths["json"].write_text(json.dumps(_jsonable(record), indent=1))
        self.seeds.to_csv(paths["seeds"], index=False, float_format="%.6g")
        self.latents.to_csv(paths["latents"], index=False, float_format="%.6g")
        fig = plot_diagnosis(self)
        fig.savefig(paths["plot"], dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return paths


def diagnose(
    sae: SAE[Any] | TrainingSAE[Any],
    activations: Any,
    *,
    n_new_latents: int = 16,
    tokens: int = 65_536,
    seeds: int | Sequence[int] = 3,
    batch_size: int = 1024,
    lr: float = DEFAULT_LR,
    training_cfg: Mapping[str, Any] | None = None,
    dead_feature_window: int | None = None,
    init_norm: float = 0.1,
    n_random_draws: int = 10,
    precision: str = "float32",
    cache: bool = False,
    progress: bool = True,
) -> Diagnosis:
    """Diagnose how much ``sae`` hedges (see the module's docstring for the procedure).

    Args:
        sae: any SAELens SAE, training or inference form (``training_form`` converts it).
        activations: what the SAE reads, in the units it was trained on: a [n, d_in] tensor or
            array (shuffled per seed, epochs repeat if ``tokens`` exceeds n), an
            ``hedging_utils.activations.ActivationSource``, or a factory ``(batch_size, seed) -> Stream``.
        n_new_latents, tokens, seeds, batch_size, lr, dead_feature_window, init_norm,
            n_random_draws, precision: see ``DiagnoseSettings``; ``seeds`` is a count (seeds
            0..n-1) or the seeds themselves.
        training_cfg: the SAE's training config, or fields of it (``training_form``).
        cache: keep the continued SAEs in the project's cache (``data/cache/continued_saes``), so
            a rerun loads them.
        progress: progress bars and timings.
    """
    settings = DiagnoseSettings(n_new_latents, tokens, seeds, batch_size, lr, dead_feature_window, init_norm, n_random_draws,
                                precision)
    if not isinstance(sae, (SAE, TrainingSAE)):
        raise ParameterError(f"sae is a {type(sae).__name__}, not a SAELens SAE; load it with SAE.load_from_disk or SAE.from_pretrained.")
    factory, data, width, sample = _streams(activations, settings.batch_size)
    if width != sae.cfg.d_in:
        raise ParameterError(f"activations have width {width} but the SAE's d_in is {sae.cfg.d_in}; give the activations "
                             "of the hook the SAE was trained on.")
    base, notes = training_form(sae, training_cfg, sample)
    base.eval()
    train = settings.train_settings()
    streams = {s: factory(settings.batch_size, s) for s in settings.seeds}
    keys = {s: {**data, "batch_size": settings.batch_size, "stream_seed": s} for s in settings.seeds}
    specs = {s: PairSpec(base, streams[s], keys[s], 0, s) for s in settings.seeds}
    pairs = extension_pairs(specs, settings.n_new_latents, train, cache=cache, progress=progress,
                            init_norm=settings.init_norm)
    return _measure(sae, base, notes, pairs, settings, sample)


def _measure(sae: Any, base: TrainingSAE[Any], notes: list[str], pairs: Mapping[int, ExtensionPair],
             settings: DiagnoseSettings, sample: torch.Tensor) -> Diagnosis:
    rows, latent_frames = [], []
    for s, pair in pairs.items():
        degree: HedgingDegree = hedging_degree(pair.control, pair.extended, n_random_draws=settings.n_random_draws, seed=s)
        with torch.no_grad():
            acts = pair.extended.encode(sample.to(pair.extended.W_dec.dtype))
            control_l0 = float((pair.control.encode(sample.to(pair.control.W_dec.dtype)) > 0).float().sum(1).mean())
        alive = float((acts[:, base.cfg.d_sae:] > 0).any(0).float().mean())
        rows.append({"seed": s, **degree.summary(), "new_latents_alive": alive, "control_l0": control_l0,
                     "extended_l0": float((acts > 0).float().sum(1).mean())})
        latent_frames.append(pd.DataFrame({"seed": s, "latent": np.arange(len(degree.projection_new)),
                                           "projection_new": degree.projection_new,
                                           "projection_random": degree.projection_random,
                                           "excess": degree.projection_new - degree.projection_random,
                                           "delta_norm": degree.delta_norm}))
    per_seed = pd.DataFrame(rows)
    latents = pd.concat(latent_frames, ignore_index=True)

    def spread(column: str) -> float:
        return float(per_seed[column].std(ddof=1)) if len(per_seed) > 1 else float("nan")

    # the noise of h: its spread over seeds, or the random-span baseline's spread where that is larger
    noise = max(spread("h"), float(per_seed["h_random_spread"].mean()))
    with contextlib.redirect_stdout(io.StringIO()):
        claim: Check = verdict(HEDGES_CLAIM, float(per_seed["h"].mean()), noise if len(per_seed) > 1 else float("nan"),
                               detail={"h_per_seed": per_seed["h"].tolist()})
    summary = HedgingSummary(
        h=float(per_seed["h"].mean()), h_spread=spread("h"), h_random_spread=float(per_seed["h_random_spread"].mean()),
        hedging_rate=float(per_seed["hedging_rate"].mean()), hedging_rate_spread=spread("hedging_rate"),
        portion_new=float(per_seed["portion_new"].mean()), portion_new_spread=spread("portion_new"),
        portion_random=float(per_seed["portion_random"].mean()), new_latents_alive=float(per_seed["new_latents_alive"].mean()),
        verdict=claim.verdict, check=dataclasses.asdict(claim), settings=settings.to_dict(),
        sae={"architecture": sae.cfg.architecture(), "form": "training" if isinstance(sae, TrainingSAE) else "inference",
             "training_architecture": base.cfg.architecture(), "d_in": int(base.cfg.d_in), "d_sae": int(base.cfg.d_sae),
             "training_cfg": {k: v for k, v in base.cfg.to_dict().items() if k not in ("metadata",)}, "notes": notes})
    if summary.new_latents_alive == 0:  # they learned only through a dead-latent loss, if at all: nothing was handed over
        summary.verdict = "inconclusive"
        summary.check = {**summary.check, "verdict": "inconclusive",
                         "value": {**(summary.check.get("value") or {}), "reason": "no new latent fired"}}
        summary.sae["notes"].append("no new latent fired on the evaluation sample, so none took a feature over and the "
                                    "verdict is inconclusive whatever h is; raise tokens or lr, or lower dead_feature_window")
    return Diagnosis(summary, per_seed, latents, base, dict(pairs))


def plot_diagnosis(diagnosis: Diagnosis):
    """Two panels: (a) h per seed with its mean ± spread over seeds and the random-span noise;
    (b) the original latents' projections onto the new latents' span against random spans."""
    import matplotlib.pyplot as plt

    s, per_seed, lat = diagnosis.summary, diagnosis.seeds, diagnosis.latents
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.bar([str(x) for x in per_seed["seed"]], per_seed["h"], color="tab:blue", alpha=0.7,
           yerr=per_seed["h_random_spread"], capsize=3, label="h per seed (± random-span noise)")
    ax.axhline(s.h, color="black", lw=1, label=f"mean {s.h:.4f} ± {s.h_spread:.4f}")
    if np.isfinite(s.h_spread):
        ax.axhspan(s.h - s.h_spread, s.h + s.h_spread, color="grey", alpha=0.2)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="seed", ylabel="h (eq. 7)", title=f"(a) hedging degree: {s.verdict}")
    ax.legend(fontsize=7)
    ax = axes[1]
    bins = np.linspace(0, float(max(lat["projection_new"].max(), lat["projection_random"].max(), 1e-9)), 30)
    ax.hist(lat["projection_random"], bins=bins, alpha=0.5, label="random spans")
    ax.hist(lat["projection_new"], bins=bins, alpha=0.5, label="new latents' span")
    ax.set(xlabel="‖Proj(δ_i)‖ per original latent", ylabel="latents (all seeds)",
           title=f"(b) {s.sae['training_architecture']} {s.sae['d_sae']} + {s.settings['n_new_latents']} latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Loading an SAE from disk or a release


RUNNER_CONFIGS = ("runner_cfg.json", "runner_config.json")
"""Where SAELens' runners save their config beside the SAE (``LanguageModelSAETrainingRunner``,
``SyntheticSAERunner``); its ``sae`` entry is the training config."""


@dataclass
class LoadedSAE:
    """An SAE loaded for a diagnosis, with what its files say about how it was trained."""

    sae: SAE[Any] | TrainingSAE[Any]
    training_cfg: dict[str, Any] | None
    hook_name: str | None
    model_name: str | None
    origin: str


def read_sae_config(path: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` of a saved SAE, or a ParameterError naming ``--sae``."""
    folder = Path(path).expanduser()
    cfg_path = folder / "cfg.json"
    if not folder.is_dir() or not cfg_path.exists():
        raise ParameterError(f"--sae {path}: no SAELens SAE there (a folder with cfg.json and sae_weights.safetensors, "
                             "as SAE.save_model or a SAELens runner writes it).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ParameterError(f"--sae {path}: cfg.json is not valid JSON ({e}).") from None
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise ParameterError(f"--sae {path}: cfg.json has no {key!r}; is it a SAELens 6 SAE?")
    return cfg


def load_sae(path: str | Path) -> LoadedSAE:
    """A saved SAE (inference form through ``SAE.load_from_disk``, training form through
    ``TrainingSAE.load_from_disk``) with the training config and hook its runner saved, if any."""
    folder = Path(path).expanduser()
    cfg = read_sae_config(folder)
    arch = cfg["architecture"]
    if arch in SAE_CLASS_REGISTRY:
        sae: Any = SAE.load_from_disk(folder)
    elif arch in SAE_TRAINING_CLASS_REGISTRY:
        sae = TrainingSAE.load_from_disk(folder)
    else:
        raise ParameterError(f"--sae {path}: architecture {arch!r} is not registered with SAELens (import the module "
                             "that registers it).")
    training_cfg, hook, model = None, None, None
    for name in RUNNER_CONFIGS:
        if (folder / name).exists():
            runner = json.loads((folder / name).read_text())
            training_cfg = runner.get("sae")
            hook, model = runner.get("hook_name"), runner.get("model_name")
            break
    meta = cfg.get("metadata") or {}
    hook = hook or meta.get("hook_name")
    model = model or meta.get("model_name")
    return LoadedSAE(sae, training_cfg, hook, model, str(folder))


# ---------------------------------------------------------------------------------------
# The command line


D_MODEL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""The per-block TransformerLens hooks whose width is the model's d_model (the ones read here)."""


@dataclass
class CLIPlan:
    """What ``check_cli`` found: everything the run needs, checked, before any compute."""

    args: argparse.Namespace
    model: Any  # llm.ModelSpec
    layer: int
    hook: str
    corpus: str
    sae_cfg: dict[str, Any]
    sae_dir: str | None
    release: str | None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hedging_utils.diagnose",
                                description="How much does an SAE hedge? Eq. 7's hedging degree of a SAELens SAE "
                                            "(Feature Hedging, §4), offline on Gemma 3 270M by default.")
    src = p.add_argument_group("the SAE (one of)")
    src.add_argument("--sae", help="folder of a saved SAELens SAE (cfg.json + sae_weights.safetensors)")
    src.add_argument("--release", help="a SAELens pretrained release (needs the Hugging Face hub)")
    src.add_argument("--sae-id", help="the SAE id within --release")
    p.add_argument("--model", default="gemma-3-270m", help="the model whose activations the SAE reads (default: gemma-3-270m, offline)")
    p.add_argument("--layer", type=int, help="block whose residual stream the SAE reads (default: from the SAE's hook name)")
    p.add_argument("--hook", help="a TransformerLens hook instead of blocks.<layer>.hook_resid_post")
    p.add_argument("--corpus", default="offline", help="'offline' (packaged text), 'pile' (hub) or a .txt/.jsonl path or folder")
    p.add_argument("--tokens", type=int, default=65_536, help="activations each control/extended SAE continues on")
    p.add_argument("--new-latents", type=int, default=16, help="N, latents added to the extended copy")
    p.add_argument("--seeds", type=int, default=3, help="control/extended pairs (the spread of h is over these)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="continued learning rate (Adam, constant)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context window when caching activations")
    p.add_argument("--input-scale", default="auto", choices=("auto", "raw", "normalized"),
                   help="activations as the model gives them ('raw'), scaled to mean norm sqrt(d_model) as this "
                        "project trains ('normalized'), or whichever the SAE reconstructs better ('auto')")
    p.add_argument("--training-cfg", help="JSON of the SAE's training config (architecture and fields), if its folder has no runner config")
    p.add_argument("--out", required=True, help="folder for diagnosis.json, seeds.csv, latents.csv, diagnosis.png")
    return p.parse_args(argv)


def check_cli(args: argparse.Namespace) -> CLIPlan:
    """Every check of the command line, before anything is loaded or computed: one SAE source;
    the SAE's folder (or release and id, and the hub for them); the model; the hook and layer
    (within the model); the SAE's d_in against the model's width; the corpus; the numbers."""
    from hedging_utils.activations import MODELS, check_layers, check_model, hub_reachable
    from hedging_utils.text import check_corpus

    if bool(args.sae) == bool(args.release):
        raise ParameterError("give --sae PATH (a saved SAE) or --release R with --sae-id ID, exactly one of them.")
    DiagnoseSettings(args.new_latents, args.tokens, args.seeds, args.batch_size, args.lr)  # the numbers
    check_positive_int("--context-size", args.context_size)
    if args.training_cfg:
        try:
            cfg = json.loads(args.training_cfg)
        except json.JSONDecodeError as e:
            raise ParameterError(f"--training-cfg is not valid JSON ({e}).") from None
        if not isinstance(cfg, dict) or cfg.get("architecture", "standard") not in SAE_TRAINING_CLASS_REGISTRY:
            raise ParameterError(f"--training-cfg needs an 'architecture' among {sorted(SAE_TRAINING_CLASS_REGISTRY)}.")
    spec = check_model(args.model)
    release_model = None
    if args.sae:
        sae_cfg = read_sae_config(args.sae)
        sae_dir = str(Path(args.sae).expanduser())
        for name in RUNNER_CONFIGS:
            if (Path(sae_dir) / name).exists():
                runner = json.loads((Path(sae_dir) / name).read_text())
                sae_cfg = {**sae_cfg, "metadata": {**(sae_cfg.get("metadata") or {}),
                                                   "hook_name": runner.get("hook_name") or (sae_cfg.get("metadata") or {}).get("hook_name")}}
    else:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if args.release not in directory:
            raise ParameterError(f"--release {args.release!r} is not in SAELens' pretrained registry "
                                 "(sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()).")
        if not args.sae_id or args.sae_id not in directory[args.release].saes_map:
            some = sorted(directory[args.release].saes_map)[:5]
            raise ParameterError(f"--sae-id {args.sae_id!r} is not in release {args.release!r} (e.g. {some}).")
        release_model = directory[args.release].model
        sae_dir, sae_cfg = None, {"d_in": None, "metadata": {"hook_name": None}}
    if release_model and release_model.split("/")[-1] not in (args.model.split("/")[-1], spec.transformer_lens_name.split("/")[-1]):
        raise ParameterError(f"--model {args.model!r}: release {args.release!r} was trained on {release_model!r}; pass "
                             f"--model with that model (known: {sorted(MODELS)}).")
    hook = args.hook
    if hook is None and args.layer is not None:
        hook = f"blocks.{args.layer}.hook_resid_post"
    hook = hook or (sae_cfg.get("metadata") or {}).get("hook_name")
    if hook is None and args.release:
        hook = None  # read from the release's config once the hub is known to answer
    elif hook is None:
        raise ParameterError("--layer: the SAE's files name no hook; give --layer L (its blocks.L.hook_resid_post) or --hook NAME.")
    layer = args.layer
    if hook is not None:
        layer = _check_hook(hook, spec, args)
    if args.layer is not None and layer != args.layer:
        raise ParameterError(f"--layer {args.layer} disagrees with --hook {hook!r}; give one of them.")
    if sae_cfg.get("d_in") is not None and int(sae_cfg["d_in"]) != spec.d_model and hook is not None:
        raise ParameterError(f"--sae: its d_in is {sae_cfg['d_in']} but {spec.name}'s width at {hook} is {spec.d_model}; "
                             "give an SAE trained on this model (or --model with the model it was trained on).")
    corpus = check_corpus(args.corpus)
    needs_hub = [what for what, needed in ((f"--release {args.release!r}", bool(args.release)),
                                            (f"--model {args.model!r}", not spec.offline),
                                            ("--corpus 'pile'", corpus == "pile")) if needed]
    if needs_hub and not hub_reachable():
        raise ParameterError(f"{' and '.join(needs_hub)} need the Hugging Face hub, which this machine cannot reach; "
                             "use a saved SAE (--sae PATH) with the offline model and corpus, or run where the hub answers.")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {args.out}: a file is there; give a folder.")
    if layer is not None:
        check_layers(spec, [layer], "--layer")
    return CLIPlan(args, spec, layer if layer is not None else -1, hook or "", corpus, sae_cfg, sae_dir, args.release)


def _check_hook(hook: str, spec: Any, args: argparse.Namespace) -> int:
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in D_MODEL_HOOKS:
        raise ParameterError(f"--hook {hook!r}: {spec.name} has no such hook among those read here; give "
                             f"blocks.<layer>.<hook> with <hook> one of {list(D_MODEL_HOOKS)}.")
    layer = int(parts[1])
    if not 0 <= layer < spec.n_layers:
        raise ParameterError(f"--layer {layer} (from hook {hook!r}) is outside {spec.name}, which has layers "
                             f"0..{spec.n_layers - 1}; pick one of those.")
    return layer


def _activations(plan: CLIPlan, tokens: int) -> tuple[torch.Tensor, float]:
    """The activations at the plan's hook for ``tokens`` tokens of its corpus (special tokens
    dropped), raw, and the scale that brings them to mean norm sqrt(d_model). Residual-stream
    hooks go through the project's activation cache (``llm.cache_activations``), so a rerun
    loads them without loading the model."""
    from hedging_utils.activations import cache_activations

    if plan.hook == f"blocks.{plan.layer}.hook_resid_post":
        source = cache_activations(plan.model.name, plan.layer, plan.corpus, context_size=plan.args.context_size,
                                   n_tokens=tokens)[plan.layer]
        acts = source.training_tokens[0] / source.scale
        return acts, source.scale
    from sae_lens.training.activations_store import ActivationsStore

    from hedging_utils.activations import load_model, load_tokenizer
    from hedging_utils.progress import progress_bar
    from hedging_utils.text import load_corpus

    model = load_model(plan.model.name)
    store = ActivationsStore.from_config_multi_hook(
        model, dataset=load_corpus(plan.corpus), hook_names=[plan.hook], hook_d_ins={plan.hook: plan.model.d_model},
        streaming=plan.corpus == "pile", context_size=plan.args.context_size, total_training_tokens=tokens,
        store_batch_size_prompts=8, prepend_bos=True, device="cpu")
    tokenizer = load_tokenizer(plan.model.name)
    special = torch.tensor(sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}))
    parts, have = [], 0
    bar = progress_bar(tokens, f"activations at {plan.hook}", unit="token")
    while have < tokens:
        batch = store.get_batch_tokens(8, move_to_model_device=False)
        out = store.get_multi_hook_activations(batch)[plan.hook].reshape(-1, plan.model.d_model)
        keep = ~torch.isin(batch.reshape(-1), special)
        parts.append(out[keep].float())
        have += int(keep.sum())
        bar.update(int(keep.sum()))
    bar.close()
    acts = torch.cat(parts)[:tokens]
    return acts, float(np.sqrt(plan.model.d_model) / acts.norm(dim=1).mean())


def _fvu(sae: Any, x: torch.Tensor) -> float:
    with torch.no_grad():
        x = x.to(sae.W_dec.dtype)
        err = (sae.decode(sae.encode(x)) - x).pow(2).sum()
    return float(err / (x - x.mean(0)).pow(2).sum())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = check_cli(args)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from hedging_utils.progress import progress_bar

    started = time.perf_counter()
    stages = progress_bar(4, "diagnose", unit="stage", leave=True)
    if plan.sae_dir:
        loaded = load_sae(plan.sae_dir)
    else:
        from hedging_utils.llm import load_pretrained_sae

        sae = load_pretrained_sae(plan.release, args.sae_id)
        loaded = LoadedSAE(sae, None, sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name, f"{plan.release}/{args.sae_id}")
        if not plan.hook:
            plan.hook = loaded.hook_name or ""
            plan.layer = _check_hook(plan.hook, plan.model, args)
        if sae.cfg.d_in != plan.model.d_model:
            print(f"error: --sae-id: its d_in is {sae.cfg.d_in} but {plan.model.name}'s width is {plan.model.d_model}.", file=sys.stderr)
            return 2
    training_cfg = json.loads(args.training_cfg) if args.training_cfg else loaded.training_cfg
    stages.set_description("diagnose: activations")
    stages.update()
    raw, scale = _activations(plan, args.tokens + args.tokens // 16)  # a few more: special tokens are dropped
    fvu = {"raw": _fvu(loaded.sae, raw[:4096]), "normalized": _fvu(loaded.sae, raw[:4096] * scale)}
    choice = args.input_scale if args.input_scale != "auto" else min(fvu, key=fvu.get)
    acts = raw if choice == "raw" else raw * scale
    stages.set_description("diagnose: control and extended SAEs")
    stages.update()
    result = diagnose(loaded.sae, acts, n_new_latents=args.new_latents, tokens=args.tokens, seeds=args.seeds,
                      batch_size=args.batch_size, lr=args.lr, training_cfg=training_cfg)
    stages.set_description("diagnose: writing")
    stages.update()
    extra = {"sae_source": loaded.origin, "model": plan.model.name, "hook": plan.hook, "corpus": args.corpus,
             "input_scale": choice, "fvu_by_input_scale": fvu, "activation_scale_to_sqrt_d": scale,
             "seconds": round(time.perf_counter() - started, 1), "argv": list(argv) if argv is not None else sys.argv[1:]}
    paths = result.save(args.out, extra)
    stages.update()
    stages.close()
    print(f"{loaded.origin} at {plan.model.name} {plan.hook} ({choice} activations, FVU {fvu[choice]:.3f}), "
          f"{result.summary.sae['training_architecture']} {result.summary.sae['d_sae']} latents + {args.new_latents}, "
          f"{args.tokens:,} tokens per SAE at lr {args.lr:g}:")
    print(result.summary.line())
    for note in result.summary.sae["notes"]:
        print(f"  note: {note}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f}s")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value



class _CallableModule(types.ModuleType):
    """This module, callable as its ``diagnose`` function: ``hedging_utils.diagnose(sae, ...)``
    works whether ``hedging_utils.diagnose`` was reached as the package's attribute or imported
    as a module (both name this one object)."""

    def __call__(self, *args: Any, **kwargs: Any) -> "Diagnosis":
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())

