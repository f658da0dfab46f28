import pytest
import torch

from hedging_utils.profiles import ParameterError
from hedging_utils.toys import Hierarchy, ToySetting, conditional_pair, toy_job
from hedging_utils.training import (
    StackedSAEs, TrainSettings, make_sae, train_saes, train_together, train_with_sae_lens,
)

PARENT_CHILDREN = ToySetting([0.25, 0.15, 0.15, 0.15], hierarchies=[Hierarchy(0, (1, 2, 3))], d_model=12)
TWENTY = ToySetting([0.3] * 20, d_model=24)
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _max_difference(a, b):
    return max(float((getattr(a, name) - getattr(b, name)).detach().abs().max()) for name in WEIGHTS)


SWEEPS = {
    "standard, L1 sweep with warm-up": (conditional_pair(0.25, 0.2, 0.1, d_model=12), 2, dict(l1_warm_up_steps=20),
                                        [dict(l1_coefficient=c) for c in (1e-3, 1e-2, 0.3)]),
    "balance matryoshka, beta sweep": (PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2,
                                                                matryoshka_widths=[1]),
                                       [dict(level_coefficients=[b]) for b in (0.0, 0.25, 1.0)]),
    "detached, snap loss": (PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2,
                                                     matryoshka_widths=[1], detach_inner_levels=True,
                                                     reconstruction_loss="snap", snap_step=40), [{}]),
    "batchtopk with AuxK": (TWENTY, 16, dict(architecture="batchtopk", k=3, init="random"), [{}, {}]),
    "balance matryoshka batchtopk": (TWENTY, 16, dict(architecture="balance_matryoshka_batchtopk", k=3, init="random",
                                                      matryoshka_widths=[4, 8], coefficient_multiplier=0.5), [{}, {}]),
    "balance matryoshka batchtopk, mixed K and losses": (
        TWENTY, 16, dict(architecture="balance_matryoshka_batchtopk", init="random", matryoshka_widths=[4, 8]),
        [dict(k=2, coefficient_multiplier=0.0), dict(k=3, coefficient_multiplier=1.0, reconstruction_loss="l2"),
         dict(k=4, coefficient_multiplier=0.5, reconstruction_loss="snap", snap_step=40)]),
}


def test_saes_that_differ_in_k_and_loss_share_one_stack():
    from hedging_utils.training import _group_key
    toy, width, common, variants = SWEEPS["balance matryoshka batchtopk, mixed K and losses"]
    keys = {_group_key(toy_job(toy, width, batch_size=200, seed=i, **common, **v)) for i, v in enumerate(variants)}
    assert len(keys) == 1


@pytest.mark.parametrize("name", SWEEPS)
def test_stacked_training_follows_sae_lens_trainer(name):
    """Each SAE of a stacked sweep follows the trajectory SAELens' own SAETrainer gives it."""
    toy, width, common, variants = SWEEPS[name]
    jobs = {i: toy_job(toy, width, batch_size=200, seed=i, **common, **v) for i, v in enumerate(variants)}
    assert all(StackedSAEs.supports(job.sae) for job in jobs.values())
    settings = TrainSettings(steps=80, batch_size=200, dead_feature_window=5)  # a short window: AuxK runs
    stacked = train_together(jobs, settings, progress=False)
    for i, job in jobs.items():
        reference = train_with_sae_lens(job, settings)
        assert _max_difference(stacked[i], reference) < 1e-4
        assert not torch.equal(stacked[i].W_dec, job.sae.W_dec)  # trained, and the job's SAE left unchanged
        if hasattr(reference, "topk_threshold"):
            assert float(stacked[i].topk_threshold) == pytest.approx(float(reference.topk_threshold), rel=1e-4)


def test_a_sweep_of_mixed_shapes_and_data_matches_training_one_at_a_time():
    toys = {"a": conditional_pair(0.25, 0.2, 0.1, d_model=12), "b": conditional_pair(0.25, 0.1, 0.2, d_model=12)}
    jobs = {(t, w): toy_job(toy, w, batch_size=100, seed=w, l1_coefficient=1e-2) for t, toy in toys.items() for w in (1, 2)}
    settings = TrainSettings(steps=30, batch_size=100)
    together = train_together(jobs, settings, progress=False)
    for key, job in jobs.items():
        alone = train_together({key: job}, settings, progress=False)[key]
        assert _max_difference(together[key], alone) < 1e-6


