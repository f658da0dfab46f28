import pytest
import torch
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput

from hedging_utils.profiles import ParameterError
from hedging_utils.toys import conditional_pair, toy_job, train_toy_saes
from hedging_utils.training import TrainSettings, make_sae
from hedging_utils.variants import reconstruction_loss

D_IN, D_SAE = 10, 8


def _step(sae, x, n=0):
    coefficients = {k: getattr(v, "value", v) for k, v in sae.get_coefficients().items()}
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    return sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                    n_training_steps=n, is_logging_step=False))


def _pair(reference: str, ours: str, **cfg):
    torch.manual_seed(0)
    ref = make_sae(D_IN, D_SAE, reference, **cfg.pop("ref", {}))
    sae = make_sae(D_IN, D_SAE, ours, **cfg)
    sae.load_state_dict(ref.state_dict())
    return ref, sae


def _grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(64, D_IN)


def test_beta_one_matches_saelens_matryoshka(x):
    ref, sae = _pair("matryoshka_batchtopk", "balance_matryoshka_batchtopk", k=3, matryoshka_widths=[2, 5, 8],
                     ref=dict(k=3, matryoshka_widths=[2, 5, 8]))
    a, b = _step(ref, x), _step(sae, x)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    ga, gb = _grads(ref, a.loss), _grads(sae, b.loss)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


@pytest.mark.parametrize("reference,ours,cfg", [
    ("standard", "balance_matryoshka_standard", dict(l1_coefficient=0.1)),
    ("batchtopk", "balance_matryoshka_batchtopk", dict(k=3)),
])
def test_beta_zero_inner_levels_matches_a_standard_sae(x, reference, ours, cfg):
    ref, sae = _pair(reference, ours, matryoshka_widths=[2, 5], level_coefficients=[0.0, 0.0], ref=dict(cfg), **cfg)
    a, b = _step(ref, x), _step(sae, x)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    ga, gb = _grads(ref, a.loss), _grads(sae, b.loss)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


def test_multiplier_parametrisation():
    sae = make_sae(D_IN, 16, "balance_matryoshka_batchtopk", k=3, matryoshka_widths=[2, 4, 8, 16],
                   coefficient_multiplier=0.5)
    assert sae.cfg.level_betas() == [0.125, 0.25, 0.5, 1.0]
    assert make_sae(D_IN, 16, "balance_matryoshka_batchtopk", k=3, matryoshka_widths=[2, 16],
                    coefficient_multiplier=0.0).cfg.level_betas() == [0.0, 1.0]


