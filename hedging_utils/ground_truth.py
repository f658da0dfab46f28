"""SAEs measured against a known synthetic model (SAELens' SynthSAEBench recipe).

An LLM's true features are unknown, so the paper measures hedging there only through proxies
(eq. 7's hedging degree). SAELens' ``SyntheticModel`` gives a model whose features are known at
LLM-like scale: thousands of features in superposition (more features than dimensions, the
dictionary orthogonalised as far as it goes), Zipfian firing, a forest of hierarchies with
mutually exclusive children and low-rank correlations between all features. This module

- builds such a model from a seeded config (``synth_config``: SynthSAEBench-16k's recipe at any
  number of features and dimensions), or loads the published SynthSAEBench-16k from the hub and
  checks it against the recipe (``load_model``, ``recipe_differences``), and streams its activations to the stacked trainer
  (``synth_stream``, ``synth_job``: ``hedging_utils.training.train_saes``);
- matches each latent to its feature (``match_latents``) and measures *true hedging* per latent
  (``true_hedging``): the norm of the component of its unit decoder row outside its match's
  direction, split into the part in the span of the match's hierarchy relatives, the part in
  the span of its most correlated features, and the rest;
- measures *absorption* (``absorption``): on samples where a parent fires with a child, the
  parent's latent is silent while the child's latent fires and carries the parent direction;
- evaluates with SAELens' ``eval_sae_on_synthetic_data`` (MCC, latents as feature classifiers,
  dead latents, shrinkage, explained variance) in ``evaluate``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    SyntheticModel,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
)
from sae_lens.synthetic.synthetic_model import (
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModelConfig,
)

from hedging_utils.cache import source_hash
from hedging_utils.metrics import projection_norms
from hedging_utils.profiles import ParameterError, check_non_negative, check_positive_int, check_seed
from hedging_utils.training import Job, Stream, make_sae, seeded

STREAM_CHUNK_BATCHES = 16
"""Batches are drawn this many at a time (one generator call); batch i is always the same batch."""

MEMO_CHUNKS = 64
"""Drawn chunks kept in memory (least recently used dropped): SAEs of different shapes train one
stack after another on the same stream, and drawing SynthSAEBench-style activations (Gaussian
copula, hierarchy) costs more than a small SAE's training step, so each chunk is drawn once."""

@dataclass(frozen=True)
class SynthRecipe:
    """SynthSAEBench-16k's recipe (SAELens docs, "SynthSAEBench"), apart from its size.

    Attributes:
        zipf_exponent, p_max, p_min: Zipfian firing probabilities (0.5, 0.4, 5e-4).
        branching_factor, max_depth: each hierarchy tree (4 children per node, depth 3); every
            parent's children are mutually exclusive.
        correlation_rank, correlation_scale: low-rank correlations of all features (25, 0.1).
        orthogonalization_lr: the dictionary orthogonalisation's learning rate (3e-4).
        mean_magnitude_start, mean_magnitude_end: mean firing magnitudes, linear over features
            (5.0 to 4.0).
        std_magnitude_mean, std_magnitude_std: the firing magnitudes' standard deviations are a
            folded normal (0.5, 0.5).
        compensate_probabilities: raise children's probabilities so that the hierarchy's gating
            keeps their marginal firing rate (SAELens' option).
    """

    zipf_exponent: float = 0.5
    p_max: float = 0.4
    p_min: float = 5e-4
    branching_factor: int = 4
    max_depth: int = 3
    correlation_rank: int = 25
    correlation_scale: float = 0.1
    orthogonalization_lr: float = 3e-4
    mean_magnitude_start: float = 5.0
    mean_magnitude_end: float = 4.0
    std_magnitude_mean: float = 0.5
    std_magnitude_std: float = 0.5
    compensate_probabilities: bool = True


SYNTH_SAE_BENCH = SynthRecipe()


