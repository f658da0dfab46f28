import numpy as np
import pytest

from hedging_utils import theory
from hedging_utils.toys import ToySetting, Hierarchy, conditional_pair


def _single_latent_ols(toy, magnitudes=1.0):
    states, probs = toy.joint_firing_distribution()
    return theory.ols_decoder(states, probs, tracked=[0], magnitudes=magnitudes)


@pytest.mark.parametrize("p1,p_child", [(0.25, 0.2), (0.4, 0.5), (0.1, 0.9)])
@pytest.mark.parametrize("m1,m2", [(1.0, 1.0), (1.0, 2.0), (1.5, 0.5)])
def test_ols_equals_eq17_for_a_hierarchy(p1, p_child, m1, m2):
    toy = ToySetting([p1, p_child], hierarchies=[Hierarchy(0, (1,))])
    v = _single_latent_ols(toy, [m1, m2])
    assert v[1, 0] == pytest.approx(1.0)  # tracked feature: unit weight (eq. 13)
    assert v[1, 1] == pytest.approx(theory.hierarchy_weight(p_child, m2, m1), abs=1e-12)
    assert v[0, 1] == pytest.approx(0.0, abs=1e-12)  # the child never fires without the parent


@pytest.mark.parametrize("p1,p2", [(0.25, 0.2), (0.4, 0.3), (0.1, 0.05)])
@pytest.mark.parametrize("m1,m2", [(1.0, 1.0), (2.0, 0.7)])
def test_ols_equals_eq18_and_eq19_for_mutual_exclusion(p1, p2, m1, m2):
    # f2 never fires with f1 and has marginal p2: P(f2 | not f1) = p2 / (1 - p1).
    toy = conditional_pair(p1, 0.0, p2 / (1 - p1))
    v = _single_latent_ols(toy, [m1, m2])
    assert v[1, 1] == pytest.approx(theory.exclusion_weight(p2, p1, m2, m1), abs=1e-12)
    assert v[0, 1] == pytest.approx(theory.exclusion_bias(p2, p1, m2), abs=1e-12)


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (0.2, 0.1), (0.1, 0.2), (0.7, 0.0)])
def test_ols_single_latent_in_conditional_probabilities(a, b):
    v = _single_latent_ols(conditional_pair(0.25, a, b))
    weight, bias = theory.single_latent_weights(a, b)
    assert v[1, 1] == pytest.approx(weight, abs=1e-12) and v[0, 1] == pytest.approx(bias, abs=1e-12)


def test_independent_orphan_goes_to_the_bias_only():
    v = _single_latent_ols(conditional_pair(0.25, 0.2, 0.2), [1.0, 3.0])
    assert v[1, 1] == pytest.approx(0.0, abs=1e-12)
    assert v[0, 1] == pytest.approx(0.2 * 3.0)  # V_0k = p_k m_k (case A)


def test_full_capacity_is_monosemantic():
    toy = ToySetting([0.25, 0.2], hierarchies=[Hierarchy(0, (1,))])
    states, probs = toy.joint_firing_distribution()
    v = theory.ols_decoder(states, probs, tracked=[0, 1])
    assert np.allclose(v, [[0, 0], [1, 0], [0, 1]], atol=1e-12)  # eq. 20


def test_sampled_ols_approaches_the_exact_one():
    toy = conditional_pair(0.25, 0.2, 0.1)
    acts = toy.sample_feature_activations(400_000, seed=0).numpy()
    sampled = theory.ols_decoder_for_encoder(acts[:, :1], acts)
    exact = _single_latent_ols(toy)
    assert np.allclose(sampled, exact, atol=0.01)


@pytest.mark.parametrize("pa,pb", [(0.3, 0.1), (0.1, 0.3), (0.2, 0.2), (0.4, 0.01)])
def test_numeric_mse_minimum_equals_the_closed_form(pa, pb):
    alpha = np.linspace(0, 1, 100_001)
    numeric = theory.local_minima(alpha, theory.tied_latent_losses(alpha, pa, pb)["mse"])
    assert len(numeric) == 1  # MSE has a single minimum
    assert numeric[0][0] == pytest.approx(theory.mse_minimum_closed_form(pa, pb), abs=2e-5)
    assert 0 < numeric[0][0] <= 0.5


def test_closed_form_is_zero_only_without_the_child():
    assert theory.mse_minimum_closed_form(0.3, 0.0) == 0.0


def test_l2_prefers_the_parent_when_it_mostly_fires_alone():
    alpha = np.linspace(0, 1, 10_001)
    minima = theory.local_minima(alpha, theory.tied_latent_losses(alpha, 0.3, 0.1)["l2"])
    assert minima[0][0] == 0.0


@pytest.mark.parametrize("pa,pb", [(0.3, 0.1), (0.15, 0.1), (0.1, 0.3), (0.25, 0.2)])
def test_l2_has_a_minimum_at_the_merged_latent_iff_pa_below_twice_pb(pa, pb):
    alpha = np.linspace(0, 1, 10_000 + 1)
    minima = theory.local_minima(alpha, theory.tied_latent_losses(alpha, pa, pb)["l2"])
    assert any(a == 0.5 for a, _ in minima) == theory.l2_has_merged_minimum(pa, pb) == (pa < 2 * pb)


def test_loss_values_at_the_ends():
    losses = theory.tied_latent_losses(np.array([0.0, 0.5]), 0.3, 0.1, l1_coefficient=0.1)
    # alpha = 0: f1 alone is perfect; f1+f2 leaves f2 (squared error 1).
    assert losses["mse"][0] == pytest.approx(0.1)
    assert losses["l1"][0] == pytest.approx(0.1 * (0.3 + 0.1))
    # alpha = 0.5: f1 alone leaves error norm sqrt(1/2); f1+f2 is perfect.
    assert losses["l2"][1] == pytest.approx(0.3 * np.sqrt(0.5))
