import numpy as np
import pytest
import torch

from hedging_utils.profiles import ParameterError
from hedging_utils.training import TrainSettings, seeded
from hedging_utils.toys import (
    STREAM_CHUNK_BATCHES,
    ConditionalFiring, CopulaGenerator, Hierarchy, ToySetting, conditional_pair, correlated_firing, correlated_pair,
    exclusive_children_base_probability, lower_triangular_mv, random_correlation_matrix, toy_job, train_toy_saes,
)

N = 400_000


def _within_sampling_error(fires: np.ndarray, p: float, sigmas: float = 5.0) -> bool:
    se = np.sqrt(p * (1 - p) / len(fires)) if 0 < p < 1 else 0.0
    return abs(fires.mean() - p) <= sigmas * se + 1e-12


@pytest.mark.parametrize("p1,a,b", [(0.25, 0.2, 0.1), (0.25, 0.1, 0.2), (0.25, 0.2, 0.0), (0.45, 0.0, 0.3)])
def test_conditional_firing_reproduces_marginal_and_conditionals(p1, a, b):
    fires = (conditional_pair(p1, a, b).sample_feature_activations(N, seed=1) > 0).numpy()
    f1, f2 = fires[:, 0], fires[:, 1]
    assert _within_sampling_error(f1, p1)
    assert _within_sampling_error(f2[f1], a)
    assert _within_sampling_error(f2[~f1], b)
    assert _within_sampling_error(f2, p1 * a + (1 - p1) * b)


def test_conditional_child_keeps_its_magnitude():
    toy = ToySetting([0.5, 0.3], conditionals=[ConditionalFiring(1, 0, 0.5, 0.2)], magnitudes=[1.0, 2.5])
    acts = toy.sample_feature_activations(10_000, seed=0)
    assert set(acts[:, 1].unique().tolist()) == {0.0, 2.5}


def test_hierarchy_child_fires_only_with_parent():
    toy = ToySetting([0.25, 0.25, 0.25, 0.2], hierarchies=[Hierarchy(2, (3,))])
    fires = (toy.sample_feature_activations(N, seed=2) > 0).numpy()
    assert not (fires[:, 3] & ~fires[:, 2]).any()
    assert _within_sampling_error(fires[fires[:, 2], 3], 0.2)


def test_correlated_pair_keeps_marginals_and_sign_of_correlation():
    fires = (correlated_pair(0.45, 0.25, 0.4).sample_feature_activations(N, seed=3) > 0).numpy().astype(float)
    assert _within_sampling_error(fires[:, 0] > 0, 0.45)
    assert _within_sampling_error(fires[:, 1] > 0, 0.25)
    assert np.corrcoef(fires.T)[0, 1] > 0.1


def test_exact_joint_distribution_matches_samples():
    toy = ToySetting([0.25, 0.25, 0.25, 0.2], hierarchies=[Hierarchy(2, (3,))],
                     conditionals=[ConditionalFiring(1, 0, 0.6, 0.1)])
    states, probs = toy.joint_firing_distribution()
    assert probs.sum() == pytest.approx(1.0)
    fires = (toy.sample_feature_activations(N, seed=4) > 0).numpy().astype(float)
    for state, p in zip(states, probs):
        freq = (fires == state).all(axis=1).mean()
        assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / N) + 1e-12


def test_samples_are_sums_of_orthogonal_unit_features():
    toy = conditional_pair(0.25, 0.2, 0.1)
    feats = toy.features
    assert torch.allclose(feats @ feats.T, torch.eye(2), atol=1e-5)
    acts = toy.sample_feature_activations(100, seed=0)
    assert torch.allclose(toy.feature_dict(acts), acts @ feats, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(firing_probabilities=[0.25, 1.2]), r"firing_probabilities\[1\]=1.2"),
    (dict(firing_probabilities=[0.25, 0.2], conditionals=[ConditionalFiring(1, 0, 0.2, 0.1)], d_model=1), "d_model=1"),
    (dict(firing_probabilities=[0.25, 0.2], hierarchies=[Hierarchy(0, (5,))]), "index 5"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        ToySetting(**kwargs)


def test_bad_conditional_probability_names_it():
    with pytest.raises(ParameterError, match=r"P\(f1\|not f0\)=-0.1"):
        ConditionalFiring(1, 0, 0.2, -0.1)


def train_one(toy, d_sae, steps=20, batch_size=1000, lr=3e-4, **kwargs):
    job = toy_job(toy, d_sae, batch_size=batch_size, **kwargs)
    return train_toy_saes({"sae": job}, TrainSettings(steps=steps, batch_size=batch_size, lr=lr))["sae"]


def test_toy_saes_are_cached_and_deterministic(tmp_path, monkeypatch, capsys):
    toy = conditional_pair(0.25, 0.2, 0.0)
    first = train_one(toy, 1, seed=3, l1_coefficient=1e-3)
    assert "trained" in capsys.readouterr().out
    again = train_one(toy, 1, seed=3, l1_coefficient=1e-3)
    assert capsys.readouterr().out == ""  # loaded from the cache, not retrained
    assert torch.equal(first.W_dec, again.W_dec)
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "other"))
    fresh = train_one(toy, 1, seed=3, l1_coefficient=1e-3)
    assert torch.equal(first.W_dec, fresh.W_dec)  # same seed, same numbers
    assert not list((tmp_path / "other" / "toy_saes").glob(".*"))  # no temporary entries left


