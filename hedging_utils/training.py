"""Building, training and caching SAEs, toy and LLM alike.

Every SAE here is a SAELens training SAE (any registered architecture) and is saved in SAELens'
format. Training takes one settings object, ``TrainSettings`` (steps, batch size, learning rate,
Adam betas, dead-latent window), which is recorded in every cache key the same way.

**Sweeps train together.** ``train_saes`` takes the SAEs of a whole sweep (seeds, widths,
coefficients, toy settings...) and trains those of one shape as a single stacked computation:
their weights are stacked along a leading axis, each step runs one batched matmul per layer
for all of them, and one Adam step updates them all. Adam, gradient clipping and every loss
term act per SAE, so each SAE follows exactly the trajectory SAELens' own ``SAETrainer`` would
give it on the same batches (a test checks this against SAELens' trainer); only the per-step
overhead, which dominates for toy-sized SAEs, is paid once per sweep. A sweep of LLM-sized SAEs
is cut into stacks of a few SAEs each (``STACK_BYTES``), which keeps a step's tensors in the CPU's
caches.

The stacked loss mirrors SAELens' training forward pass for the architectures the notebooks
use: ``standard`` (ReLU + L1 scaled by decoder norms, with its L1 warm-up), ``batchtopk``
(batch top-k, decoder-norm rescaling, the AuxK dead-latent loss and the running top-k
threshold) and the balance-matryoshka variants of ``hedging_utils.variants`` (levels, beta_m,
detached levels, MSE / L2 / snap losses). A subclass of ``standard`` or ``batchtopk`` that adds a
term of its decoder to their loss trains stacked too if it defines that term on the stack
(``stacked_penalty``, see ``StackedSAEs``; ``hedging_utils.orthogonality``'s decoder-orthogonality
penalty does). Any other architecture trains one SAE at a time with SAELens' ``SAETrainer``
(``train_with_sae_lens``), the reference path.

**Sweeps run in-process or on a cluster.** ``train_saes`` trains the SAEs missing from the cache
where ``Executor`` says (``$HEDGING_EXECUTOR``): in this process (the default), or submitted
through ``submitit`` to SLURM or to its local executor, one cluster job per data stream (the
SAEs that share batches, e.g. a control and its extension, stay together). Each cluster job
writes its SAEs into the shared cache; the caller waits, then loads them from the cache like
any cached SAE, so a rerun after a partial sweep submits only what is still missing.
Stacked training runs on ``training_device()`` (``$HEDGING_DEVICE``, else CUDA when present).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

import sae_lens.training.sae_trainer as sae_trainer_module

from hedging_utils.cache import CACHE_ENV, cache_root, cached_dir, cached_entry, source_hash
from hedging_utils.precision import check_precision, dtype_of
from hedging_utils.profiles import ParameterError, check_positive_int
from hedging_utils.progress import library_bar, log, progress_bar, progress_log
from hedging_utils.variants import BalanceMatryoshkaMixin

TRAINING_SOURCES = ("training", "precision", "variants", "toys")
"""The modules whose source enters every SAE cache key (``training_code_version``): the stacked
loss and the trainer (``training``, ``precision``), the balance-matryoshka architectures and their
losses (``variants``) and the toy data and SAE initialisation (``toys``). An edit to any of them
retrains every SAE; edits elsewhere (plots, metrics, notebooks) reuse the cache. An LLM SAE's
data stream adds the source of ``activations`` to its own key (``ActivationStream.key``)."""


@functools.cache
def training_code_version() -> str:
    """``source_hash`` of ``TRAINING_SOURCES``, as it is in every SAE cache key (read once a process)."""
    return source_hash(TRAINING_SOURCES)

DEAD_FEATURE_WINDOW = 1000  # SAELens' default: steps without firing before a latent counts as dead


DEVICE_ENV = "HEDGING_DEVICE"
"""The torch device of stacked training (``cpu``, ``cuda``, ``cuda:1``...); unset: CUDA if present."""

EXECUTOR_ENV = "HEDGING_EXECUTOR"
"""Where ``train_saes`` trains: ``inprocess`` (default), ``local`` or ``slurm`` (see ``Executor``)."""

Stream = Callable[[int], Iterator[torch.Tensor]]
"""``stream(start_batch)`` yields training batches from batch index ``start_batch`` on; the
same index always gives the same batch, so SAEs trained separately see identical data."""


@dataclass(frozen=True)
class TrainSettings:
    """How SAEs are trained; recorded in full in every cache key.

    Attributes:
        steps: optimiser steps (one batch each).
        batch_size: samples (toy inputs or LLM tokens) per batch.
        lr: Adam's learning rate, constant (no warm-up or decay).
        adam_betas: Adam's (beta1, beta2).
        dead_feature_window: steps without firing after which a latent counts as dead, which
            switches on the TopK/BatchTopK auxiliary loss (AuxK) that revives it.
        grad_clip: the gradient norm of each SAE is clipped to this (SAELens: 1.0).
        precision: ``float32``, or ``bfloat16`` to run the SAE's encoder and decoder products
            on bfloat16 copies of its weights (``hedging_utils.precision``: the LLM figures on
            hardware with bfloat16 units); weights, gradients, Adam and losses stay float32.
    """

    steps: int
    batch_size: int
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    dead_feature_window: int = DEAD_FEATURE_WINDOW
    grad_clip: float = 1.0
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_positive_int("steps", self.steps)
        check_positive_int("batch_size", self.batch_size)
        if not self.lr > 0:
            raise ParameterError(f"lr={self.lr!r} must be > 0.")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ParameterError(f"adam_betas={self.adam_betas!r} must be two numbers in [0, 1).")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))

    @classmethod
    def for_samples(cls, samples: int, batch_size: int, **kwargs: Any) -> "TrainSettings":
        """Settings that train on ``samples`` samples (rounded down to whole batches, at least one)."""
        return cls(steps=max(1, samples // batch_size), batch_size=batch_size, **kwargs)

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "adam_betas": list(self.adam_betas)}


@dataclass
class Job:
    """One SAE to train.

    Attributes:
        sae: the SAELens training SAE to start from (fresh or already trained); it is copied,
            never changed in place.
        stream: its training batches (see ``Stream``).
        data: what identifies ``stream`` (e.g. the toy setting, batch size and stream seed).
            SAEs of one call with equal ``data`` share each batch; it is part of the cache key.
        start_batch: the index of the first batch.
        init: what identifies the starting weights for the cache key (e.g. the seed and init
            scheme of a fresh SAE); None uses a hash of the weights themselves.
        label: a name for progress messages.
    """

    sae: TrainingSAE[Any]
    stream: Stream
    data: dict[str, Any]
    start_batch: int = 0
    init: dict[str, Any] | None = None
    label: str = ""

    def cache_settings(self, settings: TrainSettings) -> dict[str, Any]:
        return {
            "architecture": self.sae.cfg.architecture(),
            "sae_cfg": _cfg_key(self.sae),
            "init": self.init if self.init is not None else {"weights": weights_hash(self.sae)},
            "data": self.data,
            "start_batch": self.start_batch,
            "training": settings.to_dict(),
            "sae_lens": sae_lens_version,
            "code": training_code_version(),
        }


@dataclass(frozen=True)
class Executor:
    """Where ``train_saes`` trains the SAEs missing from the cache.

    Attributes:
        kind: ``inprocess`` (here, now), ``local`` (submitit's local executor: a separate
            process on this machine) or ``slurm`` (submitit's SLURM executor).
        folder: submitit's folder for the pickled jobs and their logs (default
            ``<cache>/submitit``); on a cluster it must be on a filesystem the nodes share, as
            must the cache.
        partition: the SLURM partition (None: the cluster's default).
        timeout_min: the time limit of one cluster job, in minutes.
        gpus_per_node, cpus_per_task, mem_gb: the resources of one cluster job.
        array_parallelism: how many jobs of one submission run at once.
        slurm_parameters: any other sbatch options (e.g. ``{"account": "x", "qos": "y"}``).

    ``Executor.from_env()`` reads ``$HEDGING_EXECUTOR`` and, for SLURM, ``$HEDGING_SLURM_PARTITION``,
    ``$HEDGING_SLURM_TIME_MIN``, ``$HEDGING_SLURM_GPUS``, ``$HEDGING_SLURM_CPUS``,
    ``$HEDGING_SLURM_MEM_GB``, ``$HEDGING_SLURM_PARALLELISM`` and ``$HEDGING_SUBMITIT_DIR``.
    """

    kind: str = "inprocess"
    folder: str | None = None
    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    array_parallelism: int = 64
    slurm_parameters: tuple[tuple[str, Any], ...] = ()

    KINDS = ("inprocess", "local", "slurm")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ParameterError(
                f"executor={self.kind!r} is not one of {list(self.KINDS)}; set ${EXECUTOR_ENV} to 'inprocess' (the default), "
                "'local' (submitit's local executor) or 'slurm'."
            )
        for name in ("timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ParameterError(f"gpus_per_node={self.gpus_per_node!r} must be a non-negative integer.")
        if isinstance(self.slurm_parameters, Mapping):
            object.__setattr__(self, "slurm_parameters", tuple(sorted(self.slurm_parameters.items())))

    @classmethod
    def from_env(cls) -> "Executor":
        env = os.environ
        ints = {field: env[var] for field, var in (
            ("timeout_min", "HEDGING_SLURM_TIME_MIN"), ("gpus_per_node", "HEDGING_SLURM_GPUS"),
            ("cpus_per_task", "HEDGING_SLURM_CPUS"), ("mem_gb", "HEDGING_SLURM_MEM_GB"),
            ("array_parallelism", "HEDGING_SLURM_PARALLELISM")) if env.get(var)}
        for field, value in ints.items():
            if not value.isdigit():
                raise ParameterError(f"{field}={value!r} (from the environment) must be a whole number.")
        return cls(kind=env.get(EXECUTOR_ENV) or "inprocess", folder=env.get("HEDGING_SUBMITIT_DIR") or None,
                   partition=env.get("HEDGING_SLURM_PARTITION") or None, **{k: int(v) for k, v in ints.items()})

    @property
    def log_folder(self) -> Path:
        return Path(self.folder) if self.folder else cache_root() / "submitit"

    def submitit_executor(self) -> Any:
        """The configured ``submitit`` executor (``local`` or ``slurm``)."""
        import submitit

        folder = self.log_folder
        if self.kind == "local":
            executor = submitit.LocalExecutor(folder=folder / "%j")
            gpus = min(self.gpus_per_node, torch.cuda.device_count())  # the GPUs this machine has, at most
            executor.update_parameters(timeout_min=self.timeout_min, gpus_per_node=gpus)
            return executor
        # a job pickles its SAEs: the paper's widest (65,536 x 2,304, both matrices) is 1.2 GB
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_pickle_size_gb=16)
        params: dict[str, Any] = dict(timeout_min=self.timeout_min, gpus_per_node=self.gpus_per_node,
                                      cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb, tasks_per_node=1, nodes=1,
                                      slurm_array_parallelism=self.array_parallelism, name="hedging-sweep")
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.slurm_parameters:
            params["slurm_additional_parameters"] = dict(self.slurm_parameters)
        executor.update_parameters(**params)
        return executor


def training_device() -> torch.device:
    """Where stacked training runs: ``$HEDGING_DEVICE``, else CUDA if present, else the CPU."""
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        try:
            return torch.device(chosen)
        except RuntimeError:
            raise ParameterError(f"{DEVICE_ENV}={chosen!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_sae(d_in: int, d_sae: int, architecture: str = "standard", **cfg: Any) -> TrainingSAE[Any]:
    """A fresh SAELens training SAE of any registered architecture."""
    sae_cls, cfg_cls = get_sae_training_class(architecture)
    return sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, **cfg))


def train_saes(
    jobs: Mapping[str, Job], settings: TrainSettings, *, kind: str = "saes", cache: bool = True,
    progress: bool = True, executor: Executor | str | None = None,
) -> dict[str, TrainingSAE[Any]]:
    """Train every job for ``settings.steps`` steps and return the trained SAEs by name.

    With ``cache``, each SAE is stored under ``data/cache/<kind>/<key>`` (SAELens format), the
    key being every setting that produced it (``Job.cache_settings``): SAEs already there are
    loaded, the missing ones are trained together (``train_together``) and saved one by one,
    atomically, so an interrupted sweep resumes with what finished.

    ``executor`` (an ``Executor``, its kind, or None for ``Executor.from_env()``) says where the
    missing SAEs train: in this process, or as submitit jobs, one per data stream, each
    training its SAEs and writing them into the cache; this call waits for them and loads the
    SAEs from the cache. Without ``cache`` everything trains in this process.
    """
    for name, job in jobs.items():
        check_steps(job.sae, settings.steps)
    if progress and progress_log():  # headless: one line per sweep, the same whether it trains or loads
        print(f"  {_describe(list(jobs), list(jobs.values()))}: {settings.steps:,} steps of {settings.batch_size}", flush=True)
    if not cache:
        return train_together(jobs, settings, progress=progress)
    executor = Executor(executor) if isinstance(executor, str) else executor or Executor.from_env()
    keys = {name: job.cache_settings(settings) for name, job in jobs.items()}
    done = {name: cached_entry(kind, key) for name, key in keys.items()}
    missing: dict[str, Job] = {}
    for name, job in jobs.items():  # jobs with the same key (the same SAE asked for twice) train once
        if done[name] is None and all(keys[other] != keys[name] for other in missing):
            missing[name] = job
    if missing and executor.kind == "inprocess":
        trained = train_together(missing, settings, progress=progress)
        for name, sae in trained.items():
            done[name] = cached_dir(kind, keys[name], lambda path, sae=sae: sae.save_model(path))
    elif missing:
        done.update(submit_and_wait(missing, settings, kind, executor, progress=progress))
    for name in jobs:
        done[name] = done[name] or cached_entry(kind, keys[name])
    return {name: TrainingSAE.load_from_disk(done[name]) for name in jobs}


@dataclass
class TrainTask:
    """A cluster job: train ``jobs`` together and write each SAE into the cache under ``kind``.

    It carries the jobs themselves (their SAEs and their streams, which rebuild their data in
    the worker: an LLM stream is its cache's path and settings, never its activations) and the
    cache root, so the worker writes where the caller reads.
    """

    jobs: dict[Any, Job]
    settings: TrainSettings
    kind: str
    cache_dir: str

    def __call__(self) -> dict[Any, str]:
        os.environ[CACHE_ENV] = self.cache_dir
        keys = {name: job.cache_settings(self.settings) for name, job in self.jobs.items()}
        todo = {name: job for name, job in self.jobs.items() if cached_entry(self.kind, keys[name]) is None}
        print(f"training {len(todo)} of {len(self.jobs)} SAEs on {training_device()}", flush=True)
        trained = train_together(todo, self.settings, progress=True) if todo else {}
        for name, sae in trained.items():
            cached_dir(self.kind, keys[name], lambda path, sae=sae: sae.save_model(path))
        return {name: str(cached_entry(self.kind, keys[name])) for name in self.jobs}


def sweep_tasks(jobs: Mapping[Any, Job], settings: TrainSettings, kind: str) -> list[TrainTask]:
    """The cluster jobs of a sweep: one per data stream (the SAEs that share batches)."""
    by_stream: dict[str, dict[Any, Job]] = {}
    for name, job in jobs.items():
        by_stream.setdefault(_stream_id(job), {})[name] = job
    return [TrainTask(group, settings, kind, str(cache_root())) for group in by_stream.values()]


def submit_and_wait(
    jobs: Mapping[Any, Job], settings: TrainSettings, kind: str, executor: Executor, *, progress: bool = True
) -> dict[Any, Path]:
    """Submit the jobs through submitit (``sweep_tasks``), wait for them, and return the cache
    entries they wrote. A failed cluster job raises with its error and log."""
    tasks = sweep_tasks(jobs, settings, kind)
    runner = executor.submitit_executor()
    with runner.batch():
        submitted = [runner.submit(task) for task in tasks]
    if progress:
        print(f"  submitted {len(submitted)} {executor.kind} job(s) for {len(jobs)} SAE(s): "
              f"{', '.join(str(j.job_id) for j in submitted)}; waiting (logs in {executor.log_folder})", flush=True)
    start = time.perf_counter()
    done: dict[Any, Path] = {}
    for job in submitted:
        done.update({name: Path(path) for name, path in job.result().items()})
    if progress:
        print(f"  collected {len(done)} SAE(s) from the cache after {time.perf_counter() - start:.1f}s", flush=True)
    return done


def train_together(
    jobs: Mapping[str, Job], settings: TrainSettings, *, progress: bool = True
) -> dict[str, TrainingSAE[Any]]:
    """Train the jobs without caching: SAEs of the same shape (architecture and every config
    field but their coefficients) and start batch as one stacked computation, the others with
    SAELens' trainer. Returns trained copies; the jobs' SAEs are left unchanged."""
    groups: dict[str, list[str]] = {}
    for name, job in jobs.items():
        groups.setdefault(_group_key(job), []).append(name)
    out: dict[str, TrainingSAE[Any]] = {}
    for names in (chunk for group in groups.values() for chunk in _stack_chunks(group, jobs, settings)):
        group = [jobs[n] for n in names]
        label = _describe(names, group)
        start = time.perf_counter()
        if StackedSAEs.supports(group[0].sae):
            trained = _train_stacked(group, settings, label if progress else None)
        else:
            trained = [train_with_sae_lens(job, settings, progress=progress) for job in group]
        out.update(zip(names, trained))
        if progress:
            line = f"  trained {label} ({settings.steps:,} steps of {settings.batch_size}) in {time.perf_counter() - start:.1f}s"
            if progress_log():
                log(line)  # headless: train_saes printed the sweep's line, without timing
            else:
                print(line, flush=True)
    return out


def train_with_sae_lens(job: Job, settings: TrainSettings, *, progress: bool = False) -> TrainingSAE[Any]:
    """Train a copy of ``job.sae`` with SAELens' own ``SAETrainer`` (the reference path; one SAE)."""
    device = training_device()
    sae = copy_sae(job.sae).to(device)
    batches = (batch.to(device) for batch in job.stream(job.start_batch))
    with _tqdm_disabled(not progress):
        trainer = SAETrainer(cfg=sae_lens_trainer_config(settings, str(device)), sae=sae, data_provider=batches)
        return trainer.fit().to("cpu")


def sae_lens_trainer_config(settings: TrainSettings, device: str = "cpu") -> SAETrainerConfig:
    """SAELens' trainer settings equivalent to ``settings``: constant learning rate, no logging."""
    return SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=settings.samples, device=device, autocast=settings.precision == "bfloat16",
        lr=settings.lr, lr_end=settings.lr, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1],
        lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=settings.batch_size,
        dead_feature_window=settings.dead_feature_window, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )


