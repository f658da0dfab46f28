"""The decoder-orthogonality penalty: its value and gradient against a direct computation, the
SAELens architectures that carry it, its stacked form against each SAE's own loss, and the
measurements notebook 08 tests it with. (Training runs of penalised stacks against SAELens'
trainer, and planted faults, are among the equivalence tests of tests/test_training.py.)"""

import copy
import itertools
import math

import pytest
import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

from hedging_utils.orthogonality import (
    ORTHOGONALITY_CODE, OrthogonalBatchTopKTrainingSAE, OrthogonalStandardTrainingSAE, chunk_partition, chunked_penalty,
    max_decoder_cosine, n_chunks_for, orthogonal_job, pairwise_penalty, step_generator, toy_absorption, unlatented_hedging,
)
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import Hierarchy, ToySetting, toy_job
from hedging_utils.training import ClosedFormStep, Job, StackedSAEs, TrainSettings, _group_key, make_sae, train_saes


def direct_pairwise(w, power, reduction):
    """The post's penalty written out pair by pair."""
    values = []
    for i, j in itertools.combinations(range(len(w)), 2):
        cos = torch.dot(w[i], w[j]) / (w[i].norm() * w[j].norm())
        values.append(cos.abs() ** power)
    total = sum(values)
    return total / len(values) if reduction == "mean" else total


def direct_chunked(w, chunks):
    """OrtSAE's penalty written out latent by latent."""
    total = 0.0
    for chunk in chunks:
        for i in chunk.tolist():
            others = [j for j in chunk.tolist() if j != i]
            if others:
                total = total + max((torch.dot(w[i], w[j]) / (w[i].norm() * w[j].norm())) ** 2 for j in others)
    return total / len(w)


@pytest.mark.parametrize("power,reduction", [(1.0, "mean"), (1.0, "sum"), (2.0, "mean"), (3.0, "sum")])
def test_pairwise_penalty_and_gradient_match_a_direct_computation(power, reduction):
    w = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ours = pairwise_penalty(w, power, reduction)
    (grad,) = torch.autograd.grad(ours, w)
    w2 = w.detach().clone().requires_grad_()
    direct = direct_pairwise(w2, power, reduction)
    (grad_direct,) = torch.autograd.grad(direct, w2)
    assert torch.allclose(ours, direct) and torch.allclose(grad, grad_direct)


def test_chunked_penalty_and_gradient_match_a_direct_computation():
    w = torch.randn(11, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    chunks = chunk_partition(11, 3, step_generator(0, 5))
    assert sorted(torch.cat(chunks).tolist()) == list(range(11)) and sorted(len(c) for c in chunks) == [3, 4, 4]
    ours = chunked_penalty(w, chunks)
    (grad,) = torch.autograd.grad(ours, w)
    w2 = w.detach().clone().requires_grad_()
    direct = direct_chunked(w2, chunks)
    (grad_direct,) = torch.autograd.grad(direct, w2)
    assert torch.allclose(ours, direct) and torch.allclose(grad, grad_direct)


def test_penalties_are_zero_for_orthogonal_decoders_and_for_a_single_latent():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    w = q[:4] * torch.tensor([[0.5], [2.0], [1.0], [3.0]], dtype=torch.float64)  # orthogonal rows of any norm
    assert float(pairwise_penalty(w)) == pytest.approx(0, abs=1e-12)
    assert float(chunked_penalty(w, [torch.arange(4)])) == pytest.approx(0, abs=1e-12)
    single = torch.randn(1, 6, requires_grad=True)
    assert float(pairwise_penalty(single).detach()) == 0 and float(chunked_penalty(single, [torch.arange(1)]).detach()) == 0
    (grad,) = torch.autograd.grad(pairwise_penalty(single), single)
    assert float(grad.abs().max()) == 0  # one latent has no pair: the penalty cannot move it


def test_the_penalty_checks_can_fail():
    """The direct computations tell a wrong penalty from the right one (a check that can fail)."""
    w = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    chunks = chunk_partition(6, 2, step_generator(0, 0))
    # squared cosines, not |cos|, in the pairwise form; the mean instead of the max in the chunked one
    assert not torch.allclose(pairwise_penalty(w, 2.0), direct_pairwise(w, 1.0, "mean"))
    assert not torch.allclose(pairwise_penalty(w, 1.0, "sum"), direct_pairwise(w, 1.0, "mean"))
    wrong = sum(decoder_mean_sq(w[c]) for c in chunks) / len(w)
    assert not torch.allclose(chunked_penalty(w, chunks), wrong)


def decoder_mean_sq(w):
    unit = w / w.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T) ** 2
    return (cos.sum(dim=1) - 1).sum() / max(len(w) - 1, 1)


