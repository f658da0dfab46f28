"""Run profiles and parameter checks.

Every notebook takes a ``profile`` parameter. A profile only changes numbers (how many
samples, how many sweep points), never the code that runs:

- ``ci``: seconds per notebook, for the test suite. Numbers are too small to show the claims.
- ``small`` (default): a CPU, offline, every notebook within an hour on 2 cores. Toy figures
  at the paper's settings with smaller training budgets; LLM figures on Gemma 3 270M.
- ``paper``: the paper's exact settings (its models, tokens, widths, seeds); needs a GPU and
  the model/data hubs for the LLM figures.

Papermill sets ``profile`` in the notebook's ``parameters`` cell; nbval cannot inject
parameters, so a notebook left at ``profile = None`` reads ``$HEDGING_PROFILE``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

PROFILE_ENV = "HEDGING_PROFILE"
FIGURES_DIR_ENV = "HEDGING_FIGURES_DIR"
DEFAULT_PROFILE = "small"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ParameterError(ValueError):
    """A notebook parameter is invalid. The message names the parameter and the fix."""


@dataclass(frozen=True)
class LLMModel:
    """One language model an LLM figure is run on, with its layer and L1 coefficient."""

    name: str
    layer: int
    l1_coefficient: float


B_DEC_INITS = ("zeros", "mean")  # where an LLM SAE's decoder bias starts (``LLMScale.b_dec_init``)


def check_b_dec_init(value: Any) -> str:
    """``value`` if it is one of ``B_DEC_INITS``; else a ParameterError naming ``b_dec_init``."""
    if value not in B_DEC_INITS:
        raise ParameterError(f"b_dec_init={value!r} is not one of {list(B_DEC_INITS)}.")
    return value


def other_b_dec_init(value: str) -> str:
    """The start an ablation sets beside ``value``: the other of ``B_DEC_INITS``."""
    return next(init for init in B_DEC_INITS if init != check_b_dec_init(value))


@dataclass(frozen=True)
class LLMScale:
    """The numbers of the LLM figures (notebook 04, paper Figures 7, 16-19, the post's growing SAE).

    Attributes:
        models: the models with their main layer (paper: Gemma-2-2b layer 12, Llama-3.2-1B layer 7)
            and the L1 coefficient of their L1 SAEs.
        layers: layers of the hedging-degree-vs-layer sweep (first model only).
        corpus: ``offline``, ``pile`` or a path (see ``hedging_utils.text``).
        context_size: tokens per context window.
        shard_sequences: context windows per cached activation shard.
        cached_tokens: tokens of activations cached per layer; budgets beyond it run more epochs.
        base_tokens: training tokens of a base SAE.
        continued_tokens: training tokens of the control and extended SAEs after the base.
        batch_size: activations per training batch.
        lr_batchtopk, lr_l1: learning rates of base SAEs.
        continued_lr_batchtopk, continued_lr_l1: learning rates of the continued control and
            extended SAEs.
        dead_feature_window: steps without firing after which a latent counts as dead, which
            switches on BatchTopK's auxiliary loss (AuxK) that revives it (SAELens: 1000).
        case_study_arch: ``btk`` or ``l1``, the SAE of the case study (P17-P19).
        l1_warm_up_steps: linear L1 warm-up of L1 SAEs.
        widths: base widths of hedging degree vs width.
        one_seed_from: P7(a)'s widths from this one on train on the first seed only (None: every
            width on every seed); ``width_seeds`` gives a width's seeds.
        width: the width of every other LLM SAE (the paper's 8,192).
        n_new: N, the latents added to measure hedging degree.
        k: BatchTopK K.
        k_values, l1_values: the L0 sweep (BatchTopK K and L1 coefficients, as multiples of the
            model's coefficient).
        n_values: N of hedging degree vs N.
        growing_start, growing_group, growing_max: the growing L1 SAE's widths.
        growing_group_tokens, growing_total_tokens: tokens between groups, and every width's total.
        growing_l1_coefficient: its L1 coefficient (the post: 10 on Gemma-2-2b).
        growing_lr: its learning rate.
        growing_l1_floor: its L1 re-warm-up: when latents are added, the coefficient restarts at
            this fraction of its value and rises linearly back to it over the next group (A.7.1's
            floor); the first group warms up from 0.
        doubling_tokens: training tokens of each stage of the growing SAE extended by doubling
            past the residual width (LW-bdec-growing; the post does not say, ours).
        seeds: seeds per point where a figure reports spread.
        b_dec_init: where every SAE of notebooks 04 and 05 starts its decoder bias (``B_DEC_INITS``):
            ``zeros`` (SAELens 6's trainer; the authors' runs, whose b_dec then travels to the
            activations' mean over 250M tokens) or ``mean``, the mean of the first cached shard
            (SAELens 5's ``b_dec_init_method="mean"``), for budgets too short for that journey.
            The models' L1 coefficients are chosen for it.
    """

    models: tuple[LLMModel, ...]
    layers: tuple[int, ...]
    corpus: str
    context_size: int
    shard_sequences: int
    cached_tokens: int
    base_tokens: int
    continued_tokens: int
    batch_size: int
    lr_batchtopk: float
    lr_l1: float
    continued_lr_batchtopk: float
    continued_lr_l1: float
    dead_feature_window: int
    case_study_arch: str
    l1_warm_up_steps: int
    widths: tuple[int, ...]
    width: int
    n_new: int
    k: int
    k_values: tuple[int, ...]
    l1_values: tuple[float, ...]
    n_values: tuple[int, ...]
    growing_start: int
    growing_group: int
    growing_max: int
    growing_group_tokens: int
    growing_total_tokens: int
    growing_l1_coefficient: float
    growing_lr: float
    growing_l1_floor: float
    doubling_tokens: int
    seeds: int
    one_seed_from: int | None = None
    b_dec_init: str = "zeros"

    def __post_init__(self) -> None:
        check_b_dec_init(self.b_dec_init)

    def width_seeds(self, width: int, first_seed: int = 0) -> list[int]:
        """The seeds of P7(a)'s SAEs at ``width`` (notebook 05 reads the same SAEs)."""
        one = self.one_seed_from is not None and width >= self.one_seed_from
        return list(range(first_seed, first_seed + (1 if one else self.seeds)))


@dataclass(frozen=True)
class SAEBenchScale:
    """The numbers of the SAEBench evaluation (``hedging_utils.saebench``; paper Figures 9 and
    21, the post's SAEBench figure). ``paper`` uses SAEBench 0.6.0's defaults.

    Attributes:
        vocab_size: alphabetic vocabulary tokens behind the first-letter probes and absorption, a
            seeded random subsample (None: all of them, as SAEBench; 139,585 for Gemma 3).
        letter_probe_epochs: epochs of the 26-letter logistic probe on the residual (SAEBench: 50).
        k_sparse_probe_epochs: epochs of the L1 probe on SAE latents that chooses the latents of
            the k-sparse probes (SAEBench: 50).
        max_k_value: the largest k of the k-sparse first-letter probes, so the most split latents
            a letter can have (SAEBench: 10).
        min_probe_f1: a letter counts only if its residual probe's test F1 exceeds this (SAEBench: 0.6).
        min_letters: SAEBench reports no absorption with fewer counted letters than this (20);
            here the metrics come with the count and whether it was reached.
        model_batch_size: prompts per model forward pass (SAEBench's probe data: 64).
        pos_sentences: sentences of text tagged for part-of-speech probing.
        pos_examples_per_tag: at most this many words of a tag, and as many words of other tags,
            form the tag's probing dataset (80% train, 20% test).
        seed: SAEBench's ``random_seed`` (42).
        probing_tasks: the sae-probes binary tasks of SAEBench's k-sparse probing
            (``sparse_probing_sae_probes``; None: all 113 of sae-probes 0.4.2, SAEBench's default).
        probing_train, probing_test: examples per task in the balanced train and test splits
            (None: sae-probes' own, ``min(rows - 100, 1024)`` to train and the other rows, at most
            5,000 in all, to test).
        probing_max_seq_len: a prompt's last tokens read by the model (sae-probes: 1024).
        probing_ks: the numbers of latents of the sparse probes (SAEBench: 1, 2, 5).
        tpp_train, tpp_test: texts per class of TPP's train and test splits (SAEBench's
            ``train_set_size`` 4,000 and ``test_set_size`` 1,000 are per binary probe, 2,000 and 500
            per class; sae-probes ships 2,000 texts per AG News topic, so paper: 1,500 and 500).
        tpp_context_length: tokens per TPP text, longer texts cut, shorter padded (SAEBench: 128).
    """

    vocab_size: int | None
    letter_probe_epochs: int
    k_sparse_probe_epochs: int
    max_k_value: int
    min_probe_f1: float
    min_letters: int
    model_batch_size: int
    pos_sentences: int
    pos_examples_per_tag: int
    seed: int = 42
    probing_tasks: tuple[str, ...] | None = None
    probing_train: int | None = None
    probing_test: int | None = None
    probing_max_seq_len: int = 1024
    probing_ks: tuple[int, ...] = (1, 2, 5)
    tpp_train: int = 1_500
    tpp_test: int = 500
    tpp_context_length: int = 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_SAEBENCH = SAEBenchScale(vocab_size=None, letter_probe_epochs=50, k_sparse_probe_epochs=50, max_k_value=10,
                               min_probe_f1=0.6, min_letters=20, model_batch_size=64, pos_sentences=50_000,
                               pos_examples_per_tag=5_000, tpp_train=1_500, tpp_test=500, tpp_context_length=128)
# A subsample of the vocabulary: the whole of it costs about 3.5 h of model time on 2 cores. With
# 3,000 tokens 18-19 letters passed the residual probe's F1 > 0.6 in float32 and 15 with bfloat16
# forward passes (measured on Gemma 3 270M layer 9), fewer than the 20 SAEBench asks before it
# reports absorption, so absorption is reported absent, as SAEBench's run_eval would. With 6,000,
# 21 letters pass in float32 (22 with bfloat16 forward passes) and SAEBench's absorption runs (its
# prompts' examples are one-token words, saebench._icl_tokens), but on 2 AVX2 cores in float32 the
# probes took 703 s and each SAE's evaluation 28-30 s with the prompts' residuals cached: about
# 14 minutes for notebook 06's 28 SAEs, too long for the hour (README, notebook 06).
# k-sparse probing on six of sae-probes' 113 tasks (news topic, sentiment, code language, two
# Wikidata tasks, spam), 256 + 128 prompts each and their last 128 tokens: all 113 at sae-probes'
# sizes are about 300,000 prompts of up to 1,024 tokens, days of model time on 2 cores.
SMALL_PROBING_TASKS = ("161_agnews_0", "113_movie_sent", "159_code_Python", "56_wikidatasex_or_gender",
                       "62_wikidata_occupation_ispolitician", "96_spam_is")
SMALL_SAEBENCH = SAEBenchScale(vocab_size=3_000, letter_probe_epochs=50, k_sparse_probe_epochs=50, max_k_value=10,
                               min_probe_f1=0.6, min_letters=20, model_batch_size=32, pos_sentences=2_000,
                               pos_examples_per_tag=500, probing_tasks=SMALL_PROBING_TASKS, probing_train=256,
                               probing_test=128, probing_max_seq_len=128, tpp_train=128,
                               tpp_test=48, tpp_context_length=128)
CI_SAEBENCH = SAEBenchScale(vocab_size=208, letter_probe_epochs=10, k_sparse_probe_epochs=5, max_k_value=3,
                            min_probe_f1=0.6, min_letters=2, model_batch_size=32, pos_sentences=80,
                            pos_examples_per_tag=40, probing_tasks=("5_hist_fig_ismale", "113_movie_sent"),
                            probing_train=64, probing_test=64, probing_max_seq_len=64, tpp_train=24, tpp_test=12,
                            tpp_context_length=32)


def matryoshka_levels(width: int, level_divisors: Sequence[int]) -> list[int]:
    """A matryoshka SAE's nested widths: ``width // d`` for each divisor ``d``, then ``width``."""
    return [width // d for d in level_divisors] + [width]


def check_levels(name: str, width: int, level_divisors: Sequence[int]) -> None:
    """Refuse a width (parameter ``name``) whose matryoshka levels are not positive and increasing."""
    levels = matryoshka_levels(width, level_divisors)
    if levels[0] < 1 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ParameterError(f"{name}={width} gives matryoshka levels {levels} with level divisors "
                             f"{list(level_divisors)}; they must be positive and strictly increasing: "
                             f"use a {name} of at least {max(level_divisors, default=1)}.")


def check_multipliers(multipliers: Sequence[float]) -> None:
    """Refuse balance multipliers that are negative or leave out either end the paper compares."""
    if 0.0 not in multipliers or 1.0 not in multipliers or any(m < 0 for m in multipliers):
        raise ParameterError(f"multipliers={list(multipliers)} must be >= 0 and include 0 (a standard SAE) and "
                             "1 (a matryoshka SAE), the ends the paper compares against.")


@dataclass(frozen=True)
class MatryoshkaLLMScale:
    """The numbers of notebook 06's LLM SAEs: balance matryoshka BatchTopK (paper Figures 9
    and 21) and the post's loss comparison (LW-saebench, LW-snap-llm). They train on the
    activations of ``LLMScale``'s first model and layer, at its batch size.

    Attributes:
        width: the SAE width (the paper's 32,768).
        level_divisors: the inner matryoshka levels are ``width // d`` for each ``d`` (the
            paper's 256, 64, 16, 4: levels 128, 512, 2,048, 8,192 and 32,768;
            ``experiments/train_btk_balanced_4x_matryoshka_saes.py``).
        k: BatchTopK K of the multiplier sweep (the paper's 40).
        multipliers: the balance multipliers; beta of level m is multiplier^(levels - m), so 0
            is a standard BatchTopK SAE and 1 a standard matryoshka SAE.
        seeds: seeds per multiplier (the paper's 10).
        tokens: training tokens of every SAE (the paper's 500M).
        lr: Adam's learning rate, constant (the authors' 1e-4).
        loss_k_values: the K (so the L0) of the loss comparison (the post's 20, 40, 60, 80).
        loss_seeds: seeds per loss-comparison SAE (the post's 5).
        snap_fraction: snap loss switches from MSE to L2 after this share of the training steps
            (the post does not say; notebook 02's choice).
        b_dec_init: where every SAE's decoder bias starts (``B_DEC_INITS``; ``LLMScale.b_dec_init``
            says why ``small`` starts it at the activations' mean).
    """

    width: int
    level_divisors: tuple[int, ...]
    k: int
    multipliers: tuple[float, ...]
    seeds: int
    tokens: int
    lr: float
    loss_k_values: tuple[int, ...]
    loss_seeds: int
    snap_fraction: float = 0.5
    b_dec_init: str = "zeros"

    def __post_init__(self) -> None:
        check_levels("width", self.width, self.level_divisors)
        check_b_dec_init(self.b_dec_init)
        if not 0 < self.k < self.width:
            raise ParameterError(f"k={self.k} must lie between 0 and the width {self.width}.")
        if any(not 0 < k < self.width for k in self.loss_k_values):
            raise ParameterError(f"loss_k_values={list(self.loss_k_values)} must lie between 0 and the width {self.width}.")
        check_multipliers(self.multipliers)
        if not 0 < self.snap_fraction < 1:
            raise ParameterError(f"snap_fraction={self.snap_fraction} must lie strictly between 0 and 1.")

    @property
    def levels(self) -> list[int]:
        return matryoshka_levels(self.width, self.level_divisors)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "levels": self.levels}


PAPER_MATRYOSHKA_LLM = MatryoshkaLLMScale(width=32_768, level_divisors=(256, 64, 16, 4), k=40,
                                          multipliers=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0), seeds=10,
                                          tokens=500_000_000, lr=1e-4, loss_k_values=(20, 40, 60, 80), loss_seeds=5)
# Width 512 (levels 2, 8, 32, 128, 512) and one pass over the cached tokens: 31 SAEs (five
# multipliers x 3 seeds, the loss comparison's others) train in about 8 minutes on 2 cores with
# bf16 units (a stacked step costs about 52 ms per SAE, much of it the memory traffic of the five
# levels' errors), where width 1,024 or two passes would about double it. Three seeds, the fewest
# from which a seed standard deviation means something, for the three-valued verdicts. Its 320
# steps leave a decoder bias started at 0 far from the activations' mean, so b_dec starts there, as
# notebooks 04-05's SAEs (SMALL_LLM).
SMALL_MATRYOSHKA_LLM = MatryoshkaLLMScale(width=512, level_divisors=(256, 64, 16, 4), k=40,
                                          multipliers=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=3,
                                          tokens=327_680, lr=1e-3, loss_k_values=(20, 40, 80), loss_seeds=1, b_dec_init="mean")
CI_MATRYOSHKA_LLM = MatryoshkaLLMScale(width=64, level_divisors=(16, 4), k=8, multipliers=(0.0, 0.5, 1.0), seeds=1,
                                       tokens=4096, lr=1e-3, loss_k_values=(8,), loss_seeds=1, b_dec_init="mean")


@dataclass(frozen=True)
class GroundTruthScale:
    """The numbers of notebook 07: SAEs on a SynthSAEBench-style synthetic model
    (``hedging_utils.ground_truth``; SynthSAEBench-16k's recipe at this size).

    Attributes:
        num_features, hidden_dim: the model's features and dimensions (SynthSAEBench-16k:
            16,384 in 768).
        hierarchy_roots: trees of the hierarchy forest (16k: 128, each of 85 features).
        orthogonalization_steps: steps of the dictionary orthogonalisation (16k: 100).
        widths: SAE widths of X-gt-hedging, from well below to near ``num_features``.
        k: BatchTopK K of every BatchTopK SAE.
        l1_coefficient: the L1 coefficient of the L1 SAEs.
        batch_size, lr: samples per batch; Adam's constant learning rate.
        train_samples: training samples of every SAE (a base SAE of X-gt-hedging, every
            balance-matryoshka SAE).
        continued_samples, n_new: the control and the extension by ``n_new`` latents of eq. 7
            continue a base SAE on this many further samples.
        balance_width, level_divisors, multipliers: X-gt-balance's balance matryoshka BatchTopK
            SAEs: levels ``balance_width // d`` for each ``d`` and the width; beta of level m is
            multiplier^(levels - m).
        seeds: seeds of the balance-matryoshka SAEs (each seed its own data stream and
            initialisation).
        hedging_seeds: seeds of X-gt-hedging's SAEs (the first of the same streams).
        eval_samples: fresh samples on which every SAE is evaluated.
        dead_feature_window: steps without firing after which a latent counts as dead (and
            BatchTopK's auxiliary loss revives it).
        published: a hub repository holding the model to use instead of building it from the
            recipe ("" builds it offline); the notebook records where it departs from the recipe.
    """

    num_features: int
    hidden_dim: int
    hierarchy_roots: int
    orthogonalization_steps: int
    widths: tuple[int, ...]
    k: int
    l1_coefficient: float
    batch_size: int
    lr: float
    train_samples: int
    continued_samples: int
    n_new: int
    balance_width: int
    level_divisors: tuple[int, ...]
    multipliers: tuple[float, ...]
    seeds: int
    hedging_seeds: int
    eval_samples: int
    dead_feature_window: int
    published: str = ""

    def __post_init__(self) -> None:
        if self.hedging_seeds > self.seeds:
            raise ParameterError(f"hedging_seeds={self.hedging_seeds} must not exceed seeds={self.seeds} (they share streams).")
        if any(w < 1 for w in self.widths) or list(self.widths) != sorted(set(self.widths)):
            raise ParameterError(f"widths={list(self.widths)} must be positive and strictly increasing.")
        if not 0 < self.k < min(min(self.widths), self.balance_levels[0] if len(self.balance_levels) else self.balance_width):
            raise ParameterError(f"k={self.k} must lie between 0 and the narrowest SAE or matryoshka level.")
        check_levels("balance_width", self.balance_width, self.level_divisors)
        check_multipliers(self.multipliers)
        if self.train_samples < self.batch_size or self.continued_samples < self.batch_size:
            raise ParameterError(f"train_samples and continued_samples must be at least one batch ({self.batch_size}).")

    @property
    def balance_levels(self) -> list[int]:
        return matryoshka_levels(self.balance_width, self.level_divisors)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "balance_levels": self.balance_levels}


# SynthSAEBench-16k's model (SAELens docs); the SAE settings where the docs are silent are ours.
PAPER_GROUND_TRUTH = GroundTruthScale(num_features=16_384, hidden_dim=768, hierarchy_roots=128, orthogonalization_steps=100,
                                      widths=(1024, 2048, 4096, 8192, 16_384), k=34, l1_coefficient=2.0, batch_size=1024,
                                      lr=3e-4, train_samples=100_000_000, continued_samples=20_000_000, n_new=64,
                                      balance_width=4096, level_divisors=(64, 16, 4), multipliers=(0.0, 0.25, 0.5, 0.75, 1.0),
                                      seeds=3, hedging_seeds=3, eval_samples=200_000, dead_feature_window=1000,
                                      published="decoderesearch/synth-sae-bench-16k-v1")
# The recipe at 1,024 features in 128 dimensions (8 trees, 680 features in hierarchies), SAEs of
# 64 to 512 latents, each trained on 153,600 samples (and as many again for eq. 7's control and
# extension: over fewer, BatchTopK's new latents stay dead, since AuxK revives them only after
# `dead_feature_window` steps, and h is 0). Measured: 530 s of CPU time for the whole notebook (13 min
# of wall time on 2 cores shared with other work); the 8-minute target on 2 idle cores is not yet timed.
SMALL_GROUND_TRUTH = GroundTruthScale(num_features=1024, hidden_dim=128, hierarchy_roots=8, orthogonalization_steps=100,
                                      widths=(64, 128, 256, 512), k=12, l1_coefficient=2.0, batch_size=1024, lr=3e-3,
                                      train_samples=153_600, continued_samples=153_600, n_new=16, balance_width=256,
                                      level_divisors=(16, 4), multipliers=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=3,
                                      hedging_seeds=2, eval_samples=10_000, dead_feature_window=25)
CI_GROUND_TRUTH = GroundTruthScale(num_features=128, hidden_dim=32, hierarchy_roots=1, orthogonalization_steps=5,
                                   widths=(16, 64), k=4, l1_coefficient=2.0, batch_size=256, lr=3e-3, train_samples=4096,
                                   continued_samples=1024, n_new=4, balance_width=32, level_divisors=(4,),
                                   multipliers=(0.0, 0.5, 1.0), seeds=2, hedging_seeds=2, eval_samples=2048,
                                   dead_feature_window=4)


@dataclass(frozen=True)
class TrueFeaturesScale:
    """The numbers of notebook 08: the "true features" post's combination toy and the
    decoder-orthogonality penalty (``hedging_utils.combinations``, ``hedging_utils.orthogonality``).
    Penalised SAEs train stacked through the autograd loss (slower a step than the closed-form
    step of the unpenalised L1 grid), so these stay small.

    Attributes:
        steps, batch_size, lr: every toy SAE's training (Adam, betas (0, 0.999), constant lr).
        l1_values, p_f3_values: the combination toy's grid of L1 coefficients and f3 firing
            probabilities (no penalty; trained stacked).
        grid_seeds: seeds per grid point.
        penalty_l1, penalty_p_f3: the grid point where the penalty is tried on the combination toy.
        combination_seeds: seeds of the penalised combination-toy SAEs (and their baselines):
            their outcomes are discrete, so they need more seeds than the others.
        coefficients: the post's pairwise penalty's coefficients (mean |cos| over pairs), besides 0.
        ortsae_coefficients: OrtSAE's chunked penalty's gamma (BatchTopK + AuxK), besides 0; the
            hedging toy uses the largest.
        seeds: seeds of the absorption and hedging SAEs, penalised and not.
        hedging_widths: the narrow widths of the 50-feature toy (P15's) for hedging.
        hedging_steps: training steps of those SAEs.
        eval_samples: fresh samples every SAE is measured on.
    """

    steps: int
    batch_size: int
    lr: float
    l1_values: tuple[float, ...]
    p_f3_values: tuple[float, ...]
    grid_seeds: int
    penalty_l1: float
    penalty_p_f3: float
    combination_seeds: int
    coefficients: tuple[float, ...]
    ortsae_coefficients: tuple[float, ...]
    seeds: int
    hedging_widths: tuple[int, ...]
    hedging_steps: int
    eval_samples: int

    def __post_init__(self) -> None:
        if self.penalty_l1 not in self.l1_values or self.penalty_p_f3 not in self.p_f3_values:
            raise ParameterError(f"penalty_l1={self.penalty_l1} and penalty_p_f3={self.penalty_p_f3} must be points of the "
                                 f"grid l1_values={list(self.l1_values)}, p_f3_values={list(self.p_f3_values)}.")
        if any(c <= 0 for c in (*self.coefficients, *self.ortsae_coefficients)):
            raise ParameterError("coefficients and ortsae_coefficients must be > 0 (0, no penalty, is always trained).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# `small` keeps to 36 penalised SAEs of 2,000 steps; the unpenalised grid trains stacked with the
# closed-form step (192 SAEs in about 30 s). The penalised SAEs used to train one at a time with
# SAELens' trainer (1.6-3 ms a step each): notebook 08 on `small` then took 327 s of wall time and
# 231 s of CPU time on 2 cores shared with a full regeneration (load 3.5), `ci` about 35 s. They
# now train stacked, one stack per penalty coefficient: at 200 steps its 32 penalised `small` jobs
# take 8.6 s stacked against 17.0 s one at a time (2.0x; 1 thread, 2 cores shared); `ci` 27 s
# against 34 s for the whole notebook, cold.
PAPER_TRUE_FEATURES = TrueFeaturesScale(steps=10_000, batch_size=500, lr=3e-3, l1_values=(0.03, 0.1, 0.2, 0.3, 0.5),
                                        p_f3_values=(0.005, 0.01, 0.02, 0.05, 0.1), grid_seeds=16, penalty_l1=0.2,
                                        penalty_p_f3=0.02, combination_seeds=16, coefficients=(0.03, 0.1, 0.3, 1.0),
                                        ortsae_coefficients=(0.25, 1.0), seeds=4, hedging_widths=(15, 20, 25, 30),
                                        hedging_steps=24_415, eval_samples=50_000)
SMALL_TRUE_FEATURES = TrueFeaturesScale(steps=2000, batch_size=500, lr=3e-3, l1_values=(0.03, 0.1, 0.2, 0.3),
                                        p_f3_values=(0.005, 0.02, 0.08), grid_seeds=8, penalty_l1=0.2, penalty_p_f3=0.02,
                                        combination_seeds=6, coefficients=(0.3, 1.0), ortsae_coefficients=(0.25, 1.0), seeds=2,
                                        hedging_widths=(15, 25), hedging_steps=2000, eval_samples=20_000)
CI_TRUE_FEATURES = TrueFeaturesScale(steps=150, batch_size=128, lr=3e-3, l1_values=(0.03, 0.2), p_f3_values=(0.005, 0.08),
                                     grid_seeds=2, penalty_l1=0.2, penalty_p_f3=0.005, combination_seeds=2, coefficients=(0.3,),
                                     ortsae_coefficients=(0.25,), seeds=2, hedging_widths=(15,), hedging_steps=150,
                                     eval_samples=2000)


@dataclass(frozen=True)
class Profile:
    """The numbers a profile sets.

    Attributes:
        name: ``ci``, ``small`` or ``paper``.
        toy_steps, toy_batch_size: optimiser steps and batch size of every toy SAE of notebooks
            01-03 but the balance-matryoshka ones (the authors': 24,414 steps of 500,
            ``hedging_paper/toy_models/train_toy_sae.py``).
        balance_steps, balance_batch_size: the same for the balance-matryoshka toy SAEs (P8,
            P20, the beta sweep; the authors': 24,414 steps of 128,
            ``notebooks/balancing_hedging_and_absorption.ipynb``).
        hedging_toy_steps: base and continued training steps (of ``toy_batch_size``) per SAE of
            the hedging-degree toy (P15; the authors': 24,415 + 24,415,
            ``notebooks/large_toy_model_experiments.ipynb``).
        growing_group_samples: samples between added groups of the growing toy SAE.
        growing_total_samples: the budget every width of the growing toy SAE is trained to.
        sweep_points: number of points in a parameter sweep (correlation, probability, beta).
        seeds: seeds of the hedging-degree toy (P15; the authors' 4).
        llm: the numbers of the LLM figures.
        saebench: the numbers of the SAEBench evaluation.
        matryoshka_llm: the numbers of notebook 06's LLM SAEs.
        ground_truth: the numbers of notebook 07 (SAEs on a synthetic model).
        true_features: the numbers of notebook 08 (the "true features" post; orthogonality).
    """

    name: str
    toy_steps: int
    toy_batch_size: int
    balance_steps: int
    balance_batch_size: int
    hedging_toy_steps: int
    growing_group_samples: int
    growing_total_samples: int
    sweep_points: int
    seeds: int
    llm: LLMScale = field(repr=False, default=None)  # type: ignore[assignment]
    saebench: SAEBenchScale = field(repr=False, default=None)  # type: ignore[assignment]
    matryoshka_llm: MatryoshkaLLMScale = field(repr=False, default=None)  # type: ignore[assignment]
    ground_truth: GroundTruthScale = field(repr=False, default=None)  # type: ignore[assignment]
    true_features: TrueFeaturesScale = field(repr=False, default=None)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Every setting, each scale's by its own ``to_dict`` (derived values included): what a
        figure records, and what tells a committed figure from today's profile."""
        out = asdict(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                out[f.name] = value.to_dict()
        return out


# The paper's LLM settings (§4, A.6-A.8; the post's growing SAE). Where it is silent (the
# layers of Figure 7b, the points of Figure 7c and 16, the number of seeds) the choice is ours.
PAPER_LLM = LLMScale(
    models=(LLMModel("google/gemma-2-2b", 12, 10.0), LLMModel("meta-llama/Llama-3.2-1B", 7, 0.5)),
    layers=(3, 6, 9, 12, 15, 18, 21, 24), corpus="pile", context_size=1024, shard_sequences=256,
    cached_tokens=500_000_000, base_tokens=250_000_000, continued_tokens=250_000_000, batch_size=4096,
    lr_batchtopk=3e-4, lr_l1=7e-5, continued_lr_batchtopk=3e-4, continued_lr_l1=7e-5, dead_feature_window=1000,
    case_study_arch="l1", l1_warm_up_steps=10_000,
    widths=(128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536), width=8192, n_new=64, k=25,
    k_values=(5, 10, 25, 50, 100, 200), l1_values=(0.25, 0.5, 1.0, 2.0, 4.0),
    n_values=(1, 4, 16, 64, 128, 256, 512, 1024),
    growing_start=64, growing_group=64, growing_max=512, growing_group_tokens=37_500_000,
    growing_total_tokens=600_000_000, growing_l1_coefficient=10.0, growing_lr=7e-5, growing_l1_floor=0.5,
    doubling_tokens=37_500_000,
    seeds=3,
)

# The offline CPU scale: Gemma 3 270M (18 layers, d_model 640) on the offline corpus, with
# widths, tokens and seeds cut so that notebook 04 runs in minutes on 2 cores. P7(a)'s widths
# 64-2,048 run from a tenth of d_model to 3.2 times it, each base SAE on 2^20 tokens (3.2 epochs
# of the cache); widths 1,024 and 2,048 hold three quarters of the sweep's arithmetic, so they
# train on the first seed only (one_seed_from). Even so this scale is estimated to take the full
# run past the hour on 2 cores (README, "Profiles"): it is what the LLM claims need, not yet what
# the hour allows. Its 1,024 steps per base SAE are too few for a decoder bias started at 0 to
# reach the activations' mean (norm 23 against 5.5 for centred activations; Adam moves b_dec by
# about the learning rate a step), so its SAEs start b_dec at the mean (notebook 04's
# X-p7-training ablates it), with L1 coefficients chosen for that start: 0.2 gives L0 49 at
# width 128 (0.1/0.3/0.5 give 77/33/18), the growing SAE's 0.4 L0 12-42 over its widths; L1
# SAEs continue at 3e-4, where their added latents live (X-l1-continued).
SMALL_LLM = LLMScale(
    models=(LLMModel("gemma-3-270m", 9, 0.2),), layers=(3, 6, 9), corpus="offline", context_size=128,
    shard_sequences=128, cached_tokens=327_680, base_tokens=1_048_576, continued_tokens=327_680, batch_size=1024,
    lr_batchtopk=1e-3, lr_l1=3e-3, continued_lr_batchtopk=1e-3, continued_lr_l1=3e-4, dead_feature_window=20,
    case_study_arch="l1", l1_warm_up_steps=160,
    widths=(64, 128, 256, 512, 1024, 2048), width=128, n_new=16, k=25,
    k_values=(10, 25, 50), l1_values=(0.5, 1.0, 2.0), n_values=(1, 2, 4, 8, 16, 32, 64),
    growing_start=32, growing_group=32, growing_max=192, growing_group_tokens=81_920, growing_total_tokens=573_440,
    growing_l1_coefficient=0.4, growing_lr=1e-3, growing_l1_floor=0.5, doubling_tokens=81_920,
    seeds=2, one_seed_from=1024, b_dec_init="mean",
)

CI_LLM = LLMScale(
    models=(LLMModel("gemma-3-270m", 2, 0.5),), layers=(1, 2), corpus="offline", context_size=64,
    shard_sequences=16, cached_tokens=4096, base_tokens=8192, continued_tokens=4096, batch_size=512,
    lr_batchtopk=1e-3, lr_l1=1e-3, continued_lr_batchtopk=1e-3, continued_lr_l1=1e-3, dead_feature_window=2,
    case_study_arch="btk", l1_warm_up_steps=2,
    widths=(32, 64), width=32, n_new=4, k=8, k_values=(4, 8), l1_values=(1.0, 2.0), n_values=(1, 4),
    growing_start=16, growing_group=16, growing_max=48, growing_group_tokens=2048, growing_total_tokens=8192,
    growing_l1_coefficient=0.5, growing_lr=1e-3, growing_l1_floor=0.5, doubling_tokens=2048,
    seeds=1, b_dec_init="mean",
)

# The authors' toy runs: SAELens' trainer with training_tokens=100M at train_batch_size_tokens=4096,
# but their synthetic activation store yields one batch of `context_size` samples per step, and
# SAELens' loop steps while fewer than 100M "tokens" are counted: ceil(100M / 4096) = 24,415
# optimiser steps (hedging_paper/toy_models/train_toy_sae.py).
AUTHORS_TOY_STEPS = -(-100_000_000 // 4096)

PROFILES: dict[str, Profile] = {
    "ci": Profile(name="ci", toy_steps=400, toy_batch_size=500, balance_steps=400, balance_batch_size=128,
                  hedging_toy_steps=200, growing_group_samples=51_200, growing_total_samples=512_000,
                  sweep_points=3, seeds=1, llm=CI_LLM, saebench=CI_SAEBENCH,
                  matryoshka_llm=CI_MATRYOSHKA_LLM, ground_truth=CI_GROUND_TRUTH,
                  true_features=CI_TRUE_FEATURES),
    # Toy SAEs at the authors' step counts and batch sizes (trained together, see
    # hedging_utils.training); P15 (8,192 + 8,192 steps, 2 seeds), the growing toy and the sweeps
    # are cut so that every notebook together runs within an hour on 2 CPU cores (the authors':
    # 24,415 + 24,415 steps and 4 seeds for P15, 11-point sweeps).
    "small": Profile(name="small", toy_steps=AUTHORS_TOY_STEPS, toy_batch_size=500, balance_steps=AUTHORS_TOY_STEPS,
                     balance_batch_size=128,
                     hedging_toy_steps=8_192, growing_group_samples=512_000, growing_total_samples=7_680_000,
                     sweep_points=7, seeds=2, llm=SMALL_LLM, saebench=SMALL_SAEBENCH,
                     matryoshka_llm=SMALL_MATRYOSHKA_LLM, ground_truth=SMALL_GROUND_TRUTH,
                     true_features=SMALL_TRUE_FEATURES),
    "paper": Profile(name="paper", toy_steps=AUTHORS_TOY_STEPS, toy_batch_size=500, balance_steps=AUTHORS_TOY_STEPS,
                     balance_batch_size=128,
                     hedging_toy_steps=AUTHORS_TOY_STEPS, growing_group_samples=1_024_000, growing_total_samples=15_360_000,
                     sweep_points=11, seeds=4, llm=PAPER_LLM, saebench=PAPER_SAEBENCH,
                     matryoshka_llm=PAPER_MATRYOSHKA_LLM, ground_truth=PAPER_GROUND_TRUTH,
                     true_features=PAPER_TRUE_FEATURES),
}


def resolve_profile(profile: str | None = None) -> Profile:
    """Return the profile named by ``profile``, else by ``$HEDGING_PROFILE``, else ``small``."""
    name = profile if profile is not None else os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)
    if name not in PROFILES:
        raise ParameterError(
            f"profile={name!r} is not a known profile. Use one of {sorted(PROFILES)} "
            f"(set it with `papermill -p profile small` or `{PROFILE_ENV}=small`)."
        )
    return PROFILES[name]


def figures_dir(profile: Profile, override: str | os.PathLike | None = None) -> Path:
    """Where a profile's figures go: ``figures/`` for ``small`` (committed, shown in the
    README), ``figures/<profile>/`` otherwise, so a test or GPU run never overwrites them.
    ``override`` or ``$HEDGING_FIGURES_DIR`` wins."""
    chosen = override or os.environ.get(FIGURES_DIR_ENV)
    if chosen:
        return Path(chosen)
    base = REPO_ROOT / "figures"
    return base if profile.name == DEFAULT_PROFILE else base / profile.name


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], or a ParameterError naming ``name``."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}={value!r} is not a number; give a probability in [0, 1].") from None
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ParameterError(f"{name}={value!r} is outside [0, 1]; give a probability in [0, 1].")
    return p


def check_probabilities(name: str, values: Iterable[Any]) -> list[float]:
    return [check_probability(f"{name}[{i}]", v) for i, v in enumerate(values)]


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name}={value!r} must be a positive integer.")
    return value


def check_seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(f"{name}={value!r} must be a non-negative integer seed.")
    return value


def check_non_negative(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}={value!r} is not a number; give a value >= 0.") from None
    if not x >= 0:
        raise ParameterError(f"{name}={value!r} must be >= 0.")
    return x


def check_positive(name: str, value: Any) -> float:
    x = check_non_negative(name, value)
    if not x > 0:
        raise ParameterError(f"{name}={value!r} must be > 0.")
    return x


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ParameterError(f"{name}={value!r} is not one of {choices}.")
    return value
