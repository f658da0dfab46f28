"""Ground-truth measures of SAEs on a synthetic model: planted decoders with known answers."""

import math

import numpy as np
import pytest
import torch

from hedging_utils import ground_truth
from hedging_utils.ground_truth import (
    PUBLISHED_16K,
    absorption,
    build_model,
    check_published,
    evaluate,
    features_of,
    hierarchy_edges,
    load_model,
    match_latents,
    most_correlated,
    recipe_differences,
    relatives,
    synth_config,
    synth_job,
    synth_stream,
    true_hedging,
)
from hedging_utils.profiles import ParameterError, resolve_profile
from hedging_utils.training import make_sae


def tiny_config(**kwargs):
    return synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=2, seed=0, **kwargs)


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


def test_config_follows_the_recipe_and_is_deterministic(model):
    cfg = tiny_config()
    assert cfg.hierarchy.branching_factor == 4 and cfg.hierarchy.max_depth == 3
    assert cfg.hierarchy.mutually_exclusive_portion == 1.0
    assert cfg.correlation.rank == 25 and cfg.firing_probability.exponent == 0.5
    again = build_model(synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=2, seed=0))
    assert torch.equal(features_of(again), features_of(model))
    other = build_model(synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=2, seed=1))
    assert not torch.equal(features_of(other), features_of(model))


def test_too_many_hierarchy_roots_stop_with_the_fix():
    with pytest.raises(ParameterError, match="hierarchy_roots=2 .* lower hierarchy_roots to at most 1"):
        synth_config(128, 32, hierarchy_roots=2, orthogonalization_steps=2)


def test_hierarchy_edges_and_relatives(model):
    edges = hierarchy_edges(model)
    assert len(edges) == 4 + 16 + 64  # one tree, branching 4, depth 3
    rel = relatives(edges)
    root = edges[0][0]
    assert len(rel[root]) == 84  # every descendant
    child = next(c for p, c in edges if p == root)
    siblings = {c for p, c in edges if p == root} - {child}
    assert root in rel[child] and siblings <= rel[child] and child not in rel[child]


def test_stream_is_deterministic_from_any_batch(model):
    stream = synth_stream(model, 8, seed=3)
    first = [b.clone() for _, b in zip(range(20), stream(0))]
    later = next(stream(17))
    assert torch.equal(later, first[17])
    assert not torch.equal(first[0], next(synth_stream(model, 8, seed=4)(0)))


def _orthonormal(n, d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, n)))
    return q.T


def test_a_decoder_that_is_a_feature_has_no_true_hedging():
    f = _orthonormal(6, 10)
    th = true_hedging(3.0 * f[[2, 4]], f)
    assert list(th["feature"]) == [2, 4]
    assert np.allclose(th["hedging"], 0.0, atol=1e-9) and np.allclose(th["cos"], 1.0)


def test_a_planted_share_of_another_feature_is_measured_and_split():
    f = _orthonormal(6, 10)
    s = 0.3
    w = np.stack([math.sqrt(1 - s**2) * f[0] + s * f[1],  # hedges into a relative
                  math.sqrt(1 - s**2) * f[2] + s * f[3],  # into a correlated feature
                  math.sqrt(1 - s**2) * f[4] + s * f[5]])  # into neither
    th = true_hedging(w, f, relatives_of={0: {1}}, correlated=np.array([[5], [0], [3], [2], [0], [0]]))
    assert np.allclose(th["hedging"], s)
    assert np.allclose(th["relatives"], [s, 0, 0]) and np.allclose(th["correlated"], [0, s, 0])
    assert np.allclose(th["rest"], [0, 0, s])
    assert np.allclose(th["relatives"] ** 2 + th["correlated"] ** 2 + th["rest"] ** 2, th["hedging"] ** 2)
    # the measure can fail: a decoder off its feature is not reported as clean
    assert (th["hedging"] > 0.25).all()


def test_match_latents_picks_the_largest_cosine():
    f = _orthonormal(4, 8)
    match, cos = match_latents(np.stack([f[3] + 0.1 * f[0], -f[1] + 0.5 * f[2]]), f)
    assert list(match) == [3, 2] and cos[0] > 0.99


