import pytest

import numpy as np

from hedging_utils.metrics import hedging_degree_from_decoders, projection_norms, replicate_noise, zero_crossing


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
    assert d.summary()["hedging_rate"] == d.rate


E1, E2, E3 = np.eye(3)
R = 2 ** -0.5


def _random_term(delta, n_new, n_draws, seed):
    """The random baseline of eq. 7 by hand: the draws are ``default_rng(seed).standard_normal((N, D))``
    in turn; with N = 1 the projection onto the span of r is |delta . r| / ||r||."""
    assert n_new == 1
    rng = np.random.default_rng(seed)
    draws = [rng.standard_normal((1, 3))[0] for _ in range(n_draws)]
    per_draw = np.array([[abs(d @ r) / np.linalg.norm(r) for d in delta] for r in draws])  # [draw, latent]
    return per_draw


def test_eq7_on_a_hand_worked_three_latent_example():
    """Control: latents e1, e2. Extended: latent 0 turns halfway towards e3, latent 1 is unchanged,
    the new latent is 5 e3. delta_0 = (R - 1, 0, R) with R = 1/sqrt(2), delta_1 = 0; the projections
    onto the new span (e3) are R and 0, so the first term of h is R / 2."""
    control = np.stack([E1, E2])
    extended = np.stack([E1 + E3, E2, 5 * E3])
    d = hedging_degree_from_decoders(control, extended, n_random_draws=4, seed=7)
    delta = np.array([[R - 1, 0, R], [0, 0, 0]])
    assert d.delta_norm == pytest.approx([np.sqrt(2 - np.sqrt(2)), 0.0])
    assert d.projection_new == pytest.approx([R, 0.0])
    random = _random_term(delta, 1, 4, 7)
    assert d.projection_random == pytest.approx(random.mean(axis=0))
    assert d.h == pytest.approx(R / 2 - random.mean())
    assert d.h_random_spread == pytest.approx(random.mean(axis=1).std())
    assert d.portion_new == pytest.approx(0.5 / (2 - np.sqrt(2)))  # ||Proj||^2 = 1/2 of ||delta||^2 = 2 - sqrt(2)
    assert d.portion_random == pytest.approx(np.mean((random ** 2).sum(axis=1)) / (2 - np.sqrt(2)))
    assert d.rate == pytest.approx((R / 2 - random.mean()) / (1 - random.mean()))


def test_a_change_away_from_the_new_latent_has_negative_h_and_a_zero_rate():
    """Latent 0 turns towards e2 (another original latent), orthogonal to the new latent e3: the
    new span catches none of the change, random spans some, so h < 0 and the clamped rate is 0."""
    d = hedging_degree_from_decoders(np.stack([E1, E2]), np.stack([E1 + E2, E2, E3]), n_random_draws=4, seed=7)
    random = _random_term(np.array([[R - 1, R, 0], [0, 0, 0]]), 1, 4, 7)
    assert d.projection_new == pytest.approx([0.0, 0.0], abs=1e-12)
    assert d.h == pytest.approx(-random.mean()) and d.h < -0.05
    assert d.rate == 0.0


def test_projection_onto_a_span_with_a_duplicated_vector_counts_its_direction_once():
    """eq. 6 on a rank-deficient span: two identical new latents span one direction, as the
    authors' pseudo-inverse has it; a plain QR adds a spurious second direction."""
    v = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    assert projection_norms(v, np.stack([E3, E3])) == pytest.approx([1.0, 0.0], abs=1e-12)
    assert projection_norms(v, np.stack([E1, E1 + E2, 2 * E1 + E2])) == pytest.approx([np.sqrt(2), 2.0])
    span = np.stack([E1 + E3, 2 * (E1 + E3), E2 - E3])
    a = span.T
    pinv = a @ np.linalg.pinv(a.T @ a) @ a.T  # the authors' projection (hedging_eval.py)
    assert projection_norms(v, span) == pytest.approx(np.linalg.norm(v @ pinv, axis=1))
    assert projection_norms(v, np.zeros((2, 3))) == pytest.approx([0.0, 0.0])
    # in the hedging degree: duplicating the new latent changes nothing in the first term
    control = np.stack([E1, E2])
    once = hedging_degree_from_decoders(control, np.stack([E1 + E2 + E3, E2, E3]))
    twice = hedging_degree_from_decoders(control, np.stack([E1 + E2 + E3, E2, E3, E3]))
    assert twice.projection_new == pytest.approx(once.projection_new)


