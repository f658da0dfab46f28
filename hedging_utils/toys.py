"""Toy models of features, and SAEs trained on them.

A toy model has N mutually orthogonal unit features in R^D (SAELens' ``FeatureDictionary``).
Each sample fires a random subset of them (SAELens' ``ActivationGenerator``) and is the sum of
the firing features times their magnitudes. Dependencies between features come from:

- ``Hierarchy``: children fire only when their parent fires (SAELens' ``HierarchyNode``); a
  child's firing probability is then P(child | parent).
- ``ConditionalFiring``: a feature fires with one probability when another fires and with a
  different one when it does not (e.g. P(f2|f1)=0.2, P(f2|not f1)=0.1), a small
  ``ActivationsModifier`` on top of SAELens' generator.
- ``correlation_matrix``: a Gaussian copula over all features (SAELens; its factor applied by
  ``lower_triangular_mv``, see ``correlated_firing``).
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Iterator, Literal, Mapping, Sequence
from unittest import mock

import numpy as np
import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import activation_generator
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    HierarchyNode,
    hierarchy_modifier,
    init_sae_to_match_feature_dict,
)

from hedging_utils.profiles import ParameterError, check_positive_int, check_probability
from hedging_utils.training import Job, Stream, TrainSettings, make_sae, seeded, train_saes

STREAM_CHUNK_BATCHES = 64
"""Toy batches are drawn this many at a time (one generator call), which keeps the cost of
SAELens' sampler per batch small; batch i is still always the same batch."""

STREAM_MEMO_BYTES = 768 * 2**20
"""Drawn chunks of toy streams are kept in memory up to this size (their feature activations, as
a bit mask of the firing ones and their values), the least recently used dropped first, and read
back instead of drawn again. The growing toy SAE of notebook 04 needs it: each group's
control/extended pair trains from that group's batch to the end of the budget on the same
stream, so the stream's tail is read once per group (49,500 batches drawn for 7,500 distinct
ones at the default budget; 61,875 for 9,375 in its ablation). Its 118 chunks of 65,536 samples
of 50 features take about 370 MB. Reading a chunk back gives the same batches as drawing it."""

_memo: OrderedDict[tuple[int, int], tuple[np.ndarray, torch.Tensor, torch.Size]] = OrderedDict()
_memo_bytes = 0
_stream_ids = itertools.count()


def _remember(key: tuple[int, int], acts: torch.Tensor) -> None:
    global _memo_bytes
    firing = acts != 0
    entry = (np.packbits(firing.numpy().ravel()), acts[firing].clone(), acts.shape)
    size = entry[0].nbytes + entry[1].nbytes
    if size > STREAM_MEMO_BYTES:
        return
    while _memo and _memo_bytes + size > STREAM_MEMO_BYTES:
        _, (bits, values, _) = _memo.popitem(last=False)
        _memo_bytes -= bits.nbytes + values.nbytes
    _memo[key] = entry
    _memo_bytes += size


def _forget(stream_id: int) -> None:
    """Drop a stream's chunks once nothing can read them any more."""
    global _memo_bytes
    for key in [key for key in _memo if key[0] == stream_id]:
        bits, values, _ = _memo.pop(key)
        _memo_bytes -= bits.nbytes + values.nbytes


def _recall(key: tuple[int, int]) -> torch.Tensor | None:
    entry = _memo.get(key)
    if entry is None:
        return None
    _memo.move_to_end(key)
    bits, values, shape = entry
    firing = torch.from_numpy(np.unpackbits(bits, count=shape.numel()).view(bool).reshape(shape))
    return torch.zeros(shape, dtype=values.dtype).masked_scatter_(firing, values)


def lower_triangular_mv(tril: torch.Tensor, vectors: torch.Tensor, rows: int = 16_384) -> torch.Tensor:
    """``tril @ v`` for every row ``v`` of ``vectors`` ([B, n]), ``tril`` lower-triangular [n, n]:
    each entry summed in order over j, every product rounded before it is added (no fused
    multiply-add). That is the arithmetic of torch's ``MultivariateNormal.rsample`` on a CPU
    (``torch.matmul`` of the [n, n] factor with B vectors, a batched matrix product of B
    matrix-vector products, bit for bit on the machines here) at a fraction of its cost: it runs
    as n column updates on blocks of ``rows`` vectors. Elementwise float operations round the same
    everywhere, so this order gives the same bits on any machine."""
    n = vectors.shape[1]
    columns = tril.t().contiguous()  # columns[j, i] = tril[i, j]
    out = torch.empty_like(vectors)
    product = vectors.new_empty(min(rows, len(vectors)), n)
    for start in range(0, len(vectors), rows):
        v, acc = vectors[start:start + rows], out[start:start + rows]
        term = product[:len(v)]
        torch.mul(v[:, :1], columns[:1], out=acc)
        for j in range(1, n):  # tril[i, j] = 0 for i < j: only columns j.. change
            torch.mul(v[:, j:j + 1], columns[j:j + 1, j:], out=term[:, j:])
            acc[:, j:].add_(term[:, j:])
    return out