def test_per_level_coefficients_weight_the_right_terms(x):
    sae = make_sae(D_IN, D_SAE, "balance_matryoshka_standard", l1_coefficient=0.1, matryoshka_widths=[2, 5],
                   level_coefficients=[0.3, 2.0])
    out = _step(sae, x)
    level = {w: out.losses[f"reconstruction_loss_{w}"] + out.losses[f"sparsity_loss_{w}"] for w in (2, 5, 8)}
    assert out.loss.item() == pytest.approx((0.3 * level[2] + 2.0 * level[5] + level[8]).item(), rel=1e-6)
    # each level's reconstruction uses only its first `width` latents
    acts = sae.encode_with_hidden_pre(x)[0]
    recon2 = acts[:, :2] @ sae.W_dec[:2] + sae.b_dec
    assert out.losses["reconstruction_loss_2"].item() == pytest.approx((recon2 - x).pow(2).sum(-1).mean().item(), rel=1e-5)
    weighted = acts[:, :5] * sae.W_dec[:5].norm(dim=1)
    assert out.losses["sparsity_loss_5"].item() == pytest.approx(0.1 * weighted.sum(-1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("architecture,cfg", [
    ("balance_matryoshka_standard", dict(l1_coefficient=0.1)),
    ("balance_matryoshka_batchtopk", dict(k=4)),
])
def test_detached_mode_blocks_outer_gradients_into_inner_latents(x, architecture, cfg):
    torch.manual_seed(0)
    # inner level weighted 0: inner latents could only learn through the outer level
    detached = make_sae(D_IN, D_SAE, architecture, matryoshka_widths=[3], level_coefficients=[0.0],
                        detach_inner_levels=True, **cfg)
    grads = _grads(detached, _step(detached, x).loss)
    assert grads["W_dec"][:3].abs().max() == 0 and grads["W_enc"][:, :3].abs().max() == 0
    assert grads["b_enc"][:3].abs().max() == 0
    # b_dec is shared by every level and, as in the authors' code, not detached: the outer level
    # trains it through the reconstruction even without the encoder input's centring
    no_centering = make_sae(D_IN, D_SAE, architecture, matryoshka_widths=[3], level_coefficients=[0.0],
                            detach_inner_levels=True, apply_b_dec_to_input=False, **cfg)
    assert _grads(no_centering, _step(no_centering, x).loss)["b_dec"].abs().max() > 0
    assert grads["W_dec"][3:].abs().max() > 0 and grads["W_enc"][:, 3:].abs().max() > 0
    attached = make_sae(D_IN, D_SAE, architecture, matryoshka_widths=[3], level_coefficients=[0.0], **cfg)
    attached.load_state_dict(detached.state_dict())
    assert _grads(attached, _step(attached, x).loss)["W_dec"][:3].abs().max() > 0
    # with the inner level on, inner latents learn from it alone
    inner_only = make_sae(D_IN, D_SAE, architecture, matryoshka_widths=[3], detach_inner_levels=True, **cfg)
    inner_only.load_state_dict(detached.state_dict())
    assert _grads(inner_only, _step(inner_only, x).loss)["W_dec"][:3].abs().max() > 0


def _loss_by_hand(W_enc, b_enc, W_dec, b_dec, x, l1, widths, betas):
    """The balance-matryoshka L1 loss written out from the tensors: sum over levels m of
    beta_m (mean ||x - (acts[:, :m] W_dec[:m] + b_dec)||^2 + l1 mean sum_(i<m) acts_i ||W_dec_i||)."""
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    total = 0.0
    for width, beta in zip(widths, betas):
        recon = acts[:, :width] @ W_dec[:width] + b_dec
        mse = ((x - recon) ** 2).sum(dim=1).mean()
        sparsity = l1 * (acts[:, :width] * W_dec[:width].norm(dim=1)).sum(dim=1).mean()
        total = total + beta * (mse + sparsity)
    return total


def _random_balance_sae(**cfg):
    torch.manual_seed(3)
    sae = make_sae(D_IN, D_SAE, "balance_matryoshka_standard", l1_coefficient=0.1, matryoshka_widths=[3],
                   level_coefficients=[0.5], **cfg).double()
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def test_balance_loss_at_beta_one_half_matches_the_loss_worked_out_by_hand(x):
    """beta = 0.5 on the inner level (3 latents), 1 on the outer (8): both the SAELens forward
    pass and the stacked training loss equal the sum written out term by term."""
    from hedging_utils.training import StackedSAEs
    sae = _random_balance_sae()
    x = x.double()
    expected = _loss_by_hand(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, x, 0.1, [3, 8], [0.5, 1.0])
    inner_only = _loss_by_hand(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, x, 0.1, [3], [1.0])
    assert 0.1 < float(inner_only) / float(expected) < 0.9  # the inner level is a real part of the total
    assert _step(sae, x).loss.item() == pytest.approx(expected.item(), rel=1e-10)
    stacked, _ = StackedSAEs([sae]).double().loss(x[None], 0, None)
    assert stacked.item() == pytest.approx(expected.item(), rel=1e-10)


def test_l2_and_snap_switch_at_the_right_step(x):
    y = x + torch.randn_like(x)
    mse = (y - x).pow(2).sum(-1).mean()
    l2 = (y - x).norm(dim=-1).mean()
    assert reconstruction_loss(y, x, "mse", 10) == pytest.approx(mse.item())
    assert reconstruction_loss(y, x, "l2", 0) == pytest.approx(l2.item())
    assert reconstruction_loss(y, x, "snap", 99, snap_step=100) == pytest.approx(mse.item())
    assert reconstruction_loss(y, x, "snap", 100, snap_step=100) == pytest.approx(l2.item())
    sae = make_sae(D_IN, D_SAE, "balance_matryoshka_batchtopk", k=3, matryoshka_widths=[2],
                   reconstruction_loss="snap", snap_step=5)
    before, after = _step(sae, x, n=4), _step(sae, x, n=5)
    for w in (2, 8):  # every level switches
        recon_err = before.losses[f"reconstruction_loss_{w}"]
        assert after.losses[f"reconstruction_loss_{w}"] < recon_err  # norm < squared norm here (errors > 1)
    assert before.losses["reconstruction_loss_8"].item() == pytest.approx(before.losses["mse_loss"].item(), rel=1e-6)


def test_l2_gradient_is_finite_at_a_perfect_reconstruction():
    x = torch.zeros(4, 3, requires_grad=True)
    reconstruction_loss(x, torch.zeros(4, 3), "l2", 0).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cfg,match", [
    (dict(matryoshka_widths=[4, 2]), r"matryoshka_widths=\[4, 2\] must be strictly increasing"),
    (dict(matryoshka_widths=[2, 2]), "strictly increasing"),
    (dict(matryoshka_widths=[2, 16]), "exceed d_sae=8"),
    (dict(matryoshka_widths=[2], level_coefficients=[-0.5]), r"level_coefficients=\[-0.5\] must all be >= 0"),
    (dict(matryoshka_widths=[2], level_coefficients=[0.5, 0.5]), "outermost level's coefficient is fixed at 1"),
    (dict(matryoshka_widths=[2], coefficient_multiplier=-1.0), "coefficient_multiplier=-1.0"),
    (dict(reconstruction_loss="huber"), "reconstruction_loss='huber'"),
    (dict(reconstruction_loss="snap"), "snap_step=None"),
    (dict(snap_step=10), "only used with reconstruction_loss='snap'"),
])
def test_invalid_configs_raise_clear_errors(cfg, match):
    with pytest.raises(ParameterError, match=match):
        make_sae(D_IN, D_SAE, "balance_matryoshka_standard", **cfg)