def test_absorption_is_found_in_a_planted_absorbing_sae(model):
    """A parent latent that never fires, and a child latent that fires with its child and carries
    the parent direction, absorb the parent; an SAE of the true features does not."""
    f = features_of(model)
    edges = hierarchy_edges(model)
    parent, child = edges[0]
    exact = make_sae(32, 128, "standard")
    with torch.no_grad():
        exact.W_dec.copy_(f)
        exact.W_enc.copy_(f.T)
        exact.b_enc.fill_(-0.5)
        exact.b_dec.copy_(model.feature_dict.bias if model.feature_dict.bias is not None else torch.zeros(32))
    clean = absorption(exact, model, edges[:1], n_samples=4096, seed=0)
    absorbing = make_sae(32, 128, "standard")
    with torch.no_grad():
        absorbing.load_state_dict(exact.state_dict())
        carried = f[child] + f[parent]
        absorbing.W_dec[child] = carried / carried.norm()
        absorbing.W_enc[:, parent] = 0.0
        absorbing.b_enc[parent] = -1.0  # the parent's latent never fires
    absorbed = absorption(absorbing, model, edges[:1], n_samples=4096, seed=0)
    assert len(clean) == len(absorbed) == 1
    assert clean["absorption"].iloc[0] < 0.2
    assert absorbed["absorption"].iloc[0] > 0.5


def test_evaluate_reuses_saelens_and_is_seeded(model):
    sae = synth_job(model, 16, "batchtopk", batch_size=64, k=2).sae
    a = evaluate(sae, model, n_samples=512, seed=1)
    assert {"mcc", "classification/f1_score", "dead_latents", "shrinkage"} <= set(a)
    assert a == evaluate(sae, model, n_samples=512, seed=1)


def test_most_correlated_excludes_the_feature_itself(model):
    top = most_correlated(model, 3)
    assert top.shape == (128, 3)
    assert not (top == np.arange(128)[:, None]).any()


def test_recipe_differences_name_each_departing_field_and_ignore_the_seed():
    assert recipe_differences(tiny_config(), synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=2, seed=7)) == {}
    other = synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=3, bias=0.5, seed=0)
    diff = recipe_differences(other, tiny_config())
    assert diff["orthogonalization.num_steps"] == {"actual": 3, "expected": 2}
    assert any(key.startswith("bias") for key in diff) and len(diff) == 2


def test_the_paper_profile_loads_the_published_16k_model_and_the_others_build_it():
    assert resolve_profile("paper").ground_truth.published == PUBLISHED_16K
    assert resolve_profile("small").ground_truth.published == resolve_profile("ci").ground_truth.published == ""


def test_a_published_model_needs_the_hub_and_says_so_before_any_compute(monkeypatch):
    check_published("")  # nothing published: nothing to check

    class Unreachable:
        def model_info(self, repo_id, timeout):
            raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.HfApi", Unreachable)
    with pytest.raises(ParameterError, match="published='decoderesearch/synth-sae-bench-16k-v1' needs the Hugging Face hub.*profile='small'"):
        check_published(PUBLISHED_16K)

    from huggingface_hub.errors import RepositoryNotFoundError

    class Missing:
        def model_info(self, repo_id, timeout):
            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response
            Exception.__init__(err, "404")
            raise err

    monkeypatch.setattr("huggingface_hub.HfApi", Missing)
    with pytest.raises(ParameterError, match="'someone/no-such-model' is not a model repository.*synth-sae-bench-16k-v1"):
        check_published("someone/no-such-model")


def test_load_model_builds_offline_or_loads_the_published_model_and_reports_its_departures(monkeypatch, model):
    built, departures = load_model(tiny_config())
    assert departures == {} and built.cfg.to_dict() == model.cfg.to_dict()
    published = build_model(synth_config(128, 32, hierarchy_roots=1, orthogonalization_steps=3, seed=1))
    monkeypatch.setattr(ground_truth, "check_published", lambda repo: None)
    monkeypatch.setattr(ground_truth.SyntheticModel, "from_pretrained", classmethod(lambda cls, repo: published))
    loaded, departures = load_model(tiny_config(), "someone/model")
    assert loaded is published and list(departures) == ["orthogonalization.num_steps"]