def test_ortsae_chunk_count_and_partitions_per_step():
    assert [n_chunks_for(w) for w in (1, 8192, 8193, 65_536)] == [1, 1, 2, 8]
    a, b = chunk_partition(20, 4, step_generator(3, 7)), chunk_partition(20, 4, step_generator(3, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a step's partition is reproducible
    c = chunk_partition(20, 4, step_generator(3, 8))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # and changes from step to step


@pytest.mark.parametrize("architecture,cfg", [("orthogonal_standard", {"l1_coefficient": 0.1}),
                                              ("orthogonal_batchtopk", {"k": 2.0})])
def test_architectures_add_the_penalty_to_their_own_loss(architecture, cfg):
    torch.manual_seed(0)
    plain = make_sae(8, 6, architecture.removeprefix("orthogonal_"), **cfg)
    sae = make_sae(8, 6, architecture, orthogonality_coefficient=0.5, orthogonality_form="chunked",
                   orthogonality_chunk_size=4, **cfg)
    sae.load_state_dict(plain.state_dict())
    x = torch.randn(32, 8)
    step = TrainStepInput(sae_in=x, coefficients={"l1": 0.1} if "l1_coefficient" in cfg else {}, dead_neuron_mask=None, is_logging_step=False,
                          n_training_steps=3)
    ours, theirs = sae.training_forward_pass(step), plain.training_forward_pass(step)
    expected = 0.5 * chunked_penalty(sae.W_dec, chunk_partition(6, 2, step_generator(0, 3)))
    assert torch.allclose(ours.losses["orthogonality_loss"], expected)
    assert torch.allclose(ours.loss, theirs.loss + expected)
    # the gradient of the total reaches W_dec through the penalty too
    ours.loss.backward()
    theirs.loss.backward()
    assert not torch.allclose(sae.W_dec.grad, plain.W_dec.grad)


STACK_CASES = {  # architecture, its own settings, the penalty's shared settings, per SAE: (width, coefficient, seed)
    "standard, pairwise mean": ("orthogonal_standard", {"l1_coefficient": 0.1}, {"orthogonality_form": "pairwise"},
                                [(6, 0.5, 0), (6, 0.0, 0), (4, 2.0, 0), (1, 1.0, 0)]),
    "standard, pairwise |cos|^3 sum": ("orthogonal_standard", {"l1_coefficient": 0.1},
                                       {"orthogonality_power": 3.0, "orthogonality_reduction": "sum"},
                                       [(6, 0.5, 0), (5, 1.0, 0), (6, 0.0, 0)]),
    "standard, chunked": ("orthogonal_standard", {"l1_coefficient": 0.1},
                          {"orthogonality_form": "chunked", "orthogonality_chunk_size": 2},
                          [(6, 0.25, 0), (6, 1.0, 3), (5, 0.5, 0), (3, 1.0, 3), (6, 0.0, 1)]),
    "batchtopk, pairwise mean": ("orthogonal_batchtopk", {"k": 2.0}, {}, [(6, 0.25, 0), (4, 1.0, 0), (6, 0.0, 0)]),
    "batchtopk, chunked (OrtSAE)": ("orthogonal_batchtopk", {"k": 2.0},
                                    {"orthogonality_form": "chunked", "orthogonality_chunk_size": 3},
                                    [(6, 0.25, 0), (6, 1.0, 5), (5, 0.25, 5), (6, 0.0, 0)]),
}


def _stack_case(name):
    """The case's SAEs (float64, random weights) and a batch of inputs."""
    architecture, own, penalty, members = STACK_CASES[name]
    saes = []
    for i, (width, coefficient, seed) in enumerate(members):
        torch.manual_seed(i)
        saes.append(make_sae(8, width, architecture, orthogonality_coefficient=coefficient, orthogonality_seed=seed,
                             **own, **penalty).double())
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(9)).double()  # float32 values, as SAELens rounds its inputs to them
    return saes, x


def _own_and_stacked(saes, x, step, model=None):
    """Each SAE's own loss and W_dec gradient, and the stack's (the stack's cut to each SAE's width)."""
    model = model or StackedSAEs(saes)
    dead = torch.zeros(model.latent_mask.shape, dtype=torch.bool)
    dead[:, ::2] = True  # AuxK runs (BatchTopK) on every other latent
    dead &= model.latent_mask
    stacked, _ = model.loss(x.expand(len(saes), *x.shape), step, dead if model.topk else None)
    stacked.sum().backward()
    own = []
    for i, sae in enumerate(saes):
        sae.zero_grad()
        coefficients = {"l1": sae.cfg.l1_coefficient} if hasattr(sae.cfg, "l1_coefficient") else {}
        output = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, is_logging_step=False,
                                                          dead_neuron_mask=dead[i, :sae.cfg.d_sae], n_training_steps=step))
        output.loss.backward()
        width = sae.cfg.d_sae
        own.append((output.loss.detach(), sae.W_dec.grad, stacked[i].detach(), model.W_dec.grad[i, :width]))
    return own


