"""Windowed activation streams: deterministic and resumable batches, the in-memory order kept
when the cache fits in a window, identical batches for a control and its extension, and memory
that stays flat as the number of training tokens grows. The caches here are written directly
(random activations, no model), so these tests take seconds."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hedging_utils import activations
from hedging_utils.cache import source_hash
from hedging_utils.profiles import ParameterError

BOS = 2
REPO = Path(__file__).resolve().parent.parent


def fake_cache(folder: Path, n_shards: int, *, shard_sequences: int = 4, context: int = 8, d_model: int = 6,
               seed: int = 0) -> activations.ActivationSource:
    """A cache laid out as ``cache_activations`` writes it: BOS first in every sequence, and
    activations whose first component is the token's global position (to trace batches)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    per_shard = shard_sequences * context
    for i in range(n_shards):
        tokens = torch.randint(3, 1000, (shard_sequences, context), generator=generator, dtype=torch.int32)
        tokens[:, 0] = BOS
        acts = torch.randn(shard_sequences, context, d_model, generator=generator)
        acts[..., 0] = torch.arange(i * per_shard, (i + 1) * per_shard, dtype=torch.float32).reshape(shard_sequences, context)
        save_file({"tokens": tokens, "activations": acts}, str(folder / f"shard_{i:05d}.safetensors"))
    meta = {"model": "fake", "layer": 0, "corpus": "fake", "context_size": context, "n_tokens": n_shards * per_shard,
            "d_model": d_model, "n_shards": n_shards, "shard_sequences": shard_sequences, "scale": 1.0,
            "special_tokens": [BOS]}
    (folder / "settings.json").write_text(json.dumps(meta))
    return activations.ActivationSource(folder, meta, n_shards, 1.0, [BOS])


def positions(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].round().long().tolist()


def test_windowed_stream_is_deterministic_resumable_and_visits_each_token_once_per_epoch(tmp_path):
    source = fake_cache(tmp_path / "acts", 6)
    stream = source.stream(5, seed=3, window_bytes=2 * source.shard_bytes)
    assert stream.window == 2 and not stream.whole and stream.key()["window_shards"] == 2
    # each window (2 shards, 56 non-BOS tokens) gives 11 batches, so an epoch has 33
    per_epoch = 33
    it = stream(0)
    batches = [next(it) for _ in range(3 * per_epoch)]
    for epoch in range(3):
        seen = [p for b in batches[epoch * per_epoch:(epoch + 1) * per_epoch] for p in positions(b)]
        assert len(seen) == len(set(seen)) == per_epoch * 5  # no token twice within an epoch
        assert not any(p % source.context_size == 0 for p in seen)  # BOS positions are dropped
    assert positions(batches[0]) != positions(batches[per_epoch])  # another epoch, another order
    for b in (0, 10, 11, 32, 33, 70):  # resumes anywhere, inside a window or at its edge
        assert torch.equal(next(stream(b)), batches[b])
    again = activations.ActivationSource(source.path, source.settings, 6, 1.0, [BOS]).stream(5, seed=3, window_bytes=2 * source.shard_bytes)
    assert all(torch.equal(a, b) for a, b in zip(again(0), batches))  # another object, same batches
    other_seed = source.stream(5, seed=4, window_bytes=2 * source.shard_bytes)
    assert not torch.equal(next(other_seed(0)), batches[0])
    assert source.n_training_tokens == 6 * 4 * 7
    assert torch.equal(source.tail(9), source.training_tokens[0][-9:])


def test_a_window_holding_every_shard_keeps_the_in_memory_order(tmp_path):
    """The stream before windows existed, verbatim: caches that fit in a window give it bit for bit,
    under the same cache key, so SAEs and figures trained on it stay valid."""
    source = fake_cache(tmp_path / "acts", 5)
    acts, _ = source.training_tokens
    batch_size, seed = 16, 2
    per_epoch = len(acts) // batch_size

    def in_memory(b):
        epoch, j = divmod(b, per_epoch)
        order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return acts[order[j * batch_size:(j + 1) * batch_size]]

    stream = source.stream(batch_size, seed)
    assert stream.whole and stream.key() == {"activations": source.settings, "batch_size": batch_size, "stream_seed": seed,
                                             "code": source_hash(["activations"])}
    it = stream(per_epoch - 2)
    for b in range(per_epoch - 2, per_epoch + 3):
        assert torch.equal(next(it), in_memory(b))


