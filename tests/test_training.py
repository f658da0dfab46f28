import dataclasses

import pytest
import torch

from hedging_utils.orthogonality import OrthogonalityMixin
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import Hierarchy, ToySetting, conditional_pair, toy_job
from hedging_utils.training import (
    ClosedFormStep, Job, StackedSAEs, TrainSettings, copy_sae, make_sae, train_saes, train_together, train_with_sae_lens,
)

PARENT_CHILDREN = ToySetting([0.25, 0.15, 0.15, 0.15], hierarchies=[Hierarchy(0, (1, 2, 3))], d_model=12)
TWENTY = ToySetting([0.3] * 20, d_model=24)
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


EXACT = 1e-8
"""How far two float64 computations of the same training may drift apart. The equivalence tests
run both paths in float64: their rounding (~1e-16 a step; 1e-10 after 80 steps at most, measured)
stays far below this on any CPU, while a real difference in the arithmetic (a missing warm-up, a
wrong coefficient, a dropped AuxK) moves the weights by 5e-4 or more. In float32 the rounding alone, amplified
near ReLU boundaries, reaches 2e-4 on some CPUs."""


def _max_difference(a, b):
    return max(float((getattr(a, name) - getattr(b, name)).detach().abs().max()) for name in WEIGHTS)


def in_float64(job: Job) -> Job:
    """The same job in float64: the SAE's weights and every batch of its stream."""
    stream = job.stream
    return dataclasses.replace(job, sae=copy_sae(job.sae).to(torch.float64),
                               stream=lambda start: (batch.double() for batch in stream(start)))


SWEEPS = {
    "standard, L1 sweep with warm-up": (conditional_pair(0.25, 0.2, 0.1, d_model=12), 2, dict(l1_warm_up_steps=20),
                                        [dict(l1_coefficient=c) for c in (1e-3, 1e-2, 0.3)]),
    "balance matryoshka, beta sweep": (PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2,
                                                                matryoshka_widths=[1]),
                                       [dict(level_coefficients=[b]) for b in (0.0, 0.25, 1.0)]),
    "detached, snap loss": (PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2,
                                                     matryoshka_widths=[1], detach_inner_levels=True,
                                                     reconstruction_loss="snap", snap_step=40), [{}]),
    "standard, L1 floor and warm-up, no b_dec on the input": (
        conditional_pair(0.25, 0.2, 0.1, d_model=12), 3,
        dict(architecture="balance_matryoshka_standard", l1_warm_up_steps=30, apply_b_dec_to_input=False),
        [dict(l1_coefficient=0.3, l1_floor=0.05), dict(l1_coefficient=1e-2, l1_floor=1e-2)]),
    "matryoshka, three levels, mixed losses": (
        PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2, matryoshka_widths=[1, 2]),
        [dict(coefficient_multiplier=0.5), dict(level_coefficients=[0.3, 0.0], reconstruction_loss="l2"),
         dict(coefficient_multiplier=1.0, reconstruction_loss="snap", snap_step=40)]),
    "detached, three levels": (PARENT_CHILDREN, 4, dict(architecture="balance_matryoshka_standard", l1_coefficient=1e-2,
                                                       matryoshka_widths=[1, 2], detach_inner_levels=True),
                               [dict(level_coefficients=[0.5, 0.2]), {}]),
    "batchtopk with AuxK": (TWENTY, 16, dict(architecture="batchtopk", k=3, init="random"), [{}, {}]),
    "batchtopk with AuxK, no decoder-norm rescaling (P15)": (
        TWENTY, 16, dict(architecture="batchtopk", init="random", rescale_acts_by_decoder_norm=False), [dict(k=3), dict(k=2)]),
    "balance matryoshka batchtopk, no decoder-norm rescaling": (
        TWENTY, 16, dict(architecture="balance_matryoshka_batchtopk", k=3, init="random", matryoshka_widths=[4, 8],
                         coefficient_multiplier=0.5, rescale_acts_by_decoder_norm=False), [{}, dict(detach_inner_levels=True)]),
    "balance matryoshka batchtopk": (TWENTY, 16, dict(architecture="balance_matryoshka_batchtopk", k=3, init="random",
                                                      matryoshka_widths=[4, 8], coefficient_multiplier=0.5), [{}, {}]),
    "balance matryoshka batchtopk, mixed K and losses": (
        TWENTY, 16, dict(architecture="balance_matryoshka_batchtopk", init="random", matryoshka_widths=[4, 8]),
        [dict(k=2, coefficient_multiplier=0.0), dict(k=3, coefficient_multiplier=1.0, reconstruction_loss="l2"),
         dict(k=4, coefficient_multiplier=0.5, reconstruction_loss="snap", snap_step=40)]),
    # hedging_utils.orthogonality: the penalty's seed differs within a stack; each coefficient (0 included) is a stack
    "orthogonal standard, pairwise |cos|^2": (
        PARENT_CHILDREN, 4, dict(architecture="orthogonal_standard", l1_coefficient=1e-2, l1_warm_up_steps=20, init="random",
                                 orthogonality_power=2.0),
        [dict(orthogonality_coefficient=c) for c in (0.0, 0.3, 1.0)]),
    "orthogonal standard, chunked": (
        PARENT_CHILDREN, 5, dict(architecture="orthogonal_standard", l1_coefficient=1e-2, init="random",
                                 orthogonality_form="chunked", orthogonality_chunk_size=2),
        [dict(orthogonality_coefficient=0.5, orthogonality_seed=0), dict(orthogonality_coefficient=1.0, orthogonality_seed=7)]),
    "orthogonal batchtopk, pairwise sum": (
        TWENTY, 16, dict(architecture="orthogonal_batchtopk", k=3, init="random", orthogonality_reduction="sum"),
        [dict(orthogonality_coefficient=c) for c in (0.0, 0.01, 0.05)]),
    "orthogonal batchtopk, chunked (OrtSAE)": (
        TWENTY, 16, dict(architecture="orthogonal_batchtopk", k=3, init="random", orthogonality_form="chunked",
                         orthogonality_chunk_size=5),
        [dict(orthogonality_coefficient=0.25, orthogonality_seed=0), dict(orthogonality_coefficient=1.0, orthogonality_seed=3),
         dict(orthogonality_coefficient=1.0, orthogonality_seed=0)]),
}


