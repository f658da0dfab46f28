"""The language-model machinery: checks before compute, text (see also test_text.py), the resumable activation cache,
streams, and the TransformerLens model against Hugging Face's. Uses a tiny corpus and few tokens."""

import dataclasses

import pytest
import torch

from hedging_utils import llm, text
from hedging_utils.profiles import PROFILES, ParameterError
from hedging_utils.training import training_device


@pytest.fixture(scope="module")
def model():
    return llm.load_model("gemma-3-270m")


@pytest.fixture
def tiny_corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The cat sat on the mat. " * 40)
    (folder / "b.jsonl").write_text('{"text": "Paris is the capital of France."}\n{"text": "def f(x):\\n    return x"}\n' * 20)
    return str(folder)


def test_unknown_model_names_the_choices():
    with pytest.raises(ParameterError, match=r"model='gpt-5' is not a model.*gemma-3-270m"):
        llm.check_llm_setup("gpt-5", [3], "offline")


def test_layer_outside_the_model_stops():
    with pytest.raises(ParameterError, match=r"layer=18 is outside gemma-3-270m, which has layers 0..17"):
        llm.check_llm_setup("gemma-3-270m", [3, 18], "offline")


def test_missing_corpus_path_stops(tmp_path):
    with pytest.raises(ParameterError, match=r"corpus=.*does not exist.*'offline'"):
        llm.check_llm_setup("gemma-3-270m", [3], str(tmp_path / "nope"))


@pytest.mark.parametrize("model_name,corpus", [("google/gemma-2-2b", "offline"), ("gemma-3-270m", "pile")])
def test_paper_settings_without_network_stop_before_compute(monkeypatch, model_name, corpus, tmp_path):
    monkeypatch.setattr(llm, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ParameterError, match=r"need the Hugging Face hub.*profile='small'"):
        llm.cache_activations(model_name, [3], corpus, n_tokens=1024)
    assert not (tmp_path / "cache").exists()


def test_every_profile_names_known_models_and_layers():
    for profile in PROFILES.values():
        for m in profile.llm.models:
            spec = llm.check_model(m.name)
            llm.check_layers(spec, [m.layer])
        llm.check_layers(llm.check_model(profile.llm.models[0].name), profile.llm.layers)


def test_the_activation_cache_follows_the_corpus_definition():
    assert text.corpus_id("offline").startswith("offline:")


def test_path_corpus_reads_txt_and_jsonl(tiny_corpus):
    data = text.load_corpus(tiny_corpus)
    assert len(data) == 41
    assert data[0]["text"].startswith("The cat sat")


def test_transformer_lens_logits_match_hugging_face(model):
    hf_model, _ = llm.load_offline_hf_model()
    for prompt in ["Paris is the capital of", "And God said, Let there be light", "def add(a, b):\n    return"]:
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            ours, theirs = model(tokens), hf_model(tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-4), (prompt, (ours - theirs).abs().max())
    assert model.tokenizer.decode(model(model.to_tokens("Paris is the capital of"))[0, -1].argmax()) == " France"


def _cache(model, corpus, **kwargs):
    return llm.cache_activations("gemma-3-270m", [1, 2], corpus, context_size=16, n_tokens=96, shard_sequences=2,
                                 model_batch_sequences=2, loaded_model=model, progress=False, **kwargs)


def test_interrupted_caching_resumes_and_never_reads_a_partial_file(model, tiny_corpus, tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _cache(model, tiny_corpus, _stop_after_shards=1)
    folders = sorted((tmp_path / "cache" / "activations").iterdir())
    assert len(folders) == 2 and all(len(list(f.glob("shard_*.safetensors"))) == 1 for f in folders)
    assert not any((f / "settings.json").exists() for f in folders)  # not complete, so not usable
    for f in folders:  # a write killed half-way leaves only a temporary file, which is ignored
        (f / ".shard_00001.safetensors.tmp123").write_bytes(b"half")
    resumed = _cache(model, tiny_corpus)

    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = _cache(model, tiny_corpus)
    for layer in (1, 2):
        assert resumed[layer].n_shards == 3
        for a, b in zip(resumed[layer].load_all(), fresh[layer].load_all()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)
    # reused, not recomputed: a third call needs no model
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "cache"))
    again = _cache(None, tiny_corpus)
    assert again[1].path == resumed[1].path


def test_cache_is_keyed_by_its_settings(model, tiny_corpus):
    a = _cache(model, tiny_corpus)
    b = llm.cache_activations("gemma-3-270m", [1], tiny_corpus, context_size=32, n_tokens=96, shard_sequences=2,
                              loaded_model=model, progress=False)
    assert a[1].path != b[1].path and a[1].path != a[2].path


def test_stream_is_deterministic_resumable_and_normalised(model, tiny_corpus):
    source = _cache(model, tiny_corpus)[2]
    acts, positions = source.training_tokens
    tokens, _ = source.load_all()
    assert not torch.isin(tokens.reshape(-1)[positions], torch.tensor(source.special_tokens, dtype=tokens.dtype)).any()
    assert abs(float(acts.norm(dim=1).mean()) / 640**0.5 - 1) < 0.3
    stream = source.stream(16, seed=3)
    it = stream(0)
    first = [next(it) for _ in range(6)]
    assert torch.equal(next(stream(4)), first[4])
    assert torch.equal(next(source.stream(16, seed=3)(0)), first[0])
    assert not torch.equal(next(source.stream(16, seed=4)(0)), first[0])