@pytest.mark.parametrize("name", STACK_CASES)
def test_the_stacked_loss_and_its_gradient_are_each_saes_own(name):
    """StackedSAEs adds OrthogonalityMixin.stacked_penalty to the plain stacked loss: in float64
    each SAE's stacked loss and decoder gradient equal its own training_forward_pass's, for a
    stack mixing coefficients (0 included), seeds and widths (padded latents enter no pair and
    no chunk), at steps whose chunks differ."""
    saes, x = _stack_case(name)
    # train_together stacks SAEs of one coefficient (any seed, width) and keeps coefficients apart
    keys = {(sae.cfg.orthogonality_coefficient, _group_key(Job(sae=sae, stream=None, data={}))) for sae in saes}
    assert len({c for c, _ in keys}) == len(keys)
    for step in (0, 7):
        for own_loss, own_grad, stacked_loss, stacked_grad in _own_and_stacked(saes, x, step):
            assert float(abs(stacked_loss - own_loss)) < 1e-12
            assert float((stacked_grad - own_grad).abs().max()) < 1e-12
    # the penalty mattered: the penalised SAEs' losses exceed their plain parts
    plain = [float(s.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 0.1}, dead_neuron_mask=None,
                                                          is_logging_step=False, n_training_steps=0)).losses["orthogonality_loss"].detach())
             for s in saes if s.cfg.orthogonality_coefficient > 0 and s.cfg.d_sae > 1]
    assert plain and min(plain) > 1e-3


