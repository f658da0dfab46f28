"""A decoder-orthogonality penalty, as SAELens training architectures.

The "true features" post (seed 004) proposes adding to the SAE loss a penalty on the cosine
similarity between decoder directions, so that an SAE cannot spend a latent on a *combination*
of features it already has latents for. OrtSAE (Korznikov et al., arXiv 2509.22033) made such
a penalty linear in the width. Both forms are here, on the decoder rows d_i (unit-normalised
inside the penalty; the SAE's own rows keep their norms):

- ``pairwise`` (the post): over every pair i < j, ``|cos(d_i, d_j)| ** power``, averaged over
  the pairs (``reduction="mean"``) or summed (``"sum"``). ``power`` > 1 is the post's
  "non-linearity" that is lenient on slightly aligned pairs and severe on closely aligned
  ones. It costs O(width^2 d_in).
- ``chunked`` (OrtSAE): each training step splits the latents at random into K chunks of
  (nearly) equal size; within each chunk every latent's largest squared cosine with another
  latent of its chunk is taken, and these are averaged over all latents (a latent alone in its
  chunk contributes 0). K = ceil(width / ``chunk_size``), OrtSAE's 8,192 by default, so each
  chunk costs O(chunk_size^2 d_in) and a step O(width chunk_size d_in): linear in the width
  (``benchmarks/orthogonality_cost.py``). The partition of step t is drawn from its own
  generator seeded with (``orthogonality_seed``, t), so a run is reproducible and the global
  RNG is left alone.

The loss term is ``orthogonality_coefficient * penalty`` (OrtSAE: gamma = 0.25), added to the
architecture's own loss under the name ``orthogonality_loss``. Two architectures, registered
with SAELens at this module's import (import it before loading such an SAE from disk):

- ``orthogonal_standard``: ReLU + L1 (``StandardTrainingSAE``) + the penalty; inference: ``standard``.
- ``orthogonal_batchtopk``: BatchTopK with its AuxK dead-latent loss (``BatchTopKTrainingSAE``)
  + the penalty, OrtSAE's setting; inference: ``jumprelu``, as SAELens saves BatchTopK.

**Training.** These SAEs train stacked, like the plain architectures (``train_saes`` /
``train_together``): ``OrthogonalityMixin.stacked_penalty`` is the penalty on the stacked
decoder [S, L, d], each SAE's with its own coefficient, seed and width, and the stacked trainer
adds it to the plain stacked loss (its autograd path: the closed-form step of ReLU + L1 toys does
not know it). A chunked penalty draws each SAE's partition of step t from (its seed, t), as
its own ``training_forward_pass`` does at SAELens' step t, so the stacked loss is the SAE's own
(tests/test_orthogonality.py checks the loss and its gradient, tests/test_training.py training
runs against SAELens' ``SAETrainer``, in float64). SAEs that differ only in ``orthogonality_seed``
or the width (or the data, seed, L1 coefficient, K... as any stack) share a stack; a narrower SAE
is padded with masked latents, which the penalty leaves out (its pairs and chunks are over the
SAE's own latents only). The coefficient, form, power, reduction and chunk size split stacks
(``stacked_varying_fields`` says why for the coefficient). With ``orthogonality_coefficient = 0`` an
SAE here trains exactly like SAELens' own ``standard`` / ``batchtopk``; the notebook trains its
no-penalty baselines as those (``orthogonal_job``'s ``stacked_baseline``).

**Cache keys.** ``training.training_code_version`` does not cover this module, so
``orthogonal_job`` adds ``ORTHOGONALITY_CODE`` (this module's source hash) to a job's ``init``:
an edit here retrains the penalised SAEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput
from sae_lens.saes.standard_sae import StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from typing_extensions import override

from hedging_utils.cache import source_hash
from hedging_utils.ground_truth import match_latents, true_hedging
from hedging_utils.metrics import projection_norms
from hedging_utils.profiles import ParameterError, check_non_negative, check_positive_int, check_seed
from hedging_utils.training import Job, weights_hash

FORMS = ("pairwise", "chunked")
REDUCTIONS = ("mean", "sum")
ORTSAE_CHUNK_SIZE = 8192
"""OrtSAE's chunk size: K = ceil(width / 8192) chunks."""
ORTSAE_COEFFICIENT = 0.25
"""OrtSAE's gamma."""
ORTHOGONALITY_CODE = source_hash(["orthogonality"])
"""This module's source hash, added to the cache key of every job ``orthogonal_job`` makes."""