def test_stream_batches_depend_only_on_their_index():
    stream = conditional_pair(0.25, 0.2, 0.1).stream(10, seed=1)
    from_zero = [b for _, b in zip(range(STREAM_CHUNK_BATCHES + 3), stream(0))]
    from_later = [b for _, b in zip(range(5), stream(STREAM_CHUNK_BATCHES - 2))]
    assert all(torch.equal(a, b) for a, b in zip(from_zero[STREAM_CHUNK_BATCHES - 2:], from_later))


def test_true_feature_init_starts_at_the_features():
    toy = conditional_pair(0.25, 0.2, 0.1)
    sae = train_one(toy, 2, steps=1, seed=0, l1_coefficient=1e-3, lr=1e-12)
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ toy.features.T
    assert torch.allclose(cos, torch.eye(2), atol=1e-4)


def test_exclusive_children_fire_with_the_requested_conditional_probability():
    q = exclusive_children_base_probability(0.4, 2)
    toy = ToySetting([0.3, q, q], hierarchies=[Hierarchy(0, (1, 2), mutually_exclusive=True)])
    fires = (toy.sample_feature_activations(N, seed=5) > 0).numpy()
    parent = fires[:, 0]
    assert not (fires[:, 1] & fires[:, 2]).any()
    for child in (1, 2):
        assert _within_sampling_error(fires[parent, child], 0.4)
        assert not (fires[:, child] & ~parent).any()


def test_parent_fires_exactly_with_any_child():
    toy = ToySetting([0.5] + [0.02] * 14, hierarchies=[Hierarchy(0, tuple(range(1, 15)), parent_fires_with_any_child=True)])
    fires = (toy.sample_feature_activations(N, seed=6) > 0).numpy()
    assert (fires[:, 0] == fires[:, 1:].any(axis=1)).all()
    assert _within_sampling_error(fires[:, 0], 1 - 0.98**14)


def test_random_correlation_matrix_keeps_the_independent_block_uncorrelated():
    corr = random_correlation_matrix(20, independent=5, seed=0)
    assert np.allclose(corr, corr.T) and np.allclose(np.diag(corr), 1)
    assert np.linalg.eigvalsh(corr).min() > -1e-9
    assert np.abs(corr[:5, :5] - np.eye(5)).max() < 1e-12
    assert np.abs(corr[5:, :5]).max() > 0.1


def test_toy_training_is_the_authors_optimiser():
    """hedging_paper/toy_models/train_toy_sae.py: Adam at a constant 3e-4 with SAELens 5.10.2's
    betas (0.0, 0.999), gradients clipped at norm 1."""
    from hedging_utils.toys import toy_training
    assert toy_training(24_415, 500).to_dict() == {"steps": 24_415, "batch_size": 500, "lr": 3e-4, "adam_betas": [0.0, 0.999],
                                                   "dead_feature_window": 1000, "grad_clip": 1.0, "precision": "float32"}


