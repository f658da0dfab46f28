import numpy as np
import pytest
import torch

from hedging_utils.extension import (PairSpec, control_and_extended, continue_training, extend_sae, extension_pairs, grow_sae,
                                     double_beside_control, grow_by_doubling, grow_saes)
from hedging_utils.metrics import hedging_degree, hedging_degree_from_decoders, projection_norms
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import ToySetting, conditional_pair
from hedging_utils.training import TrainSettings, make_sae


def _unit(w):
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_h_is_zero_when_the_original_latents_do_not_change():
    rng = np.random.default_rng(0)
    control = rng.standard_normal((20, 50))
    extended = np.concatenate([control * 3.0, rng.standard_normal((4, 50))])  # same directions, other norms
    result = hedging_degree_from_decoders(control, extended)
    assert result.h == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(result.delta_norm, 0)


def test_a_change_inside_the_new_span_projects_with_its_full_norm():
    rng = np.random.default_rng(1)
    new = rng.standard_normal((3, 40))
    delta = rng.standard_normal((5, 3)) @ new  # every row lies in the span of the new latents
    assert np.allclose(projection_norms(delta, new), np.linalg.norm(delta, axis=1))
    control = _unit(rng.standard_normal((5, 40)))
    extended = np.concatenate([control + 0.01 * delta, new])
    result = hedging_degree_from_decoders(control, extended)
    assert result.portion_new > 0.95  # renormalising the rows adds a small part along each row itself
    assert result.h > 0


def test_random_baseline_matches_random_subspace_theory():
    rng = np.random.default_rng(2)
    d, n = 400, 16
    control = _unit(rng.standard_normal((200, d)))
    after = _unit(control + 0.05 * rng.standard_normal((200, d)))
    extended = np.concatenate([after, rng.standard_normal((n, d))])
    result = hedging_degree_from_decoders(control, extended, n_random_draws=20)
    expected = np.sqrt(n / d) * result.delta_norm
    assert result.projection_random.mean() == pytest.approx(expected.mean(), rel=0.1)
    assert result.portion_random == pytest.approx(n / d, rel=0.1)
    assert abs(result.h) < 3 * result.h_random_spread + 0.02 * expected.mean()  # a random change is not hedging


@pytest.mark.parametrize("architecture,cfg", [
    ("standard", dict(l1_coefficient=1e-3)),
    ("batchtopk", dict(k=3)),
    ("balance_matryoshka_standard", dict(l1_coefficient=1e-3, matryoshka_widths=[2])),
    ("balance_matryoshka_batchtopk", dict(k=3, matryoshka_widths=[2])),
])
def test_extension_keeps_the_original_latents(architecture, cfg):
    torch.manual_seed(0)
    sae = make_sae(12, 6, architecture, **cfg)
    with torch.no_grad():  # a trained SAE's latents are much larger than the new ones (norm 0.1)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(10)
        sae.W_enc.mul_(10)
    extended = extend_sae(sae, 3, seed=1)
    assert extended.cfg.d_sae == 9 and type(extended) is type(sae)
    assert torch.equal(extended.W_dec[:6], sae.W_dec) and torch.equal(extended.W_enc[:, :6], sae.W_enc)
    new_dec, new_enc = extended.W_dec[6:], extended.W_enc[:, 6:].T
    assert torch.allclose(new_dec.norm(dim=1), torch.full((3,), 0.1))
    assert torch.equal(new_dec, new_enc)  # encoder = decoder direction
    if "matryoshka" in architecture:
        assert extended.cfg.matryoshka_widths == [2, 9]
    x = torch.randn(256, 12)
    before, after = sae.encode(x), extended.encode(x)
    if "topk" in architecture:  # the batch-wide top-k can, rarely, give a slot to a new latent
        assert torch.isclose(after[:, :6], before, atol=1e-6).float().mean() > 0.99
    else:
        assert torch.allclose(after[:, :6], before, atol=1e-6)  # (a wider matmul may round differently)


def test_extension_refuses_fewer_than_one_latent():
    sae = make_sae(12, 6, "standard", l1_coefficient=1e-3)
    for bad in (0, -2, 1.5):
        with pytest.raises(ParameterError, match=f"n_new={bad!r}"):
            extend_sae(sae, bad)


