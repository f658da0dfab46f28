"""Measurements on trained SAEs and on the curves the notebooks sweep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def zero_crossing(x: Sequence[float], y: Sequence[float]) -> float | None:
    """The first x at which the sampled curve y(x) changes sign, by linear interpolation
    between the two samples around it (x sorted ascending); None if it never does."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    for i in range(len(x) - 1):
        if y[i] == 0:
            return float(x[i])
        if y[i] * y[i + 1] < 0:
            return float(x[i] - y[i] * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))
    return float(x[-1]) if len(y) and y[-1] == 0 else None


# ---------------------------------------------------------------------------------------
# Hedging degree (paper §4, eq. 5-7)


@dataclass
class HedgingDegree:
    """Hedging degree h of an extension pair and the numbers behind it.

    Attributes:
        h: mean over the original latents of ||Proj(delta_i, new latents)|| minus the mean over
            random draws of ||Proj(delta_i, N random unit vectors)|| (eq. 7).
        projection_new: per original latent, ||Proj(delta_i, new latents)||.
        projection_random: per original latent, the mean over draws of the random projection.
        h_random_spread: standard deviation over draws of the random term's latent mean.
        portion_new: share of the change's squared norm inside the new latents' span,
            ||Proj(Delta)||^2 / ||Delta||^2 over all original latents (the post's "portion").
        portion_random: the same share for random spans, mean over draws (about N/D).
        delta_norm: per original latent, ||delta_i||.

    ``rate`` is the authors' normalised, clamped form of h (``hedging_rate`` in their
    ``hedging_paper/evals/hedging_eval.py``, which their Figure 15 plots as "hedging degree"):
    max(0, (p_new - p_rand) / (1 - p_rand)), with p_new and p_rand the mean projections above
    (their decoder rows are divided by the control's mean decoder norm; ours are unit rows).
    """

    h: float
    projection_new: np.ndarray
    projection_random: np.ndarray
    h_random_spread: float
    portion_new: float
    portion_random: float
    delta_norm: np.ndarray

    @property
    def rate(self) -> float:
        p_new, p_random = float(self.projection_new.mean()), float(self.projection_random.mean())
        return max(0.0, (p_new - p_random) / (1 - p_random))

    def summary(self) -> dict[str, float]:
        return {"h": self.h, "h_random_spread": self.h_random_spread, "hedging_rate": self.rate, "portion_new": self.portion_new,
                "portion_random": self.portion_random, "mean_delta_norm": float(self.delta_norm.mean())}


def _unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.clip(np.linalg.norm(w, axis=1, keepdims=True), 1e-12, None)


def projection_norms(vectors: np.ndarray, span: np.ndarray) -> np.ndarray:
    """||Proj(v, span)|| for each row v of ``vectors``, where ``span`` holds the spanning
    vectors as rows (eq. 6, computed with an orthonormal basis of the span)."""
    basis, _ = np.linalg.qr(np.asarray(span, dtype=float).T)
    return np.linalg.norm(np.asarray(vectors, dtype=float) @ basis, axis=1)


def decoder_change(w_dec_before: np.ndarray, w_dec_after: np.ndarray) -> np.ndarray:
    """delta_L (eq. 5): the change of the original latents' unit-norm decoder rows."""
    n = len(w_dec_before)
    return _unit_rows(np.asarray(w_dec_after, dtype=float)[:n]) - _unit_rows(np.asarray(w_dec_before, dtype=float))


def hedging_degree_from_decoders(
    w_dec_control: np.ndarray, w_dec_extended: np.ndarray, *, n_random_draws: int = 10, seed: int = 0
) -> HedgingDegree:
    """Hedging degree from the control's decoder [L, D] and the extended SAE's decoder [L+N, D]."""
    n_original = len(w_dec_control)
    new = _unit_rows(np.asarray(w_dec_extended, dtype=float)[n_original:])
    if len(new) < 1:
        raise ValueError("the extended decoder has no new latents")
    delta = decoder_change(w_dec_control, w_dec_extended)
    rng = np.random.default_rng(seed)
    proj_new = projection_norms(delta, new)
    randoms = [projection_norms(delta, rng.standard_normal(new.shape)) for _ in range(n_random_draws)]
    random_means = np.array([r.mean() for r in randoms])
    total = float((delta**2).sum())
    share = (lambda p: float((p**2).sum()) / total) if total > 0 else (lambda p: 0.0)
    return HedgingDegree(
        h=float(proj_new.mean() - random_means.mean()),
        projection_new=proj_new,
        projection_random=np.mean(randoms, axis=0),
        h_random_spread=float(random_means.std()),
        portion_new=share(proj_new),
        portion_random=float(np.mean([share(r) for r in randoms])),
        delta_norm=np.linalg.norm(delta, axis=1),
    )


def hedging_degree(control: Any, extended: Any, *, n_random_draws: int = 10, seed: int = 0) -> HedgingDegree:
    """Hedging degree of an SAE ``extended`` by N latents against its ``control`` (any two
    SAELens SAEs whose first L decoder rows are the same latents)."""
    return hedging_degree_from_decoders(
        control.W_dec.detach().float().cpu().numpy(), extended.W_dec.detach().float().cpu().numpy(),
        n_random_draws=n_random_draws, seed=seed,
    )
