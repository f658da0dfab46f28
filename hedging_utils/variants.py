"""The SAE variants of the paper and the post, as SAELens training architectures.

**Balance matryoshka** (paper eq. 8): L = sum_m beta_m (||a - a_hat_m||^2 + lambda S_m) + alpha L_aux,
where a_hat_m reconstructs the input from the first m latents and S_m is the sparsity penalty on
them. beta_m = 1 for every level is a standard matryoshka SAE; beta_m = 0 for every inner level
is a standard SAE; ``detach_inner_levels`` ("beta = infinity" in P8) stops the outer levels'
losses from sending gradient into the latents of the levels inside them; b_dec, shared by every
level, still gets gradient from all of them (as in the authors' ``iterable_decode``, which adds
the undetached b_dec at every level).

**Reconstruction loss** (the post): ``"mse"`` (squared error norm, the default), ``"l2"`` (the
norm of the error, not squared) or ``"snap"`` (MSE until ``snap_step`` training steps, L2
after), applied to every matryoshka level.

Two architectures, registered with SAELens so they train, save and load like its own:

- ``balance_matryoshka_standard``: ReLU + L1 (``StandardTrainingSAE``); inference: ``standard``.
- ``balance_matryoshka_batchtopk``: BatchTopK (SAELens' ``MatryoshkaBatchTopKTrainingSAE``,
  whose dead-latent auxiliary loss it keeps); inference: ``jumprelu``, as SAELens saves BatchTopK.

With the default ``matryoshka_widths=[]`` (one level, the whole SAE) either is a plain SAE
with a choice of reconstruction loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import act_times_W_dec
from typing_extensions import override

from hedging_utils.profiles import ParameterError

ReconstructionLoss = Literal["mse", "l2", "snap"]
RECONSTRUCTION_LOSSES = ("mse", "l2", "snap")


def reconstruction_loss(
    sae_out: torch.Tensor, sae_in: torch.Tensor, kind: ReconstructionLoss, step: int, snap_step: int | None = None
) -> torch.Tensor:
    """Batch mean of the per-sample reconstruction loss: squared error norm (``mse``), error
    norm (``l2``), or ``mse`` before training step ``snap_step`` and ``l2`` from it on (``snap``)."""
    squared = (sae_out - sae_in).pow(2).sum(dim=-1)
    if kind == "l2" or (kind == "snap" and step >= (snap_step or 0)):
        # the norm's gradient is undefined at 0; a tiny floor keeps it finite
        return squared.clamp_min(1e-12).sqrt().mean()
    return squared.mean()


@dataclass(kw_only=True)
class BalanceMatryoshkaOptions:
    """Options shared by both balance-matryoshka architectures.

    Args:
        matryoshka_widths: strictly increasing prefix widths m_1 < ... < m_n; ``d_sae`` is
            appended if the last is smaller. Empty: a single level, a plain SAE.
        level_coefficients: beta_m per level, >= 0. Either one per inner level (the outermost
            is fixed at 1) or one per level with the last equal to 1. None: all 1.
        coefficient_multiplier: alternative to ``level_coefficients``: beta_m = multiplier^(n-m)
            (paper P9; 0 is a standard SAE, 1 a standard matryoshka SAE).
        detach_inner_levels: outer levels send no gradient into inner latents ("beta = infinity").
        reconstruction_loss: ``"mse"``, ``"l2"`` or ``"snap"``.
        snap_step: the training step at which ``"snap"`` switches from MSE to L2.
    """

    matryoshka_widths: list[int] = field(default_factory=list)
    level_coefficients: list[float] | None = None
    coefficient_multiplier: float | None = None
    detach_inner_levels: bool = False
    reconstruction_loss: str = "mse"
    snap_step: int | None = None

    def validate_options(self, d_sae: int) -> None:
        widths = list(self.matryoshka_widths)
        if any(not isinstance(w, int) or w <= 0 for w in widths):
            raise ParameterError(f"matryoshka_widths={widths} must be positive integers.")
        if any(b <= a for a, b in zip(widths, widths[1:])):
            raise ParameterError(f"matryoshka_widths={widths} must be strictly increasing (e.g. [128, 512, {d_sae}]).")
        if widths and widths[-1] > d_sae:
            raise ParameterError(f"matryoshka_widths={widths} exceed d_sae={d_sae}; the last level must be d_sae.")
        if not widths or widths[-1] < d_sae:
            widths.append(d_sae)
        self.matryoshka_widths = widths
        self.level_betas()  # validates the coefficients
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ParameterError(f"reconstruction_loss={self.reconstruction_loss!r} is not one of {list(RECONSTRUCTION_LOSSES)}.")
        if self.reconstruction_loss == "snap":
            if not isinstance(self.snap_step, int) or isinstance(self.snap_step, bool) or self.snap_step < 0:
                raise ParameterError(f"snap_step={self.snap_step!r}: snap loss needs the training step to switch at (an integer >= 0).")
        elif self.snap_step is not None:
            raise ParameterError(f"snap_step={self.snap_step} is only used with reconstruction_loss='snap'.")

    def level_betas(self) -> list[float]:
        """beta_m for every level, innermost first; the outermost is 1."""
        n = len(self.matryoshka_widths)
        if self.level_coefficients is not None and self.coefficient_multiplier is not None:
            raise ParameterError("give level_coefficients or coefficient_multiplier, not both.")
        if self.coefficient_multiplier is not None:
            mult = float(self.coefficient_multiplier)
            if not mult >= 0:
                raise ParameterError(f"coefficient_multiplier={self.coefficient_multiplier!r} must be >= 0.")
            return [mult ** (n - 1 - m) for m in range(n)]
        if self.level_coefficients is None:
            return [1.0] * n
        betas = [float(b) for b in self.level_coefficients]
        if len(betas) == n - 1:
            betas.append(1.0)
        if len(betas) != n:
            raise ParameterError(
                f"level_coefficients={self.level_coefficients} has {len(self.level_coefficients)} values for {n} levels; "
                f"give one per inner level ({n - 1})."
            )
        if betas[-1] != 1.0:
            raise ParameterError(f"level_coefficients={self.level_coefficients}: the outermost level's coefficient is fixed at 1.")
        if any(not b >= 0 for b in betas):
            raise ParameterError(f"level_coefficients={self.level_coefficients} must all be >= 0.")
        return betas

    def check_training_steps(self, total_steps: int) -> None:
        """Raise if snap loss would switch after training ends."""
        if self.reconstruction_loss == "snap" and self.snap_step is not None and self.snap_step > total_steps:
            raise ParameterError(
                f"snap_step={self.snap_step} is beyond the {total_steps} training steps; choose a step within training."
            )


class BalanceMatryoshkaMixin:
    """The training forward pass shared by both architectures: a loss per matryoshka level,
    weighted by beta_m, with the chosen reconstruction loss."""

    cfg: Any

    def level_sparsity(self, step_input: TrainStepInput, feature_acts: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """lambda S over latents [start, stop); None where the architecture has no penalty."""
        return None

    def level_reconstructions(self, feature_acts: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """(start, width, reconstruction from the first ``width`` latents) per level. In
        detached mode the inner part of each outer reconstruction carries no gradient."""
        rescale = getattr(self.cfg, "rescale_acts_by_decoder_norm", False)
        out, start, latents = [], 0, 0
        for width in self.cfg.matryoshka_widths:
            if self.cfg.detach_inner_levels and start > 0:
                latents = latents.detach()  # type: ignore[union-attr]
            latents = latents + act_times_W_dec(feature_acts[:, start:width], self.W_dec[start:width], rescale)  # type: ignore[attr-defined]
            recon = self.b_dec + latents  # type: ignore[attr-defined]
            out.append((start, width, self.run_time_activation_norm_fn_out(recon)))  # type: ignore[attr-defined]
            start = width
        return out

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        feature_acts, hidden_pre = self.encode_with_hidden_pre(sae_in)  # type: ignore[attr-defined]
        sae_out = self.decode(feature_acts)  # type: ignore[attr-defined]
        losses: dict[str, torch.Tensor] = {}
        total = sae_out.new_zeros(())
        for beta, (start, width, recon) in zip(self.cfg.level_betas(), self.level_reconstructions(feature_acts)):
            level = reconstruction_loss(recon, sae_in, self.cfg.reconstruction_loss, step_input.n_training_steps, self.cfg.snap_step)
            losses[f"reconstruction_loss_{width}"] = level
            sparsity = self.level_sparsity(step_input, feature_acts, start if self.cfg.detach_inner_levels else 0, width)
            if sparsity is not None:
                losses[f"sparsity_loss_{width}"] = sparsity
                level = level + sparsity
            if beta != 0:
                total = total + beta * level
        aux = self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)  # type: ignore[attr-defined]
        for name, value in aux.items():
            losses[name] = value
            total = total + value
        with torch.no_grad():
            losses["mse_loss"] = (sae_out - sae_in).pow(2).sum(dim=-1).mean()
        return TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                               loss=total, losses=losses)


# ---------------------------------------------------------------------------------------
# ReLU + L1


@dataclass
class BalanceMatryoshkaStandardTrainingSAEConfig(StandardTrainingSAEConfig, BalanceMatryoshkaOptions):
    """A ReLU + L1 SAE with balance-matryoshka levels and a choice of reconstruction loss.

    ``l1_floor``: the L1 coefficient never goes below this during its warm-up (lambda_min of
    the paper's A.7.1, used when re-warming an extended SAE); 0 is SAELens' plain warm-up.
    """

    l1_floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_options(self.d_sae)
        if not 0 <= self.l1_floor <= self.l1_coefficient:
            raise ParameterError(f"l1_floor={self.l1_floor} must lie in [0, l1_coefficient={self.l1_coefficient}].")

    @override
    @classmethod
    def architecture(cls) -> str:
        return "balance_matryoshka_standard"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return StandardSAEConfig


class BalanceMatryoshkaStandardTrainingSAE(BalanceMatryoshkaMixin, StandardTrainingSAE):
    cfg: BalanceMatryoshkaStandardTrainingSAEConfig  # type: ignore[assignment]

    @override
    def level_sparsity(self, step_input: TrainStepInput, feature_acts: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # SAELens' standard L1 penalty (activations weighted by decoder norms), on latents [start, stop)
        weighted = feature_acts[:, start:stop] * self.W_dec[start:stop].norm(dim=1)
        coefficient = max(step_input.coefficients["l1"], self.cfg.l1_floor)
        return (coefficient * weighted.norm(p=self.cfg.lp_norm, dim=-1)).mean()

    @override
    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {}  # the L1 penalty is applied per level in ``level_sparsity``


# ---------------------------------------------------------------------------------------
# BatchTopK


@dataclass
class BalanceMatryoshkaBatchTopKTrainingSAEConfig(MatryoshkaBatchTopKTrainingSAEConfig, BalanceMatryoshkaOptions):
    """A BatchTopK SAE with balance-matryoshka levels and a choice of reconstruction loss."""

    # SAELens declares this field positionally; keep it keyword-only as in BalanceMatryoshkaOptions
    matryoshka_widths: list[int] = field(default_factory=list, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_options(self.d_sae)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "balance_matryoshka_batchtopk"


class BalanceMatryoshkaBatchTopKTrainingSAE(BalanceMatryoshkaMixin, MatryoshkaBatchTopKTrainingSAE):
    cfg: BalanceMatryoshkaBatchTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: BalanceMatryoshkaBatchTopKTrainingSAEConfig, use_error_term: bool = False):
        with warnings.catch_warnings():  # SAELens warns about a single level: here that is a plain BatchTopK SAE
            warnings.simplefilter("ignore")
            super().__init__(cfg, use_error_term)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = BalanceMatryoshkaMixin.training_forward_pass(self, step_input)
        self.update_topk_threshold(output.feature_acts)
        output.metrics["topk_threshold"] = self.topk_threshold
        return output


for _cls, _cfg in (
    (BalanceMatryoshkaStandardTrainingSAE, BalanceMatryoshkaStandardTrainingSAEConfig),
    (BalanceMatryoshkaBatchTopKTrainingSAE, BalanceMatryoshkaBatchTopKTrainingSAEConfig),
):
    if _cfg.architecture() not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(_cfg.architecture(), _cls, _cfg)
