"""The "true features" post's combination toy and the naming of learned latents."""

import math

import pytest
import torch

from hedging_utils.combinations import Classification, classify_latents, combination_toy, firing_summary, outcome, summarize
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import toy_job, train_toy_saes
from hedging_utils.training import TrainSettings, make_sae


def test_the_toy_fires_f1_and_f2_together_often_and_f3_rarely():
    toy = combination_toy(0.3, 0.7, 0.15, 0.02)
    firing = firing_summary(toy)
    assert firing == pytest.approx({"p_f1_alone": 0.09, "p_f2_alone": 0.105, "p_f1_and_f2": 0.21, "p_f3": 0.02})
    acts = toy.sample_feature_activations(20_000, seed=0)
    fires = acts > 0
    assert float((fires[:, 0] & fires[:, 1]).float().mean()) == pytest.approx(0.21, abs=0.015)
    assert float(fires[:, 2].float().mean()) == pytest.approx(0.02, abs=0.005)
    assert set(acts.unique().tolist()) <= {0.0, 1.0}  # fixed magnitudes: co-firing f1, f2 in a 1:1 proportion
    with pytest.raises(ParameterError, match="p_f3=1.5"):
        combination_toy(p_f3=1.5)
    with pytest.raises(ParameterError, match="d_model=2"):
        combination_toy(d_model=2)


def sae_with_decoder(toy, rows):
    sae = make_sae(toy.d_model, len(rows), "standard")
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack(rows))
        sae.W_enc.copy_(torch.stack(rows).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_latents_are_named_by_their_decoder_direction():
    toy = combination_toy()
    f = toy.features
    other = torch.zeros(toy.d_model)
    other[:] = torch.linalg.svd(torch.cat([f, torch.zeros(1, toy.d_model)]))[2][-1]  # orthogonal to f1, f2, f3
    rows = [f[0], f[1], (f[0] + f[1]) / math.sqrt(2), f[2], other, 0.6 * f[0] + 0.8 * f[2], (f[1] - f[0]) / math.sqrt(2)]
    x = toy.feature_dict(toy.sample_feature_activations(2000, seed=1)).detach()
    sae = sae_with_decoder(toy, rows)
    with torch.no_grad():
        sae.b_enc[4] = -0.1  # along a direction no input has, behind a threshold: it never fires
    kinds = classify_latents(sae, f, x)["kind"].tolist()
    assert kinds == ["f1", "f2", "f1+f2", "f3", "dead", "other", "f1-f2"]
    assert classify_latents(sae_with_decoder(toy, rows), f)["kind"].tolist()[4] == "other"  # without samples, not checked
    assert outcome(["f1", "f2", "f1+f2"]) == "combination"
    assert outcome(["f1", "f2", "f3"]) == "true features"
    assert outcome(["f1", "f2", "f1+f2", "f3"]) == "combination + f3"
    assert outcome(["f1+f2", "f1-f2", "f3"]) == "rotated"
    assert outcome(["f1+f2", "f3", "dead"]) == "other" and outcome(["f1", "f2", "dead"]) == "other"


def test_the_classification_can_fail():
    """A combination with little of f2 is not named f1+f2, and a stricter threshold rejects a
    slightly rotated feature: the checks built on these names can come out either way."""
    toy = combination_toy()
    f = toy.features
    mostly_f1 = 0.97 * f[0] + 0.243 * f[1]
    rotated = 0.95 * f[2] + 0.312 * f[0]
    frame = classify_latents(sae_with_decoder(toy, [mostly_f1, rotated]), f)
    assert frame["kind"].tolist() == ["f1", "f3"]
    strict = classify_latents(sae_with_decoder(toy, [mostly_f1, rotated]), f, rule=Classification(match_cos=0.99))
    assert strict["kind"].tolist() == ["other", "other"]
    with pytest.raises(ParameterError, match="match_cos=1.5"):
        Classification(match_cos=1.5)


def test_summarize_reports_outcomes_and_loss_of_trained_saes():
    toy = combination_toy(p_f3=0.05)
    jobs = {s: toy_job(toy, 3, batch_size=64, seed=s, l1_coefficient=0.05) for s in (0, 1)}
    saes = train_toy_saes(jobs, TrainSettings(steps=300, batch_size=64, lr=3e-3), progress=False)
    frame = summarize(saes, {s: toy for s in saes}, n_samples=2000)
    assert list(frame["key"]) == [0, 1]
    # initialised at the true features with a low L1 coefficient, the SAEs keep them
    assert (frame["outcome"] == "true features").all() and frame["has_f3"].all()
    assert (frame["variance_explained"] > 0.9).all() and (frame["loss"] > 0).all()
    assert (frame[[f"n_{k}" for k in ("f1", "f2", "f3")]] == 1).all().all()