def test_saes_that_differ_in_k_and_loss_share_one_stack():
    from hedging_utils.training import _group_key
    toy, width, common, variants = SWEEPS["balance matryoshka batchtopk, mixed K and losses"]
    keys = {_group_key(toy_job(toy, width, batch_size=200, seed=i, **common, **v)) for i, v in enumerate(variants)}
    assert len(keys) == 1


def _closed_form(name):
    """Whether the stack of sweep ``name`` trains with closed-form gradients (``ClosedFormStep``)."""
    toy, width, common, variants = SWEEPS[name]
    return ClosedFormStep.supports(StackedSAEs([toy_job(toy, width, batch_size=10, **common, **variants[0]).sae]))


PATHS = [(name, path) for name in SWEEPS for path in (("closed form", "autograd") if _closed_form(name) else ("autograd",))]
"""Every sweep through the stacked path it takes, and the ReLU + L1 ones through the autograd
loss too (which LLM-sized stacks use)."""


def _use_path(path, monkeypatch):
    if path == "autograd":
        monkeypatch.setattr(ClosedFormStep, "supports", staticmethod(lambda model: False))


@pytest.mark.parametrize("name, path", PATHS)
def test_stacked_training_follows_sae_lens_trainer(name, path, monkeypatch):
    """Each SAE of a stacked sweep follows the trajectory SAELens' own SAETrainer gives it."""
    _use_path(path, monkeypatch)
    for i, (stacked, reference, job) in _both_paths(name).items():
        assert stacked.W_dec.dtype == torch.float64 and _max_difference(stacked, reference) < EXACT
        assert not torch.equal(stacked.W_dec, job.sae.W_dec)  # trained, and the job's SAE left unchanged
        if hasattr(reference, "topk_threshold"):
            assert float(stacked.topk_threshold) == pytest.approx(float(reference.topk_threshold), rel=EXACT)