def test_l1_rewarmup_with_floor():
    sae = make_sae(12, 6, "balance_matryoshka_standard", l1_coefficient=5.0)
    extended = extend_sae(sae, 2, l1_rewarmup_steps=100, l1_floor=1.0)
    assert extended.cfg.l1_warm_up_steps == 100 and extended.cfg.l1_floor == 1.0
    low = extend_sae(make_sae(12, 6, "balance_matryoshka_standard", l1_coefficient=0.5), 2, l1_rewarmup_steps=100, l1_floor=1.0)
    assert low.cfg.l1_warm_up_steps == 0  # already at or below the floor: no warm-up
    with pytest.raises(ParameterError, match="floor"):
        extend_sae(make_sae(12, 6, "standard", l1_coefficient=5.0), 2, l1_rewarmup_steps=100, l1_floor=1.0)


def test_streams_repeat_batches_by_index():
    stream = conditional_pair(0.25, 0.2, 0.1).stream(batch_size=8, seed=3)
    a, b = stream(5), stream(5)
    assert torch.equal(next(a), next(b))
    first = stream(0)
    next(first)
    assert not torch.equal(next(first), next(stream(5)))


def test_control_and_extended_see_identical_batches():
    toy = ToySetting([0.3, 0.2, 0.1], d_model=8)
    base = make_sae(8, 2, "standard", l1_coefficient=1e-3)
    settings, data = TrainSettings(steps=20, batch_size=64), toy.stream_key(64, 0)
    pair = control_and_extended(base, 1, toy.stream(64, seed=0), settings, data=data)
    alone = continue_training(base, toy.stream(64, seed=0), settings, data=data)
    assert torch.allclose(pair.control.W_dec, alone.W_dec)  # the control is plain continued training
    assert pair.extended.cfg.d_sae == 3
    degree = hedging_degree(pair.control, pair.extended)
    assert np.isfinite(degree.h)


def test_extension_pairs_are_cached(monkeypatch):
    from hedging_utils import training
    trained = []
    original = training.train_together
    monkeypatch.setattr(training, "train_together", lambda jobs, *a, **kw: trained.extend(jobs) or original(jobs, *a, **kw))
    toy = ToySetting([0.3, 0.2, 0.1], d_model=8)
    base = make_sae(8, 2, "standard", l1_coefficient=1e-3)
    settings, data = TrainSettings(steps=10, batch_size=64), toy.stream_key(64, 0)
    first = control_and_extended(base, 1, toy.stream(64, seed=0), settings, data=data)
    assert len(trained) == 2  # the control and the extended SAE
    again = control_and_extended(base, 1, toy.stream(64, seed=0), settings, data=data)
    assert len(trained) == 2  # both read from the cache
    assert torch.equal(first.extended.W_dec, again.extended.W_dec) and torch.equal(first.control.W_dec, again.control.W_dec)


def test_control_gets_the_same_l1_rewarmup_as_the_extended():
    toy = ToySetting([0.3, 0.2, 0.1], d_model=8)
    base = make_sae(8, 2, "balance_matryoshka_standard", l1_coefficient=1.0)
    pair = control_and_extended(base, 1, toy.stream(64, seed=0), TrainSettings(steps=5, batch_size=64),
                                data=toy.stream_key(64, 0), l1_rewarmup_steps=50, l1_floor=0.1)
    for sae in (pair.control, pair.extended):
        assert sae.cfg.l1_warm_up_steps == 50 and sae.cfg.l1_floor == 0.1


def test_extension_pairs_of_a_sweep_train_together_like_one_at_a_time():
    toy = ToySetting([0.3, 0.2, 0.1], d_model=8)
    settings = TrainSettings(steps=10, batch_size=64)
    specs = {s: PairSpec(make_sae(8, 2, "standard", l1_coefficient=1e-3 * (s + 1)), toy.stream(64, seed=s),
                         toy.stream_key(64, s), start_batch=3, seed=s) for s in range(3)}
    together = extension_pairs(specs, 1, settings, cache=False)
    for s, spec in specs.items():
        alone = control_and_extended(spec.base, 1, spec.stream, settings, data=spec.data, start_batch=3, seed=s, cache=False)
        assert torch.allclose(together[s].extended.W_dec, alone.extended.W_dec, atol=1e-6)
        assert torch.allclose(together[s].control.W_enc, alone.control.W_enc, atol=1e-6)


def _growth_kwargs(batch):
    return dict(group_size=1, max_width=4, samples_per_group=4 * batch, total_samples=12 * batch,
                settings=TrainSettings(steps=1, batch_size=batch), n_random_draws=2, progress=lambda _: None)


