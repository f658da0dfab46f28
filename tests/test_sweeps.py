"""Sweeps submitted through submitit (its local executor, which runs each job in a separate
process as SLURM would on a node): every job writes its SAEs into the shared cache, the caller
collects them from there, a rerun submits only what is missing, and the in-process path then
reads the sweep back without training."""

import os

import pytest
import torch

from hedging_utils import training
from hedging_utils.extension import control_and_extended
from hedging_utils.profiles import ParameterError
from hedging_utils.toys import conditional_pair, toy_job
from hedging_utils.training import Executor, TrainSettings, make_sae, seeded, sweep_tasks, train_saes
from test_streaming import fake_cache

TOY = conditional_pair(0.25, 0.2, 0.1, d_model=12)
SETTINGS = TrainSettings(steps=20, batch_size=100)


def _sweep():
    """An L1 sweep on one data stream: one cluster job trains it (the SAEs share batches)."""
    return {c: toy_job(TOY, 2, batch_size=100, seed=0, l1_coefficient=c, label=f"L1 {c}") for c in (1e-3, 1e-2, 1e-1)}


def _no_training(*args, **kwargs):
    raise AssertionError("an SAE was trained although the sweep is in the cache")


def test_a_partial_sweep_submits_only_the_missing_jobs_and_reads_back_from_the_cache(capsys, monkeypatch):
    jobs = _sweep()
    assert len(sweep_tasks(jobs, SETTINGS, "toy_saes")) == 1
    first = train_saes({c: jobs[c] for c in (1e-3, 1e-2)}, SETTINGS, kind="toy_saes")  # in-process, then interrupted
    capsys.readouterr()

    submitted = train_saes(jobs, SETTINGS, kind="toy_saes", executor="local")
    log = capsys.readouterr().out
    assert "submitted 1 local job(s) for 1 SAE(s)" in log and "collected 1 SAE(s)" in log
    assert torch.equal(submitted[1e-2].W_dec, first[1e-2].W_dec)  # loaded, not retrained
    alone = training.train_together({1e-1: jobs[1e-1]}, SETTINGS, progress=False)[1e-1]
    assert torch.equal(submitted[1e-1].W_dec, alone.W_dec)  # the worker trained what this process would

    # the notebook's next run: everything is in the cache, nothing trains or is submitted
    monkeypatch.setattr(training, "train_together", _no_training)
    monkeypatch.setattr(training, "submit_and_wait", _no_training)
    for executor in ("inprocess", "local"):
        again = train_saes(jobs, SETTINGS, kind="toy_saes", executor=executor)
        assert all(torch.equal(again[c].W_dec, submitted[c].W_dec) for c in jobs)


def test_an_llm_pair_on_a_windowed_stream_trains_through_the_environment_setting(tmp_path, monkeypatch):
    """``HEDGING_EXECUTOR=local`` sends a control/extended pair to one worker: the job carries
    the stream's description (cache path, seed, window), not its activations."""
    source = fake_cache(tmp_path / "acts", 6, shard_sequences=8, context=16, d_model=32)
    stream = source.stream(64, seed=1, window_bytes=2 * source.shard_bytes)
    with seeded(0):
        base = make_sae(32, 8, "batchtopk", k=2)
    settings = TrainSettings(steps=30, batch_size=64)
    here = control_and_extended(base, 2, stream, settings, data=stream.key(), start_batch=5, cache=False)
    monkeypatch.setenv("HEDGING_EXECUTOR", "local")
    remote = control_and_extended(base, 2, stream, settings, data=stream.key(), start_batch=5)
    assert "training_tokens" not in source.__dict__  # the windowed stream never read the whole cache
    for a, b in ((here.control, remote.control), (here.extended, remote.extended)):
        assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    monkeypatch.setattr(training, "submit_and_wait", _no_training)
    cached = control_and_extended(base, 2, stream, settings, data=stream.key(), start_batch=5)
    assert torch.equal(cached.extended.W_dec, remote.extended.W_dec)


def test_executor_settings_are_checked_and_read_from_the_environment(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"  # submitit checks that SLURM's srun exists
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HEDGING_EXECUTOR", "slurm")
    monkeypatch.setenv("HEDGING_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("HEDGING_SLURM_TIME_MIN", "600")
    executor = Executor.from_env()
    assert (executor.kind, executor.partition, executor.timeout_min, executor.gpus_per_node) == ("slurm", "gpu", 600, 1)
    script = executor.submitit_executor()._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=64GB"):
        assert line in script, script
    with pytest.raises(ParameterError, match=r"executor='sge' is not one of .*HEDGING_EXECUTOR"):
        Executor("sge")
    monkeypatch.setenv("HEDGING_SLURM_GPUS", "two")
    with pytest.raises(ParameterError, match=r"gpus_per_node='two'"):
        Executor.from_env()