def test_llm_sae_training_is_cached_and_measures_hedging(model, tiny_corpus, monkeypatch):
    from hedging_utils import training
    trained = []
    original = training.train_together
    monkeypatch.setattr(training, "train_together", lambda jobs, *a, **kw: trained.extend(jobs) or original(jobs, *a, **kw))
    source = _cache(model, tiny_corpus)[2]
    kwargs = dict(architecture="batchtopk", base_tokens=96, continued_tokens=64, batch_size=32, lr=1e-3, seed=0, k=4)
    m = llm.measure_hedging(source, 16, 2, **kwargs)
    assert m.pair.extended.W_dec.shape == (18, 640) and m.pair.control.W_dec.shape == (16, 640)
    assert len(trained) == 3  # the base SAE, then its control and extension
    again = llm.measure_hedging(source, 16, 2, **kwargs)
    assert len(trained) == 3  # all three read from the cache
    assert torch.equal(again.base.W_dec, m.base.W_dec) and again.degree.h == m.degree.h


def test_top_examples_point_at_the_highest_activations(model, tiny_corpus):
    source = _cache(model, tiny_corpus)[2]
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
def test_llm_saes_of_every_kind_train_and_extend(model, tiny_corpus, architecture, cfg):
    source = _cache(model, tiny_corpus)[2]
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
    source = llm.cache_activations("gemma-3-270m", [9], tiny.corpus, context_size=tiny.context_size, n_tokens=tiny.cached_tokens,
                                   shard_sequences=tiny.shard_sequences, loaded_model=model, device="cpu", progress=False)[9]
    monkeypatch.setattr(llm, "DEFAULT_WINDOW_BYTES", source.shard_bytes)  # a paper cache: far more shards than a window
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


def test_recipe_base_sae_is_measure_hedgings_base(model, tiny_corpus):
    from dataclasses import replace
    source = _cache(model, tiny_corpus)[2]
    scale = replace(PROFILES["ci"].llm, base_tokens=96, continued_tokens=64, batch_size=32, k=4)
    recipe = llm.SAERecipe.at_scale(scale, scale.models[0], "btk")
    m = llm.measure_hedging(source, 16, 2, architecture=recipe.architecture, base_tokens=scale.base_tokens,
                            continued_tokens=scale.continued_tokens, batch_size=scale.batch_size, lr=recipe.lr,
                            dead_feature_window=scale.dead_feature_window, seed=1, **recipe.cfg)
    assert torch.equal(recipe.base_sae(source, scale, 16, seed=1).W_dec, m.base.W_dec)
    assert llm.SAERecipe.at_scale(scale, scale.models[0], "l1", l1_multiple=2.0).cfg["l1_coefficient"] == 2 * scale.models[0].l1_coefficient
    with pytest.raises(ParameterError, match="arch"):
        llm.SAERecipe.at_scale(scale, scale.models[0], "jumprelu")


def test_llm_saes_train_as_a_sweep_and_share_cache_entries_with_train_llm_sae(model, tiny_corpus):
    source = _cache(model, tiny_corpus)[2]
    scale = dataclasses.replace(PROFILES["ci"].matryoshka_llm, width=16, level_divisors=(4,), k=4)
    settings = llm.matryoshka_settings(dataclasses.replace(scale, tokens=96), batch_size=32, dead_feature_window=2)
    variants = [llm.MatryoshkaVariant(m, loss, 4) for m, loss in [(0.0, "mse"), (0.5, "mse"), (1.0, "snap")]]
    specs = {(v, s): v.spec(scale, settings.steps, s) for v in variants for s in (0, 1)}
    assert specs[(variants[2], 0)].cfg["snap_step"] == settings.steps // 2
    assert specs[(variants[1], 1)].cfg["matryoshka_widths"] == [4, 16] and specs[(variants[1], 1)].stream_seed == 1
    together = llm.train_llm_saes(source, specs, settings, progress=False)
    alone = llm.train_llm_sae(source, 16, settings, architecture="balance_matryoshka_batchtopk", seed=1, stream_seed=1,
                              **specs[(variants[1], 1)].cfg)  # the same cache entry
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


ACTIVATION_REL_ERROR = 0.01
"""bfloat16 products may move the default model's layer-9 residual stream by at most this, as a
mean relative error per token (measured on an AVX512-BF16 CPU: 0.004)."""

TOP1_AGREEMENT = 0.95
"""... and must keep at least this share of its top-1 next-token predictions (measured: 0.982
of 384 tokens)."""


def test_bf16_products_keep_the_models_activations_and_predictions(model):
    tokens = torch.as_tensor(llm.load_offline_tokenizer()(
        [d["text"] for d in text.offline_documents()[:64]], return_tensors="pt", padding="max_length", truncation=True,
        max_length=64)["input_ids"][:, :64])
    tokens = tokens[(tokens != 0).all(dim=1)][:6]  # whole windows of real text
    hook = "blocks.9.hook_resid_post"
    with torch.no_grad():
        logits32, cache32 = model.run_with_cache(tokens, names_filter=[hook])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, cache16 = model.run_with_cache(tokens, names_filter=[hook])
    a32, a16 = cache32[hook][:, 1:].float(), cache16[hook][:, 1:].float()  # BOS aside: its norm is in the thousands
    rel = float(((a16 - a32).norm(dim=-1) / a32.norm(dim=-1)).mean())
    agreement = float((logits16.float().argmax(-1) == logits32.argmax(-1)).float().mean())
    assert rel < ACTIVATION_REL_ERROR and agreement > TOP1_AGREEMENT, (rel, agreement)
    assert rel > 0  # bfloat16 really ran