# ---------------------------------------------------------------------------------------
# The stacked computation


class StackedSAEs(torch.nn.Module):
    """S SAELens training SAEs of one shape, their weights stacked along a leading axis.

    ``loss(x, step, dead)`` returns each SAE's training loss (shape [S]) exactly as its own
    ``training_forward_pass`` computes it, for inputs ``x`` of shape [S, B, d_in].
    Coefficients may differ between the SAEs: the L1 coefficient and its floor, the
    balance-matryoshka level coefficients beta_m, BatchTopK's K and the reconstruction loss
    (MSE, L2 or snap, and snap's switching step).

    **Extra loss terms of the decoder.** A subclass of ``StandardTrainingSAE`` or
    ``BatchTopKTrainingSAE`` whose loss is its parent's plus a term of its decoder trains stacked
    when its class defines

    - ``stacked_penalty(cfgs, W_dec, step)`` (a classmethod): each SAE's term [S], with its
      coefficient, from the stacked decoder ``W_dec`` [S, L, d] at 0-based training step
      ``step`` (SAELens' ``n_training_steps``), equal to what the SAE's own
      ``training_forward_pass`` adds. SAE i's latents are the first ``cfgs[i].d_sae`` rows of
      ``W_dec[i]``; the rows past them pad a narrower SAE to the stack's width and must not enter
      its term (they are unit rows, so a norm of them stays finite);
    - ``stacked_varying_fields``: the config fields that may differ within one stack (e.g. the
      term's seed); any other field not already free (``_group_key``) splits the stack.

    Such stacks take the autograd loss (``ClosedFormStep`` does not know the term).
    """

    def __init__(self, saes: Sequence[TrainingSAE[Any]], precision: str = "float32"):
        super().__init__()
        first = saes[0]
        self.product_dtype = dtype_of(precision)
        cfg = first.cfg
        self.saes = list(saes)
        self.topk = isinstance(first, BatchTopKTrainingSAE)
        self.penalty = getattr(type(first), "stacked_penalty", None)  # an extra loss term of the decoder, or None
        self.rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)) and self.topk
        self.apply_b_dec_to_input = float(cfg.apply_b_dec_to_input)
        self.widths = [max(s.cfg.d_sae for s in saes)] if _single_level(first) else list(cfg.matryoshka_widths)
        self.detach = bool(getattr(cfg, "detach_inner_levels", False))
        self.lp_norm = getattr(cfg, "lp_norm", 1.0)
        self.l1_warm_up_steps = getattr(cfg, "l1_warm_up_steps", 0)
        # per SAE: BatchTopK's K, and the reconstruction loss with the step where snap loss switches to L2
        self.k = [getattr(s.cfg, "k", None) for s in saes]
        self.loss_kinds = [getattr(s.cfg, "reconstruction_loss", "mse") for s in saes]
        self.snap_steps = [getattr(s.cfg, "snap_step", None) for s in saes]
        # single-level SAEs of different widths share one stack: each is padded to the widest
        # with latents whose activations are held at 0, so they get no gradient and never count
        width = self.widths[-1]
        self.register_buffer("latent_mask", torch.stack([torch.arange(width) < s.cfg.d_sae for s in saes]))
        self.all_latents_real = bool(self.latent_mask.all())
        for name, pad_dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0), ("b_dec", None)):
            stacked = torch.stack([_pad(getattr(s, name).detach(), pad_dim, width) for s in saes]).clone()
            self.register_parameter(name, torch.nn.Parameter(stacked))
        betas = [s.cfg.level_betas() if isinstance(s, BalanceMatryoshkaMixin) else [1.0] * len(self.widths) for s in saes]
        self.register_buffer("betas", torch.tensor(betas, dtype=self.W_enc.dtype))
        dtype = self.W_enc.dtype
        self.register_buffer("l1", torch.tensor([float(getattr(s.cfg, "l1_coefficient", 0.0)) for s in saes], dtype=dtype))
        self.register_buffer("l1_floor", torch.tensor([float(getattr(s.cfg, "l1_floor", 0.0)) for s in saes], dtype=dtype))
        if self.topk:
            self.register_buffer("topk_threshold", torch.stack([s.topk_threshold.detach().reshape(()) for s in saes]).clone())

    @staticmethod
    def supports(sae: TrainingSAE[Any]) -> bool:
        """Whether the stacked loss reproduces this SAE's own training loss."""
        cfg = sae.cfg
        if cfg.normalize_activations != "none" or getattr(cfg, "reshape_activations", "none") != "none":
            return False
        if type(sae) is StandardTrainingSAE or type(sae) is BatchTopKTrainingSAE:
            return True
        if getattr(type(sae), "stacked_penalty", None) is not None and not isinstance(sae, BalanceMatryoshkaMixin):
            return isinstance(sae, (StandardTrainingSAE, BatchTopKTrainingSAE))
        if isinstance(sae, BalanceMatryoshkaMixin):
            return not getattr(cfg, "use_matryoshka_aux_loss", False)
        return False

    def coefficient(self, step: int) -> torch.Tensor:
        """Each SAE's L1 coefficient at ``step`` (SAELens' linear warm-up, then the floor)."""
        ramp = min(step, self.l1_warm_up_steps) / self.l1_warm_up_steps if self.l1_warm_up_steps > 0 else 1.0
        return torch.maximum(self.l1 * ramp, self.l1_floor)

    def loss(self, x: torch.Tensor, step: int, dead: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of each SAE [S], feature activations [S, B, d_sae]) for inputs ``x`` [S, B, d_in]."""
        hidden_pre = _Encode.apply(x, self.b_dec, self.W_enc, self.b_enc, self.apply_b_dec_to_input, self.product_dtype)
        dec_norm = self.W_dec.norm(dim=-1)  # [S, L]
        padded = not self.all_latents_real
        if self.topk:
            if self.rescale:
                hidden_pre = hidden_pre * dec_norm[:, None]
            acts = batch_topk(torch.where(self.latent_mask[:, None], hidden_pre, 0.0) if padded else hidden_pre, self.k,
                              exact_ties=self.product_dtype != torch.bfloat16)
            decoder = self.W_dec / dec_norm[..., None] if self.rescale else self.W_dec
        else:
            acts = torch.where(self.latent_mask[:, None], hidden_pre.relu(), 0.0) if padded else hidden_pre.relu()
            decoder = self.W_dec
        coefficient = None if self.topk else self.coefficient(step)
        total = x.new_zeros(x.shape[0])
        # every level's error x - recon (``_NestedErrors``); with detached inner levels the inner part of
        # each error carries no gradient to the inner latents
        errors = _NestedErrors.apply(x - self.b_dec[:, None], acts, decoder, tuple(self.widths), self.detach, self.product_dtype)
        # the L1 penalty of ReLU activations: their decoder-norm-weighted sums, from the batch means of the activations
        mean_acts = acts.mean(dim=1) if coefficient is not None and self.lp_norm == 1 else None
        start = 0
        for m, (width, error) in enumerate(zip(self.widths, errors)):
            level = self.reconstruction_loss(error, step)
            if coefficient is not None:
                lo = start if self.detach else 0
                if mean_acts is not None:
                    norm = (mean_acts[:, lo:width] * dec_norm[:, lo:width]).sum(dim=-1)
                else:
                    norm = (acts[:, :, lo:width] * dec_norm[:, None, lo:width]).norm(p=self.lp_norm, dim=-1).mean(dim=1)
                level = level + coefficient * norm
            total = total + self.betas[:, m] * level
            start = width
        if self.topk and dead is not None:
            total = total + self.auxk_loss(errors[-1].detach(), hidden_pre, dead, decoder)
        if self.penalty is not None:
            total = total + self.penalty([s.cfg for s in self.saes], self.W_dec, step)
        return total, acts

    def reconstruction_loss(self, error: torch.Tensor, step: int) -> torch.Tensor:
        """Each SAE's batch-mean reconstruction loss [S] from its errors x - recon [S, B, d]
        (``hedging_utils.variants.reconstruction_loss``)."""
        norms = torch.linalg.vector_norm(error, dim=-1)
        l2 = [kind == "l2" or (kind == "snap" and step >= (snap or 0)) for kind, snap in zip(self.loss_kinds, self.snap_steps)]
        if not any(l2):
            return norms.pow(2).mean(dim=1)
        l2_loss = norms.clamp_min(1e-6).mean(dim=1)
        if all(l2):
            return l2_loss
        return torch.where(torch.tensor(l2, device=error.device), l2_loss, norms.pow(2).mean(dim=1))

    def auxk_loss(self, residual: torch.Tensor, hidden_pre: torch.Tensor, dead: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        """SAELens' TopK auxiliary loss, per SAE: the top k_aux dead latents of each input
        reconstruct the live latents' residual x - recon (k_aux = d_in / 2, scaled down if fewer are dead)."""
        num_dead = dead.sum(dim=1)
        most = int(num_dead.max())
        if most == 0:
            return residual.new_zeros(residual.shape[0])
        k_aux = residual.shape[-1] // 2
        scale = (num_dead / k_aux).clamp(max=1.0)
        top = torch.where(dead[:, None, :], hidden_pre, -torch.inf).topk(min(k_aux, most), dim=-1)
        keep = torch.arange(top.values.shape[-1], device=dead.device) < torch.clamp(num_dead, max=k_aux)[:, None]
        values = torch.where(keep[:, None, :], top.values, 0.0)
        aux_acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, values)
        error = torch.linalg.vector_norm(_addbmm(residual, aux_acts, decoder, alpha=-1.0, dtype=self.product_dtype), dim=-1).pow(2).mean(dim=1)
        coefficient = float(getattr(self.saes[0].cfg, "aux_loss_coefficient", 1.0))
        return coefficient * scale * error

    @torch.no_grad()
    def update_topk_threshold(self, acts: torch.Tensor) -> None:
        """SAELens' running threshold: an average of each SAE's smallest positive activation."""
        lr = self.saes[0].cfg.topk_threshold_lr
        smallest = torch.where(acts > 0, acts, torch.inf).flatten(1).amin(dim=1)
        fired = torch.isfinite(smallest)
        self.topk_threshold.copy_(torch.where(fired, (1 - lr) * self.topk_threshold + lr * smallest, self.topk_threshold))

    @torch.no_grad()
    def unstack(self) -> list[TrainingSAE[Any]]:
        """The trained SAEs as SAELens training SAEs (copies of the originals with the new weights)."""
        out = []
        for i, original in enumerate(self.saes):
            sae = copy_sae(original)
            width = original.cfg.d_sae
            sae.W_enc.data.copy_(self.W_enc[i, :, :width])
            sae.b_enc.data.copy_(self.b_enc[i, :width])
            sae.W_dec.data.copy_(self.W_dec[i, :width])
            sae.b_dec.data.copy_(self.b_dec[i])
            if self.topk:
                sae.topk_threshold = self.topk_threshold[i].clone().to(sae.topk_threshold)
            sae.cfg.sae_lens_training_version = str(sae_lens_version)
            out.append(sae)
        return out