def correlated_firing(batch_size: int, correlation_matrix: torch.Tensor, thresholds: torch.Tensor,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' ``_generate_correlated_features`` (the Gaussian copula: a multivariate normal
    sample with the features' correlation, thresholded per feature), the same random draws and
    the same numbers, with the Cholesky factor applied by ``lower_triangular_mv``. SAELens'
    ``MultivariateNormal.sample`` multiplies the factor into each sample as its own tiny matrix
    product: for the 50-feature toys of notebooks 04 and 08 that was two thirds of drawing a
    batch (75 of 118 ms per 65,536 samples on two threads, 25 ms here)."""
    corr = correlation_matrix.to(device=device, dtype=thresholds.dtype)
    scale_tril = torch.linalg.cholesky(corr)  # MultivariateNormal's factor of its covariance
    noise = torch.empty(batch_size, corr.shape[0], dtype=thresholds.dtype, device=device).normal_()  # its draw
    return (lower_triangular_mv(scale_tril, noise) > thresholds.unsqueeze(0)).nonzero(as_tuple=True)


class CopulaGenerator(ActivationGenerator):
    """SAELens' ``ActivationGenerator``, whose correlated features (``correlation_matrix``) are
    drawn by ``correlated_firing``: the same samples for the same seed, faster."""

    def sample(self, batch_size: int) -> torch.Tensor:
        with mock.patch.object(activation_generator, "_generate_correlated_features", correlated_firing):
            return super().sample(batch_size)


@dataclass(frozen=True)
class ConditionalFiring:
    """``child`` fires with ``p_given_parent`` when ``parent`` fires, else ``p_given_not_parent``."""

    child: int
    parent: int
    p_given_parent: float
    p_given_not_parent: float

    def __post_init__(self) -> None:
        check_probability(f"P(f{self.child}|f{self.parent})", self.p_given_parent)
        check_probability(f"P(f{self.child}|not f{self.parent})", self.p_given_not_parent)
        if self.child == self.parent:
            raise ParameterError(f"ConditionalFiring child={self.child} cannot be its own parent.")


@dataclass(frozen=True)
class Hierarchy:
    """``children`` fire only when ``parent`` fires; optionally at most one child at a time.

    With ``parent_fires_with_any_child`` the dependency runs the other way: children fire
    independently with their own probabilities and the parent fires exactly when at least one
    child does (the post's 14-children toy), so the parent never fires alone.
    """

    parent: int
    children: tuple[int, ...]
    mutually_exclusive: bool = False
    parent_fires_with_any_child: bool = False

    def node(self) -> HierarchyNode:
        return HierarchyNode(
            feature_index=self.parent,
            children=[HierarchyNode(feature_index=c) for c in self.children],
            mutually_exclusive_children=self.mutually_exclusive,
        )


class AnyChildParentModifier:
    """An SAELens ``ActivationsModifier``: each parent fires, with its own magnitude, exactly
    when at least one of its children fires."""

    def __init__(self, hierarchies: Sequence[Hierarchy]):
        self.hierarchies = list(hierarchies)

    def __call__(self, acts: torch.Tensor, generator: ActivationGenerator) -> torch.Tensor:
        for h in self.hierarchies:
            fires = (acts[:, list(h.children)] > 0).any(dim=1).to(acts.dtype)
            mean = generator.mean_firing_magnitudes[h.parent]
            std = generator.std_firing_magnitudes[h.parent]
            acts[:, h.parent] = fires * (mean + std * torch.randn_like(fires))
        return acts


class ConditionalFiringModifier:
    """An SAELens ``ActivationsModifier`` that redraws each conditional child's firing from
    the state of its parent, with the child's own magnitude distribution."""

    def __init__(self, conditionals: Sequence[ConditionalFiring]):
        self.conditionals = list(conditionals)

    def __call__(self, acts: torch.Tensor, generator: ActivationGenerator) -> torch.Tensor:
        for c in self.conditionals:
            parent_on = acts[:, c.parent] > 0
            p = torch.where(parent_on, c.p_given_parent, c.p_given_not_parent).to(acts.dtype)
            fires = torch.bernoulli(p)
            mean = generator.mean_firing_magnitudes[c.child]
            std = generator.std_firing_magnitudes[c.child]
            magnitude = mean + std * torch.randn_like(p)
            acts[:, c.child] = fires * magnitude
        return acts


@dataclass
class ToySetting:
    """A toy model of orthogonal features.

    Attributes:
        firing_probabilities: P(feature fires) for each feature. For a child in ``hierarchies``
            this is P(child | parent); for a child of a ``ConditionalFiring`` it is unused.
        conditionals: features whose firing depends on another feature's state.
        hierarchies: parent/child groups (children fire only with the parent).
        correlation_matrix: optional Gaussian-copula correlation between all features.
        magnitudes: mean firing magnitude, one value or one per feature.
        magnitude_std: standard deviation of the firing magnitude.
        d_model: dimension D of the space the features live in.
        feature_seed: seed of the random orthogonal feature directions.
    """

    firing_probabilities: Sequence[float]
    conditionals: Sequence[ConditionalFiring] = ()
    hierarchies: Sequence[Hierarchy] = ()
    correlation_matrix: Sequence[Sequence[float]] | None = None
    magnitudes: float | Sequence[float] = 1.0
    magnitude_std: float | Sequence[float] = 0.0
    d_model: int = 50
    feature_seed: int = 0

    def __post_init__(self) -> None:
        self.firing_probabilities = [
            check_probability(f"firing_probabilities[{i}]", p) for i, p in enumerate(self.firing_probabilities)
        ]
        n = self.num_features
        check_positive_int("d_model", self.d_model)
        if n > self.d_model:
            raise ParameterError(f"d_model={self.d_model} is smaller than the {n} features; raise d_model.")
        self.conditionals = tuple(self.conditionals)
        self.hierarchies = tuple(self.hierarchies)
        for c in self.conditionals:
            for idx in (c.child, c.parent):
                if not 0 <= idx < n:
                    raise ParameterError(f"ConditionalFiring feature index {idx} is outside 0..{n - 1}.")
        for h in self.hierarchies:
            for idx in (h.parent, *h.children):
                if not 0 <= idx < n:
                    raise ParameterError(f"Hierarchy feature index {idx} is outside 0..{n - 1}.")

    @property
    def num_features(self) -> int:
        return len(self.firing_probabilities)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.correlation_matrix is not None:
            d["correlation_matrix"] = np.asarray(self.correlation_matrix, dtype=float).round(10).tolist()
        return d

    @cached_property
    def feature_dict(self) -> FeatureDictionary:
        return FeatureDictionary(self.num_features, self.d_model, seed=self.feature_seed)

    @property
    def features(self) -> torch.Tensor:
        """The true features, shape [N, D], unit norm and mutually orthogonal."""
        return self.feature_dict.feature_vectors.detach()

    @cached_property
    def generator(self) -> ActivationGenerator:
        modifiers: list[Any] = []
        gated = [h for h in self.hierarchies if not h.parent_fires_with_any_child]
        if gated:
            modifiers.append(hierarchy_modifier([h.node() for h in gated]))
        if len(gated) < len(self.hierarchies):
            modifiers.append(AnyChildParentModifier([h for h in self.hierarchies if h.parent_fires_with_any_child]))
        if self.conditionals:
            modifiers.append(ConditionalFiringModifier(self.conditionals))
        corr = None if self.correlation_matrix is None else torch.tensor(self.correlation_matrix, dtype=torch.float32)
        return CopulaGenerator(
            self.num_features,
            torch.tensor(self.firing_probabilities),
            std_firing_magnitudes=_per_feature(self.magnitude_std, self.num_features),
            mean_firing_magnitudes=_per_feature(self.magnitudes, self.num_features),
            modify_activations=modifiers or None,
            correlation_matrix=corr,
        )

    def sample_feature_activations(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``n`` samples of feature activations a (shape [n, N]); x = a @ features."""
        with seeded(seed):
            return self.generator.sample(n)

    def stream(self, batch_size: int, seed: int = 0) -> Stream:
        """Deterministic training batches. They are drawn ``STREAM_CHUNK_BATCHES`` at a time,
        chunk c with seed (seed, c), so batch i is always the same batch: two SAEs trained
        separately from the same batch index see identical data. The chunks this stream drew
        are kept for its later reads (``STREAM_MEMO_BYTES``)."""
        stream_id = next(_stream_ids)

        def batches(start_batch: int = 0) -> Iterator[torch.Tensor]:
            features = self.feature_dict  # built (by optimisation) outside no_grad
            chunk, offset = divmod(start_batch, STREAM_CHUNK_BATCHES)
            while True:
                acts = _recall((stream_id, chunk))
                if acts is None:
                    with seeded(seed * 1_000_003 + chunk), torch.no_grad():
                        acts = self.generator.sample(batch_size * STREAM_CHUNK_BATCHES)
                    _remember((stream_id, chunk), acts)
                with torch.no_grad():
                    block = features(acts)
                yield from block.view(STREAM_CHUNK_BATCHES, batch_size, -1)[offset:]
                chunk, offset = chunk + 1, 0

        weakref.finalize(batches, _forget, stream_id)
        return batches

    def stream_key(self, batch_size: int, seed: int = 0) -> dict[str, Any]:
        """What identifies ``self.stream(batch_size, seed)`` in a cache key."""
        return {"toy": self.to_dict(), "batch_size": batch_size, "stream_seed": seed, "chunk_batches": STREAM_CHUNK_BATCHES}

    def joint_firing_distribution(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact joint distribution of which features fire.

        Returns ``(states, probs)``: every binary firing pattern (shape [2^N, N]) and its
        probability. Exact for independent features, hierarchies without mutual exclusion and
        conditional firing; other settings raise ``NotImplementedError`` (sample instead).
        """
        if self.correlation_matrix is not None or any(
            h.mutually_exclusive or h.parent_fires_with_any_child for h in self.hierarchies
        ):
            raise NotImplementedError("no closed-form joint distribution for this setting; sample it instead")
        n = self.num_features
        if n > 16:
            raise NotImplementedError(f"{n} features give 2^{n} firing patterns; sample instead")
        parents = {c.child: c for c in self.conditionals}
        for h in self.hierarchies:
            for child in h.children:
                p = self.firing_probabilities[child]
                parents[child] = ConditionalFiring(child, h.parent, p, 0.0)
        states = np.array(list(itertools.product([0, 1], repeat=n)), dtype=float)
        probs = np.ones(len(states))
        for j in range(n):
            if j in parents:
                c = parents[j]
                p_on = np.where(states[:, c.parent] == 1, c.p_given_parent, c.p_given_not_parent)
            else:
                p_on = np.full(len(states), self.firing_probabilities[j])
            probs *= np.where(states[:, j] == 1, p_on, 1 - p_on)
        return states, probs


def conditional_pair(
    p_f1: float, p_f2_given_f1: float, p_f2_given_not_f1: float, *, d_model: int = 50, **kwargs: Any
) -> ToySetting:
    """Two features: f1 fires with ``p_f1``; f2 fires with P(f2|f1) and P(f2|not f1)."""
    return ToySetting(
        firing_probabilities=[p_f1, p_f2_given_f1],
        conditionals=[ConditionalFiring(1, 0, p_f2_given_f1, p_f2_given_not_f1)],
        d_model=d_model,
        **kwargs,
    )


def correlated_pair(p_f1: float, p_f2: float, rho: float, *, d_model: int = 50, **kwargs: Any) -> ToySetting:
    """Two features with marginals ``p_f1``, ``p_f2`` and Gaussian-copula correlation ``rho``."""
    if not -1 < rho < 1:
        raise ParameterError(f"rho={rho!r} must lie in (-1, 1).")
    return ToySetting(
        firing_probabilities=[p_f1, p_f2], correlation_matrix=[[1.0, rho], [rho, 1.0]], d_model=d_model, **kwargs
    )


def exclusive_children_base_probability(p_each: float, n_children: int) -> float:
    """The base firing probability q that gives each of ``n_children`` mutually exclusive
    children P(child | parent) = ``p_each`` under SAELens' rule (children are drawn
    independently with q, and if several fire one of them is kept at random):
    (1 - (1 - q)^n) / n = p_each."""
    check_probability("p_each", p_each)
    if n_children * p_each > 1:
        raise ParameterError(f"p_each={p_each} is impossible for {n_children} mutually exclusive children (sum > 1).")
    return 1 - (1 - n_children * p_each) ** (1 / n_children)


def random_correlation_matrix(num_features: int, independent: int = 0, seed: int = 0) -> np.ndarray:
    """A random correlation matrix for a Gaussian copula (the post's 20-feature toy) in which
    the first ``independent`` features are mutually uncorrelated.

    It is the normalised Gram matrix of random Gaussian vectors, one per feature, with the
    first ``independent`` vectors made orthogonal, so it is a valid correlation matrix with
    exactly zero correlation inside that block and random correlations everywhere else.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((num_features, num_features))
    if independent > 1:
        q, _ = np.linalg.qr(vectors[:independent].T)
        vectors[:independent] = q.T * np.linalg.norm(vectors[:independent], axis=1, keepdims=True)
    gram = vectors @ vectors.T
    scale = np.sqrt(np.diag(gram))
    corr = gram / np.outer(scale, scale)
    np.fill_diagonal(corr, 1.0)
    return corr


# ---------------------------------------------------------------------------------------
# SAEs on toys


Init = Literal["true_features", "random"]


def toy_job(
    setting: ToySetting,
    d_sae: int,
    *,
    batch_size: int,
    seed: int = 0,
    stream_seed: int | None = None,
    architecture: str = "standard",
    init: Init = "true_features",
    init_feature_order: Sequence[int] | None = None,
    label: str = "",
    **sae_cfg: Any,
) -> Job:
    """A fresh SAE of width ``d_sae`` on ``setting``, ready for ``training.train_saes``.

    ``init="true_features"`` starts latent i at true feature i (encoder = decoder = f_i, for
    i < min(d_sae, N); SAELens' ``init_sae_to_match_feature_dict``), or at feature
    ``init_feature_order[i]`` (e.g. parents first for a matryoshka SAE); ``"random"`` keeps
    SAELens' default initialisation, drawn with ``seed``. The SAE trains on
    ``setting.stream(batch_size, stream_seed)`` (``stream_seed`` defaults to ``seed``). Extra
    keyword arguments go to the SAE config (e.g. ``l1_coefficient``, ``k``).
    """
    check_positive_int("d_sae", d_sae)
    if init not in ("true_features", "random"):
        raise ParameterError(f"init={init!r} must be 'true_features' or 'random'.")
    stream_seed = seed if stream_seed is None else stream_seed
    with seeded(seed):
        sae = make_sae(setting.d_model, d_sae, architecture, **sae_cfg)
        if init == "true_features":
            order = None if init_feature_order is None else torch.tensor(list(init_feature_order))
            init_sae_to_match_feature_dict(sae, setting.feature_dict, feature_ordering=order)
            sae.W_dec.data = sae.W_dec.data.contiguous()  # it is set to a transpose
    return Job(
        sae=sae,
        stream=setting.stream(batch_size, seed=stream_seed),
        data=setting.stream_key(batch_size, stream_seed),
        init={"seed": seed, "init": init if init_feature_order is None else [init, list(init_feature_order)]},
        label=label,
    )


def toy_training(steps: int, batch_size: int) -> TrainSettings:
    """The authors' toy optimiser (``hedging_paper/toy_models/train_toy_sae.py``): Adam at a
    constant 3e-4 with SAELens 5.10.2's default betas (0.0, 0.999) (their ``poetry.lock``; SAELens
    6 defaults to beta1 = 0.9), gradients clipped at norm 1, for ``steps`` steps of ``batch_size``."""
    return TrainSettings(steps=steps, batch_size=batch_size, lr=3e-4, adam_betas=(0.0, 0.999))


def train_toy_saes(jobs: Mapping[str, Job], settings: TrainSettings, **kwargs: Any) -> dict[str, TrainingSAE[Any]]:
    """Train a sweep of toy SAEs together (cached under ``data/cache/toy_saes``)."""
    return train_saes(jobs, settings, kind="toy_saes", **kwargs)


def _per_feature(value: float | Sequence[float], n: int) -> torch.Tensor:
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value))
    if len(value) != n:
        raise ParameterError(f"got {len(value)} magnitude values for {n} features.")
    return torch.tensor([float(v) for v in value])