def test_a_batch_larger_than_a_window_names_the_fix(tmp_path):
    source = fake_cache(tmp_path / "acts", 3)
    with pytest.raises(ParameterError, match=r"batch_size=100 is larger than .* window of 1 shard.*window_bytes"):
        source.stream(100, window_bytes=source.shard_bytes)


def test_a_pickled_stream_carries_no_activations(tmp_path):
    import pickle

    source = fake_cache(tmp_path / "acts", 4)
    stream = source.stream(8)
    next(stream(0))  # reads the whole cache into the source
    assert "training_tokens" in source.__dict__
    copy = pickle.loads(pickle.dumps(stream))
    assert "training_tokens" not in copy.source.__dict__
    assert all(torch.equal(a, b) for a, b, _ in zip(copy(3), stream(3), range(5)))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from hedging_utils import activations
    from hedging_utils.extension import control_and_extended
    from hedging_utils.training import TrainSettings, make_sae, seeded
    torch.set_num_threads(1)
    meta = json.loads(open(sys.argv[1] + "/settings.json").read())
    source = activations.ActivationSource(activations.Path(sys.argv[1]), meta, meta["n_shards"], meta["scale"], meta["special_tokens"])
    window_bytes = 2 * source.shard_bytes
    stream = source.stream(512, seed=0, window_bytes=window_bytes)
    calls, seen = [], []
    def recorded(start):  # what training reads, batch by batch
        calls.append(start)
        for batch in stream(start):
            seen.append(float(batch.double().sum()))
            yield batch
    with seeded(0):
        base = make_sae(source.d_model, 16, "batchtopk", k=4)
    steps = sum(n for _, n in stream._plan(0))  # one whole epoch of the cache
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a few steps first: everything a step needs is allocated once, a window read
    control_and_extended(base, 4, stream, TrainSettings(steps=3, batch_size=512), data=stream.key(), cache=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calls.clear()
    pair = control_and_extended(base, 4, recorded, TrainSettings(steps=steps, batch_size=512), data=stream.key(), cache=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = [float(b.double().sum()) for b, _ in zip(stream(0), range(steps))]
    print(json.dumps({"growth_kb": after - before, "warm_up_kb": before - start, "steps": steps, "calls": calls, "identical": seen[:steps] == reference,
                      "window_bytes": window_bytes, "finite": bool(torch.isfinite(pair.extended.W_dec).all()),
                      "read_whole_cache": "training_tokens" in source.__dict__}))
""")


def test_control_and_extended_train_from_a_long_stream_on_identical_batches_in_flat_memory(tmp_path):
    """After a few warm-up steps, streaming 4 or 16 windows of tokens peaks at the same memory:
    one window (2 shards, 1/4 and 1/16 of the cache), not the cache. The control and its
    extension read one stream, once, and get exactly the stream's batches."""
    shape = dict(shard_sequences=64, context=64, d_model=512)  # 8.4 MB of activations a shard
    results = {}
    for n_shards in (8, 32):
        folder = tmp_path / f"acts{n_shards}"
        fake_cache(folder, n_shards, **shape)
        # a fixed mmap threshold: glibc returns every freed window to the system at once, so the
        # peak measures what is held, not how its heap happens to fragment
        env = {**os.environ, "PYTHONPATH": str(REPO), "HEDGING_DEVICE": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder)], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        results[n_shards] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = results[8], results[32]
    cache_mb = {n: n * 64 * 64 * 512 * 4 / 2**20 for n in results}
    assert large["steps"] >= 4 * small["steps"] - 8
    for r in results.values():
        assert r["calls"] == [0] and r["identical"] and r["finite"] and not r["read_whole_cache"]
    # after a few steps (one window read), streaming the whole cache, 64 or 256 MB, adds less
    # than a window to the peak: memory does not grow with the tokens
    growth_mb = {n: r["growth_kb"] / 1024 for n, r in results.items()}
    window_mb = small["window_bytes"] / 2**20
    assert max(growth_mb.values()) < window_mb, (growth_mb, window_mb, cache_mb)
    assert abs(growth_mb[32] - growth_mb[8]) < 0.05 * (cache_mb[32] - cache_mb[8]), (growth_mb, cache_mb)
