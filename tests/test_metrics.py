import pytest

from hedging_utils.metrics import zero_crossing


def test_zero_crossing_interpolates_between_samples():
    assert zero_crossing([0, 0.1, 0.2, 0.3], [-0.3, -0.1, 0.1, 0.3]) == pytest.approx(0.15)


def test_zero_crossing_on_a_sample_and_none():
    assert zero_crossing([0, 1, 2], [-1, 0, 1]) == 1
    assert zero_crossing([0, 1, 2], [1, 2, 3]) is None