def _sae_with(w_dec, b_dec, architecture="standard"):
    import torch
    from hedging_utils.training import make_sae
    w_dec = torch.as_tensor(w_dec, dtype=torch.float32)
    sae = make_sae(w_dec.shape[1], w_dec.shape[0], architecture)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.as_tensor(b_dec, dtype=torch.float32))
    return sae


def test_decoder_bias_table_reads_norm_cosine_span_and_l0():
    import torch
    from hedging_utils.metrics import decoder_bias_table
    eye = np.eye(4)
    narrow = _sae_with(eye[:2], [0.0, 0.0, 3.0, 4.0])  # b_dec outside the decoder's span
    wide = _sae_with(eye, [1.0, 0.0, 0.0, 0.0])
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]) + torch.tensor([0.0, 0.0, 3.0, 4.0])
    table = decoder_bias_table({"narrow": narrow, "wide": wide}, x).set_index("sae")
    assert table.loc["narrow", "b_dec_norm"] == pytest.approx(5.0)
    assert table.loc["narrow", "b_dec_span_share"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["wide", "b_dec_span_share"] == pytest.approx(1.0)
    assert table.loc["narrow", "cos_b_dec_mean_input"] == pytest.approx(5.0 / np.linalg.norm([1.0, 0.5, 3.0, 4.0]))
    assert table.loc["narrow", "l0"] == pytest.approx(1.5)  # inputs minus b_dec: (1,1) and (1,0) on latents 0, 1
    assert list(table["width"]) == [2, 4]


def test_bias_changes_sees_a_handover_and_matches_the_random_walk_law():
    import torch
    from hedging_utils.metrics import bias_changes
    eye = np.eye(8)
    before = _sae_with(eye[:2], [0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # the added latent (feature 2) takes over what b_dec held: b_dec drops by its mean output
    after = _sae_with(eye[:3], [0.0] * 8)
    x = torch.zeros(100, 8)
    x[:, 2] = 2.0
    row = bias_changes([before, after], x, n_random_draws=2000).iloc[0]
    assert row["cos_handover"] == pytest.approx(1.0)
    assert row["span_share_new"] == pytest.approx(1.0) and row["span_share_random"] == pytest.approx(1 / 8)
    assert row["cos_previous_bias"] == pytest.approx(-1.0)
    # ||b0 + r|| for a random r of norm 2 with ||b0|| = 2: mean over directions, about 2.6 in 8 dimensions
    assert row["b_dec_norm"] == 0.0 and 2.4 < row["random_walk_norm"] < 3.0


def test_control_changes_corrects_by_the_control_and_splits_each_change():
    from hedging_utils.metrics import control_changes
    eye = np.eye(4)
    b0, b1, b2 = [3.0, 4.0, 0.0, 0.0], [3.0, 4.0, 2.0, 0.0], [3.0, 4.0, 2.0, 2.0]
    doubled = [_sae_with(eye[:1], b0), _sae_with(eye[:2], b1), _sae_with(eye[:4], b2)]
    # the control makes the first stage's change too and none of the second
    control = [_sae_with(eye[:1], b0), _sae_with(eye[:1], b1), _sae_with(eye[:1], b1)]
    table = control_changes(doubled, control).set_index("stage")
    assert list(table["width"]) == [1, 2, 4]
    assert np.isnan(table.loc[0, "share_not_control"]) and table.loc[0, "corrected_norm"] == pytest.approx(5.0)
    assert table.loc[1, "share_not_control"] == pytest.approx(0.0) and table.loc[1, "cos_control_change"] == pytest.approx(1.0)
    assert table.loc[1, "corrected_norm"] == pytest.approx(5.0)  # all of the rise is the control's
    assert table.loc[2, "share_not_control"] == pytest.approx(1.0) and table.loc[2, "control_change_norm"] == 0.0
    assert table.loc[2, "corrected_norm"] == pytest.approx(np.sqrt(33) - (np.sqrt(29) - 5.0))
    with pytest.raises(ValueError, match="stages"):
        control_changes(doubled, control[:2])


def test_reconstruction_table_reads_variance_explained_l0_and_live_latents():
    import torch
    from hedging_utils.metrics import reconstruction_table
    eye = np.eye(3)
    full = _sae_with(eye, [0.0, 0.0, 0.0])  # reconstructs every non-negative input exactly
    half = _sae_with(eye[:1], [0.0, 0.0, 0.0])  # only the first coordinate
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    table = reconstruction_table({"full": full, "half": half}, x, batch_size=3).set_index("sae")
    assert table.loc["full", "variance_explained"] == pytest.approx(1.0)
    total = float((x - x.mean(0)).pow(2).sum())
    assert table.loc["half", "variance_explained"] == pytest.approx(1 - 4.0 / total)  # misses the 2 on coordinate 1
    assert table.loc["half", "mse"] == pytest.approx(1.0)
    assert table.loc["full", "l0"] == pytest.approx(0.75) and table.loc["full", "alive_fraction"] == pytest.approx(2 / 3)


def _sweep(means_by_x, noise=0.0):
    import pandas as pd
    rows = [{"x": x, "m": mean + sign * noise} for x, mean in means_by_x.items() for sign in (-1, 1)]
    return pd.DataFrame(rows)


def test_interior_optimum_finds_a_middle_winner_and_weighs_it_against_seed_noise():
    from hedging_utils.metrics import interior_optimum
    clear = interior_optimum(_sweep({0: 0.5, 0.5: 0.8, 0.75: 0.9, 1: 0.6}, noise=0.05), "x", "m", higher_is_better=True)
    assert clear["best_x"] == 0.75 and clear["beats_both_ends"] and clear["separated"]
    assert clear["margin"] == pytest.approx(0.3) and clear["noise"] == pytest.approx(np.std([-0.05, 0.05], ddof=1))
    noisy = interior_optimum(_sweep({0: 0.5, 0.5: 0.55, 1: 0.52}, noise=0.1), "x", "m", higher_is_better=True)
    assert noisy["beats_both_ends"] and not noisy["separated"]
    ends_win = interior_optimum(_sweep({0: 0.1, 0.5: 0.3, 1: 0.2}), "x", "m", higher_is_better=False)
    assert ends_win["best_x"] == 0.5 and not ends_win["beats_both_ends"] and not ends_win["separated"]


def test_interior_optimum_says_when_a_metric_did_not_run():
    import pandas as pd
    from hedging_utils.metrics import interior_optimum
    frame = pd.DataFrame({"x": [0, 0.5, 1], "m": ["not run: no hub"] * 3})
    out = interior_optimum(frame, "x", "m", higher_is_better=True)
    assert out["status"].startswith("not run") and out["separated"] is None
    two = interior_optimum(_sweep({0: 1.0, 1: 2.0}), "x", "m", higher_is_better=True)
    assert "need 3" in two["status"]


def test_summarise_gives_mean_std_and_count_and_skips_metrics_that_did_not_run():
    import pandas as pd
    from hedging_utils.metrics import summarise
    frame = pd.DataFrame({"g": ["a", "a", "b"], "m": [1.0, 3.0, 5.0], "off": ["not run: x"] * 3})
    table = summarise(frame, ["g"], ["m", "off"])
    assert list(table.columns) == ["g", "metric", "mean", "std", "n"]
    assert table.set_index("g").loc["a", "mean"] == 2.0 and table.set_index("g").loc["a", "n"] == 2
    assert set(table["metric"]) == {"m"}


def test_pareto_gap_interpolates_the_reference_curve_at_each_point():
    import pandas as pd
    from hedging_utils.metrics import pareto_gap
    frame = pd.DataFrame({"loss": ["mse", "mse", "mse", "l2", "l2", "snap"], "l0": [10, 20, 40, 15, 50, 30],
                          "ve": [0.5, 0.6, 0.8, 0.56, 0.9, 0.65]})
    gaps = pareto_gap(frame, "l0", "ve", "loss", "mse").set_index(["loss", "l0"])
    assert gaps.loc[("l2", 15), "gap"] == pytest.approx(0.56 - 0.55)
    assert gaps.loc[("snap", 30), "gap"] == pytest.approx(0.65 - 0.7)
    assert np.isnan(gaps.loc[("l2", 50), "gap"])  # beyond the reference curve
    assert "mse" not in gaps.index.get_level_values("loss")


def test_replicate_noise_is_the_pooled_seed_std_of_two_runs():
    assert replicate_noise([0.1, 0.5, -0.2], [0.1, 0.44, -0.28]) == pytest.approx(np.sqrt((0.06**2 + 0.08**2) / 3 / 2))
    assert replicate_noise([0.3, float("nan")], [0.2, 0.1]) == pytest.approx(0.1 / np.sqrt(2))  # NaN pairs left out
    assert np.isnan(replicate_noise([float("nan")], [0.1]))
    rng = np.random.default_rng(0)  # two runs with seed noise 0.01 on 400 measurements: the estimate is 0.01
    truth = rng.standard_normal(400)
    assert replicate_noise(truth + 0.01 * rng.standard_normal(400), truth + 0.01 * rng.standard_normal(400)) == pytest.approx(0.01, rel=0.15)


def test_replicate_noise_refuses_mismatched_runs():
    with pytest.raises(ValueError, match="same, non-empty"):
        replicate_noise([0.1, 0.2], [0.1])