def _both_paths(name):
    """{i: (stacked SAE, SAELens-trained SAE, job)} for sweep ``name``, in float64."""
    toy, width, common, variants = SWEEPS[name]
    jobs = {i: in_float64(toy_job(toy, width, batch_size=200, seed=i, **common, **v)) for i, v in enumerate(variants)}
    assert all(StackedSAEs.supports(job.sae) for job in jobs.values())
    settings = TrainSettings(steps=80, batch_size=200, dead_feature_window=5)  # a short window: AuxK runs
    stacked = train_together(jobs, settings, progress=False)
    return {i: (stacked[i], train_with_sae_lens(job, settings), job) for i, job in jobs.items()}


_original_level_gradient = ClosedFormStep.level_gradient
_original_stacked_penalty = OrthogonalityMixin.stacked_penalty.__func__

BOTH = ("closed form", "autograd")
PLANTED = {  # fault: (sweep, the paths it reaches, class, method, replacement)
    "the L1 warm-up dropped": ("standard, L1 sweep with warm-up", BOTH, StackedSAEs, "coefficient",
                               lambda self, step: torch.maximum(self.l1, self.l1_floor)),
    "the L1 floor dropped": ("standard, L1 floor and warm-up, no b_dec on the input", BOTH, StackedSAEs, "l1_floor", None),
    "beta_m ignored": ("balance matryoshka, beta sweep", BOTH, StackedSAEs, "betas", None),
    "AuxK dropped": ("batchtopk with AuxK", ("autograd",), StackedSAEs, "auxk_loss",
                     lambda self, residual, *a: residual.new_zeros(residual.shape[0])),
    "AuxK dropped (closed form)": ("batchtopk with AuxK, no decoder-norm rescaling (P15)", ("closed form",), ClosedFormStep, "auxk_gradient",
                                   lambda self, residual, hidden_pre, dead, d_hidden, d_dec: (d_hidden, d_dec)),
    "snap never switches to L2": ("detached, snap loss", ("autograd",), StackedSAEs, "reconstruction_loss",
                                  lambda self, error, step: torch.linalg.vector_norm(error, dim=-1).pow(2).mean(dim=1)),
    "snap never switches to L2 (closed form)": ("detached, snap loss", ("closed form",), ClosedFormStep, "level_gradient",
                                                lambda self, error, m, step: _original_level_gradient(self, error, m, -1)),
    "detached levels not detached (closed form)": ("detached, three levels", ("closed form",), StackedSAEs, "detach", None),
    "the orthogonality penalty dropped": ("orthogonal standard, pairwise |cos|^2", ("autograd",), StackedSAEs, "penalty", None),
    "the orthogonality penalty dropped (BatchTopK)": ("orthogonal batchtopk, pairwise sum", ("autograd",), StackedSAEs, "penalty",
                                                      None),
    "OrtSAE's chunks drawn for the next step": (
        "orthogonal batchtopk, chunked (OrtSAE)", ("autograd",), OrthogonalityMixin, "stacked_penalty",
        classmethod(lambda cls, cfgs, w_dec, step: _original_stacked_penalty(cls, cfgs, w_dec, step + 1))),
}
FAULT_PATHS = [(fault, path) for fault, (_, paths, *_) in PLANTED.items() for path in paths]