def _addbmm(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + alpha * a @ b`` per SAE: one fused ``baddbmm`` in the tensors' precision, or with
    ``dtype`` bfloat16 (and a float32 ``base``) the product of bfloat16 copies of ``a`` and ``b``
    (float32 accumulation inside the matmul, its result rounded to bfloat16) added to ``base`` in
    float32. Every product of the stacked loss goes through here."""
    if dtype == torch.bfloat16 and base.dtype != torch.bfloat16:
        return base.add(torch.bmm(a.to(dtype), b.to(dtype)), alpha=alpha)
    return torch.baddbmm(base, a, b, alpha=alpha)


class _Encode(torch.autograd.Function):
    """hidden_pre = (x - a b_dec) W_enc + b_enc per SAE [S, B, L], with its gradient in closed
    form: b_dec's gradient comes from the batch sum of the upstream gradient times W_enc^T (one
    [S, L] x [S, L, d] product) instead of the full [S, B, L] x [S, L, d] product autograd would
    form, a fifth of the step's arithmetic. With ``dtype`` bfloat16 the two large products run on
    bfloat16 copies (float32 results: hidden_pre and every gradient)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, apply_b_dec, dtype):  # type: ignore[override]
        sae_in = x - apply_b_dec * b_dec[:, None] if apply_b_dec else x
        low = dtype == torch.bfloat16 and x.dtype != torch.bfloat16
        a, w = (sae_in.to(dtype), W_enc.to(dtype)) if low else (sae_in, W_enc)
        product = dtype if low else None
        if W_enc.shape[-1] < W_enc.shape[1]:  # narrow SAEs: (W_enc^T sae_in^T)^T is several times faster
            hidden_pre = _addbmm(b_enc[:, :, None], w.transpose(1, 2), a.transpose(1, 2), dtype=product).transpose(1, 2)
        else:
            hidden_pre = _addbmm(b_enc[:, None], a, w, dtype=product)
        ctx.save_for_backward(a, W_enc)
        ctx.apply_b_dec, ctx.low = apply_b_dec, low
        return hidden_pre

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, W_enc = ctx.saved_tensors
        grad_b_enc = grad.sum(dim=1)
        g = grad.to(a.dtype) if ctx.low else grad
        grad_W_enc = torch.bmm(a.transpose(1, 2), g).to(W_enc.dtype)
        grad_b_dec = None
        if ctx.needs_input_grad[1] and ctx.apply_b_dec:
            grad_b_dec = -ctx.apply_b_dec * torch.bmm(grad_b_enc[:, None], W_enc.transpose(1, 2))[:, 0]
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None


