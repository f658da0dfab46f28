import pytest

import numpy as np

from hedging_utils.metrics import hedging_degree_from_decoders, zero_crossing


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
    unrelated = np.concatenate([control + 0.3 * rng.standard_normal((6, 10)), new])
    assert hedging_degree_from_decoders(control, unrelated).rate >= 0  # clamped, where h may be < 0
    assert "hedging_rate" in d.summary()


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