# ---------------------------------------------------------------------------------------
# The penalty


def unit_rows(w_dec: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Decoder rows divided by their norms (a zero row stays zero)."""
    return w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(eps)


def decoder_cosines(w_dec: torch.Tensor) -> torch.Tensor:
    """[L, L] cosine similarities between the decoder rows of ``w_dec`` [L, d]."""
    unit = unit_rows(w_dec)
    return unit @ unit.T


def pairwise_penalty(w_dec: torch.Tensor, power: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The post's penalty: |cos(d_i, d_j)|^power over the pairs i < j, their mean or sum
    (0 for a single latent, which has no pair)."""
    n = w_dec.shape[0]
    if n < 2:
        return w_dec.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=w_dec.device)
    values = decoder_cosines(w_dec)[i, j].abs().pow(power)
    return values.mean() if reduction == "mean" else values.sum()


def n_chunks_for(width: int, chunk_size: int = ORTSAE_CHUNK_SIZE) -> int:
    """OrtSAE's K = ceil(width / chunk_size)."""
    return max(1, math.ceil(width / chunk_size))


def chunk_partition(width: int, n_chunks: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random split of latents 0..width-1 into ``n_chunks`` chunks of (nearly) equal size."""
    order = torch.randperm(width, generator=generator)
    return [chunk for chunk in torch.tensor_split(order, n_chunks) if len(chunk)]


def chunked_penalty(w_dec: torch.Tensor, chunks: list[torch.Tensor]) -> torch.Tensor:
    """OrtSAE's penalty for a given partition: the mean over all latents of each latent's
    largest squared cosine with another latent of its chunk (0 for a latent alone in its chunk)."""
    total = w_dec.sum() * 0.0
    for chunk in chunks:
        if len(chunk) < 2:
            continue
        squared = decoder_cosines(w_dec[chunk.to(w_dec.device)]).pow(2)
        squared = squared - torch.diag_embed(torch.diagonal(squared))  # no latent is its own neighbour
        total = total + squared.max(dim=1).values.sum()
    return total / w_dec.shape[0]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step ``step``'s chunk partition."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------------------
# Options and the architectures


@dataclass(kw_only=True)
class OrthogonalityOptions:
    """The decoder-orthogonality penalty of an SAE.

    Args:
        orthogonality_coefficient: weight of the penalty in the loss (OrtSAE's gamma: 0.25);
            0 trains the plain architecture.
        orthogonality_form: ``"pairwise"`` (the post's, every pair) or ``"chunked"`` (OrtSAE's).
        orthogonality_power: pairwise form: the penalty of a pair is |cos|^power (>= 1; 1: the
            post's |cos|, larger: lenient on small cosines, severe on large ones).
        orthogonality_reduction: pairwise form: ``"mean"`` or ``"sum"`` over the pairs.
        orthogonality_chunk_size: chunked form: K = ceil(d_sae / chunk_size) (OrtSAE: 8,192).
        orthogonality_seed: chunked form: seed of the per-step random partitions.
    """

    orthogonality_coefficient: float = 0.0
    orthogonality_form: str = "pairwise"
    orthogonality_power: float = 1.0
    orthogonality_reduction: str = "mean"
    orthogonality_chunk_size: int = ORTSAE_CHUNK_SIZE
    orthogonality_seed: int = 0

    def validate_orthogonality(self) -> None:
        check_non_negative("orthogonality_coefficient", self.orthogonality_coefficient)
        if self.orthogonality_form not in FORMS:
            raise ParameterError(f"orthogonality_form={self.orthogonality_form!r} is not one of {list(FORMS)}.")
        if not (isinstance(self.orthogonality_power, (int, float)) and self.orthogonality_power >= 1):
            raise ParameterError(f"orthogonality_power={self.orthogonality_power!r} must be >= 1 (|cos|^power is not "
                                 "differentiable at 0 below 1); use 1 for the post's |cos|.")
        if self.orthogonality_reduction not in REDUCTIONS:
            raise ParameterError(f"orthogonality_reduction={self.orthogonality_reduction!r} is not one of {list(REDUCTIONS)}.")
        check_positive_int("orthogonality_chunk_size", self.orthogonality_chunk_size)
        check_seed("orthogonality_seed", self.orthogonality_seed)

    def n_chunks(self, width: int) -> int:
        return n_chunks_for(width, self.orthogonality_chunk_size)

    def penalty(self, w_dec: torch.Tensor, step: int) -> torch.Tensor:
        """The penalty (before its coefficient) of decoder ``w_dec`` at training step ``step``."""
        if self.orthogonality_form == "pairwise":
            return pairwise_penalty(w_dec, self.orthogonality_power, self.orthogonality_reduction)
        chunks = chunk_partition(w_dec.shape[0], self.n_chunks(w_dec.shape[0]), step_generator(self.orthogonality_seed, step))
        return chunked_penalty(w_dec, chunks)


class OrthogonalityMixin:
    """Adds ``orthogonality_loss`` to an architecture's auxiliary losses, and the same term on a
    stack of SAEs for ``hedging_utils.training.StackedSAEs`` (``stacked_penalty``)."""

    cfg: Any
    W_dec: torch.nn.Parameter

    stacked_varying_fields = ("orthogonality_seed",)
    """The penalty's settings that may differ within one stack (``StackedSAEs``, ``_group_key``).
    Not the coefficient, although ``stacked_penalty`` takes one per SAE: a stacked step's float32
    rounding depends on an SAE's position in its stack (about 1e-9 in a gradient, which training
    amplifies to 1e-3 in the weights over 2,000 steps), so SAEs that differ only in their
    coefficient train in separate stacks of the same layout, where each sits at the same position
    and follows the same arithmetic. A penalty that is identically 0 (one latent, which has no
    pair) then leaves the SAE bit for bit as its coefficient-0 twin, as notebook 08's control asks."""

    @classmethod
    def stacked_penalty(cls, cfgs: list[Any], W_dec: torch.Tensor, step: int) -> torch.Tensor:
        """Each SAE's ``orthogonality_coefficient * penalty`` [S] at training step ``step`` from
        the stacked decoder ``W_dec`` [S, L, d]: what its own ``calculate_aux_loss`` adds (0
        with coefficient 0). SAE i's latents are the first ``cfgs[i].d_sae`` rows; the rows past
        them pad it to the stack's width and enter no pair and no chunk. The pairwise form runs
        on the whole stack at once; the chunked one draws each SAE's partition from its
        (``orthogonality_seed``, ``step``), as ``OrthogonalityOptions.penalty`` does, once per
        distinct seed and width, and runs each chunk on the SAEs that share it at once."""
        first = cfgs[0]
        shared = ("orthogonality_form", "orthogonality_power", "orthogonality_reduction", "orthogonality_chunk_size")
        if any(getattr(c, name) != getattr(first, name) for c in cfgs for name in shared):
            raise ValueError(f"a stack of orthogonal SAEs must share {list(shared)} (StackedSAEs groups them so).")
        S, L = W_dec.shape[:2]
        widths = torch.tensor([c.d_sae for c in cfgs], device=W_dec.device)
        coefficients = W_dec.new_tensor([float(c.orthogonality_coefficient) for c in cfgs])
        if first.orthogonality_form == "pairwise":
            if L < 2:
                return W_dec.sum(dim=(1, 2)) * 0.0
            unit = unit_rows(W_dec)
            i, j = torch.triu_indices(L, L, offset=1, device=W_dec.device)
            values = torch.bmm(unit, unit.transpose(1, 2))[:, i, j].abs().pow(first.orthogonality_power)  # [S, pairs]
            real = j[None] < widths[:, None]  # both latents are the SAE's own (i < j)
            penalty = torch.where(real, values, 0.0).sum(dim=1)
            if first.orthogonality_reduction == "mean":
                penalty = penalty / real.sum(dim=1).clamp_min(1)
            return coefficients * penalty
        penalty = W_dec.new_zeros(S)
        groups: dict[tuple[int, int], list[int]] = {}
        for s, c in enumerate(cfgs):
            groups.setdefault((int(c.orthogonality_seed), int(c.d_sae)), []).append(s)
        for (seed, width), members in groups.items():
            rows = torch.tensor(members, device=W_dec.device)
            total = W_dec.new_zeros(len(members))
            for chunk in chunk_partition(width, first.n_chunks(width), step_generator(seed, step)):
                if len(chunk) < 2:
                    continue
                unit = unit_rows(W_dec[rows][:, chunk.to(W_dec.device)])  # [members, chunk, d]
                squared = torch.bmm(unit, unit.transpose(1, 2)).pow(2)
                squared = squared - torch.diag_embed(torch.diagonal(squared, dim1=1, dim2=2))  # no latent is its own neighbour
                total = total + squared.max(dim=2).values.sum(dim=1)
            penalty = penalty.index_put((rows,), total / width)
        return coefficients * penalty

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor,
                           sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)  # type: ignore[misc]
        if not isinstance(losses, dict):
            losses = {"aux_loss": losses}
        if self.cfg.orthogonality_coefficient > 0:
            penalty = self.cfg.penalty(self.W_dec, step_input.n_training_steps)
            losses["orthogonality_loss"] = self.cfg.orthogonality_coefficient * penalty
        return losses


@dataclass
class OrthogonalStandardTrainingSAEConfig(StandardTrainingSAEConfig, OrthogonalityOptions):
    """A ReLU + L1 SAE with a decoder-orthogonality penalty (``OrthogonalityOptions``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_orthogonality()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "orthogonal_standard"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return StandardSAEConfig


class OrthogonalStandardTrainingSAE(OrthogonalityMixin, StandardTrainingSAE):
    cfg: OrthogonalStandardTrainingSAEConfig  # type: ignore[assignment]


@dataclass
class OrthogonalBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig, OrthogonalityOptions):
    """A BatchTopK SAE (with AuxK) with a decoder-orthogonality penalty: OrtSAE with
    ``orthogonality_form="chunked"`` and ``orthogonality_coefficient=0.25``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_orthogonality()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "orthogonal_batchtopk"


class OrthogonalBatchTopKTrainingSAE(OrthogonalityMixin, BatchTopKTrainingSAE):
    cfg: OrthogonalBatchTopKTrainingSAEConfig  # type: ignore[assignment]


ARCHITECTURES = {"standard": "orthogonal_standard", "batchtopk": "orthogonal_batchtopk"}
"""The penalised architecture of each plain one."""

for _cls, _cfg in (
    (OrthogonalStandardTrainingSAE, OrthogonalStandardTrainingSAEConfig),
    (OrthogonalBatchTopKTrainingSAE, OrthogonalBatchTopKTrainingSAEConfig),
):
    if _cfg.architecture() not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(_cfg.architecture(), _cls, _cfg)


# ---------------------------------------------------------------------------------------
# Jobs


def orthogonal_job(make_job: Any, *args: Any, architecture: str = "standard", orthogonality_coefficient: float = 0.0,
                   stacked_baseline: bool = True, **kwargs: Any) -> Job:
    """A training job from ``make_job`` (e.g. ``toys.toy_job``) with the penalty: ``architecture``
    is the plain one (``standard`` or ``batchtopk``). With ``orthogonality_coefficient`` 0 and
    ``stacked_baseline`` the job is the plain architecture's (it trains in the plain
    architecture's stack, for toy ReLU + L1 SAEs with the closed-form step: the same trajectory
    up to float rounding); otherwise the penalised architecture's (with coefficient 0: trained
    by the same arithmetic as the penalised SAEs, in a stack of the same layout, bit for bit the
    plain loss), whose
    cache key carries ``ORTHOGONALITY_CODE``. Other ``orthogonality_*`` keyword arguments go to
    the config."""
    if architecture not in ARCHITECTURES:
        raise ParameterError(f"architecture={architecture!r} has no orthogonal variant; use one of {list(ARCHITECTURES)}.")
    coefficient = check_non_negative("orthogonality_coefficient", orthogonality_coefficient)
    if coefficient == 0 and stacked_baseline:
        extra = {k: v for k, v in kwargs.items() if not k.startswith("orthogonality_")}
        return make_job(*args, architecture=architecture, **extra)
    job = make_job(*args, architecture=ARCHITECTURES[architecture], orthogonality_coefficient=coefficient, **kwargs)
    base = job.init if job.init is not None else {"weights": weights_hash(job.sae)}
    job.init = {**base, "orthogonality_code": ORTHOGONALITY_CODE}
    return job


# ---------------------------------------------------------------------------------------
# What the penalty is tested against: absorption and hedging on toys with known features


def max_decoder_cosine(w_dec: Any) -> float:
    """The mean over latents of each latent's largest |cos| with another latent's decoder (0:
    an orthogonal decoder; NaN for a single latent, which has no other)."""
    w = torch.as_tensor(w_dec).detach().float()
    if w.shape[0] < 2:
        return float("nan")
    cos = decoder_cosines(w).abs()
    cos.fill_diagonal_(0.0)
    return float(cos.max(dim=1).values.mean())


def _latent_of(w_unit: torch.Tensor, feature: torch.Tensor, exclude: int | None = None) -> int:
    cos = w_unit @ feature
    if exclude is not None and w_unit.shape[0] > 1:
        cos[exclude] = -torch.inf
    return int(cos.argmax())


def toy_absorption(sae: Any, features: torch.Tensor, feature_acts: torch.Tensor, parent: int, child: int) -> dict[str, float]:
    """Absorption of ``child`` by ``parent`` in a toy SAE, measured on feature activations
    ``feature_acts`` [n, N] (inputs ``feature_acts @ features``).

    The parent's latent is the latent whose decoder is closest to f_parent; the child's the
    closest to f_child among the others. Returns the parent latent's encoder cosine with
    f_child (negative under absorption: it is switched off when the child fires), the child
    latent's decoder cosine with f_parent (positive: it reconstructs the parent too), and
    ``absorption_rate``: the share of the samples where both features fire in which the parent's
    latent is silent while the child's fires (the paper's firing-based absorption)."""
    features = features.detach().float()
    w = unit_rows(sae.W_dec.detach().float())
    p_latent = _latent_of(w, features[parent])
    c_latent = _latent_of(w, features[child], exclude=p_latent)
    encoder = sae.W_enc.detach().float().T
    enc_cos = float(unit_rows(encoder)[p_latent] @ features[child])
    with torch.no_grad():
        acts = sae.encode(feature_acts.float() @ features) > 0
    both = (feature_acts[:, parent] > 0) & (feature_acts[:, child] > 0)
    absorbed = both & ~acts[:, p_latent] & acts[:, c_latent]
    return {"parent_encoder_cos_child": enc_cos, "child_decoder_cos_parent": float(w[c_latent] @ features[parent]),
            "absorption_rate": float(absorbed.sum() / both.sum().clamp_min(1)), "cofiring_samples": int(both.sum())}


def unlatented_hedging(w_dec: Any, features: Any) -> dict[str, float]:
    """Hedging of the features an SAE has no latent for.

    Each latent is matched to the feature its decoder is closest to (``ground_truth.match_latents``);
    features matched by no latent are *unlatented*. ``hedging`` is the mean over latents of
    ``ground_truth.true_hedging`` (the norm of the unit decoder's component outside its own
    feature); ``unlatented`` the mean norm of its projection on the span of the unlatented
    features (``metrics.projection_norms``: what the latents carry of features they were not
    given); ``n_unlatented`` their count."""
    w = unit_rows(torch.as_tensor(w_dec).detach().float()).numpy()
    f = unit_rows(torch.as_tensor(features).detach().float()).numpy()
    match, _ = match_latents(w, f)
    unmatched = sorted(set(range(f.shape[0])) - set(match.tolist()))
    return {"hedging": float(true_hedging(w, f)["hedging"].mean()),
            "unlatented": float(projection_norms(w, f[unmatched]).mean()), "n_unlatented": len(unmatched)}


def toy_measurements(sae: Any, features: torch.Tensor, feature_acts: torch.Tensor, *, parent: int | None = None,
                     child: int | None = None) -> dict[str, float]:
    """Everything notebook 08 reads off a toy SAE, on feature activations ``feature_acts``
    [n, N] (inputs ``feature_acts @ features``): the variance it explains, its L0, how far its
    decoder is from orthogonal (``max_decoder_cosine``), its hedging (``unlatented_hedging``)
    and, given a ``parent`` and ``child`` feature, its absorption (``toy_absorption``)."""
    x = feature_acts.float() @ features.detach().float()
    with torch.no_grad():
        acts = sae.encode(x)
        error = float((sae.decode(acts) - x).pow(2).sum())
    out = {"variance_explained": 1 - error / float((x - x.mean(0)).pow(2).sum()), "l0": float((acts > 0).sum(1).float().mean()),
           "max_decoder_cos": max_decoder_cosine(sae.W_dec)}
    hedging = unlatented_hedging(sae.W_dec, features)
    out.update({"hedging": hedging["hedging"], "unlatented_hedging": hedging["unlatented"], "n_unlatented": hedging["n_unlatented"]})
    if parent is not None and child is not None:
        out.update(toy_absorption(sae, features, feature_acts, parent, child))
    return out