def test_a_penalty_that_is_identically_zero_leaves_the_sae_bit_for_bit_as_its_baseline():
    """One latent has no pair: trained stacked, the penalised SAE is its coefficient-0 twin to the
    bit (notebook 08's control), because each coefficient trains in a stack of its own layout
    (``OrthogonalityMixin.stacked_varying_fields``). In one stack the twins would drift apart
    (stack positions round differently), by more than the notebook's 1e-6 on its ``small`` profile."""
    toys = {"hierarchical": ToySetting([0.25, 0.2], hierarchies=[Hierarchy(0, (1,))], d_model=50),
            "correlated": ToySetting([0.25, 0.2], d_model=50)}
    jobs = {(name, c): orthogonal_job(toy_job, toy, 1, batch_size=200, l1_coefficient=1e-3, orthogonality_coefficient=c,
                                      stacked_baseline=False) for name, toy in toys.items() for c in (0.0, 1.0)}
    saes = train_saes(jobs, TrainSettings(steps=300, batch_size=200, lr=3e-3, adam_betas=(0.0, 0.999)), cache=False, progress=False)
    for name in toys:
        assert torch.equal(saes[(name, 1.0)].W_dec, saes[(name, 0.0)].W_dec)
        assert torch.equal(saes[(name, 1.0)].W_enc, saes[(name, 0.0)].W_enc)
        assert not torch.equal(saes[(name, 1.0)].W_dec, jobs[(name, 1.0)].sae.W_dec)  # trained


def test_the_stacked_penalty_check_can_fail(monkeypatch):
    """The check above tells a wrong stacked penalty from the right one: padded latents let into
    the pairs, chunks drawn for the wrong step, or the penalty dropped each move some SAE's loss."""
    from hedging_utils import orthogonality
    worst = {}
    for name, fault in (("standard, pairwise mean", "padding enters"), ("batchtopk, chunked (OrtSAE)", "next step's chunks"),
                        ("batchtopk, pairwise mean", "penalty dropped")):
        saes, x = _stack_case(name)
        model = StackedSAEs(saes)
        original = orthogonality.OrthogonalityMixin.stacked_penalty.__func__
        if fault == "padding enters":
            model.penalty = lambda cfgs, w, step: original(type(saes[0]), [dataclass_replace(c, d_sae=w.shape[1]) for c in cfgs], w, step)
        elif fault == "next step's chunks":
            model.penalty = lambda cfgs, w, step: original(type(saes[0]), cfgs, w, step + 1)
        else:
            model.penalty = None
        worst[fault] = max(float(abs(stacked - own)) for own, _, stacked, _ in _own_and_stacked(saes, x, 3, model))
    assert min(worst.values()) > 1e-4, worst


def dataclass_replace(cfg, **changes):
    changed = copy.copy(cfg)
    for key, value in changes.items():
        setattr(changed, key, value)
    return changed


def test_bad_options_name_the_parameter():
    with pytest.raises(ParameterError, match="orthogonality_form='dense'"):
        make_sae(4, 3, "orthogonal_standard", orthogonality_form="dense")
    with pytest.raises(ParameterError, match="orthogonality_power=0.5"):
        make_sae(4, 3, "orthogonal_standard", orthogonality_power=0.5)
    with pytest.raises(ParameterError, match="orthogonality_coefficient=-1"):
        make_sae(4, 3, "orthogonal_batchtopk", orthogonality_coefficient=-1)
    with pytest.raises(ParameterError, match="architecture='topk'"):
        orthogonal_job(toy_job, ToySetting([0.5, 0.5], d_model=4), 2, batch_size=8, architecture="topk",
                       orthogonality_coefficient=1.0)