def test_growing_adds_groups_up_to_the_maximum_width():
    toy = ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8)
    steps = grow_sae(make_sae(8, 2, "standard", l1_coefficient=1e-3), toy.stream(32, seed=0), data=toy.stream_key(32, 0),
                     **_growth_kwargs(32))
    assert [(st.width_before, st.width_after, st.added_at_sample) for st in steps] == [(2, 3, 128), (3, 4, 256)]
    assert all(st.pair.control.cfg.d_sae == st.width_before and st.pair.extended.cfg.d_sae == st.width_after for st in steps)


def test_chains_grown_in_lockstep_match_chains_grown_alone():
    toys = {"a": ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8), "b": ToySetting([0.4, 0.1, 0.1, 0.05], d_model=8)}
    starts = {name: PairSpec(make_sae(8, 2, "standard", l1_coefficient=1e-3), toy.stream(32, seed=1),
                             toy.stream_key(32, 1), seed=i) for i, (name, toy) in enumerate(toys.items())}
    together = grow_saes(starts, **_growth_kwargs(32))
    for name, spec in starts.items():
        alone = grow_sae(spec.base, spec.stream, data=spec.data, seed=spec.seed, **_growth_kwargs(32))
        for a, b in zip(together[name], alone):
            assert torch.allclose(a.pair.extended.W_dec, b.pair.extended.W_dec, atol=1e-6)
            assert a.degree.portion_new == pytest.approx(b.degree.portion_new, abs=1e-5)


def test_growing_chains_must_start_at_one_width():
    toy = ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8)
    starts = {w: PairSpec(make_sae(8, w, "standard"), toy.stream(32, seed=0), toy.stream_key(32, 0)) for w in (2, 3)}
    with pytest.raises(ParameterError, match="one width"):
        grow_saes(starts, **_growth_kwargs(32))


def test_doubling_keeps_each_stage_and_its_latents():
    toy = ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8)
    starts = {s: PairSpec(make_sae(8, 2, "standard", l1_coefficient=1e-3), toy.stream(32, seed=s), toy.stream_key(32, s),
                          start_batch=5, seed=s) for s in (0, 1)}
    grown = grow_by_doubling(starts, doublings=2, samples_per_stage=3 * 32, settings=TrainSettings(steps=1, batch_size=32))
    for s, saes in grown.items():
        assert [sae.cfg.d_sae for sae in saes] == [2, 4, 8]
        assert saes[0] is starts[s].base
    assert not torch.equal(grown[0][1].W_dec, grown[1][1].W_dec)  # seeds differ in new latents and batches
    control = grow_by_doubling(starts, doublings=2, samples_per_stage=3 * 32, settings=TrainSettings(steps=1, batch_size=32),
                               double=False)
    assert [sae.cfg.d_sae for sae in control[0]] == [2, 2, 2]
    with pytest.raises(ParameterError, match="doublings"):
        grow_by_doubling(starts, doublings=0, samples_per_stage=32, settings=TrainSettings(steps=1, batch_size=32))


def test_doubling_beside_its_control_trains_both_chains_as_alone():
    toy = ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8)
    starts = {s: PairSpec(make_sae(8, 2, "standard", l1_coefficient=1e-3), toy.stream(32, seed=s), toy.stream_key(32, s),
                          start_batch=5, seed=s) for s in (0, 1)}
    kw = dict(doublings=2, samples_per_stage=3 * 32, settings=TrainSettings(steps=1, batch_size=32))
    doubled, control = double_beside_control(starts, **kw)
    alone, alone_control = grow_by_doubling(starts, **kw), grow_by_doubling(starts, double=False, **kw)
    for s in starts:
        assert [sae.cfg.d_sae for sae in doubled[s]] == [2, 4, 8] and [sae.cfg.d_sae for sae in control[s]] == [2, 2, 2]
        for ours, theirs in zip(doubled[s] + control[s], alone[s] + alone_control[s]):
            assert torch.allclose(ours.W_dec, theirs.W_dec, atol=1e-6) and torch.allclose(ours.b_dec, theirs.b_dec, atol=1e-6)
    assert not torch.equal(doubled[0][2].b_dec, control[0][2].b_dec)


def test_growing_gives_every_extension_and_its_control_the_l1_rewarmup():
    toy = ToySetting([0.3, 0.2, 0.1, 0.1], d_model=8)
    base = make_sae(8, 2, "balance_matryoshka_standard", l1_coefficient=1.0)
    steps = grow_sae(base, toy.stream(32, seed=0), data=toy.stream_key(32, 0), l1_rewarmup_steps=7, l1_floor=0.5,
                     **_growth_kwargs(32))
    for st in steps:
        for sae in (st.pair.control, st.pair.extended):
            assert sae.cfg.l1_warm_up_steps == 7 and sae.cfg.l1_floor == 0.5