def test_an_architecture_without_a_stacked_loss_trains_with_sae_lens():
    job = toy_job(TWENTY, 8, batch_size=100, architecture="topk", k=2, init="random")
    assert not StackedSAEs.supports(job.sae)
    trained = train_together({"topk": job}, TrainSettings(steps=5, batch_size=100), progress=False)["topk"]
    assert type(trained) is type(job.sae) and not torch.equal(trained.W_dec, job.sae.W_dec)


def test_an_interrupted_sweep_resumes_with_what_finished(capsys):
    toy = conditional_pair(0.25, 0.2, 0.1, d_model=12)
    settings = TrainSettings(steps=10, batch_size=100)
    jobs = {c: toy_job(toy, 1, batch_size=100, l1_coefficient=c, label=f"L1 {c}") for c in (1e-3, 1e-2, 1e-1)}
    first = train_saes({c: jobs[c] for c in (1e-3, 1e-2)}, settings, kind="toy_saes")
    capsys.readouterr()
    everything = train_saes(jobs, settings, kind="toy_saes")
    log = capsys.readouterr().out
    assert "L1 0.1" in log and "L1 0.01" not in log  # only the missing SAE trained
    assert torch.equal(first[1e-2].W_dec, everything[1e-2].W_dec)


def test_settings_are_recorded_in_full_and_checked():
    settings = TrainSettings(steps=3, batch_size=7, adam_betas=(0, 0.999))
    assert settings.to_dict() == {"steps": 3, "batch_size": 7, "lr": 3e-4, "adam_betas": [0.0, 0.999],
                                  "dead_feature_window": 1000, "grad_clip": 1.0}
    assert TrainSettings.for_samples(100, 30).steps == 3
    with pytest.raises(ParameterError, match="steps=0"):
        TrainSettings(steps=0, batch_size=1)
    with pytest.raises(ParameterError, match="adam_betas"):
        TrainSettings(steps=1, batch_size=1, adam_betas=(1.0, 0.5))


def test_other_adam_betas_change_training_the_same_way_in_both_paths():
    job = toy_job(conditional_pair(0.25, 0.2, 0.1, d_model=12), 2, batch_size=100, l1_coefficient=1e-2)
    settings = TrainSettings(steps=30, batch_size=100, adam_betas=(0.0, 0.999))
    stacked = train_together({"s": job}, settings, progress=False)["s"]
    assert _max_difference(stacked, train_with_sae_lens(job, settings)) < 1e-5
    default = train_together({"s": job}, TrainSettings(steps=30, batch_size=100), progress=False)["s"]
    assert _max_difference(stacked, default) > 1e-4


def test_make_sae_builds_any_registered_architecture():
    assert make_sae(6, 3, "balance_matryoshka_batchtopk", k=1).cfg.d_sae == 3


def test_batchtopk_saes_of_different_widths_share_a_padded_stack():
    jobs = {w: toy_job(TWENTY, w, batch_size=200, seed=w, architecture="batchtopk", k=2.5, init="random",
                       rescale_acts_by_decoder_norm=rescale)
            for w, rescale in ((8, True), (12, True))}
    settings = TrainSettings(steps=60, batch_size=200, dead_feature_window=5)
    stacked = train_together(jobs, settings, progress=False)
    for w, job in jobs.items():
        reference = train_with_sae_lens(job, settings)
        assert stacked[w].cfg.d_sae == w and _max_difference(stacked[w], reference) < 1e-4
        assert float(stacked[w].topk_threshold) == pytest.approx(float(reference.topk_threshold), rel=1e-4)


def test_a_sweep_too_big_for_one_stack_is_cut_into_stacks_that_train_the_same(monkeypatch):
    from hedging_utils import training
    toy, width, common, variants = SWEEPS["balance matryoshka batchtopk, mixed K and losses"]
    jobs = {i: toy_job(toy, width, batch_size=200, seed=i, **common, **v) for i, v in enumerate(variants)}
    settings = TrainSettings(steps=30, batch_size=200, dead_feature_window=5)
    whole = train_together(jobs, settings, progress=False)
    monkeypatch.setattr(training, "STACK_BYTES", 200 * 24 * 4 * 2)  # two SAEs of [200, max(24, 16)] per stack
    assert [len(c) for c in training._stack_chunks(list(jobs), jobs, settings)] == [2, 1]
    cut = train_together(jobs, settings, progress=False)
    for i in jobs:
        assert _max_difference(whole[i], cut[i]) < 1e-5