def synth_config(
    num_features: int, hidden_dim: int, *, hierarchy_roots: int, orthogonalization_steps: int, bias: float = 0.0,
    seed: int = 0, recipe: SynthRecipe = SYNTH_SAE_BENCH,
) -> SyntheticModelConfig:
    """A seeded ``SyntheticModelConfig`` of ``num_features`` features in ``hidden_dim`` dimensions
    with ``recipe`` (SynthSAEBench-16k: 16,384 features, 768 dimensions, 128 roots, 100
    orthogonalisation steps). ``bias`` is the norm of the model's constant bias vector: 0 (the
    default) gives none, as the settings quoted for SynthSAEBench-16k list no bias (SAELens'
    own default is a bias of norm 1). ``load_model`` loads the published 16k model instead."""
    check_positive_int("num_features", num_features)
    check_positive_int("hidden_dim", hidden_dim)
    check_positive_int("hierarchy_roots", hierarchy_roots)
    check_positive_int("orthogonalization_steps", orthogonalization_steps)
    check_non_negative("bias", bias)
    check_seed("seed", seed)
    tree = sum(recipe.branching_factor**d for d in range(recipe.max_depth + 1))
    if hierarchy_roots * tree > num_features:
        raise ParameterError(f"hierarchy_roots={hierarchy_roots} trees of {tree} features need {hierarchy_roots * tree} "
                             f"features, more than num_features={num_features}; lower hierarchy_roots to at most "
                             f"{num_features // tree}.")
    if recipe.correlation_rank >= num_features:
        raise ParameterError(f"num_features={num_features} must exceed the correlation rank {recipe.correlation_rank}.")
    return SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=recipe.zipf_exponent, max_prob=recipe.p_max,
                                                          min_prob=recipe.p_min),
        hierarchy=HierarchyConfig(total_root_nodes=hierarchy_roots, branching_factor=recipe.branching_factor,
                                  max_depth=recipe.max_depth, mutually_exclusive_portion=1.0,
                                  compensate_probabilities=recipe.compensate_probabilities),
        correlation=LowRankCorrelationConfig(rank=recipe.correlation_rank, correlation_scale=recipe.correlation_scale),
        orthogonalization=OrthogonalizationConfig(num_steps=orthogonalization_steps, lr=recipe.orthogonalization_lr),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=recipe.mean_magnitude_start, end=recipe.mean_magnitude_end),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=recipe.std_magnitude_mean, std=recipe.std_magnitude_std),
        bias=float(bias) if bias else False,
        seed=seed,
    )


@functools.lru_cache(maxsize=4)
def _build(key: str) -> SyntheticModel:
    with contextlib.redirect_stderr(io.StringIO()):  # SAELens' orthogonalisation always draws a progress bar
        return SyntheticModel(SyntheticModelConfig.from_dict(json.loads(key)))


def build_model(cfg: SyntheticModelConfig) -> SyntheticModel:
    """The ``SyntheticModel`` of ``cfg`` (deterministic given its seed; built once per process)."""
    return _build(json.dumps(cfg.to_dict(), sort_keys=True))


PUBLISHED_16K = "decoderesearch/synth-sae-bench-16k-v1"
"""SynthSAEBench-16k as published on the Hugging Face hub (SAELens docs, "SynthSAEBench")."""

RECIPE_IGNORED = ("seed", "dtype")
"""Config fields ``recipe_differences`` leaves out: they say how a model was drawn, not its recipe."""


def check_published(published: str) -> None:
    """Before any compute: a ``published`` model (a hub repository id; "" for none) needs the hub
    to answer and the repository to exist there."""
    if not published:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(published, timeout=10)
    except RepositoryNotFoundError:
        raise ParameterError(f"published={published!r} is not a model repository on the Hugging Face hub; "
                             f"SynthSAEBench-16k is {PUBLISHED_16K!r}.") from None
    except Exception as err:  # offline mode, no route, DNS, timeout
        raise ParameterError(f"published={published!r} needs the Hugging Face hub, which this machine cannot reach "
                             f"({type(err).__name__}). Run with profile='small' (the recipe built offline from its "
                             "config), or on a machine with network access.") from None


def load_model(cfg: SyntheticModelConfig, published: str = "") -> tuple[SyntheticModel, dict[str, Any]]:
    """(the model, its differences from ``cfg``'s recipe). Without ``published`` the model is
    ``build_model(cfg)`` (no differences); with it, the model published under that hub repository
    (``SyntheticModel.from_pretrained``), compared field by field with ``cfg``
    (``recipe_differences``) so that a figure records where the published model departs from the
    recipe the notebook states."""
    if not published:
        return build_model(cfg), {}
    check_published(published)
    with contextlib.redirect_stderr(io.StringIO()):
        model = SyntheticModel.from_pretrained(published)
    return model, recipe_differences(model.cfg, cfg)


