"""Run profiles and parameter checks.

Every notebook takes a ``profile`` parameter. A profile only changes numbers (how many
samples, how many sweep points), never the code that runs:

- ``ci``: seconds per notebook, for the test suite. Numbers are too small to show the claims.
- ``small`` (default): a CPU, offline. Toy figures at the paper's own settings.
- ``paper``: the paper's exact settings (its models, tokens, widths, seeds); needs a GPU and
  the model/data hubs for the LLM figures. Toy figures are the same as ``small``.

Papermill sets ``profile`` in the notebook's ``parameters`` cell; nbval cannot inject
parameters, so a notebook left at ``profile = None`` reads ``$HEDGING_PROFILE``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

PROFILE_ENV = "HEDGING_PROFILE"
FIGURES_DIR_ENV = "HEDGING_FIGURES_DIR"
DEFAULT_PROFILE = "small"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ParameterError(ValueError):
    """A notebook parameter is invalid. The message names the parameter and the fix."""


@dataclass(frozen=True)
class Profile:
    """The numbers a profile sets.

    Attributes:
        name: ``ci``, ``small`` or ``paper``.
        toy_samples: training samples per toy SAE (the paper trains each on 15M).
        balance_samples: training samples per balance-matryoshka toy SAE (P8, P20: 100M in the paper).
        beta_sweep_samples: training samples per SAE of the beta sweep (X-beta-sweep).
        hedging_toy_samples: base and continued training samples per SAE of the hedging-degree
            toy (P15: 3M + 3M in the paper).
        growing_group_samples: samples between added groups of the growing toy SAE.
        growing_total_samples: the budget every width of the growing toy SAE is trained to.
        sweep_points: number of points in a parameter sweep (correlation, probability, beta).
        seeds: number of seeds where a figure reports spread over seeds.
    """

    name: str
    toy_samples: int
    balance_samples: int
    beta_sweep_samples: int
    hedging_toy_samples: int
    growing_group_samples: int
    growing_total_samples: int
    sweep_points: int
    seeds: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "ci": Profile(name="ci", toy_samples=200_000, balance_samples=200_000, beta_sweep_samples=200_000,
                  hedging_toy_samples=102_400, growing_group_samples=51_200, growing_total_samples=512_000,
                  sweep_points=3, seeds=1),
    "small": Profile(name="small", toy_samples=15_000_000, balance_samples=100_000_000, beta_sweep_samples=15_000_000,
                     hedging_toy_samples=3_000_000, growing_group_samples=1_024_000, growing_total_samples=15_360_000,
                     sweep_points=11, seeds=3),
    "paper": Profile(name="paper", toy_samples=15_000_000, balance_samples=100_000_000, beta_sweep_samples=100_000_000,
                     hedging_toy_samples=3_000_000, growing_group_samples=1_024_000, growing_total_samples=15_360_000,
                     sweep_points=11, seeds=5),
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


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ParameterError(f"{name}={value!r} is not one of {choices}.")
    return value
