"""The "true features" post's toy (seed 004): frequent co-firing features and a rare one.

Three orthogonal features: f1 and f2 fire often and often together (with fixed magnitudes, so
"in roughly fixed proportions" when they co-fire), f3 fires rarely and independently. The post
argues that an L1 SAE with 3 latents may learn f1 alone, f2 alone and the *combination* f1+f2
(one latent active instead of two on the frequent co-firing inputs, a lower L1 cost) and drop
f3, when f3 is rare enough and the L1 coefficient high enough; and that a 4th latent would then
go to f3. The post gives no numbers; ``combination_toy``'s defaults are this project's
(notebook 08 says so and records them).

``classify_latents`` names each latent of a trained SAE by its decoder direction (as the post
reads the learned directions): ``f1``, ``f2``, ``f3``, ``f1+f2`` (a decoder in the plane of f1
and f2 with a real share of both), ``f1-f2`` (the same with opposite signs: with f1+f2, an
orthogonal basis of the plane rotated away from the features), ``other`` or ``dead`` (never
fires on the evaluation samples). ``outcome`` sums an SAE up: ``true features`` (f1, f2 and f3 each have a latent, and
no latent is a combination), ``combination`` (latents for f1, f2 and f1+f2, none for f3: the
post's prediction for 3 latents), ``combination + f3`` (latents for f1, f2, f1+f2 and f3: its
prediction for 4), ``rotated`` (f1+f2 and f1-f2 latents in place of f1 and f2: orthogonal, yet
not the features), or ``other`` (e.g. a dead latent in place of f3, or, at an L1 coefficient
so high that a lone feature is not worth a latent, only f1+f2 and f3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from hedging_utils.profiles import ParameterError, check_positive_int, check_probability
from hedging_utils.toys import ConditionalFiring, ToySetting

LATENT_KINDS = ("f1", "f2", "f3", "f1+f2", "f1-f2", "other", "dead")
OUTCOMES = ("true features", "combination", "combination + f3", "rotated", "other")


def combination_toy(p_f1: float = 0.3, p_f2_given_f1: float = 0.7, p_f2_given_not_f1: float = 0.15, p_f3: float = 0.02,
                    *, d_model: int = 10, magnitude_std: float = 0.0, feature_seed: int = 0) -> ToySetting:
    """The post's toy as a ``ToySetting``: f1 fires with ``p_f1``; f2 with P(f2|f1) and
    P(f2|not f1) (so the two co-fire with probability p_f1 P(f2|f1)); f3, independent, with
    ``p_f3``. Magnitudes are 1 (± ``magnitude_std``): co-firing f1 and f2 come in a fixed 1:1
    proportion unless ``magnitude_std`` > 0 (the post's relaxed case)."""
    for name, p in (("p_f1", p_f1), ("p_f2_given_f1", p_f2_given_f1), ("p_f2_given_not_f1", p_f2_given_not_f1), ("p_f3", p_f3)):
        check_probability(name, p)
    if d_model < 3:
        raise ParameterError(f"d_model={d_model} must be at least 3 (three orthogonal features).")
    return ToySetting([p_f1, p_f2_given_f1, p_f3], conditionals=[ConditionalFiring(1, 0, p_f2_given_f1, p_f2_given_not_f1)],
                      magnitude_std=magnitude_std, d_model=d_model, feature_seed=feature_seed)


def firing_summary(toy: ToySetting) -> dict[str, float]:
    """Exact probabilities of the firing events of a combination toy: f1 alone, f2 alone,
    f1 and f2 together (with or without f3) and f3 (any)."""
    states, probs = toy.joint_firing_distribution()
    f1, f2, f3 = (states[:, i] == 1 for i in range(3))
    return {"p_f1_alone": float(probs[f1 & ~f2].sum()), "p_f2_alone": float(probs[~f1 & f2].sum()),
            "p_f1_and_f2": float(probs[f1 & f2].sum()), "p_f3": float(probs[f3].sum())}


@dataclass(frozen=True)
class Classification:
    """How ``classify_latents`` names a latent.

    Attributes:
        match_cos: a latent is ``fi`` when cos(decoder, f_i) exceeds this.
        plane_share: a latent is ``f1+f2`` when the share of its unit decoder inside the plane
            of f1 and f2 (the norm of its projection there) exceeds this...
        min_component: ...and its cosine with each of f1 and f2 exceeds this (``f1-f2``: their
            absolute values do, with opposite signs).
    """

    match_cos: float = 0.9
    plane_share: float = 0.9
    min_component: float = 0.25

    def __post_init__(self) -> None:
        for name in ("match_cos", "plane_share", "min_component"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ParameterError(f"{name}={value!r} must lie strictly between 0 and 1.")


def classify_latents(sae: Any, features: torch.Tensor, activations: torch.Tensor | None = None,
                     rule: Classification = Classification()) -> pd.DataFrame:
    """One row per latent: its decoder's cosines with f1, f2, f3, the share of it in the f1-f2
    plane, how often it fires on ``activations`` (inputs [n, d]; None: not checked) and its
    ``kind`` (``LATENT_KINDS``)."""
    w = sae.W_dec.detach().float()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = features.detach().float()
    if f.shape[0] < 3:
        raise ParameterError(f"features has {f.shape[0]} rows; the combination toy has 3 (f1, f2, f3).")
    cos = (unit @ f[:3].T).numpy()
    plane = np.sqrt(cos[:, 0] ** 2 + cos[:, 1] ** 2)
    if activations is not None:
        with torch.no_grad():
            fire_rate = (sae.encode(activations.float()) > 0).float().mean(0).numpy()
    else:
        fire_rate = np.full(len(cos), np.nan)
    rows = []
    for i, (c, share, rate) in enumerate(zip(cos, plane, fire_rate)):
        if rate == 0:
            kind = "dead"
        elif c[2] > rule.match_cos:
            kind = "f3"
        elif c[0] > rule.match_cos:
            kind = "f1"
        elif c[1] > rule.match_cos:
            kind = "f2"
        elif share > rule.plane_share and min(c[0], c[1]) > rule.min_component:
            kind = "f1+f2"
        elif share > rule.plane_share and min(abs(c[0]), abs(c[1])) > rule.min_component and c[0] * c[1] < 0:
            kind = "f1-f2"
        else:
            kind = "other"
        rows.append({"latent": i, "cos_f1": float(c[0]), "cos_f2": float(c[1]), "cos_f3": float(c[2]),
                     "plane_share": float(share), "fire_rate": float(rate), "kind": kind})
    return pd.DataFrame(rows)


def outcome(kinds: Any) -> str:
    """An SAE's outcome (``OUTCOMES``) from its latents' kinds."""
    kinds = set(kinds)
    if {"f1+f2", "f1-f2"} <= kinds and not kinds & {"f1", "f2"}:
        return "rotated"
    if not {"f1", "f2"} <= kinds:
        return "other"
    if "f1+f2" in kinds:
        return "combination + f3" if "f3" in kinds else "combination"
    return "true features" if "f3" in kinds else "other"


def summarize(saes: Mapping[Any, Any], toys: Mapping[Any, ToySetting], *, n_samples: int = 4096, seed: int = 0,
              rule: Classification = Classification()) -> pd.DataFrame:
    """One row per SAE (keyed alike in ``saes`` and ``toys``): its outcome, whether it has a
    f3 latent and a f1+f2 latent, the count of each kind, and the variance it explains on
    ``n_samples`` fresh samples of its toy."""
    check_positive_int("n_samples", n_samples)
    rows = []
    for key, sae in saes.items():
        toy = toys[key]
        x = toy.feature_dict(toy.sample_feature_activations(n_samples, seed=seed)).detach()
        latents = classify_latents(sae, toy.features, x, rule)
        kinds = latents["kind"].tolist()
        with torch.no_grad():
            acts = sae.encode(x)
            error = float((sae.decode(acts) - x).pow(2).sum())
            l1 = float((acts * sae.W_dec.norm(dim=1)).sum())
        coefficient = getattr(sae.cfg, "l1_coefficient", None)
        variance = float((x - x.mean(0)).pow(2).sum())
        rows.append({"key": key, "outcome": outcome(kinds), "has_f3": "f3" in kinds, "has_combination": "f1+f2" in kinds,
                     **{f"n_{k}": kinds.count(k) for k in LATENT_KINDS},
                     "variance_explained": 1 - error / variance,
                     "loss": (error + coefficient * l1) / n_samples if coefficient is not None else float("nan"),
                     "max_cos_f3": float(latents["cos_f3"].max())})
    return pd.DataFrame(rows)