def recipe_differences(actual: SyntheticModelConfig, expected: SyntheticModelConfig) -> dict[str, Any]:
    """Every config field (dotted path into nested configs) where ``actual`` differs from
    ``expected``, as ``{field: {"actual": ..., "expected": ...}}``; ``RECIPE_IGNORED`` aside."""
    flat_a, flat_e = _flatten(actual.to_dict()), _flatten(expected.to_dict())
    out = {}
    for key in sorted(set(flat_a) | set(flat_e)):
        if key.split(".")[-1] in RECIPE_IGNORED:
            continue
        a, e = flat_a.get(key), flat_e.get(key)
        same = math.isclose(a, e, rel_tol=1e-6, abs_tol=1e-12) if _number(a) and _number(e) else a == e
        if not same:
            out[key] = {"actual": a, "expected": e}
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def features_of(model: SyntheticModel) -> torch.Tensor:
    """The model's true features, shape [N, D], unit norm."""
    return model.feature_dict.feature_vectors.detach()


def synth_stream(model: SyntheticModel, batch_size: int, seed: int = 0) -> Stream:
    """Deterministic training batches of the model's hidden activations: chunk c of
    ``STREAM_CHUNK_BATCHES`` batches is drawn with seed (seed, c), so batch i is always the same
    (chunks are kept, ``MEMO_CHUNKS``)."""
    check_positive_int("batch_size", batch_size)

    def batches(start_batch: int = 0) -> Iterator[torch.Tensor]:
        chunk, offset = divmod(start_batch, STREAM_CHUNK_BATCHES)
        while True:
            yield from _chunk(model, batch_size, seed, chunk)[offset:]
            chunk, offset = chunk + 1, 0

    return batches


@functools.lru_cache(maxsize=MEMO_CHUNKS)
def _chunk(model: SyntheticModel, batch_size: int, seed: int, chunk: int) -> torch.Tensor:
    with seeded(seed * 1_000_003 + chunk):
        return model.sample(batch_size * STREAM_CHUNK_BATCHES).view(STREAM_CHUNK_BATCHES, batch_size, -1)


