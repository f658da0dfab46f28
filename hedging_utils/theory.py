"""The theory of hedging: exact loss curves and MSE-optimal decoders.

- ``tied_latent_losses``: expected MSE, L1 and L2 loss of a single tied latent
  l = normalize((1-alpha) f1 + alpha f2) when f1 fires alone or with its child f2 (paper §3.5,
  post), and ``mse_minimum_closed_form``, the post's quadratic for the MSE minimum.
- ``ols_decoder``: paper appendix A.4. With an oracle encoder (z_i = A_i m_i for the tracked
  features), the MSE-optimal decoder and bias solve an ordinary least-squares regression of
  each feature's activation on [1, z]. It is computed here from a joint firing distribution
  (exact or sampled), so closed forms 17-19 are checks of it, not its source.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------
# Single tied latent (paper Figure 6, the post's loss curves)


def tied_latent(alpha: np.ndarray) -> np.ndarray:
    """Unit latents normalize((1-alpha) f1 + alpha f2) in feature coordinates, shape [len(alpha), 2]."""
    alpha = np.asarray(alpha, dtype=float)
    raw = np.stack([1 - alpha, alpha], axis=-1)
    return raw / np.linalg.norm(raw, axis=-1, keepdims=True)


def tied_latent_losses(
    alpha: np.ndarray, p_parent_alone: float, p_both: float, l1_coefficient: float = 0.0
) -> dict[str, np.ndarray]:
    """Expected losses of a single-latent tied SAE (ReLU encoder, no biases) with latent
    ``tied_latent(alpha)`` when x = f1 with probability ``p_parent_alone``, x = f1 + f2 with
    probability ``p_both`` and x = 0 otherwise.

    Returns ``mse`` (E||x - x_hat||^2), ``l1`` (coefficient * E[z]), ``mse_l1`` (their sum) and
    ``l2`` (E||x - x_hat||, the norm of the error, not squared).
    """
    latent = tied_latent(alpha)
    mse = np.zeros(len(latent))
    l1 = np.zeros(len(latent))
    l2 = np.zeros(len(latent))
    for prob, x in ((p_parent_alone, np.array([1.0, 0.0])), (p_both, np.array([1.0, 1.0]))):
        z = np.maximum(latent @ x, 0.0)
        err = x[None, :] - z[:, None] * latent
        sq = (err**2).sum(axis=1)
        mse += prob * sq
        l2 += prob * np.sqrt(np.maximum(sq, 0.0))
        l1 += prob * l1_coefficient * z
    return {"mse": mse, "l1": l1, "mse_l1": mse + l1, "l2": l2}


def mse_minimum_closed_form(p_parent_alone: float, p_both: float) -> float:
    """The alpha minimising the tied latent's expected MSE: the root in [0, 1] of
    p_a alpha^2 - (p_a + 2 p_b) alpha + p_b = 0 (p_a = P(f1 alone), p_b = P(f1 and f2)).
    It is 0 only when p_b = 0, i.e. when the child never fires."""
    pa, pb = float(p_parent_alone), float(p_both)
    if pa == 0:
        return 0.5 if pb > 0 else 0.0  # MSE is then minimised by the merged latent f1 + f2
    b = pa + 2 * pb
    return (b - np.sqrt(b * b - 4 * pa * pb)) / (2 * pa)


def l2_has_merged_minimum(p_parent_alone: float, p_both: float) -> bool:
    """Whether the tied latent's L2 loss has a local minimum at the merged latent (alpha = 0.5).

    With l = (cos t, sin t), L2 = p_a sin t + p_b sqrt(2) |sin(t - 45 deg)|, which has a cusp at
    t = 45 deg; its slope from the left there is p_a/sqrt(2) - p_b sqrt(2), so the cusp is a
    local minimum exactly when p_a < 2 p_b.
    """
    return p_parent_alone < 2 * p_both


def local_minima(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    """The local minima (x, y) of a sampled curve, endpoints included, lowest first."""
    y = np.asarray(y)
    out = []
    for i in range(len(y)):
        left = y[i - 1] if i > 0 else np.inf
        right = y[i + 1] if i < len(y) - 1 else np.inf
        if y[i] < left and y[i] <= right:
            out.append((float(x[i]), float(y[i])))
    return sorted(out, key=lambda t: t[1])


# ---------------------------------------------------------------------------------------
# MSE-optimal decoder under an oracle encoder (paper appendix A.4)


def ols_decoder(
    states: np.ndarray,
    probs: np.ndarray | None,
    tracked: Sequence[int],
    magnitudes: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """The MSE-optimal decoder V (eq. 14-15) given an oracle encoder.

    Args:
        states: firing patterns A, shape [S, N] (0/1), exact support or samples.
        probs: probability of each pattern (``None``: equally weighted samples).
        tracked: the features that have a latent (z_i = A_i m_i), in latent order.
        magnitudes: firing magnitude m_j, one value or one per feature.

    Returns:
        V of shape [1 + len(tracked), N]: row 0 is the decoder bias in feature coordinates,
        row 1 + r is the decoder of the latent tracking feature ``tracked[r]``, scaled so the
        latent's activation is A_i m_i.
    """
    states = np.asarray(states, dtype=float)
    n_states, n_features = states.shape
    w = np.full(n_states, 1.0 / n_states) if probs is None else np.asarray(probs, dtype=float)
    m = np.broadcast_to(np.asarray(magnitudes, dtype=float), (n_features,))
    y = states * m  # A_k m_k for every feature k
    z = np.concatenate([np.ones((n_states, 1)), y[:, list(tracked)]], axis=1)
    gram = z.T @ (w[:, None] * z)
    cross = z.T @ (w[:, None] * y)
    return np.linalg.pinv(gram) @ cross


def ols_decoder_for_encoder(z: np.ndarray, feature_acts: np.ndarray) -> np.ndarray:
    """The MSE-optimal decoder for a given (trained) encoder: regress each feature's
    activation on [1, z] over samples. Same layout as ``ols_decoder``."""
    z1 = np.concatenate([np.ones((len(z), 1)), np.asarray(z, dtype=float)], axis=1)
    coef, *_ = np.linalg.lstsq(z1, np.asarray(feature_acts, dtype=float), rcond=None)
    return coef


def hierarchy_weight(p_child_given_parent: float, m_child: float = 1.0, m_parent: float = 1.0) -> float:
    """Eq. 17: weight of an untracked child in its tracked parent's latent."""
    return m_child / m_parent * p_child_given_parent


def exclusion_weight(p_k: float, p_i: float, m_k: float = 1.0, m_i: float = 1.0) -> float:
    """Eq. 18: weight of untracked f_k in the latent of a mutually exclusive tracked f_i."""
    return -(m_k / m_i) * p_k / (1 - p_i)


def exclusion_bias(p_k: float, p_i: float, m_k: float = 1.0) -> float:
    """Eq. 19: decoder-bias weight of f_k when it is mutually exclusive with tracked f_i,
    m_k P(f_k | not f_i)."""
    return m_k * p_k / (1 - p_i)


def single_latent_weights(p_k_given_i: float, p_k_given_not_i: float, m_k: float = 1.0, m_i: float = 1.0) -> tuple[float, float]:
    """For one tracked feature i and one untracked k, the OLS solution in terms of
    conditional probabilities: latent weight (m_k/m_i)(P(k|i) - P(k|not i)) and bias
    m_k P(k|not i). Eq. 17-19 are its special cases."""
    return m_k / m_i * (p_k_given_i - p_k_given_not_i), m_k * p_k_given_not_i