@pytest.mark.parametrize("fault, path", FAULT_PATHS)
def test_the_equivalence_check_catches_a_planted_fault(fault, path, monkeypatch):
    """The check above can fail: with a fault planted in the stacked loss (or, for the closed
    form, in its gradients), some SAE of the sweep leaves SAELens' trajectory by far more than
    the tolerance."""
    name, _, cls, method, replacement = PLANTED[fault]
    _use_path(path, monkeypatch)
    if replacement is None:  # a setting dropped: every level weighted 1, whatever beta_m says; no floor; no detaching; no penalty
        original, setting = StackedSAEs.__init__, method

        def replacement(self, saes, *args):
            original(self, saes, *args)
            {"betas": lambda: self.betas.fill_(1.0), "l1_floor": lambda: self.l1_floor.zero_(),
             "detach": lambda: setattr(self, "detach", False), "penalty": lambda: setattr(self, "penalty", None)}[setting]()
        method = "__init__"
    monkeypatch.setattr(cls, method, replacement)
    worst = max(_max_difference(stacked, reference) for stacked, reference, _ in _both_paths(name).values())
    assert worst > 1e3 * EXACT, worst


def test_a_sweep_of_mixed_shapes_and_data_matches_training_one_at_a_time():
    toys = {"a": conditional_pair(0.25, 0.2, 0.1, d_model=12), "b": conditional_pair(0.25, 0.1, 0.2, d_model=12)}
    jobs = {(t, w): in_float64(toy_job(toy, w, batch_size=100, seed=w, l1_coefficient=1e-2))
            for t, toy in toys.items() for w in (1, 2)}
    settings = TrainSettings(steps=30, batch_size=100)
    together = train_together(jobs, settings, progress=False)
    for key, job in jobs.items():
        alone = train_together({key: job}, settings, progress=False)[key]
        assert _max_difference(together[key], alone) < EXACT


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
                                  "dead_feature_window": 1000, "grad_clip": 1.0, "precision": "float32"}
    assert TrainSettings.for_samples(100, 30).steps == 3
    with pytest.raises(ParameterError, match="steps=0"):
        TrainSettings(steps=0, batch_size=1)
    with pytest.raises(ParameterError, match="adam_betas"):
        TrainSettings(steps=1, batch_size=1, adam_betas=(1.0, 0.5))
    with pytest.raises(ParameterError, match="precision='float16'"):
        TrainSettings(steps=1, batch_size=1, precision="float16")


def test_other_adam_betas_change_training_the_same_way_in_both_paths():
    job = toy_job(conditional_pair(0.25, 0.2, 0.1, d_model=12), 2, batch_size=100, l1_coefficient=1e-2)
    job = in_float64(job)
    settings = TrainSettings(steps=30, batch_size=100, adam_betas=(0.0, 0.999))
    stacked = train_together({"s": job}, settings, progress=False)["s"]
    assert _max_difference(stacked, train_with_sae_lens(job, settings)) < EXACT
    default = train_together({"s": job}, TrainSettings(steps=30, batch_size=100), progress=False)["s"]
    assert _max_difference(stacked, default) > 1e-4


def test_make_sae_builds_any_registered_architecture():
    assert make_sae(6, 3, "balance_matryoshka_batchtopk", k=1).cfg.d_sae == 3


@pytest.mark.parametrize("rescale", [True, False])
def test_batchtopk_saes_of_different_widths_share_a_padded_stack(rescale):
    """Padded BatchTopK stacks, with decoder-norm rescaling (the autograd loss) and without it
    (``ClosedFormStep``, as notebook 04's P15 sweep trains)."""
    jobs = {w: in_float64(toy_job(TWENTY, w, batch_size=200, seed=w, architecture="batchtopk", k=2.5, init="random",
                                  rescale_acts_by_decoder_norm=rescale))
            for w in (8, 12)}
    assert ClosedFormStep.supports(StackedSAEs([job.sae for job in jobs.values()])) == (not rescale)
    settings = TrainSettings(steps=60, batch_size=200, dead_feature_window=5)
    stacked = train_together(jobs, settings, progress=False)
    for w, job in jobs.items():
        reference = train_with_sae_lens(job, settings)
        assert stacked[w].cfg.d_sae == w and _max_difference(stacked[w], reference) < EXACT
        assert float(stacked[w].topk_threshold) == pytest.approx(float(reference.topk_threshold), rel=EXACT)