class _NestedErrors(torch.autograd.Function):
    """Every level's reconstruction error of a (balance-)matryoshka stack, with its gradient in
    closed form: error_m = base - acts[:, :, :w_m] W[:w_m] (level by level, one fused product
    per level; the reconstructions are never formed). Backward, level l's latents get the sum of
    the gradients of the errors of levels m >= l (only level l's own with ``detach``: detached
    inner levels), written straight into their slice of one gradient tensor, one product per
    level for the activations and one for the decoder. ``base`` gets every level's gradient.
    A single-level SAE is the case of one level. With ``dtype`` bfloat16 the products run on
    bfloat16 copies of the activations and decoder; errors and gradients are float32."""

    @staticmethod
    def forward(ctx, base, acts, decoder, widths, detach, dtype):  # type: ignore[override]
        low = dtype == torch.bfloat16 and base.dtype != torch.bfloat16
        a, w = (acts.to(dtype), decoder.to(dtype)) if low else (acts, decoder)
        errors, error, start = [], base, 0
        for width in widths:
            error = _addbmm(error, a[:, :, start:width], w[:, start:width], alpha=-1.0, dtype=dtype if low else None)
            errors.append(error)
            start = width
        ctx.save_for_backward(a, w)
        ctx.widths, ctx.detach, ctx.low, ctx.dtypes = widths, detach, low, (acts.dtype, decoder.dtype)
        return tuple(errors)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        a, w = ctx.saved_tensors
        present = [g for g in grads if g is not None]
        grad_base = present[0]
        if len(present) > 1:  # summed in place: stacking the levels' errors would copy them all
            grad_base = grad_base.clone()
            for g in present[1:]:
                grad_base += g
        grad_acts = a.new_zeros(a.shape, dtype=ctx.dtypes[0]) if len(present) < len(grads) else a.new_empty(a.shape, dtype=ctx.dtypes[0])
        grad_dec = w.new_zeros(w.shape, dtype=ctx.dtypes[1]) if len(present) < len(grads) else w.new_empty(w.shape, dtype=ctx.dtypes[1])
        starts = [0, *ctx.widths[:-1]]
        running = None
        for level in reversed(range(len(ctx.widths))):
            g = grads[level]
            if ctx.detach:
                running = g
            elif g is not None:
                running = g if running is None else running + g
            if running is None:
                continue
            lo, hi = starts[level], ctx.widths[level]
            r = running.to(a.dtype) if ctx.low else running
            grad_acts[:, :, lo:hi] = torch.bmm(r, w[:, lo:hi].transpose(1, 2))
            grad_dec[:, lo:hi] = torch.bmm(a[:, :, lo:hi].transpose(1, 2), r)
        return grad_base, grad_acts.neg_(), grad_dec.neg_(), None, None, None


