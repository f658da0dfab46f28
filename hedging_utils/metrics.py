"""Measurements on trained SAEs and on the curves the notebooks sweep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch


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


def projection_norms(vectors: np.ndarray, span: np.ndarray, *, rtol: float | None = None) -> np.ndarray:
    """||Proj(v, span)|| for each row v of ``vectors``, where ``span`` holds the spanning
    vectors as rows (eq. 6), for any span, rank-deficient included.

    The orthonormal basis is the left singular vectors of ``span``^T whose singular values
    exceed ``rtol`` times the largest (default: numpy's ``matrix_rank`` tolerance,
    max(shape) * machine epsilon), so linearly dependent spanning vectors (two identical
    decoder rows, say) add no direction; this equals the authors' pseudo-inverse projection
    A (A^T A)^+ A^T v. A plain QR would keep a spurious direction there."""
    span = np.asarray(span, dtype=float)
    vectors = np.asarray(vectors, dtype=float)
    if span.size == 0:
        return np.zeros(len(vectors))
    u, singular, _ = np.linalg.svd(span.T, full_matrices=False)
    tolerance = (max(span.shape) * np.finfo(float).eps if rtol is None else rtol) * singular.max(initial=0.0)
    basis = u[:, singular > tolerance]
    return np.linalg.norm(vectors @ basis, axis=1)


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


# ---------------------------------------------------------------------------------------
# Decoder-bias norms (the post: "Larger decoder bias norm indicates more hedging")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _span_share(vector: np.ndarray, rows: np.ndarray) -> float:
    """||Proj(v, span of rows)||^2 / ||v||^2 (1 once the rows span the whole space)."""
    norm = float(vector @ vector)
    if norm == 0 or len(rows) == 0:
        return float("nan")
    return float(projection_norms(vector[None], rows)[0] ** 2 / norm)


def decoder_bias_table(saes: Mapping[Any, Any], activations: Any, *, batch_size: int = 4096) -> pd.DataFrame:
    """One row per SAE (any SAELens SAE, keyed by a name): its width, its L0 and the share of
    its latents that fire on ``activations`` (inputs [n, d] in the units the SAE was trained
    on), ||b_dec||, ||b_dec|| over the mean input norm, the cosine of b_dec with the mean
    input, and the share of b_dec in the span of the decoder rows (1 once the decoder spans
    the input space, i.e. for widths of at least d that are full rank)."""
    x = torch.as_tensor(activations).float()
    mean_x = x.mean(0).numpy()
    mean_norm = float(x.norm(dim=1).mean())
    rows = []
    for name, sae in saes.items():
        b = sae.b_dec.detach().float().cpu().numpy()
        w = sae.W_dec.detach().float().cpu().numpy()
        with torch.no_grad():
            fires = torch.cat([sae.encode(x[i:i + batch_size]) > 0 for i in range(0, len(x), batch_size)])
        rows.append({"sae": name, "width": int(sae.cfg.d_sae), "d_in": int(sae.cfg.d_in),
                     "l0": float(fires.float().sum(1).mean()), "alive_fraction": float(fires.any(0).float().mean()),
                     "b_dec_norm": float(np.linalg.norm(b)), "relative_b_dec_norm": float(np.linalg.norm(b)) / mean_norm,
                     "cos_b_dec_mean_input": _cos(b, mean_x), "b_dec_span_share": _span_share(b, w)})
    return pd.DataFrame(rows)


def bias_changes(
    saes: Sequence[Any], activations: Any, *, n_random_draws: int = 200, seed: int = 0, batch_size: int = 4096,
) -> pd.DataFrame:
    """How b_dec changes across the stages of a growing SAE (``saes``: widths in order, each
    stage's first latents being the previous stage's), and a test of the post's guess that
    past the residual width the changes add up like independent random vectors.

    Per stage s (from the second SAE on), with delta = b_s - b_{s-1}:
    - ``span_share_new``: share of ||delta||^2 in the span of the latents just added (NaN once
      they are at least d, when that span is everything), against ``span_share_random`` = N/d;
    - ``cos_handover``: cosine of delta with minus the new latents' mean output
      sum_j E[a_j] W_dec[j] on ``activations`` (+1: the bias hands what the new latents now
      carry over to them, as hedging predicts);
    - ``cos_previous_bias`` and ``cos_previous_change``: cosine of delta with b_{s-1} and with
      the previous stage's delta (about ±1/sqrt(d) for independent random vectors);
    - ``random_walk_norm`` (± ``random_walk_std``): ||b_0 + sum of independent random vectors
      of the measured change norms|| over ``n_random_draws`` draws, the sqrt(n) law, beside the
      measured ``b_dec_norm``.
    """
    x = torch.as_tensor(activations).float()
    rng = np.random.default_rng(seed)
    biases = [sae.b_dec.detach().float().cpu().numpy().astype(float) for sae in saes]
    d = len(biases[0])
    walks = np.repeat(biases[0][None], n_random_draws, axis=0)
    rows, previous_delta = [], None
    for s in range(1, len(saes)):
        before, after = saes[s - 1], saes[s]
        old, new = int(before.cfg.d_sae), int(after.cfg.d_sae)
        delta = biases[s] - biases[s - 1]
        w_new = after.W_dec.detach().float().cpu().numpy()[old:]
        with torch.no_grad():
            mean_acts = torch.cat([after.encode(x[i:i + batch_size])[:, old:] for i in range(0, len(x), batch_size)]).mean(0)
        handover = -(mean_acts.numpy().astype(float) @ w_new)
        steps = rng.standard_normal((n_random_draws, d))
        walks = walks + steps / np.linalg.norm(steps, axis=1, keepdims=True) * np.linalg.norm(delta)
        walk_norms = np.linalg.norm(walks, axis=1)
        rows.append({"width_before": old, "width_after": new, "n_new": new - old,
                     "b_dec_norm_before": float(np.linalg.norm(biases[s - 1])), "b_dec_norm": float(np.linalg.norm(biases[s])),
                     "change_norm": float(np.linalg.norm(delta)),
                     "span_share_new": _span_share(delta, w_new) if new - old < d else float("nan"),
                     "span_share_random": min(1.0, (new - old) / d),
                     "cos_handover": _cos(delta, handover), "cos_previous_bias": _cos(delta, biases[s - 1]),
                     "cos_previous_change": _cos(delta, previous_delta) if previous_delta is not None else float("nan"),
                     "random_walk_norm": float(walk_norms.mean()), "random_walk_std": float(walk_norms.std())})
        previous_delta = delta
    return pd.DataFrame(rows)


def control_changes(doubled: Sequence[Any], control: Sequence[Any]) -> pd.DataFrame:
    """Each stage of a doubling chain beside its control's (``extension.double_beside_control``:
    the same SAE trained on the same batches without new latents), one row per ``stage`` (0: the
    shared start):

    - ``b_dec_norm`` and ``control_b_dec_norm``, and ``corrected_norm``: the doubled SAE's norm
      less what the control's moved since the start (what more training alone would have done);
    - from stage 1 on, with delta and delta_c the stage's change of b_dec in each chain:
      ``control_change_norm`` (||delta_c||), ``cos_control_change`` (cosine of delta with
      delta_c) and ``share_not_control`` (||delta - delta_c||^2 / ||delta||^2: the share of the
      stage's change the control does not make too); NaN at stage 0.
    """
    if len(doubled) != len(control):
        raise ValueError(f"the doubled chain has {len(doubled)} stages and its control {len(control)}; they must match.")
    biases = [[sae.b_dec.detach().float().cpu().numpy().astype(float) for sae in chain] for chain in (doubled, control)]
    (ours, theirs), nan = biases, float("nan")
    rows = []
    for stage, (b, c) in enumerate(zip(ours, theirs)):
        row = {"stage": stage, "width": int(doubled[stage].cfg.d_sae), "b_dec_norm": float(np.linalg.norm(b)),
               "control_b_dec_norm": float(np.linalg.norm(c)),
               "corrected_norm": float(np.linalg.norm(b) - (np.linalg.norm(c) - np.linalg.norm(theirs[0]))),
               "control_change_norm": nan, "cos_control_change": nan, "share_not_control": nan}
        if stage:
            delta, delta_c = b - ours[stage - 1], c - theirs[stage - 1]
            row.update(control_change_norm=float(np.linalg.norm(delta_c)), cos_control_change=_cos(delta, delta_c),
                       share_not_control=float(np.sum((delta - delta_c) ** 2) / np.sum(delta ** 2)) if delta.any() else nan)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# Reconstruction, and comparing SAE families over a setting (notebook 06)


def reconstruction_table(saes: Mapping[Any, Any], activations: Any, *, batch_size: int = 4096) -> pd.DataFrame:
    """One row per SAE (any SAELens SAE, keyed by a name) on ``activations`` (inputs [n, d] in
    the units the SAE was trained on): its L0, the variance it explains
    (1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2), its MSE (mean squared error norm per
    input) and the share of its latents that fire."""
    x = torch.as_tensor(activations).float()
    total_variance = float((x - x.mean(0)).pow(2).sum())
    rows = []
    for name, sae in saes.items():
        l0, squared_error, fired = 0.0, 0.0, torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                chunk = x[i:i + batch_size]
                acts = sae.encode(chunk)
                squared_error += float((sae.decode(acts) - chunk).pow(2).sum())
                l0 += float((acts > 0).sum())
                fired |= (acts > 0).any(0)
        rows.append({"sae": name, "width": int(sae.cfg.d_sae), "l0": l0 / len(x),
                     "variance_explained": 1 - squared_error / total_variance, "mse": squared_error / len(x),
                     "alive_fraction": float(fired.float().mean())})
    return pd.DataFrame(rows)


def numeric_values(values: pd.Series) -> pd.Series:
    """``values`` as floats, NaN where a metric could not run (a "not run: ..." string)."""
    return pd.to_numeric(values, errors="coerce")


def replicate_noise(first: Any, second: Any) -> float:
    """The seed standard deviation of a set of measurements, from two runs that differ only in
    their seed (e.g. the cosines of the same toy SAE trained with seeds 0 and 1).

    ``first`` and ``second`` hold the same measurements, in the same order. Each difference
    has variance 2σ², so the pooled estimate is sqrt(mean(difference²) / 2): the typical
    measurement's seed std (large, hedged cosines move more than it, near-zero ones less).
    Pairs with a NaN are left out; with none left the noise is NaN (unknown)."""
    a, b = (np.asarray(v, dtype=float).ravel() for v in (first, second))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"replicate_noise needs the same, non-empty measurements from both runs; got {a.size} and {b.size}")
    diff = a - b
    diff = diff[np.isfinite(diff)]
    return float(np.sqrt(np.mean(diff**2) / 2.0)) if diff.size else float("nan")


def interior_optimum(frame: pd.DataFrame, x: str, metric: str, *, higher_is_better: bool) -> dict[str, Any]:
    """Whether an intermediate value of ``x`` beats both ends on ``metric`` (paper §5: a balance
    multiplier between 0 and 1 against the standard and the matryoshka SAE).

    ``frame`` has one row per SAE (seeds as repeated rows). Means and standard deviations over
    the rows of each ``x``; ``best_x`` is the interior ``x`` with the best mean. ``beats_both_ends``:
    its mean is better than both end means; ``margin``: how much better than the closer end;
    ``noise``: the largest standard deviation over seeds among the three (0 with one seed);
    ``separated``: ``beats_both_ends`` and ``margin`` above ``noise``. With no numeric value
    (a metric that did not run) or fewer than three values of ``x``, ``status`` says why and
    the verdicts are None."""
    values = numeric_values(frame[metric])
    stats = values.groupby(frame[x]).agg(["mean", "std", "count"]).dropna(subset=["mean"]).sort_index()
    out: dict[str, Any] = {"metric": metric, "higher_is_better": higher_is_better, "means": stats["mean"].to_dict(),
                           "best_x": None, "beats_both_ends": None, "margin": None, "noise": None, "separated": None}
    if len(stats) < 3:
        out["status"] = (f"not run: {metric} has no value" if stats.empty else
                         f"not run: {metric} has values at {len(stats)} values of {x}; need 3")
        return out
    sign = 1.0 if higher_is_better else -1.0
    interior = stats.iloc[1:-1]
    best = (sign * interior["mean"]).idxmax()
    ends = [stats.index[0], stats.index[-1]]
    margin = min(sign * (stats.loc[best, "mean"] - stats.loc[e, "mean"]) for e in ends)
    noise = float(stats.loc[[best, *ends], "std"].fillna(0.0).max())
    out.update(status="ok", best_x=float(best), beats_both_ends=bool(margin > 0), margin=float(margin), noise=noise,
               separated=bool(margin > noise))
    return out


def summarise(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over the rows (seeds) of each group of ``by``, per
    metric, in one tidy table (columns ``*by, metric, mean, std, n``). Entries that are not
    numbers ("not run: ...") are left out; a metric with none gets no rows."""
    parts = []
    for metric in metrics:
        values = numeric_values(frame[metric])
        stats = values.groupby([frame[b] for b in by]).agg(["mean", "std", "count"]).dropna(subset=["mean"])
        parts.append(stats.rename(columns={"count": "n"}).reset_index().assign(metric=metric))
    if not parts:
        return pd.DataFrame(columns=[*by, "metric", "mean", "std", "n"])
    return pd.concat(parts, ignore_index=True)[[*by, "metric", "mean", "std", "n"]]


def pareto_gap(frame: pd.DataFrame, x: str, y: str, by: str, reference: Any) -> pd.DataFrame:
    """How far each curve of ``frame`` (one per value of ``by``; points (``x``, ``y``), e.g. L0 and
    variance explained, averaged over repeated rows at equal ``x``) lies from the ``reference``
    curve at the same ``x``: ``gap`` = y - the reference's y linearly interpolated at x, NaN where
    x lies outside the reference's range. The reference's own points are left out."""
    curves = frame.groupby([by, x], as_index=False)[y].mean()
    ref = curves[curves[by] == reference].sort_values(x)
    rows = curves[curves[by] != reference].copy()
    inside = rows[x].between(ref[x].min(), ref[x].max())
    rows["reference_y"] = np.where(inside, np.interp(rows[x], ref[x], ref[y]), np.nan)
    rows["gap"] = rows[y] - rows["reference_y"]
    return rows.reset_index(drop=True)
