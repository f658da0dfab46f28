import json

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE
from scipy.stats import spearmanr

from hedging_utils import diagnose as dg
from hedging_utils.diagnose import diagnose, load_sae, training_form
from hedging_utils.extension import extend_sae
from hedging_utils.figures import verdict
from hedging_utils.ground_truth import (SynthRecipe, build_model, features_of, firing_latents, hierarchy_edges, relatives,
                                        synth_config, synth_job, true_hedging)
from hedging_utils.profiles import ParameterError
from hedging_utils.training import TrainSettings, make_sae, train_saes


# ---------------------------------------------------------------------------------------
# A ground-truth model small enough for a test (SynthSAEBench's recipe with smaller trees):
# 96 features in 64 dimensions, 4 trees of 13 features, low-rank correlations of rank 8.

GT_RECIPE = SynthRecipe(branching_factor=3, max_depth=2, correlation_rank=8)


@pytest.fixture(scope="module")
def gt_model():
    return build_model(synth_config(96, 64, hierarchy_roots=4, orthogonalization_steps=20, seed=0, recipe=GT_RECIPE))


def _samples(model, n, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model.sample(n)


def _independent_features(n, d=16, features=8, p=0.2, seed=0):
    """Orthogonal features (the first ``features`` axes) firing independently with magnitude 1:
    nothing correlated for a latent to hedge."""
    g = torch.Generator().manual_seed(seed)
    fires = (torch.rand(n, features, generator=g) < p).float()
    return torch.cat([fires, torch.zeros(n, d - features)], dim=1)


# ---------------------------------------------------------------------------------------
# Validated against the truth


def test_diagnose_ranks_saes_of_several_widths_as_their_true_hedging_does(gt_model):
    """The test the paper could not run: on a model whose features are known, narrower BatchTopK
    SAEs hedge more (true hedging: what a latent's decoder carries besides its feature), and
    ``diagnose``'s h ranks the widths the same way, seed by seed."""
    widths = (8, 16, 32, 64)
    train = TrainSettings.for_samples(153_600, 512, lr=3e-3, dead_feature_window=10)
    jobs = {w: synth_job(gt_model, w, "batchtopk", batch_size=512, seed=0, k=4) for w in widths}
    saes = train_saes(jobs, train, cache=False, progress=False)
    acts = _samples(gt_model, 30_720, seed=5)
    rel = relatives(hierarchy_edges(gt_model))
    h, truth = {}, {}
    for w in widths:
        result = diagnose(saes[w], acts, n_new_latents=4, tokens=30_720, seeds=3, batch_size=512, lr=3e-3, progress=False)
        h[w] = result.seeds["h"].to_numpy()
        if w == widths[0]:
            assert result.summary.verdict == "holds", result.summary.line()  # the narrowest SAE hedges
        live = firing_latents(saes[w], gt_model, n_samples=4096, seed=7)
        truth[w] = float(true_hedging(saes[w].W_dec, features_of(gt_model), relatives_of=rel)[live]["hedging"].mean())
    true_order = [truth[w] for w in widths]
    assert spearmanr(widths, true_order).statistic < 0  # the truth: narrower SAEs hedge more
    per_seed = [spearmanr([h[w][i] for w in widths], true_order).statistic for i in range(3)]
    check = verdict("diagnose's h ranks the widths as true hedging does (Spearman rho per seed)", per_seed)
    assert check.verdict == "holds", (per_seed, truth, {w: v.tolist() for w, v in h.items()})
    # the same check on a wrong truth (the order reversed) departs: the check can fail
    assert verdict("h ranks as the reversed truth", [-r for r in per_seed]).verdict == "departs"


def test_the_hedging_verdict_fails_where_nothing_can_be_hedged():
    """An L1 SAE that is exactly the features of independent orthogonal features: the new
    latents find nothing to take over, and the verdict is not 'holds'."""
    sae = make_sae(16, 8, "standard", l1_coefficient=1e-4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(16)[:8])
        sae.W_enc.copy_(torch.eye(16)[:8].T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    result = diagnose(sae, _independent_features(8192), n_new_latents=2, tokens=8192, seeds=3, batch_size=512, lr=1e-3,
                      progress=False)
    assert result.summary.verdict != "holds", result.summary.line()
    assert abs(result.summary.h) < 0.005


# ---------------------------------------------------------------------------------------
# The call: any SAE, its outputs


@pytest.mark.parametrize("architecture,cfg", [
    ("standard", dict(l1_coefficient=1e-3)),
    ("topk", dict(k=3)),
    ("batchtopk", dict(k=3)),
    ("jumprelu", dict()),
    ("matryoshka_batchtopk", dict(k=3, matryoshka_widths=[4, 12])),
    ("balance_matryoshka_batchtopk", dict(k=3, matryoshka_widths=[4, 12], coefficient_multiplier=0.5)),
])
def test_every_architecture_training_and_inference_form(architecture, cfg, tmp_path):
    torch.manual_seed(0)
    sae = make_sae(16, 12, architecture, **cfg)
    acts = torch.randn(2048, 16)
    result = diagnose(sae, acts, n_new_latents=2, tokens=1024, seeds=2, batch_size=256, progress=False)
    assert result.summary.sae["training_architecture"] == architecture
    assert len(result.seeds) == 2 and len(result.latents) == 2 * 12
    assert set(result.latents.columns) >= {"seed", "latent", "projection_new", "projection_random", "excess", "delta_norm"}
    assert np.isfinite(result.summary.h) and np.isfinite(result.summary.h_spread)
    assert result.summary.settings["lr"] == dg.DEFAULT_LR
    # the inference form, as SAELens saves and loads it
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    again = diagnose(loaded, acts, n_new_latents=2, tokens=1024, seeds=1, batch_size=256, progress=False)
    assert again.training_sae.cfg.d_sae == 12 and np.isfinite(again.summary.h)


def test_saved_batchtopk_is_continued_as_batchtopk_with_its_mean_l0():
    torch.manual_seed(0)
    sae = make_sae(16, 12, "batchtopk", k=3)
    sae.topk_threshold.fill_(0.2)
    inference_dir = None
    acts = torch.randn(2048, 16)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sae.save_inference_model(d)
        loaded = SAE.load_from_disk(d)
        inference_dir = loaded.cfg.architecture()
        base, notes = training_form(loaded, activations=acts)
    assert inference_dir == "jumprelu"
    assert base.cfg.architecture() == "batchtopk"
    assert float(base.topk_threshold) == pytest.approx(0.2)
    assert any("saved BatchTopK" in n for n in notes)


def test_jumprelu_extension_keeps_the_original_latents():
    torch.manual_seed(0)
    sae = make_sae(8, 5, "jumprelu")
    ext = extend_sae(sae, 3, seed=1)
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.allclose(ext.encode(x)[:, :5], sae.encode(x))
    assert ext.threshold.shape == (8,)


def test_bad_input_to_the_call_names_the_parameter():
    sae = make_sae(16, 8, "standard")
    with pytest.raises(ParameterError, match="d_in"):
        diagnose(sae, torch.randn(2048, 32), progress=False)
    with pytest.raises(ParameterError, match="tokens"):
        diagnose(sae, torch.randn(2048, 16), tokens=100, batch_size=256, progress=False)
    with pytest.raises(ParameterError, match="n_new_latents"):
        diagnose(sae, torch.randn(2048, 16), n_new_latents=0, progress=False)
    with pytest.raises(ParameterError, match="seeds"):
        diagnose(sae, torch.randn(2048, 16), seeds=[1, 1], progress=False)
    with pytest.raises(ParameterError, match="batch_size"):
        diagnose(sae, torch.randn(100, 16), batch_size=256, tokens=256, progress=False)


# ---------------------------------------------------------------------------------------
# The paper's variants from SAELens' own runner


@pytest.mark.parametrize("name,architecture,cfg", [
    ("balance matryoshka BatchTopK", "balance_matryoshka_batchtopk",
     dict(k=4, matryoshka_widths=[8, 32], coefficient_multiplier=0.5)),
    ("snap loss", "balance_matryoshka_batchtopk", dict(k=4, reconstruction_loss="snap", snap_step=20)),
    ("orthogonality-penalised BatchTopK", "orthogonal_batchtopk", dict(k=4, orthogonality_coefficient=0.25)),
])
def test_variants_train_through_sae_lens_runner_save_reload_and_diagnose(gt_model, tmp_path, name, architecture, cfg):
    """SAELens' own ``SyntheticSAERunner`` trains the registered variant (a few steps), saves it
    in inference form with its runner config, ``SAE.load_from_disk`` reloads it, and diagnose
    continues it as the variant it was trained as, with its own loss."""
    from sae_lens.config import LoggingConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

    cfg_cls = get_sae_training_class(architecture)[1]
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=gt_model.cfg, sae=cfg_cls(d_in=64, d_sae=32, **cfg), training_samples=40 * 256, batch_size=256,
        lr=3e-3, output_path=str(tmp_path / "sae"), checkpoint_path=None, eval_samples=0, run_final_eval=False,
        dead_feature_window=10, n_batches_for_norm_estimate=10, logger=LoggingConfig(log_to_wandb=False))
    SyntheticSAERunner(runner_cfg, override_synthetic_model=gt_model).run()
    reloaded = SAE.load_from_disk(tmp_path / "sae")
    assert not isinstance(reloaded, TrainingSAE)
    training_cfg = json.loads((tmp_path / "sae" / "runner_config.json").read_text())["sae"]
    acts = _samples(gt_model, 4096, seed=3)
    result = diagnose(reloaded, acts, n_new_latents=4, tokens=4096, seeds=2, batch_size=256, training_cfg=training_cfg,
                      progress=False)
    form = result.training_sae
    assert form.cfg.architecture() == architecture
    if "matryoshka_widths" in cfg:
        assert form.cfg.matryoshka_widths == [8, 32] and form.cfg.coefficient_multiplier == 0.5
    elif "reconstruction_loss" in cfg:
        assert form.cfg.reconstruction_loss == "snap" and form.cfg.snap_step == 0
    else:
        assert form.cfg.orthogonality_coefficient == 0.25
    assert np.isfinite(result.summary.h)
    # the command line's loader finds the runner's config by itself
    found = load_sae(tmp_path / "sae")
    assert found.training_cfg["architecture"] == architecture


# ---------------------------------------------------------------------------------------
# The command


def _refuse_compute(monkeypatch):
    import hedging_utils.activations as activations

    def refuse(*a, **k):
        raise AssertionError("computed before the input was checked")

    monkeypatch.setattr(activations, "load_model", refuse)
    monkeypatch.setattr(activations, "cache_activations", refuse)
    monkeypatch.setattr(dg, "diagnose", refuse)


def _saved(tmp_path, d_in=640, hook="blocks.6.hook_resid_post"):
    sae = make_sae(d_in, 32, "batchtopk", k=4)
    sae.topk_threshold.fill_(0.3)  # as after training: saved as a JumpReLU SAE with this shared threshold
    sae.cfg.metadata.hook_name = hook
    sae.save_inference_model(tmp_path / "sae")
    return str(tmp_path / "sae")


@pytest.mark.parametrize("argv,message", [
    (["--layer", "40"], "--layer 40"),
    (["--hook", "blocks.3.hook_nonsense"], "--hook"),
    (["--model", "gpt-7"], "model='gpt-7'"),
    (["--corpus", "/no/such/corpus"], "corpus"),
    (["--new-latents", "0"], "n_new_latents"),
    (["--tokens", "10"], "tokens"),
])
def test_bad_command_line_stops_before_compute_naming_the_parameter(argv, message, tmp_path, monkeypatch, capsys):
    _refuse_compute(monkeypatch)
    path = _saved(tmp_path)
    assert dg.main(["--sae", path, "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_sae_of_another_width_stops_before_compute(tmp_path, monkeypatch, capsys):
    _refuse_compute(monkeypatch)
    path = _saved(tmp_path, d_in=32)
    assert dg.main(["--sae", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--sae" in err and "d_in is 32" in err and "640" in err


def test_missing_sae_folder_and_release_errors_stop_before_compute(tmp_path, monkeypatch, capsys):
    _refuse_compute(monkeypatch)
    import hedging_utils.activations as activations

    monkeypatch.setattr(activations, "hub_reachable", lambda timeout=3.0: False)
    out = str(tmp_path / "out")
    cases = [
        (["--sae", str(tmp_path / "nothing"), "--out", out], "--sae"),
        (["--release", "no-such-release", "--sae-id", "x", "--out", out], "--release 'no-such-release'"),
        (["--release", "gemma-scope-2b-pt-res-canonical", "--sae-id", "nope", "--out", out], "--sae-id 'nope'"),
        (["--release", "gemma-scope-2b-pt-res-canonical", "--sae-id", "layer_12/width_16k/canonical", "--out", out],
         "--model 'gemma-3-270m'"),
        (["--release", "gemma-scope-2b-pt-res-canonical", "--sae-id", "layer_12/width_16k/canonical",
          "--model", "google/gemma-2-2b", "--out", out], "need the Hugging Face hub"),
        (["--out", out], "exactly one"),
    ]
    for argv, message in cases:
        assert dg.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_command_writes_json_csv_and_plot(tmp_path, monkeypatch, capsys):
    """The command's flow end to end, with the model's activations stood in for by random ones
    (loading Gemma takes a minute; the README's run does it for real)."""
    path = _saved(tmp_path, d_in=640)
    acts = torch.randn(4096, 640)
    monkeypatch.setattr(dg, "_activations", lambda plan, tokens: (acts, 1.0))
    out = tmp_path / "out"
    assert dg.main(["--sae", path, "--tokens", "2048", "--new-latents", "4", "--seeds", "2", "--batch-size", "512",
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "h = " in printed and "±" in printed
    record = json.loads((out / "diagnosis.json").read_text())
    assert record["hook"] == "blocks.6.hook_resid_post" and record["summary"]["settings"]["n_new_latents"] == 4
    assert record["summary"]["sae"]["training_architecture"] == "batchtopk"
    assert (out / "seeds.csv").exists() and (out / "latents.csv").exists() and (out / "diagnosis.png").exists()


def test_a_training_form_save_loads_as_a_training_sae(tmp_path):
    """``SAE.load_from_disk`` refuses a saved BatchTopK training SAE; the command's loader takes
    the training class instead, and the diagnosis continues it as it is."""
    torch.manual_seed(0)
    sae = make_sae(16, 12, "batchtopk", k=3)
    sae.save_model(tmp_path / "training")
    loaded = load_sae(tmp_path / "training")
    assert isinstance(loaded.sae, TrainingSAE) and loaded.sae.cfg.architecture() == "batchtopk"
    result = diagnose(loaded.sae, torch.randn(2048, 16), n_new_latents=2, tokens=1024, seeds=1, batch_size=256, progress=False)
    assert result.summary.sae["form"] == "training" and result.summary.verdict == "inconclusive"  # one seed: no spread


def test_dead_new_latents_make_the_verdict_inconclusive():
    """New latents that never fire took nothing over: whatever h is, the verdict is inconclusive."""
    torch.manual_seed(0)
    sae = make_sae(16, 12, "batchtopk", k=3)
    result = diagnose(sae, torch.randn(2048, 16), n_new_latents=2, tokens=1024, seeds=2, batch_size=256, init_norm=1e-6,
                      dead_feature_window=1000, progress=False)
    assert result.summary.new_latents_alive == 0
    assert result.summary.verdict == "inconclusive" and result.summary.check["value"]["reason"] == "no new latent fired"


def test_the_package_call_is_the_diagnose_function_and_the_notebooks_never_load_it(monkeypatch):
    """``hedging_utils.diagnose(sae, ...)`` calls ``diagnose`` (the module is callable), whether
    the package attribute or the module was reached first; the package's ``__init__`` does not
    import it, so it is in no notebook's code version."""
    import sys

    import hedging_utils
    from hedging_utils.cache import module_closure

    assert hedging_utils.diagnose is sys.modules["hedging_utils.diagnose"] is dg
    monkeypatch.setattr(dg, "diagnose", lambda *args, **kwargs: ("called", args, kwargs))
    assert hedging_utils.diagnose("sae", "acts", n_new_latents=4) == ("called", ("sae", "acts"), {"n_new_latents": 4})
    assert "diagnose" not in module_closure(["__init__"])
    with pytest.raises(AttributeError, match="no_such_thing"):
        hedging_utils.no_such_thing