def _copula_toy(n: int = 50, seed: int = 42) -> ToySetting:
    correlation = random_correlation_matrix(n, independent=n // 5, seed=seed)
    return ToySetting(np.linspace(0.3, 0.05, n).tolist(), correlation_matrix=correlation.tolist(), magnitude_std=0.15,
                      d_model=2 * n, feature_seed=seed)


def test_lower_triangular_mv_sums_each_entry_in_order_without_fused_products():
    torch.manual_seed(0)
    tril = torch.linalg.cholesky(torch.tensor(random_correlation_matrix(30, seed=1), dtype=torch.float32))
    vectors = torch.randn(5000, 30)
    expected = torch.zeros(5000, 30)
    for j in range(30):  # the definition: one rounded product added at a time, j in order
        expected = expected + vectors[:, j:j + 1] * tril[:, j]
    for rows in (64, 5000, 16_384):
        assert torch.equal(lower_triangular_mv(tril, vectors, rows=rows), expected)
    exact = (vectors.double() @ tril.double().T).float()
    assert torch.allclose(lower_triangular_mv(tril, vectors), exact, rtol=0, atol=1e-5)
    # a check that can fail: the transposed factor (the upper triangle) is a different product
    assert not torch.allclose(lower_triangular_mv(tril.T.contiguous().tril(), vectors), exact, atol=1e-3)


def test_copula_draws_are_saelens_own_for_the_same_seed():
    """``correlated_firing`` against SAELens' ``_generate_correlated_features`` (torch's
    MultivariateNormal): the same random draws, so the same firing pattern. On the machines here
    they agree bit for bit; elsewhere a matrix product that fuses its multiply-adds could differ in
    the last bit, so an entry within 1e-5 of its threshold may fire in one and not the other."""
    from sae_lens.synthetic import activation_generator

    generator = _copula_toy().generator
    corr = generator.correlation_matrix
    thresholds = generator.correlation_thresholds
    with seeded(7):
        theirs = activation_generator._generate_correlated_features(20_000, corr, thresholds, torch.device("cpu"))
    with seeded(7):
        ours = correlated_firing(20_000, corr, thresholds, torch.device("cpu"))
    fired = {tuple(x) for x in torch.stack(theirs, 1).tolist()}
    mine = {tuple(x) for x in torch.stack(ours, 1).tolist()}
    assert len(fired) > 50_000
    assert len(fired ^ mine) <= 2
    # and the copula is the toy's: the generator's samples fire with its probabilities
    with seeded(3):
        acts = generator.sample(40_000)
    assert np.allclose((acts > 0).float().mean(0).numpy(), np.linspace(0.3, 0.05, 50), atol=0.01)


def test_toy_batches_are_those_of_saelens_generator():
    """Whole toy batches through ``CopulaGenerator`` against SAELens' own ``ActivationGenerator``
    built with the same settings, on the same seed."""
    from sae_lens.synthetic import ActivationGenerator

    toy = _copula_toy(20, seed=3)
    ours = toy.generator
    assert isinstance(ours, CopulaGenerator)
    theirs = ActivationGenerator(toy.num_features, torch.tensor(toy.firing_probabilities), std_firing_magnitudes=0.15,
                                 correlation_matrix=torch.tensor(toy.correlation_matrix, dtype=torch.float32))
    with seeded(11):
        a = theirs.sample(8192)
    with seeded(11):
        b = ours.sample(8192)
    assert torch.allclose(a, b, atol=1e-6)
    assert (a > 0).ne(b > 0).sum() <= 2


def test_a_stream_reads_back_the_chunks_it_drew_as_they_were_drawn(monkeypatch):
    """The memo of drawn chunks (``STREAM_MEMO_BYTES``): a second read of a stream's batches (as
    each group of the growing SAE rereads the stream's tail) gives the very tensors a fresh
    stream draws, without drawing them; the memo stays within its size, dropping the least
    recently used chunks, and a stream's chunks go when the stream does."""
    import gc

    from hedging_utils import toys

    toy = _copula_toy(20, seed=5)
    stream = toy.stream(64, seed=2)
    first = [batch.clone() for batch, _ in zip(stream(10), range(3 * STREAM_CHUNK_BATCHES))]
    draws = []
    original = CopulaGenerator.sample
    monkeypatch.setattr(CopulaGenerator, "sample", lambda self, n: draws.append(n) or original(self, n))
    again = [batch for batch, _ in zip(stream(10), range(3 * STREAM_CHUNK_BATCHES))]
    assert draws == [] and all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = [batch for batch, _ in zip(toy.stream(64, seed=2)(10), range(3 * STREAM_CHUNK_BATCHES))]
    assert len(draws) == 4 and all(torch.equal(a, b) for a, b in zip(first, fresh))  # chunks 0-3 of a new stream
    # a bounded memo: room for about two chunks keeps the latest two
    monkeypatch.setattr(toys, "STREAM_MEMO_BYTES", 2 * max(b.nbytes + v.nbytes for b, v, _ in toys._memo.values()) + 1)
    small = toy.stream(64, seed=3)
    for _ in zip(small(0), range(5 * STREAM_CHUNK_BATCHES)):
        pass
    assert toys._memo_bytes <= toys.STREAM_MEMO_BYTES and len(toys._memo) == 2
    (small_id,) = {key[0] for key in toys._memo}
    draws.clear()
    assert torch.equal(next(small(4 * STREAM_CHUNK_BATCHES)), next(toy.stream(64, seed=3)(4 * STREAM_CHUNK_BATCHES)))
    assert len(draws) == 1  # chunk 4 was kept, the fresh stream drew it
    del small
    gc.collect()
    assert all(key[0] != small_id for key in toys._memo)  # the stream is gone, and its chunks
    assert toys._memo_bytes == sum(b.nbytes + v.nbytes for b, v, _ in toys._memo.values())