def batch_topk(hidden_pre: torch.Tensor, k: float | Sequence[float], exact_ties: bool = True) -> torch.Tensor:
    """SAELens' BatchTopK for each SAE of a stack: keep the k * B largest ReLU activations of
    each SAE's batch [B, d_sae] and zero the rest. They are found with a k-th value threshold,
    which is faster than ``topk``. When a batch ties at the threshold, exactly k * B entries are
    still kept: with ``exact_ties`` the same ones as SAELens' own ``topk`` selection (needed where
    the stack must match SAELens' trainer: identical toy inputs give identical activations),
    otherwise the tied entries that come first in the batch. bfloat16 products round the
    activations to 8 significant bits, so their batches tie at the threshold at almost every
    step, where ``topk`` over the whole batch would cost more than the rest of the step.
    ``k``: one for every SAE, or one per SAE."""
    acts = hidden_pre.relu()
    flat = acts.flatten(1)
    ks = list(k) if isinstance(k, (list, tuple)) else [k] * len(flat)
    wanted = [int(value * acts.shape[1]) for value in ks]
    with torch.no_grad():
        if len(set(wanted)) == 1:
            threshold = _kth_largest(flat, wanted[0])
        else:
            threshold = flat.new_empty(len(flat))
            for value in set(wanted):
                rows = torch.tensor([i for i, v in enumerate(wanted) if v == value], device=flat.device)
                threshold[rows] = _kth_largest(flat[rows], value)
        keep = flat >= threshold[:, None]
        excess = keep.sum(dim=1) - torch.tensor(wanted, device=flat.device)
        for i in (excess > 0).nonzero().flatten().tolist():
            if exact_ties:
                keep[i] = torch.zeros_like(keep[i]).scatter(-1, flat[i].topk(wanted[i], dim=-1).indices, True)
            else:  # drop the last of the entries at the threshold
                at = (flat[i] == threshold[i]).nonzero().flatten()
                keep[i, at[len(at) - int(excess[i]):]] = False
    return torch.where(keep, flat, 0.0).view_as(acts)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k``-th largest value: the smallest of the row's top ``k``. ``kthvalue`` gives
    the same value, more slowly: on a GPU it gives each row one thread block (a BatchTopK batch of
    4,096 x 8,192 is one row: 230 ms a step on an H200), and on the 2-core CPU here it took
    1.01-1.30x as long as ``topk`` at every stack shape of the notebooks (toy, LLM, bfloat16-rounded
    ties; one and two threads)."""
    return flat.topk(k, dim=1, sorted=False).values.amin(dim=1)


def _train_stacked(jobs: Sequence[Job], settings: TrainSettings, label: str | None) -> list[TrainingSAE[Any]]:
    device = training_device()
    model = StackedSAEs([job.sae for job in jobs], settings.precision).to(device)
    if ClosedFormStep.supports(model):  # toy-sized ReLU + L1 stacks: gradients without autograd
        return _train_closed_form(model, jobs, settings, label)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=settings.adam_betas, foreach=True)
    since_fired = torch.zeros(len(jobs), model.W_enc.shape[-1], device=device)
    inputs = _stacked_batches(jobs)
    bar = _progress_bar(settings, label)
    for step in range(settings.steps):
        x = next(inputs).to(device, model.W_enc.dtype, non_blocking=True)
        dead = (since_fired > settings.dead_feature_window) & model.latent_mask if model.topk else None
        loss, acts = model.loss(x, step, dead)
        loss.sum().backward()
        _clip_per_sae(list(model.parameters()), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            fired = (acts > 0).any(dim=1)
            since_fired += 1
            since_fired[fired] = 0
        if model.topk:
            model.update_topk_threshold(acts.detach())
        bar.update()
    bar.close()
    return model.unstack()


def _progress_bar(settings: TrainSettings, label: str | None) -> Any:
    return progress_bar(settings.steps, label, unit="step", disable=label is None, summarise=False)  # train_together prints one


# ---------------------------------------------------------------------------------------
# Closed-form training of ReLU + L1 stacks


CLOSED_FORM_MAX_D_IN = 256
"""Stacks of ReLU + L1 SAEs with ``d_in`` below this (the toys) train with ``ClosedFormStep``;
wider ones (LLM SAEs) keep the autograd loss ``StackedSAEs.loss``."""


def _train_closed_form(model: StackedSAEs, jobs: Sequence[Job], settings: TrainSettings,
                       label: str | None) -> list[TrainingSAE[Any]]:
    """``_train_stacked`` for a stack ``ClosedFormStep`` supports: the same batches, loss,
    per-SAE gradient clipping and Adam (and for BatchTopK the same dead-latent window and
    running threshold), with the gradients written out by hand."""
    step_fn = ClosedFormStep(model, settings)
    inputs = _stacked_batches(jobs)
    bar = _progress_bar(settings, label)
    for step in range(settings.steps):
        x = next(inputs).to(model.W_enc.device, model.W_enc.dtype, non_blocking=True)  # a stream may need autograd
        with torch.no_grad():
            step_fn(x, step)
        bar.update()
    bar.close()
    return model.unstack()


class ClosedFormStep:
    """One training step of a stack of ReLU + L1 SAEs (``standard`` and ``balance_matryoshka_standard``,
    any levels, betas, detached levels, MSE / L2 / snap losses, L1 warm-up and floor) or of
    BatchTopK SAEs (``batchtopk`` and ``balance_matryoshka_batchtopk`` without decoder-norm
    rescaling, with AuxK) with the gradients of ``StackedSAEs.loss`` in closed form, then
    ``_clip_per_sae`` and torch's Adam (foreach, no weight decay), in a few dozen tensor
    operations on the whole stack.

    Its weights live in one [S, P] tensor (``flat``), the model's parameters becoming views of
    it, and so do the gradients and Adam's moments: clipping and Adam are each a handful of
    operations. Per SAE s, with e_m = x - b_dec - acts[:, :w_m] W_dec[:w_m] the error of level m,
    R_m its reconstruction loss and c the L1 coefficient at this step:

        loss = sum_m beta_m (R_m(e_m) + c mean_b sum_{j in level m's L1 range} acts_bj |W_dec_j|)
        G_m = beta_m dR_m/de_m            (MSE: 2 e_m / B; L2: e_m / (B |e_m|) where |e_m| >= 1e-6)
        dL/dacts_j = -Gsum_j W_dec_j^T + c betasum_j |W_dec_j| / B
        dL/dW_dec_j = -acts_j^T Gsum_j + c betasum_j (sum_b acts_bj / B) W_dec_j / |W_dec_j|
        dh = dL/dacts * (h > 0); dW_enc = sae_in^T dh; db_enc = sum_b dh
        db_dec = -sum_b sum_m G_m - apply_b_dec_to_input * W_enc db_enc

    where for latent j in level k, Gsum_j and betasum_j sum G_m and beta_m over the levels
    whose loss reaches latent j: m >= k, or only m = k with detached inner levels.

    BatchTopK: acts = batch_topk(relu(h)) and c = 0, so dh = dL/dacts where acts > 0 (the
    entries the batch kept); AuxK (``auxk_gradient``) adds its gradient at the dead latents each
    input's auxiliary top-k picked. The step keeps SAELens' count of steps since each latent
    fired and its running threshold, as ``_train_stacked`` does. The equivalence tests
    (tests/test_training.py) hold all of this against SAELens' trainer in float64.
    """

    def __init__(self, model: StackedSAEs, settings: TrainSettings):
        self.model, self.settings = model, settings
        S, d, L = model.W_enc.shape
        # W_enc is kept as [S, L, d] (its gradient comes out in that layout), the others as they are
        parts = [model.W_enc.detach().transpose(1, 2), model.b_enc.detach(), model.W_dec.detach(), model.b_dec.detach()]
        self.flat = torch.cat([p.flatten(1) for p in parts], dim=1)
        views, offset = [], 0
        for p in parts:
            size = p[0].numel()
            views.append(self.flat[:, offset:offset + size].view(p.shape))
            offset += size
        self.W_enc_t, self.b_enc, self.W_dec, self.b_dec = views
        # the model's parameters become views of ``flat`` (``unstack`` reads them)
        model.W_enc.data, model.b_enc.data, model.W_dec.data, model.b_dec.data = (
            self.W_enc_t.transpose(1, 2), self.b_enc, self.W_dec, self.b_dec)
        self.grad = torch.empty_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat) if settings.adam_betas[0] != 0 else None
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.a = model.apply_b_dec_to_input
        starts = [0, *model.widths[:-1]]
        # the latents each level's loss reaches: all of its own (lo = 0), or only its new ones when detached
        self.levels = [(start if model.detach else 0, start, width) for start, width in zip(starts, model.widths)]
        # betasum per latent: the sum of beta_m over the levels whose loss reaches it
        betas = model.betas
        reach = [betas[:, k] if model.detach else betas[:, k:].sum(dim=1) for k in range(len(starts))]
        self.beta_latent = torch.cat([r[:, None].expand(-1, w - s) for r, s, w in zip(reach, starts, model.widths)], dim=1)
        self.mask = None if bool(model.latent_mask.all()) else model.latent_mask[:, :, None].to(self.flat.dtype)
        self._l1: tuple[int, torch.Tensor] | None = None
        if model.topk:  # steps since each latent last fired (SAELens' dead-latent count), as _train_stacked keeps it
            self.since_fired = torch.zeros(S, L, device=self.flat.device)
            self.aux_coefficient = float(getattr(model.saes[0].cfg, "aux_loss_coefficient", 1.0))

    @staticmethod
    def supports(model: StackedSAEs) -> bool:
        return (not model.rescale and model.penalty is None and model.lp_norm == 1 and model.W_enc.shape[1] < CLOSED_FORM_MAX_D_IN
                and model.product_dtype != torch.bfloat16 and not torch.is_autocast_enabled())

    def l1_scale(self, step: int, batch: int) -> torch.Tensor:
        """c betasum_j / B per SAE and latent [S, L] (constant once the warm-up is over)."""
        warm_up = self.model.l1_warm_up_steps
        key = min(step, warm_up) if warm_up > 0 else 0
        if self._l1 is None or self._l1[0] != key:
            self._l1 = (key, self.model.coefficient(step)[:, None] * self.beta_latent / batch)
        return self._l1[1]

    def level_gradient(self, error: torch.Tensor, m: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """G_m = beta_m dR_m/de_m for the error e_m [S, B, d] of level m, as (g, scale) with
        G_m = g * scale: for MSE (g = e_m, scale = 2 beta_m / B per SAE [S, 1, 1]) the scale
        goes onto the small tensors it multiplies, never onto e_m."""
        model, batch = self.model, error.shape[1]
        l2 = [kind == "l2" or (kind == "snap" and step >= (snap or 0)) for kind, snap in zip(model.loss_kinds, model.snap_steps)]
        beta = model.betas[:, m, None, None]
        mse = 2.0 / batch * beta
        if not any(l2):
            return error, mse
        norms = torch.linalg.vector_norm(error, dim=-1, keepdim=True)
        weight = torch.where(norms >= 1e-6, beta / batch / norms, 0.0)  # the gradient of norms.clamp_min(1e-6)
        if not all(l2):
            weight = torch.where(torch.tensor(l2, device=error.device)[:, None, None], weight, mse)
        return error * weight, torch.ones_like(mse)

    def __call__(self, x: torch.Tensor, step: int) -> None:
        model = self.model
        W_enc_t, b_enc, W_dec, b_dec = self.W_enc_t, self.b_enc, self.W_dec, self.b_dec
        batch = x.shape[1]
        base = x - b_dec[:, None]
        sae_in = base if self.a == 1.0 else x - self.a * b_dec[:, None]
        # latent-space tensors are [S, L, B] (transposed): for narrow SAEs the matmuls are several times faster
        hidden_pre = torch.baddbmm(b_enc[:, :, None], W_enc_t, sae_in.transpose(1, 2))
        if model.topk:
            dead = (self.since_fired > self.settings.dead_feature_window) & model.latent_mask
            masked = hidden_pre if self.mask is None else hidden_pre * self.mask
            acts = batch_topk(masked.transpose(1, 2), model.k).transpose(1, 2)
            d_acts, d_dec = hidden_pre.new_zeros(hidden_pre.shape), torch.zeros_like(W_dec)  # no L1 term
        else:
            acts = hidden_pre.relu()
            if self.mask is not None:
                acts.mul_(self.mask)
            dec_norm = torch.linalg.vector_norm(W_dec, dim=-1)  # [S, L]
            l1 = self.l1_scale(step, batch)
            d_acts = (l1 * dec_norm)[:, :, None].expand(-1, -1, batch)
            d_dec = (l1 * acts.sum(dim=-1) / dec_norm)[..., None] * W_dec
        d_b_dec = None
        error = base
        for m, (lo, start, width) in enumerate(self.levels):
            error = torch.baddbmm(error, acts[:, start:width].transpose(1, 2), W_dec[:, start:width], alpha=-1.0)
            g, scale = self.level_gradient(error, m, step)
            # G_m reaches latents [lo, width): d_acts -= W_dec G_m^T, d_dec -= acts G_m, d_b_dec -= sum_b G_m
            reached = d_acts[:, lo:width] if lo > 0 or width < d_acts.shape[1] else d_acts
            reached = torch.baddbmm(reached, W_dec[:, lo:width] * scale, g.transpose(1, 2), alpha=-1.0)
            d_dec_m = torch.bmm(acts[:, lo:width], g).mul_(scale)
            if reached.shape[1] == d_acts.shape[1]:
                d_acts, d_dec = reached, d_dec - d_dec_m
            else:
                d_acts = torch.cat([d_acts[:, :lo], reached, d_acts[:, width:]], dim=1)
                d_dec = torch.cat([d_dec[:, :lo], d_dec[:, lo:width] - d_dec_m, d_dec[:, width:]], dim=1)
            out_m = g.sum(dim=1).mul_(scale[:, :, 0])
            d_b_dec = out_m if d_b_dec is None else d_b_dec + out_m
        # ReLU's gradient (and BatchTopK's: only the kept entries, where acts > 0)
        d_hidden = torch.ops.aten.threshold_backward(d_acts, acts if model.topk else hidden_pre, 0.0)
        if self.mask is not None:
            d_hidden.mul_(self.mask)
        if model.topk:
            if bool(dead.any()):
                d_hidden, d_dec = self.auxk_gradient(error, hidden_pre, dead, d_hidden, d_dec)
            self.since_fired += 1
            self.since_fired.masked_fill_((acts > 0).any(dim=-1), 0)
            model.update_topk_threshold(acts)
        d_b_enc = d_hidden.sum(dim=-1)
        d_b_dec = d_b_dec.neg_()
        if self.a != 0:
            d_b_dec = torch.baddbmm(d_b_dec[:, :, None], W_enc_t.transpose(1, 2), d_b_enc[:, :, None], alpha=-self.a).squeeze(-1)
        grads = [torch.bmm(d_hidden, sae_in), d_b_enc, d_dec, d_b_dec]
        torch.cat([g.flatten(1) for g in grads], dim=1, out=self.grad)
        self.clip_and_adam(step + 1)

    def auxk_gradient(self, residual: torch.Tensor, hidden_pre: torch.Tensor, dead: torch.Tensor,
                      d_hidden: torch.Tensor, d_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AuxK's gradient (``StackedSAEs.auxk_loss``) added to d_hidden [S, L, B] and d_dec [S, L, d].
        Per SAE and input, the top k_aux = d_in / 2 dead latents' pre-activations a (no ReLU)
        reconstruct the detached residual r [S, B, d]: loss = coef scale mean_b |r - a W_dec|^2,
        scale = min(1, dead / k_aux). With E = r - a W_dec and G = 2 coef scale E / B:
        dL/da = -W_dec G^T at the picked entries, dL/dW_dec = -a^T G."""
        num_dead = dead.sum(dim=1)
        k_aux = residual.shape[-1] // 2
        scale = (num_dead / k_aux).clamp(max=1.0)
        top = torch.where(dead[:, :, None], hidden_pre, -torch.inf).topk(min(k_aux, int(num_dead.max())), dim=1)
        keep = (torch.arange(top.values.shape[1], device=dead.device)[None, :] < num_dead.clamp(max=k_aux)[:, None])[:, :, None]
        picked = torch.zeros_like(d_hidden).scatter_(1, top.indices, keep.expand_as(top.values).to(d_hidden.dtype))
        aux_acts = torch.zeros_like(hidden_pre).scatter_(1, top.indices, torch.where(keep, top.values, 0.0))
        error = torch.baddbmm(residual, aux_acts.transpose(1, 2), self.W_dec, alpha=-1.0)
        g = error * (2.0 * self.aux_coefficient / residual.shape[1] * scale)[:, None, None]
        d_hidden = d_hidden.addcmul_(torch.bmm(self.W_dec, g.transpose(1, 2)), picked, value=-1.0)
        return d_hidden, d_dec - torch.bmm(aux_acts, g)

    def clip_and_adam(self, t: int) -> None:
        """``_clip_per_sae`` then torch's Adam (foreach, no weight decay) at step ``t``, on ``flat``."""
        settings, grad = self.settings, self.grad
        norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        grad.mul_(norm.add_(1e-6).reciprocal_().mul_(settings.grad_clip).clamp_(max=1.0))
        beta1, beta2 = settings.adam_betas
        if self.exp_avg is None:  # beta1 = 0: the first moment is the gradient (lerp with weight 1)
            exp_avg = grad
        else:
            exp_avg = self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = self.exp_avg_sq.sqrt().div_((1 - beta2 ** t) ** 0.5).add_(1e-8)
        self.flat.addcdiv_(exp_avg, denom, value=(settings.lr / (1 - beta1 ** t)) * -1)


STACK_BYTES = {"cpu": 16 * 2**20, "cuda": 4 * 2**30}
"""By device type: a stack holds at most as many SAEs as keep one [SAEs, batch, max(d_in, d_sae)]
float32 tensor within this size (at least one). On the CPU, past 16 MiB the per-level tensors of
a step leave the caches and a step costs more per SAE: on 2 cores, 26 matryoshka BatchTopK SAEs
(640 -> 512, batches of 1,024) take about 95 ms per SAE and step in one stack, 52 ms in stacks
of 6. Toy stacks fit whole. A GPU has no such cliff, only its memory (several such tensors a
step): the paper's LLM SAEs (4,096 x 8,192, 128 MiB each) stack by the dozen."""

STACK_PAD_FLOPS = 2e8
"""A stack pads its SAEs to the widest, so widening a stack from width w to w' costs every SAE in
it the products of w' - w more latents (12 x batch x d_in FLOP per latent and step: two products
forward, two gradients each backward). ``_stack_chunks`` starts a new stack instead once that
waste passes this many FLOP a step, about what one more stack's per-step work outside its
products costs on 2 CPU cores (a few ms). Toy stacks (d_in 100 or less, batches of 500) never
reach it; the LLM notebooks' mixed widths do: on an AVX2 CPU of 2 cores, BatchTopK SAEs of widths
64, 64, 256, 256, 512, 512 (d_in 640, batches of 1,024) took 317 ms a step in one padded stack."""


def _stack_chunks(names: Sequence[Any], jobs: Mapping[Any, Job], settings: TrainSettings) -> list[list[Any]]:
    """``names`` (one stackable group) cut into stacks: ordered by width (SAEs of different widths
    are padded to the widest of their stack, so a stack of similar widths wastes least), each stack
    as large as ``STACK_BYTES`` allows for its widest SAE, and a new stack started where padding
    the current one to the next width would waste more than ``STACK_PAD_FLOPS`` a step."""
    d_in = jobs[names[0]].sae.cfg.d_in
    budget = STACK_BYTES.get(training_device().type, STACK_BYTES["cpu"])
    chunks: list[list[Any]] = []
    widest = 0
    for name in sorted(names, key=lambda n: jobs[n].sae.cfg.d_sae):
        d_sae = jobs[name].sae.cfg.d_sae
        fits = chunks and (len(chunks[-1]) + 1) * settings.batch_size * max(d_in, d_sae) * 4 <= budget
        waste = 12 * settings.batch_size * d_in * (d_sae - widest) * len(chunks[-1]) if chunks else 0
        if fits and waste <= STACK_PAD_FLOPS:
            chunks[-1].append(name)
        else:
            chunks.append([name])
        widest = d_sae
    return chunks


def _stacked_batches(jobs: Sequence[Job]) -> Iterator[torch.Tensor]:
    """[S, B, d_in] batches: one iterator per distinct data stream, shared by the jobs that use it."""
    streams: dict[str, Iterator[torch.Tensor]] = {}
    index = []
    for job in jobs:
        key = _stream_id(job)
        if key not in streams:
            streams[key] = job.stream(job.start_batch)
        index.append(list(streams).index(key))
    while True:
        batches = [next(it) for it in streams.values()]
        if len(batches) == 1:
            yield batches[0].expand(len(jobs), *batches[0].shape)
        else:
            yield torch.stack([batches[i] for i in index])


def _stream_id(job: Job) -> str:
    """Jobs with equal ids read the same batches."""
    return json.dumps({"data": job.data, "start": job.start_batch}, sort_keys=True, default=str)


def _clip_per_sae(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each SAE of the stack on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.stack([g.pow(2).flatten(1).sum(dim=1) for g in grads]).sum(dim=0).sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *[1] * (g.ndim - 1)))


def _group_key(job: Job) -> str:
    """SAEs with the same key train as one stack: same class, same config but coefficients, K,
    reconstruction loss and, for single-level SAEs, width."""
    cfg = _cfg_key(job.sae)
    numeric = ["l1_coefficient", "l1_floor", "level_coefficients", "coefficient_multiplier", "k", "reconstruction_loss",
               "snap_step"]
    if _single_level(job.sae):
        numeric += ["d_sae", "matryoshka_widths"]
    numeric += list(getattr(type(job.sae), "stacked_varying_fields", ()))  # a stacked penalty's free settings
    for name in numeric:
        cfg.pop(name, None)
    return json.dumps({"class": type(job.sae).__name__, "cfg": cfg, "start": job.start_batch}, sort_keys=True, default=str)


def _single_level(sae: TrainingSAE[Any]) -> bool:
    widths = getattr(sae.cfg, "matryoshka_widths", None) or [sae.cfg.d_sae]
    return list(widths) == [sae.cfg.d_sae]


def _pad(value: torch.Tensor, dim: int | None, width: int) -> torch.Tensor:
    """``value`` padded along its latent dimension ``dim`` to ``width``: zeros, except decoder
    rows (dim 0 of a matrix), which get unit norm so that decoder-norm rescaling stays finite."""
    if dim is None or value.shape[dim] == width:
        return value
    shape = list(value.shape)
    shape[dim] = width - value.shape[dim]
    pad = value.new_zeros(shape)
    if value.ndim == 2 and dim == 0:
        pad += value.shape[1] ** -0.5
    return torch.cat([value, pad], dim=dim)


def _cfg_key(sae: TrainingSAE[Any]) -> dict[str, Any]:
    cfg = sae.cfg.to_dict()
    for volatile in ("metadata", "sae_lens_training_version", "device", "dtype"):
        cfg.pop(volatile, None)
    return cfg


def _describe(names: Sequence[str], jobs: Sequence[Job]) -> str:
    first = jobs[0].label or names[0]
    archs = {job.sae.cfg.architecture() for job in jobs}
    return first if len(jobs) == 1 else f"{len(jobs)} {' '.join(archs) + ' ' if len(archs) == 1 else ''}SAEs ({first}, ...)"


# ---------------------------------------------------------------------------------------
# Small tools


def check_steps(sae: TrainingSAE[Any], steps: int) -> None:
    """Raise if the SAE's config needs a step beyond training (e.g. snap loss switching late)."""
    if hasattr(sae.cfg, "check_training_steps"):
        sae.cfg.check_training_steps(steps)


def copy_sae(sae: TrainingSAE[Any]) -> TrainingSAE[Any]:
    """An independent copy of a training SAE (same class, config and weights)."""
    clone = type(sae)(type(sae.cfg).from_dict(sae.cfg.to_dict()))
    clone.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    return clone


def weights_hash(sae: TrainingSAE[Any]) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global RNG (which SAELens' generators and initialisers use) for a block,
    restoring the previous state afterwards."""
    if seed is None:
        yield
        return
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextlib.contextmanager
def _tqdm_disabled(disabled: bool) -> Iterator[None]:
    original = sae_trainer_module.tqdm
    sae_trainer_module.tqdm = functools.partial(original, disable=True) if disabled else library_bar(original)
    try:
        yield
    finally:
        sae_trainer_module.tqdm = original
