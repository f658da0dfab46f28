"""The model and its activations: checks before compute, the offline model's conversion cache, the
resumable activation cache, streams, bfloat16 products, and the TransformerLens model against Hugging
Face's (see also test_text.py and test_streaming.py). Uses a tiny corpus and few tokens."""

import json

import pytest
import torch

from hedging_utils import activations, text
from hedging_utils.profiles import PROFILES, ParameterError


def test_unknown_model_names_the_choices():
    with pytest.raises(ParameterError, match=r"model='gpt-5' is not a model.*gemma-3-270m"):
        activations.check_llm_setup("gpt-5", [3], "offline")


def test_layer_outside_the_model_stops():
    with pytest.raises(ParameterError, match=r"layer=18 is outside gemma-3-270m, which has layers 0..17"):
        activations.check_llm_setup("gemma-3-270m", [3, 18], "offline")


def test_missing_corpus_path_stops(tmp_path):
    with pytest.raises(ParameterError, match=r"corpus=.*does not exist.*'offline'"):
        activations.check_llm_setup("gemma-3-270m", [3], str(tmp_path / "nope"))


@pytest.mark.parametrize("model_name,corpus", [("google/gemma-2-2b", "offline"), ("gemma-3-270m", "pile")])
def test_paper_settings_without_network_stop_before_compute(monkeypatch, model_name, corpus, tmp_path):
    monkeypatch.setattr(activations, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ParameterError, match=r"need the Hugging Face hub.*profile='small'"):
        activations.cache_activations(model_name, [3], corpus, n_tokens=1024)
    assert not (tmp_path / "cache").exists()


def test_every_profile_names_known_models_and_layers():
    for profile in PROFILES.values():
        for m in profile.llm.models:
            spec = activations.check_model(m.name)
            activations.check_layers(spec, [m.layer])
        activations.check_layers(activations.check_model(profile.llm.models[0].name), profile.llm.layers)


def test_the_activation_cache_follows_the_corpus_definition():
    assert text.corpus_id("offline").startswith("offline:")


def test_path_corpus_reads_txt_and_jsonl(tiny_corpus):
    data = text.load_corpus(tiny_corpus)
    assert len(data) == 41
    assert data[0]["text"].startswith("The cat sat")


def test_transformer_lens_logits_match_hugging_face(model):
    hf_model, _ = activations.load_offline_hf_model()
    for prompt in ["Paris is the capital of", "And God said, Let there be light", "def add(a, b):\n    return"]:
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            ours, theirs = model(tokens), hf_model(tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-4), (prompt, (ours - theirs).abs().max())
    assert model.tokenizer.decode(model(model.to_tokens("Paris is the capital of"))[0, -1].argmax()) == " France"


def test_interrupted_caching_resumes_and_never_reads_a_partial_file(model, tiny_corpus, tmp_path, monkeypatch, tiny_cache):
    with pytest.raises(KeyboardInterrupt):
        tiny_cache(model, tiny_corpus, _stop_after_shards=1)
    folders = sorted((tmp_path / "cache" / "activations").iterdir())
    assert len(folders) == 2 and all(len(list(f.glob("shard_*.safetensors"))) == 1 for f in folders)
    assert not any((f / "settings.json").exists() for f in folders)  # not complete, so not usable
    for f in folders:  # a write killed half-way leaves only a temporary file, which is ignored
        (f / ".shard_00001.safetensors.tmp123").write_bytes(b"half")
    resumed = tiny_cache(model, tiny_corpus)

    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = tiny_cache(model, tiny_corpus)
    for layer in (1, 2):
        assert resumed[layer].n_shards == 3
        for a, b in zip(resumed[layer].load_all(), fresh[layer].load_all()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)
    # reused, not recomputed: a third call needs no model
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "cache"))
    again = tiny_cache(None, tiny_corpus)
    assert again[1].path == resumed[1].path


def test_cache_is_keyed_by_its_settings(model, tiny_corpus, tiny_cache):
    a = tiny_cache(model, tiny_corpus)
    b = activations.cache_activations("gemma-3-270m", [1], tiny_corpus, context_size=32, n_tokens=96, shard_sequences=2,
                              loaded_model=model, progress=False)
    assert a[1].path != b[1].path and a[1].path != a[2].path


def test_stream_is_deterministic_resumable_and_normalised(model, tiny_corpus, tiny_cache):
    source = tiny_cache(model, tiny_corpus)[2]
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


ACTIVATION_REL_ERROR = 0.01
"""bfloat16 products may move the default model's layer-9 residual stream by at most this, as a
mean relative error per token (measured on an AVX512-BF16 CPU: 0.004)."""

TOP1_AGREEMENT = 0.95
"""... and must keep at least this share of its top-1 next-token predictions (measured: 0.982
of 384 tokens)."""


def test_bf16_products_keep_the_models_activations_and_predictions(model):
    tokens = torch.as_tensor(activations.load_offline_tokenizer()(
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


def test_the_offline_model_is_converted_once_and_a_changed_copy_is_refused(model, tmp_path):
    """The converted model (``offline_model_dir``) is what the GGUF conversion gave: the check that
    guards it (``check_same_model``) passes on the entry and fails on a copy with one weight or one
    tokenizer setting changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf_model, tokenizer = activations.load_offline_hf_model()
    folder = activations.offline_model_dir()
    assert json.loads((folder / "complete.json").read_text()) == activations.offline_model_key()
    activations.check_same_model(hf_model, tokenizer, folder)
    weights = tmp_path / "weights"
    shutil.copytree(folder, weights)
    tensors = load_file(weights / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, weights / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="model saved in"):
        activations.check_same_model(hf_model, tokenizer, weights)
    flags = tmp_path / "flags"
    shutil.copytree(folder, flags)
    (flags / "tokenizer_flags.json").write_text(json.dumps({"add_bos_token": not tokenizer.add_bos_token}))
    with pytest.raises(RuntimeError, match="tokenizer saved in"):
        activations.check_same_model(hf_model, tokenizer, flags)