def test_they_train_stacked_and_reload_from_the_cache(tmp_path):
    """Stackable (through the autograd loss, not the closed-form step): train_saes trains them
    with the stacked trainer; the cache key carries this module's code; the cache reloads them
    as their own class."""
    toy = ToySetting([0.4, 0.3, 0.2], d_model=6)
    jobs = {c: orthogonal_job(toy_job, toy, 3, batch_size=32, architecture="standard", l1_coefficient=0.01,
                              orthogonality_coefficient=c, init="random") for c in (0.0, 1.0)}
    assert jobs[0.0].sae.cfg.architecture() == "standard" and StackedSAEs.supports(jobs[0.0].sae)
    assert StackedSAEs.supports(jobs[1.0].sae) and jobs[1.0].init["orthogonality_code"] == ORTHOGONALITY_CODE
    assert not ClosedFormStep.supports(StackedSAEs([jobs[1.0].sae]))
    saes = train_saes(jobs, TrainSettings(steps=60, batch_size=32, lr=1e-2), kind="t", progress=False)
    assert isinstance(saes[1.0], OrthogonalStandardTrainingSAE) and saes[1.0].cfg.orthogonality_coefficient == 1.0
    # the penalty made the decoder more orthogonal than without it
    assert max_decoder_cosine(saes[1.0].W_dec) < max_decoder_cosine(saes[0.0].W_dec)
    again = train_saes(jobs, TrainSettings(steps=60, batch_size=32, lr=1e-2), kind="t", progress=False)
    assert torch.equal(again[1.0].W_dec, saes[1.0].W_dec)
    # a baseline on SAELens' path: the penalised architecture with coefficient 0
    same_path = orthogonal_job(toy_job, toy, 3, batch_size=32, l1_coefficient=0.01, orthogonality_coefficient=0.0,
                               stacked_baseline=False, init="random")
    assert same_path.sae.cfg.architecture() == "orthogonal_standard" and StackedSAEs.supports(same_path.sae)
    cls, _ = get_sae_training_class("orthogonal_batchtopk")
    assert cls is OrthogonalBatchTopKTrainingSAE


def test_toy_absorption_and_unlatented_hedging_on_constructed_saes():
    toy = ToySetting([0.5, 0.5], hierarchies=[Hierarchy(0, (1,))], d_model=4)
    f = toy.features
    sae = make_sae(4, 2, "standard")
    with torch.no_grad():  # an absorbing SAE: parent latent f1 - f2 (off when the child fires), child latent f1 + f2
        sae.W_enc.copy_(torch.stack([f[0] - f[1], f[1]]).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.stack([f[0], (f[0] + f[1]) / math.sqrt(2)]))
    acts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    result = toy_absorption(sae, f, acts, parent=0, child=1)
    assert result["absorption_rate"] == 1.0 and result["cofiring_samples"] == 2
    assert result["parent_encoder_cos_child"] == pytest.approx(-math.sqrt(0.5), abs=1e-5)
    assert result["child_decoder_cos_parent"] == pytest.approx(math.sqrt(0.5), abs=1e-5)
    # a clean SAE does not absorb: the check can fail
    with torch.no_grad():
        sae.W_enc.copy_(f[:2].T)
        sae.W_dec.copy_(f[:2])
    clean = toy_absorption(sae, f, acts, parent=0, child=1)
    assert clean["absorption_rate"] == 0.0 and abs(clean["parent_encoder_cos_child"]) < 1e-4
    # hedging: one latent mixing 0.6 of the unlatented f2 into f1
    hedged = unlatented_hedging(torch.stack([0.8 * f[0] + 0.6 * f[1]]), f)
    assert hedged == pytest.approx({"hedging": 0.6, "unlatented": 0.6, "n_unlatented": 1}, abs=1e-5)
    # (SAELens' feature directions are orthogonal to about 1e-5)
    assert unlatented_hedging(f[:2], f) == pytest.approx({"hedging": 0.0, "unlatented": 0.0, "n_unlatented": 0}, abs=1e-4)
    assert max_decoder_cosine(f[:2]) == pytest.approx(0.0, abs=1e-4) and math.isnan(max_decoder_cosine(f[:1]))


@pytest.mark.parametrize("width", [100, 8192, 8193, 40_000, 100_000])
def test_ortsae_chunks_keep_the_work_linear_in_width(width):
    """Each chunk holds at most 8,192 latents, so the cosines computed (the sum of squared chunk
    sizes) stay within width x 8,192: linear in the width (benchmarks/orthogonality_cost.py times it)."""
    chunks = chunk_partition(width, n_chunks_for(width), step_generator(0, 0))
    sizes = [len(c) for c in chunks]
    assert sum(sizes) == width and max(sizes) <= 8192
    assert sum(s * s for s in sizes) <= width * 8192
