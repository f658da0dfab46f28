"""LLM SAE experiments on cached activations: training (alone and as a sweep, cached), every
architecture extended, the recipes' hedging measurement, the streamed path at paper settings, top
examples and SAELens' pretrained SAEs. Uses a tiny corpus and few tokens."""

import dataclasses

import pytest
import torch

from hedging_utils import activations, llm
from hedging_utils.profiles import PROFILES, ParameterError
from hedging_utils.training import training_device


def test_llm_sae_training_is_cached_and_measures_hedging(model, tiny_corpus, monkeypatch, tiny_cache):
    from hedging_utils import training
    trained = []
    original = training.train_together
    monkeypatch.setattr(training, "train_together", lambda jobs, *a, **kw: trained.extend(jobs) or original(jobs, *a, **kw))
    source = tiny_cache(model, tiny_corpus)[2]
    kwargs = dict(architecture="batchtopk", base_tokens=96, continued_tokens=64, batch_size=32, lr=1e-3, seed=0, k=4)
    m = llm.measure_hedging(source, 16, 2, **kwargs)
    assert m.pair.extended.W_dec.shape == (18, 640) and m.pair.control.W_dec.shape == (16, 640)
    assert len(trained) == 3  # the base SAE, then its control and extension
    again = llm.measure_hedging(source, 16, 2, **kwargs)
    assert len(trained) == 3  # all three read from the cache
    assert torch.equal(again.base.W_dec, m.base.W_dec) and again.degree.h == m.degree.h