@pytest.mark.parametrize("path", ["closed form", "autograd"])
def test_standard_saes_of_different_widths_share_a_padded_stack(path, monkeypatch):
    _use_path(path, monkeypatch)
    toy = conditional_pair(0.25, 0.2, 0.1, d_model=12)
    jobs = {w: in_float64(toy_job(toy, w, batch_size=200, seed=w, init="random", l1_coefficient=c))
            for w, c in ((1, 1e-2), (3, 3e-3))}
    from hedging_utils.training import _group_key
    assert len({_group_key(job) for job in jobs.values()}) == 1
    settings = TrainSettings(steps=60, batch_size=200)
    stacked = train_together(jobs, settings, progress=False)
    for w, job in jobs.items():
        assert stacked[w].cfg.d_sae == w and _max_difference(stacked[w], train_with_sae_lens(job, settings)) < EXACT


def test_a_sweep_too_big_for_one_stack_is_cut_into_stacks_that_train_the_same(monkeypatch):
    from hedging_utils import training
    toy, width, common, variants = SWEEPS["balance matryoshka batchtopk, mixed K and losses"]
    jobs = {i: in_float64(toy_job(toy, width, batch_size=200, seed=i, **common, **v)) for i, v in enumerate(variants)}
    settings = TrainSettings(steps=30, batch_size=200, dead_feature_window=5)
    whole = train_together(jobs, settings, progress=False)
    monkeypatch.setitem(training.STACK_BYTES, "cpu", 200 * 24 * 4 * 2)  # two SAEs of [200, max(24, 16)] per stack
    assert [len(c) for c in training._stack_chunks(list(jobs), jobs, settings)] == [2, 1]
    cut = train_together(jobs, settings, progress=False)
    for i in jobs:
        assert _max_difference(whole[i], cut[i]) < EXACT


def test_saes_of_far_apart_widths_go_to_separate_stacks_where_padding_would_cost_more_than_a_stack():
    """LLM-sized SAEs of widths 64, 256 and 512 (d_in 640, batches of 1,024) are not padded to
    512 in one stack; toy SAEs of widths 15-50 (d_in 100, batches of 500) still share one."""
    from hedging_utils import training
    def chunks(d_in, widths, batch):
        jobs = {i: Job(make_sae(d_in, w, "batchtopk", k=4), lambda start: iter(()), {}) for i, w in enumerate(widths)}
        return [[jobs[n].sae.cfg.d_sae for n in c] for c in training._stack_chunks(list(jobs), jobs, TrainSettings(steps=1, batch_size=batch))]
    assert chunks(640, [512, 64, 256, 64, 256, 512], 1024) == [[64, 64], [256, 256], [512, 512]]
    assert chunks(640, [64, 65], 1024) == [[64, 65]]  # a latent more is not worth a stack
    toy = [15, 20, 25, 30, 35, 40, 45, 50] * 2
    assert chunks(100, toy, 500) == [sorted(toy)]


def test_a_gpu_stacks_llm_saes_that_the_cpu_cuts_into_stacks(monkeypatch):
    """The stack budget follows the device: the paper's LLM SAEs (d_in 2,304, width 8,192, batches
    of 4,096) train one per stack on the CPU and all together on a GPU."""
    from hedging_utils import training
    jobs = {i: Job(make_sae(2304, 8192, "batchtopk", k=25), lambda start: iter(()), {}) for i in range(8)}
    settings = TrainSettings(steps=1, batch_size=4096)
    sizes = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv(training.DEVICE_ENV, device)
        sizes[device] = [len(c) for c in training._stack_chunks(list(jobs), jobs, settings)]
    assert sizes == {"cpu": [1] * 8, "cuda": [8]}


@pytest.mark.parametrize("ties", [False, True])
def test_the_threshold_by_topk_is_the_kth_value(ties):
    """``batch_topk``'s threshold (the smallest of the top k) is ``kthvalue``'s k-th largest."""
    from hedging_utils.training import _kth_largest
    flat = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)).relu()
    if ties:
        flat = flat.to(torch.bfloat16).float()  # bfloat16's 8 bits: many ties at any threshold
    for k in (1, 77, 2500, 5000):
        assert torch.equal(_kth_largest(flat, k), flat.kthvalue(5000 - k + 1, dim=1).values)
    assert not torch.equal(_kth_largest(flat, 77), flat.kthvalue(5000 - 78 + 1, dim=1).values)


