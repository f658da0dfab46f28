import pytest

import numpy as np

from hedging_utils.metrics import hedging_degree_from_decoders, zero_crossing


def test_zero_crossing_interpolates_between_samples():
    assert zero_crossing([0, 0.1, 0.2, 0.3], [-0.3, -0.1, 0.1, 0.3]) == pytest.approx(0.15)


def test_zero_crossing_on_a_sample_and_none():
    assert zero_crossing([0, 1, 2], [-1, 0, 1]) == 1
    assert zero_crossing([0, 1, 2], [1, 2, 3]) is None


def test_hedging_rate_is_the_normalised_clamped_degree():
    rng = np.random.default_rng(0)
    control = rng.standard_normal((6, 10))
    new = rng.standard_normal((2, 10))
    extended = np.concatenate([control + 0.3 * rng.standard_normal((6, 1)) * new[:1], new])  # changes along a new latent
    d = hedging_degree_from_decoders(control, extended, n_random_draws=20)
    p_new, p_random = d.projection_new.mean(), d.projection_random.mean()
    assert d.h == pytest.approx(p_new - p_random)
    assert d.rate == pytest.approx((p_new - p_random) / (1 - p_random)) and d.rate > d.h > 0
    unrelated = np.concatenate([control + 0.3 * rng.standard_normal((6, 10)), new])
    assert hedging_degree_from_decoders(control, unrelated).rate >= 0  # clamped, where h may be < 0
    assert "hedging_rate" in d.summary()