def test_snap_step_beyond_training_is_refused():
    job = toy_job(conditional_pair(0.25, 0.2, 0.1), 1, batch_size=100, architecture="balance_matryoshka_standard",
                  reconstruction_loss="snap", snap_step=500, l1_coefficient=1e-3)
    with pytest.raises(ParameterError, match="snap_step=500 is beyond the 19 training steps"):
        train_toy_saes({"sae": job}, TrainSettings(steps=19, batch_size=100))


@pytest.mark.parametrize("architecture,cfg", [
    ("balance_matryoshka_standard", dict(l1_coefficient=0.1)),
    ("balance_matryoshka_batchtopk", dict(k=3)),
])
def test_save_load_round_trip_in_saelens_format(tmp_path, x, architecture, cfg):
    sae = make_sae(D_IN, D_SAE, architecture, matryoshka_widths=[2, 5], level_coefficients=[0.25, 0.5],
                   detach_inner_levels=True, reconstruction_loss="snap", snap_step=7, **cfg)
    sae.save_model(tmp_path / "train")
    loaded = TrainingSAE.load_from_disk(tmp_path / "train")
    assert type(loaded) is type(sae)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert _step(loaded, x, n=8).loss.item() == pytest.approx(_step(sae, x, n=8).loss.item(), rel=1e-6)
    assert type(sae.cfg).from_dict(sae.cfg.to_dict()).level_betas() == [0.25, 0.5, 1.0]
    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert inference.cfg.architecture() == ("standard" if "standard" in architecture else "jumprelu")


def test_snap_trains_as_mse_until_its_step_then_departs_from_both():
    """Trained on one toy stream from one start: snap loss follows MSE exactly up to snap_step,
    and after it, having switched to L2, ends apart from both MSE and plain L2."""
    toy = conditional_pair(0.25, 0.2, 0.1)

    def train(steps, loss, **extra):
        job = toy_job(toy, 2, batch_size=500, architecture="balance_matryoshka_standard", matryoshka_widths=[1],
                      l1_coefficient=1e-3, reconstruction_loss=loss, **extra)
        return train_toy_saes({loss: job}, TrainSettings(steps=steps, batch_size=500), cache=False)[loss].W_dec

    assert torch.equal(train(10, "snap", snap_step=10), train(10, "mse"))
    snap, mse, l2 = train(40, "snap", snap_step=10), train(40, "mse"), train(40, "l2")
    assert (snap - mse).abs().max() > 1e-5 and (snap - l2).abs().max() > 1e-5 and (mse - l2).abs().max() > 1e-5