def test_batch_topk_keeps_exactly_k_per_input_when_activations_tie():
    """Identical inputs give identical activations: a tie at the threshold keeps SAELens' own
    selection (exactly k * B entries), which a plain threshold would exceed."""
    from sae_lens.saes.batchtopk_sae import BatchTopK
    from hedging_utils.training import batch_topk
    row = torch.tensor([3.0, 2.0, 1.0, 0.5])
    # SAE 1 has no tie and no ReLU zero among its top three, so it keeps exactly three entries
    untied_positive = torch.arange(1.0, 13.0)[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    hidden_pre = torch.stack([torch.stack([row, row, row * 0.1]), untied_positive.view(3, 4)])  # SAE 0 ties at k * B = 3
    for k in (1.0, [1.0, 2.0]):
        ours = batch_topk(hidden_pre, k)
        for i, ki in enumerate(k if isinstance(k, list) else [k, k]):
            assert torch.equal(ours[i], BatchTopK(ki)(hidden_pre[i]))
    assert int((batch_topk(hidden_pre, 1.0)[0] > 0).sum()) == 3



def test_batch_topk_without_exact_ties_keeps_k_per_input_the_first_tied_entries():
    """bfloat16 stacks break ties by position: still exactly k * B entries, every entry above the
    threshold, and of the entries at it the first ones in the batch."""
    from hedging_utils.training import batch_topk
    row = torch.tensor([3.0, 2.0, 2.0, 0.5])
    # SAE 1 has no tie and no ReLU zero among its top three, so it keeps exactly three entries
    untied_positive = torch.arange(1.0, 13.0)[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    hidden_pre = torch.stack([torch.stack([row, row, row * 0.1]), untied_positive.view(3, 4)])
    ours = batch_topk(hidden_pre, 1.0, exact_ties=False)  # SAE 0: 3.0, 3.0, then one of four 2.0s
    assert [int((a > 0).sum()) for a in ours] == [3, 3]
    assert ours[0].flatten().nonzero().flatten().tolist() == [0, 1, 4]
    exact = batch_topk(hidden_pre, 1.0)
    assert torch.equal(ours[1], exact[1]) and (ours[0] > 0).sum() == (exact[0] > 0).sum()
    # with no tie both rules keep the same entries
    untied = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(batch_topk(untied, 2.0, exact_ties=False), batch_topk(untied, 2.0))

def _counting_training(monkeypatch):
    """Wrap ``train_together`` so that a test sees which SAEs were trained (not loaded from the cache)."""
    from hedging_utils import training
    trained = []
    original = training.train_together

    def counting(jobs, settings, **kwargs):
        trained.extend(jobs)
        return original(jobs, settings, **kwargs)

    monkeypatch.setattr(training, "train_together", counting)
    return trained


def test_a_cached_sae_is_loaded_not_retrained(monkeypatch):
    trained = _counting_training(monkeypatch)
    toy = conditional_pair(0.25, 0.2, 0.1, d_model=12)
    settings = TrainSettings(steps=5, batch_size=50)
    first = train_saes({"a": toy_job(toy, 1, batch_size=50, l1_coefficient=1e-2)}, settings, kind="toy_saes")
    again = train_saes({"a": toy_job(toy, 1, batch_size=50, l1_coefficient=1e-2)}, settings, kind="toy_saes")
    assert trained == ["a"] and torch.equal(first["a"].W_dec, again["a"].W_dec)
    train_saes({"b": toy_job(toy, 1, batch_size=50, l1_coefficient=2e-2)}, settings, kind="toy_saes")
    assert trained == ["a", "b"]  # another setting: trained


def test_an_edit_to_the_training_code_retrains_cached_saes(monkeypatch):
    """The training modules' source is in every key: after an edit (here, its hash changed) the
    SAEs trained by the old code are not reused."""
    from hedging_utils import training
    from hedging_utils.cache import source_hash
    assert training.training_code_version() == source_hash(training.TRAINING_SOURCES)
    job = toy_job(conditional_pair(0.25, 0.2, 0.1, d_model=12), 1, batch_size=50, l1_coefficient=1e-2)
    settings = TrainSettings(steps=5, batch_size=50)
    assert job.cache_settings(settings)["code"] == training.training_code_version()
    trained = _counting_training(monkeypatch)
    train_saes({"a": job}, settings, kind="toy_saes")
    monkeypatch.setattr(training, "training_code_version", lambda: "edited")
    train_saes({"a": job}, settings, kind="toy_saes")
    assert trained == ["a", "a"]


def test_the_training_code_is_the_stacked_loss_its_precision_the_variants_and_the_toys():
    from hedging_utils import training
    assert set(training.TRAINING_SOURCES) == {"training", "precision", "variants", "toys"}


@pytest.mark.parametrize("wide", [False, True])
def test_the_encoders_closed_form_gradient_is_autograds(wide):
    """The encoder's hand-written backward (b_dec's gradient from a batch sum) against finite
    differences, in float64, for narrow (transposed layout) and wide SAEs."""
    from hedging_utils.training import _Encode
    torch.manual_seed(0)
    d, width = (6, 4) if not wide else (4, 6)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    params = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, d), (2, d, width), (2, width))]
    assert torch.autograd.gradcheck(lambda b_dec, w, b: _Encode.apply(x, b_dec, w, b, 1.0, torch.float64), params)