def stream_key(model: SyntheticModel, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """What identifies ``synth_stream(model, batch_size, seed)`` in a cache key (with this
    module's source, which draws the stream)."""
    return {"synthetic_model": model.cfg.to_dict(), "batch_size": batch_size, "stream_seed": seed,
            "chunk_batches": STREAM_CHUNK_BATCHES, "sae_lens": sae_lens_version, "code": source_hash(["ground_truth"])}


def synth_job(model: SyntheticModel, d_sae: int, architecture: str, *, batch_size: int, seed: int = 0,
              stream_seed: int | None = None, label: str = "", **sae_cfg: Any) -> Job:
    """A fresh SAE (SAELens' default initialisation, drawn with ``seed``) of width ``d_sae`` on
    the model's activations, for ``training.train_saes``. Extra keyword arguments go to the SAE
    config (``k``, ``l1_coefficient``, ``matryoshka_widths``, ``coefficient_multiplier``...)."""
    check_positive_int("d_sae", d_sae)
    stream_seed = seed if stream_seed is None else stream_seed
    with seeded(seed):
        sae = make_sae(model.cfg.hidden_dim, d_sae, architecture, **sae_cfg)
    return Job(sae=sae, stream=synth_stream(model, batch_size, stream_seed),
               data=stream_key(model, batch_size, stream_seed), init={"seed": seed, "init": "random"}, label=label)


# ---------------------------------------------------------------------------------------
# The model's structure


def hierarchy_edges(model: SyntheticModel) -> list[tuple[int, int]]:
    """Every (parent, child) pair of feature indices in the model's hierarchy."""
    edges: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        for child in node.children:
            if node.feature_index is not None and child.feature_index is not None:
                edges.append((node.feature_index, child.feature_index))
            walk(child)

    for root in (model.hierarchy.roots if model.hierarchy is not None else []):
        walk(root)
    return edges


def relatives(edges: Sequence[tuple[int, int]]) -> dict[int, set[int]]:
    """Each feature's hierarchy relatives: its ancestors, descendants and siblings."""
    parent = {c: p for p, c in edges}
    children: dict[int, list[int]] = {}
    for p, c in edges:
        children.setdefault(p, []).append(c)

    def ancestors(f: int) -> list[int]:
        out = []
        while f in parent:
            f = parent[f]
            out.append(f)
        return out

    def descendants(f: int) -> list[int]:
        out, todo = [], list(children.get(f, []))
        while todo:
            g = todo.pop()
            out.append(g)
            todo.extend(children.get(g, []))
        return out

    nodes = set(parent) | set(children)
    return {f: (set(ancestors(f)) | set(descendants(f)) | set(children.get(parent.get(f), []))) - {f} for f in nodes}


def most_correlated(model: SyntheticModel, n: int) -> np.ndarray:
    """For each feature, the ``n`` other features of largest |correlation| (the model's
    low-rank copula correlation), shape [N, n]."""
    corr = model.correlation_matrix
    if corr is None or n == 0:
        return np.zeros((model.cfg.num_features, 0), dtype=int)
    factor = corr.correlation_factor.detach().float()
    full = (factor @ factor.T).abs()
    full.fill_diagonal_(-1.0)
    return torch.topk(full, n, dim=1).indices.numpy()


# ---------------------------------------------------------------------------------------
# Ground-truth measures


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.clip(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12, None)


def match_latents(w_dec: Any, features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's feature: the feature of largest cosine with its decoder row. Returns the
    matched feature index and that cosine, one per latent."""
    cos = _unit(_np(w_dec)) @ _unit(_np(features)).T
    match = cos.argmax(axis=1)
    return match, cos[np.arange(len(match)), match]


def true_hedging(w_dec: Any, features: Any, *, relatives_of: dict[int, set[int]] | None = None,
                 correlated: np.ndarray | None = None) -> pd.DataFrame:
    """True hedging of every latent, one row per latent.

    With d the latent's unit decoder row and f its matched feature (``match_latents``), the
    residual r = d - (d.f) f is what the latent carries besides its feature; ``hedging`` is
    ||r|| (0 for a decoder that is exactly its feature; s for sqrt(1 - s^2) f + s g with g a unit
    feature orthogonal to f). It splits orthogonally: ``relatives`` is the norm of r's
    projection on the span of the match's hierarchy relatives (``relatives_of``), ``correlated``
    that of the rest of r on the span of the match's most correlated features (``correlated``,
    relatives left out), ``rest`` the remainder; relatives^2 + correlated^2 + rest^2 = hedging^2.
    """
    w = _unit(_np(w_dec))
    f = _unit(_np(features))
    match, cos = match_latents(w, f)
    rows = []
    for i, (m, c) in enumerate(zip(match, cos)):
        r = w[i] - (w[i] @ f[m]) * f[m]
        total = float(np.linalg.norm(r))
        rel_idx = sorted((relatives_of or {}).get(int(m), set()))
        rel_norm = 0.0
        if rel_idx:
            span = f[rel_idx]
            rel_norm = float(projection_norms(r[None], np.vstack([f[m][None], span]))[0])
            rel_norm = min(rel_norm, total)
        corr_norm = 0.0
        if correlated is not None and len(correlated[m]):
            corr_idx = [int(j) for j in correlated[m] if int(j) not in set(rel_idx) and int(j) != int(m)]
            if corr_idx:
                both = projection_norms(r[None], np.vstack([f[m][None], f[rel_idx] if rel_idx else np.zeros((0, f.shape[1])),
                                                            f[corr_idx]]))[0]
                corr_norm = float(np.sqrt(max(min(both, total) ** 2 - rel_norm**2, 0.0)))
        rest = float(np.sqrt(max(total**2 - rel_norm**2 - corr_norm**2, 0.0)))
        rows.append({"latent": i, "feature": int(m), "cos": float(c), "hedging": total, "relatives": rel_norm,
                     "correlated": corr_norm, "rest": rest})
    return pd.DataFrame(rows)


def absorption(sae: Any, model: SyntheticModel, edges: Sequence[tuple[int, int]], *, n_samples: int, seed: int = 0,
               parent_cos: float = 0.2, min_cofiring: int = 5, batch_size: int = 8192) -> pd.DataFrame:
    """Absorption per (parent, child) edge, on ``n_samples`` fresh samples (seed ``seed``).

    Each feature's latent is the latent whose decoder row has the largest cosine with it. On the
    samples where parent and child both fire, ``absorption`` is the share in which the parent's
    latent is silent while the child's latent fires, counted only when the child's latent
    carries the parent direction (cosine of its decoder with the parent >= ``parent_cos``),
    else 0. Edges with fewer than ``min_cofiring`` such samples are left out."""
    check_positive_int("n_samples", n_samples)
    if not 0 < parent_cos < 1:
        raise ParameterError(f"parent_cos={parent_cos} must lie in (0, 1).")
    f = _unit(_np(features_of(model)))
    w = _unit(_np(sae.W_dec))
    latent_of = (w @ f.T).argmax(axis=0)  # per feature
    parents = np.array([p for p, _ in edges], dtype=int)
    kids = np.array([c for _, c in edges], dtype=int)
    both = np.zeros(len(edges))
    absorbed = np.zeros(len(edges))
    with torch.no_grad():
        for hidden, acts in eval_batches(model, n_samples, seed, batch_size):
            lat = sae.encode(hidden.to(sae.W_dec.dtype)) > 0
            fires = acts > 0
            co = (fires[:, parents] & fires[:, kids]).numpy()
            lat_p = lat[:, latent_of[parents]].numpy()
            lat_c = lat[:, latent_of[kids]].numpy()
            both += co.sum(axis=0)
            absorbed += (co & ~lat_p & lat_c).sum(axis=0)
    carries = (w[latent_of[kids]] * f[parents]).sum(axis=1)
    frame = pd.DataFrame({"parent": parents, "child": kids, "cofiring": both, "child_latent_parent_cos": carries,
                          "absorption": np.where(carries >= parent_cos, absorbed / np.maximum(both, 1), 0.0)})
    return frame[frame["cofiring"] >= min_cofiring].reset_index(drop=True)


def firing_latents(sae: Any, model: SyntheticModel, *, n_samples: int, seed: int = 0, batch_size: int = 8192) -> np.ndarray:
    """Which latents fire at least once on ``n_samples`` fresh samples (seed ``seed``)."""
    check_positive_int("n_samples", n_samples)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for hidden, _ in eval_batches(model, n_samples, seed, batch_size):
            fired |= (sae.encode(hidden.to(sae.W_dec.dtype)) > 0).any(dim=0)
    return fired.numpy()


EVAL_MEMO_VALUES = 200_000_000
"""Evaluation draws of at most this many feature activations (samples x features) are kept in
memory, so that every SAE of a sweep is measured on the same samples without redrawing them."""


def eval_batches(model: SyntheticModel, n_samples: int, seed: int = 0,
                 batch_size: int = 8192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_samples`` fresh (hidden activations, feature activations) pairs drawn with ``seed``,
    in batches; the same arguments give the same samples (kept when small, ``EVAL_MEMO_VALUES``)."""
    check_positive_int("n_samples", n_samples)
    if n_samples * model.cfg.num_features <= EVAL_MEMO_VALUES:
        return _eval_draw(model, n_samples, seed, batch_size)
    return _eval_draw.__wrapped__(model, n_samples, seed, batch_size)


@functools.lru_cache(maxsize=2)
def _eval_draw(model: SyntheticModel, n_samples: int, seed: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    with seeded(seed):
        for start in range(0, n_samples, batch_size):
            out.append(model.sample_with_features(min(batch_size, n_samples - start)))
    return out


def evaluate(sae: Any, model: SyntheticModel, *, n_samples: int, seed: int = 0, batch_size: int = 8192) -> dict[str, float]:
    """SAELens' ``eval_sae_on_synthetic_data`` on ``n_samples`` fresh samples (seed ``seed``),
    flattened: mcc, uniqueness, the classification metrics (precision, recall, F1), L0s, dead
    latents, shrinkage and explained variance."""
    check_positive_int("n_samples", n_samples)
    with seeded(seed), torch.no_grad():
        result = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, num_samples=n_samples,
                                            batch_size=min(batch_size, n_samples))
    return {k: float(v) for k, v in result.to_log_dict().items()}


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(float)
    return np.asarray(x, dtype=float)