def test_top_examples_point_at_the_highest_activations(model, tiny_corpus, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
    tokens, _ = source.load_all()
    values = torch.zeros(tokens.shape, dtype=torch.float32)
    values[1, 5], values[0, 3] = 2.0, 1.0
    rows = llm.top_examples(values, tokens, model.tokenizer, k=2)
    assert [(r["sequence"], r["position"], r["activation"]) for r in rows] == [(1, 5, 2.0), (0, 3, 1.0)]
    assert rows[0]["token"] == model.tokenizer.decode([int(tokens[1, 5])])


@pytest.mark.parametrize("architecture,cfg", [
    ("standard", {"l1_coefficient": 1.0, "l1_warm_up_steps": 1}),
    ("balance_matryoshka_batchtopk", {"k": 4, "matryoshka_widths": [4, 8, 16], "coefficient_multiplier": 0.5}),
    ("balance_matryoshka_standard", {"l1_coefficient": 1.0, "matryoshka_widths": [8, 16], "reconstruction_loss": "snap", "snap_step": 1}),
])
def test_llm_saes_of_every_kind_train_and_extend(model, tiny_corpus, architecture, cfg, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
    m = llm.measure_hedging(source, 16, 2, architecture=architecture, base_tokens=64, continued_tokens=64, batch_size=32,
                            lr=1e-3, seed=0, **cfg)
    assert m.pair.extended.cfg.d_sae == 18 and torch.isfinite(m.pair.extended.W_dec).all()


def test_paper_settings_at_tiny_token_counts_take_the_streamed_path(model, monkeypatch):
    """The ``paper`` profile's LLM settings (context 1,024, BatchTopK K = 25, its narrowest width, N = 64,
    its learning rates and dead-latent window) on the offline model and text, a few thousand tokens,
    through the windowed stream a paper-sized cache takes (one shard a window), on
    ``training_device()``: the GPU when there is one, else this CPU."""
    paper = PROFILES["paper"].llm
    tiny = dataclasses.replace(paper, corpus="offline", shard_sequences=1, cached_tokens=4 * paper.context_size,
                               base_tokens=2048, continued_tokens=1024, batch_size=256)
    source = activations.cache_activations("gemma-3-270m", [9], tiny.corpus, context_size=tiny.context_size, n_tokens=tiny.cached_tokens,
                                   shard_sequences=tiny.shard_sequences, loaded_model=model, device="cpu", progress=False)[9]
    monkeypatch.setattr(activations, "DEFAULT_WINDOW_BYTES", source.shard_bytes)  # a paper cache: far more shards than a window
    assert source.n_shards == 4 and not source.stream(tiny.batch_size).whole
    m = llm.measure_hedging(source, tiny.widths[0], tiny.n_new, architecture="batchtopk", base_tokens=tiny.base_tokens,
                            continued_tokens=tiny.continued_tokens, batch_size=tiny.batch_size, lr=tiny.lr_batchtopk,
                            continued_lr=tiny.continued_lr_batchtopk, dead_feature_window=tiny.dead_feature_window,
                            k=tiny.k, n_random_draws=2)
    assert m.pair.extended.cfg.d_sae == 128 + 64 and torch.isfinite(m.pair.extended.W_dec).all()
    assert "training_tokens" not in source.__dict__  # the cache was never read whole
    assert 0 < m.l0 <= 2 * tiny.k
    print(f"paper settings at {tiny.base_tokens:,} + {tiny.continued_tokens:,} tokens on {training_device()}: "
          f"h = {m.degree.h:.4f}, L0 = {m.l0:.1f}")


def test_recipe_base_sae_is_measure_hedgings_base(model, tiny_corpus, tiny_cache):
    from dataclasses import replace
    source = tiny_cache(model, tiny_corpus)[2]
    scale = replace(PROFILES["ci"].llm, base_tokens=96, continued_tokens=64, batch_size=32, k=4)
    recipe = llm.SAERecipe.at_scale(scale, scale.models[0], "btk")
    m = llm.measure_hedging(source, 16, 2, architecture=recipe.architecture, base_tokens=scale.base_tokens,
                            continued_tokens=scale.continued_tokens, batch_size=scale.batch_size, lr=recipe.lr,
                            dead_feature_window=scale.dead_feature_window, seed=1, b_dec_init=scale.b_dec_init, **recipe.cfg)
    assert torch.equal(recipe.base_sae(source, scale, 16, seed=1).W_dec, m.base.W_dec)
    from_spec = llm.measure_hedgings({0: recipe.hedging_spec(source, scale, 16, 1, n_new=2)}, progress=False)[0]
    assert torch.equal(from_spec.base.W_dec, m.base.W_dec) and torch.equal(from_spec.pair.extended.W_dec, m.pair.extended.W_dec)
    assert llm.SAERecipe.at_scale(scale, scale.models[0], "l1", l1_multiple=2.0).cfg["l1_coefficient"] == 2 * scale.models[0].l1_coefficient
    with pytest.raises(ParameterError, match="arch"):
        llm.SAERecipe.at_scale(scale, scale.models[0], "jumprelu")


def test_llm_saes_train_as_a_sweep_and_share_cache_entries_with_train_llm_sae(model, tiny_corpus, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
    scale = dataclasses.replace(PROFILES["ci"].matryoshka_llm, width=16, level_divisors=(4,), k=4)
    settings = llm.matryoshka_settings(dataclasses.replace(scale, tokens=96), batch_size=32, dead_feature_window=2)
    variants = [llm.MatryoshkaVariant(m, loss, 4) for m, loss in [(0.0, "mse"), (0.5, "mse"), (1.0, "snap")]]
    specs = {(v, s): v.spec(scale, settings.steps, s) for v in variants for s in (0, 1)}
    assert specs[(variants[2], 0)].cfg["snap_step"] == settings.steps // 2
    assert specs[(variants[0], 0)].b_dec_init == scale.b_dec_init == "mean"  # ci, as small; paper: the authors' zeros
    assert PROFILES["paper"].matryoshka_llm.b_dec_init == "zeros"
    with pytest.raises(ParameterError, match="b_dec_init"):
        dataclasses.replace(scale, b_dec_init="median")
    assert specs[(variants[1], 1)].cfg["matryoshka_widths"] == [4, 16] and specs[(variants[1], 1)].stream_seed == 1
    together = llm.train_llm_saes(source, specs, settings, progress=False)
    alone = llm.train_llm_sae(source, 16, settings, architecture="balance_matryoshka_batchtopk", seed=1, stream_seed=1,
                              b_dec_init=scale.b_dec_init, **specs[(variants[1], 1)].cfg)  # the same cache entry
    assert torch.equal(alone.W_dec, together[(variants[1], 1)].W_dec)
    assert not torch.equal(together[(variants[0], 0)].W_dec, together[(variants[1], 0)].W_dec)
    assert [v.name for v in variants] == ["BatchTopK MSE", "balance x0.5 MSE", "matryoshka snap"]


def test_pretrained_ids_come_from_sae_lens_registry_sorted_by_width_and_l0():
    ids = llm.pretrained_sae_ids("gemma-scope-2b-pt-res", "layer_12/")
    assert ids[0] == "layer_12/width_16k/average_l0_22" and ids[-1].startswith("layer_12/width_1m/")
    assert llm.sae_id_width("layer_12/width_1m/average_l0_19") == 2**20 and llm.sae_id_l0("layer_12/width_16k/average_l0_82") == 82
    with pytest.raises(ParameterError, match="release"):
        llm.pretrained_sae_ids("no-such-release")


def test_pretrained_sae_loads_through_sae_lens(tmp_path, monkeypatch):
    """The pretrained path, offline: SAELens' loader is pointed at a small SAE saved in SAELens' format."""
    from sae_lens import SAE
    from hedging_utils.metrics import decoder_bias_table
    from hedging_utils.training import make_sae
    saved = make_sae(8, 12, "standard")
    with torch.no_grad():
        saved.b_dec.fill_(0.5)
    saved.save_inference_model(tmp_path / "sae")
    calls = []

    def from_disk(release, sae_id, device="cpu"):
        calls.append((release, sae_id))
        return SAE.load_from_disk(tmp_path / "sae", device=device)

    monkeypatch.setattr(SAE, "from_pretrained", from_disk)
    sae = llm.load_pretrained_sae("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_22")
    assert calls == [("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_22")]
    table = decoder_bias_table({"pretrained": sae}, torch.randn(64, 8))
    assert table.loc[0, "width"] == 12 and table.loc[0, "b_dec_norm"] == pytest.approx(0.5 * 8**0.5)


def test_a_decoder_bias_started_at_the_mean_is_its_own_cache_entry(model, tiny_corpus, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
    spec = llm.LLMSAESpec(16, "batchtopk", seed=0, cfg={"k": 4})
    mean_spec = dataclasses.replace(spec, b_dec_init="mean")
    zeros, at_mean = llm.llm_job(source, spec, 32), llm.llm_job(source, mean_spec, 32)
    assert zeros.init == {"seed": 0}  # the key of every SAE trained before the option existed
    assert torch.count_nonzero(zeros.sae.b_dec) == 0
    assert torch.allclose(at_mean.sae.b_dec, source.shard_training_tokens(0)[0].float().mean(0))
    assert torch.equal(at_mean.sae.W_dec, zeros.sae.W_dec)  # only the bias differs
    settings = llm.llm_settings(64, 32, lr=1e-3, dead_feature_window=2)
    assert zeros.cache_settings(settings) != at_mean.cache_settings(settings)
    scale = dataclasses.replace(PROFILES["ci"].llm, base_tokens=64, batch_size=32, k=4)
    at_mean_recipe, at_zero_recipe = (llm.SAERecipe.at_scale(scale, scale.models[0], "btk", b_dec_init=init) for init in ("mean", "zeros"))
    assert not torch.equal(at_mean_recipe.base_sae(source, scale, 16, 0).b_dec, at_zero_recipe.base_sae(source, scale, 16, 0).b_dec)
    with pytest.raises(ParameterError, match="b_dec_init"):
        llm.LLMSAESpec(16, b_dec_init="median")
    with pytest.raises(ParameterError, match="b_dec_init"):
        dataclasses.replace(scale, b_dec_init="median")


def test_a_recipe_starts_its_decoder_bias_where_the_scale_says():
    scale = PROFILES["small"].llm
    lead = scale.models[0]
    assert scale.b_dec_init == "mean" and PROFILES["paper"].llm.b_dec_init == "zeros"  # the authors' start
    l1 = llm.SAERecipe.at_scale(scale, lead, "l1")
    assert l1.b_dec_init == "mean" and l1.cfg["l1_coefficient"] == lead.l1_coefficient
    other = llm.SAERecipe.at_scale(scale, lead, "l1", l1_coefficient=1.5, b_dec_init="zeros")
    assert other.b_dec_init == "zeros" and other.cfg["l1_coefficient"] == 1.5
    spec = l1.hedging_spec("source", scale, 128, 1)
    assert (spec.b_dec_init, spec.n_new, spec.base_tokens, spec.continued_lr, spec.seed) == (
        "mean", scale.n_new, scale.base_tokens, scale.continued_lr_l1, 1)
    assert spec.base_spec().b_dec_init == "mean" and l1.hedging_spec("source", scale, 128, 1, n_new=1).n_new == 1


def test_a_hedging_measurement_can_start_its_base_at_the_mean(model, tiny_corpus, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
    kwargs = dict(architecture="batchtopk", base_tokens=64, continued_tokens=32, batch_size=32, lr=1e-3, seed=0, k=4)
    zeros, at_mean = (llm.measure_hedging(source, 16, 2, b_dec_init=init, **kwargs) for init in ("zeros", "mean"))
    spec = llm.HedgingSpec(source, 16, 2, "batchtopk", 64, 32, 32, 1e-3, cfg={"k": 4})
    assert spec.base_spec() == llm.LLMSAESpec(16, "batchtopk", 0, 0, {"k": 4}, spec.base_spec().label)  # zeros by default
    assert dataclasses.replace(spec, b_dec_init="mean").base_spec().b_dec_init == "mean"
    assert not torch.equal(zeros.base.b_dec, at_mean.base.b_dec)
    assert at_mean.pair.control.W_dec.shape == (16, 640) and at_mean.pair.extended.W_dec.shape == (18, 640)


def test_the_growing_sae_starts_its_decoder_bias_where_the_scale_says(monkeypatch):
    seen = {}

    class Started(Exception):
        pass

    def start(source, d_sae, settings, **kwargs):
        seen.update(kwargs, d_sae=d_sae)
        raise Started

    monkeypatch.setattr(llm, "train_llm_sae", start)
    for init in ("mean", "zeros"):
        scale = dataclasses.replace(PROFILES["ci"].llm, b_dec_init=init)
        with pytest.raises(Started):
            llm.grow_llm_sae("source", scale)
        assert seen["b_dec_init"] == init and seen["l1_coefficient"] == scale.growing_l1_coefficient
        assert seen["d_sae"] == scale.growing_start