@pytest.mark.parametrize("detach", [False, True])
def test_the_levels_closed_form_gradient_is_autograds(detach):
    """Every level's error and its hand-written backward against autograd on the level-by-level
    reference (with detached inner levels: each error's inner part carries no gradient to the
    inner latents), in float64; without detaching, against finite differences too."""
    from hedging_utils.training import _NestedErrors
    torch.manual_seed(0)
    widths = (1, 3, 6)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 5, 4), (2, 5, 6), (2, 6, 4))]
    weights = [torch.randn(2, 5, 4, dtype=torch.float64) for _ in widths]

    def reference(base, acts, decoder):
        errors, error, start = [], base, 0
        for width in widths:
            if detach and start > 0:
                error = base - base.detach() + error.detach()
            error = error - acts[:, :, start:width] @ decoder[:, start:width]
            errors.append(error)
            start = width
        return errors

    def total(errors):
        return sum((w * e).sum() for w, e in zip(weights, errors))
    ours = torch.autograd.grad(total(_NestedErrors.apply(*inputs, widths, detach, torch.float64)), inputs)
    theirs = torch.autograd.grad(total(reference(*inputs)), inputs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)
    for a, b in zip(_NestedErrors.apply(*inputs, widths, detach, torch.float64), reference(*inputs)):
        assert torch.allclose(a, b, atol=1e-12)
    if not detach:
        assert torch.autograd.gradcheck(lambda *t: _NestedErrors.apply(*t, widths, False, torch.float64), inputs)


def test_a_toy_stack_trains_to_the_same_bits_with_one_thread_as_with_two():
    """What lets ``regenerate.run_notebooks`` run the toy notebooks side by side with one torch
    thread each: their stacked training gives bit-identical SAEs with one thread and with two."""
    toy, width, common, variants = SWEEPS["batchtopk with AuxK, no decoder-norm rescaling (P15)"]
    jobs = {i: toy_job(toy, width, batch_size=200, seed=i, **common, **v) for i, v in enumerate(variants)}
    settings = TrainSettings(steps=40, batch_size=200, dead_feature_window=5)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(train_together(jobs, settings, progress=False))
    finally:
        torch.set_num_threads(threads)
    for i in jobs:
        assert all(torch.equal(getattr(runs[0][i], p), getattr(runs[1][i], p)) for p in ("W_enc", "b_enc", "W_dec", "b_dec"))
