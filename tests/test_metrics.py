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
