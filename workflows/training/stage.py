"""Run one training stage: a DeepSpeed engine over the stage's trainable parameters, in this process (one worker)
or on Ray Train (``TorchTrainer``, N workers), with resumable checkpoints.

The worker function :func:`train_stage` is the same in both cases. It resumes from the newest complete step
directory of the stage (see :mod:`workflows.training.checkpoints`), else starts from the previous stage's model (or
builds the first model from the config's preset and component checkpoints), trains until the stage's step count,
and writes the stage's model and ``DONE.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ola_model.checkpoint.components import load_components
from ola_model.checkpoint.ola_format import load_checkpoint, save_checkpoint
from ola_model.model import FP32_PARTS, OlaModel, build_model
from ola_model.tokenizer import OLA_ADDED_TOKENS, load_tokenizer, tiny_tokenizer
from workflows.training import checkpoints as ckpt
from workflows.training.batch import (
    BatchSamplerFrom,
    LengthGroupedBatches,
    StageDataset,
    TrainBatch,
    build_inputs,
    collate,
    lm_loss,
)
from workflows.training.config import StageConfig, TrainConfig
from workflows.training.trainability import apply_trainable, parameter_groups

log = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]


class StageError(RuntimeError):
    """A stage cannot run or failed; the message says which stage and why."""


# ----------------------------------------------------------------------------------------------------- settings
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``fp32`` (CPU training is fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from 0, then cosine to ``min_ratio``.

    With ``min_ratio`` 0 this is transformers' ``get_cosine_schedule_with_warmup``, which Ola's trainer used.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    )


def deepspeed_config(stage: StageConfig, world_size: int, precision: str, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a stage (ZeRO stage, precision, batch sizes, clipping, torch AdamW)."""
    zero: dict[str, Any] = {"stage": stage.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if stage.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = stage.zero3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves for the Ola-format save
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.batch_size * stage.grad_accum * world_size,
        "gradient_clipping": stage.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": stage.lr,
                "betas": list(stage.adam_betas),
                "eps": stage.adam_eps,
                "weight_decay": stage.weight_decay,
                "torch_adam": True,  # no cpu_adam / fused_adam build
            },
        },
    }


def total_steps(stage: StageConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a stage: ``steps``, or ``epochs`` x micro-batches per epoch / grad_accum."""
    if stage.steps is not None:
        return stage.steps
    return max(1, int(stage.epochs * batches_per_epoch) // stage.grad_accum)


# ------------------------------------------------------------------------------------------------- distribution
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed(backend: str = "gloo") -> None:
    """Initialise a process group if none exists (single process: RANK=0, WORLD_SIZE=1 on a free local port).

    The group is kept for every later stage of the process; call :func:`shutdown_distributed` when done.
    """
    if dist.is_initialized():
        return
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # One process of its own: a fresh port every time. A MASTER_PORT inherited from a parent process that
        # trained in-process (and still holds that port) would fail with EADDRINUSE.
        port = str(free_port())
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)


def shutdown_distributed() -> None:
    """``barrier`` + ``destroy_process_group`` (without them multi-process runs can abort at exit).

    Through DeepSpeed when it is loaded, so that it drops its cached groups and a later stage can initialise again.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    if "deepspeed" in sys.modules:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
            return
    dist.destroy_process_group()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------------- jobs
@dataclass
class StageJob:
    """Everything a worker needs to run a stage (picklable, for Ray)."""

    config: TrainConfig
    stage: str
    out_dir: str
    init_model: str | None  # the previous stage's model directory; None: build from config.model
    use_gpu: bool = False
    max_steps: int | None = None  # stop after this global step without finishing (an interruption)
    progress: bool = True
    callbacks: Sequence[StepCallback] = ()
    on_ray: bool = False


@dataclass
class StageResult:
    """What a stage run produced."""

    stage: str
    model_dir: Path
    finished: bool
    skipped: bool = False  # it was already DONE
    done: dict[str, Any] = field(default_factory=dict)


class StageModule(nn.Module):
    """The module DeepSpeed wraps: a micro-batch in, (loss, supervised tokens, positions) out."""

    def __init__(self, model: OlaModel, trainable: Sequence[str], max_length: int) -> None:
        super().__init__()
        self.model = model
        self.trainable = tuple(trainable)
        self.max_length = max_length

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, int, int]:
        inputs = build_inputs(self.model, batch, self.max_length, self.trainable)
        loss, supervised = lm_loss(self.model, inputs)
        return loss, supervised, inputs.num_tokens


def _initial_tokenizer(config: TrainConfig):
    spec = config.model
    if spec.tokenizer is None and spec.preset == "tiny":
        return tiny_tokenizer()
    tok = load_tokenizer(spec.tokenizer or spec.init.llm)
    missing = [t for t in OLA_ADDED_TOKENS if t not in tok.get_vocab()]
    if missing:  # Qwen2.5's tokenizer + Ola's five added special tokens (ola-architecture.md §1.2)
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def _initial_model(config: TrainConfig, dtype: torch.dtype) -> OlaModel:
    spec = config.model
    model = build_model(spec.model_config(), dtype=dtype, seed=spec.seed)
    init = {k: v for k, v in dataclasses.asdict(spec.init).items() if v is not None}
    patches_root = init.pop("vit_patches", None)
    if patches_root is not None:
        from workflows.training.patch_init import init_patch_embedding

        init_patch_embedding(model, patches_root, seed=spec.seed)
    mels_root = init.pop("whisper_mels", None)
    if mels_root is not None:
        from workflows.training.patch_init import init_whisper_frontend

        init_whisper_frontend(model, mels_root, seed=spec.seed)
    if init:
        for part, report in load_components(model, **init).items():
            log.info("initialised %s from its component checkpoint: %d tensors", part, report.loaded)
    return model


def _zero3_gathered(model: nn.Module, enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _save_model(model: OlaModel, path: Path, tokenizer, rank: int, zero3: bool) -> None:
    """Rank 0 writes the whole model in the Ola format (atomic); under ZeRO-3 every rank joins the gather."""
    with _zero3_gathered(model, zero3):
        if rank == 0:
            save_checkpoint(model, path, tokenizer=tokenizer, overwrite=True)


# ------------------------------------------------------------------------------------------------- the worker
def train_stage(job: StageJob) -> dict[str, Any] | None:
    """Run (or resume) one stage in this worker; every rank calls it. Returns DONE's content, or None if stopped
    at ``job.max_steps``.
    """
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    config, stage = job.config, job.config.stage(job.stage)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = resolve_precision(stage.precision, device)
    if precision == "bf16" and stage.zero_stage == 3:
        raise StageError(
            f"stage {stage.name}: ZeRO-3 with bf16 is not supported: DeepSpeed would cast the frozen, partitioned "
            "BEATs weights to bf16, and Ola runs BEATs in float32; use zero_stage 2, or precision fp32"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    paths = ckpt.StagePaths(Path(job.out_dir), stage.name)
    torch.manual_seed(stage.seed + rank)

    # ---- where to start from
    if rank == 0:
        ckpt.remove_incomplete(paths)
    _barrier()
    resume = ckpt.latest_complete(paths)
    if resume is not None:
        source: Path | None = resume[1] / "model"
    else:
        source = Path(job.init_model) if job.init_model else None
    if source is not None:
        model = load_checkpoint(source, device="cpu", dtype=dtype)
        tokenizer = load_tokenizer(source)
    else:
        model, tokenizer = _initial_model(config, dtype), _initial_tokenizer(config)
    if len(tokenizer) > model.config.llm.vocab_size:
        raise StageError(
            f"tokenizer has {len(tokenizer)} tokens, the model's embedding only {model.config.llm.vocab_size}"
        )
    model.to(device)
    trainability = apply_trainable(model, stage.trainable)
    if stage.gradient_checkpointing and "llm" in stage.trainable:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- data
    dataset = StageDataset(
        config.data_root(stage),
        stage.data,
        tokenizer,
        model.config,
        split=config.data.split,
        max_length=stage.max_length,
        max_video_frames=stage.max_video_frames,
        seed=stage.seed,
        label_all_turn_markers=config.data.label_all_turn_markers,
    )
    batches = LengthGroupedBatches(
        dataset.lengths, stage.batch_size, world, rank, seed=stage.seed, group_by_length=stage.group_by_length
    )
    n_steps = total_steps(stage, batches.batches_per_epoch)
    warmup = math.ceil(stage.warmup_ratio * n_steps)

    # ---- engine
    module = StageModule(model, stage.trainable, stage.max_length)
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=parameter_groups(model, stage.weight_decay, stage.part_lr),
        config=deepspeed_config(stage, world, precision, job.use_gpu),
        lr_scheduler=partial(
            _scheduler, total=n_steps, warmup=warmup, schedule=stage.schedule, min_ratio=stage.min_lr_ratio
        ),
    )
    zero3 = stage.zero_stage == 3
    if precision == "bf16":
        # DeepSpeed casts every parameter to bf16; frozen fp32 parts (BEATs) go back (they are in no optimizer).
        for name in FP32_PARTS:
            part = model.get_submodule(name)
            if not any(p.requires_grad for p in part.parameters()):
                part.float()
    start_step, state = 0, {"elapsed": 0.0, "losses": [], "samples": 0}
    if resume is not None:
        step_dir = resume[1]
        load_path, _ = engine.load_checkpoint(str(step_dir / "ds"), tag="ds", load_module_strict=False)
        if load_path is None:
            raise StageError(f"stage {stage.name}: cannot load the DeepSpeed state in {step_dir / 'ds'}")
        state = json.loads((step_dir / "state.json").read_text())
        start_step = int(state["step"])
        log.info("stage %s: resuming from step %d (%s)", stage.name, start_step, step_dir)

    metrics_log = ckpt.MetricsLog(paths.metrics, start_step) if rank == 0 else None
    loader = DataLoader(
        dataset,
        batch_sampler=BatchSamplerFrom(batches, start_step * stage.grad_accum),
        collate_fn=collate,
        num_workers=stage.dataloader_workers,
    )
    data = iter(loader)
    stop = n_steps if job.max_steps is None else min(n_steps, job.max_steps)
    bar = tqdm(total=n_steps, initial=start_step, desc=f"stage {stage.name}", disable=not (job.progress and rank == 0))
    report = _ray_report if job.on_ray else None
    t_run = time.perf_counter()
    last_save = start_step
    step = start_step
    for step in range(start_step + 1, stop + 1):
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        # the stage's base rate (parts with a part_lr of their own follow the same schedule)
        lr = stage.lr * engine.lr_scheduler.get_last_lr()[0] / engine.lr_scheduler.base_lrs[0]
        for _ in range(stage.grad_accum):
            loss, _, positions = engine(next(data))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            tokens += positions
        stats = torch.tensor([loss_sum / stage.grad_accum, float(tokens)], dtype=torch.float64)
        dist.all_reduce(stats)
        seconds = time.perf_counter() - t0
        samples = stage.batch_size * stage.grad_accum * world
        metrics = {
            "stage": stage.name,
            "step": step,
            "total_steps": n_steps,
            "loss": float(stats[0]) / world,
            "lr": lr,
            "step_seconds": seconds,
            "samples_per_s": samples / seconds,
            "samples_per_s_per_worker": samples / seconds / world,
            "tokens_per_s": float(stats[1]) / seconds,
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        state["losses"].append(metrics["loss"])
        state["samples"] += samples
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
            for callback in (metrics_log, *job.callbacks):
                callback(metrics)
        if report is not None:
            report(metrics)
        if step % stage.save_every == 0 and step < n_steps:
            state["elapsed"] += time.perf_counter() - t_run
            t_run = time.perf_counter()
            _save_step(engine, model, tokenizer, paths, step, state, rank, zero3, stage.keep_last)
            last_save = step
    bar.close()
    state["elapsed"] += time.perf_counter() - t_run
    if step < n_steps:
        log.info("stage %s: stopped at step %d of %d; resumable from step %d", stage.name, step, n_steps, last_save)
        _release(engine)
        return None

    # ---- finish: the stage's model, then DONE
    _save_model(model, paths.model, tokenizer, rank, zero3)
    done = None
    if rank == 0:
        losses = state["losses"]
        done = {
            "stage": stage.name,
            "steps": n_steps,
            "samples": state["samples"],
            "seconds": round(state["elapsed"], 3),
            "samples_per_s": state["samples"] / max(state["elapsed"], 1e-9),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "world_size": world,
            "zero_stage": stage.zero_stage,
            "precision": precision,
            "trainable": list(trainability.trainable),
            "trainable_params": trainability.trainable_params,
            "started_from": job.init_model or f"preset {config.model.preset}",
            "resumed_from_step": resume[0] if resume else None,
            "model": str(paths.model),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        ckpt.write_json_atomic(paths.done, done)
        shutil.rmtree(paths.steps, ignore_errors=True)
        log.info(
            "stage %s done: %d steps in %.1f s, final loss %.4f",
            stage.name,
            n_steps,
            state["elapsed"],
            done["final_loss"],
        )
    _barrier()
    _release(engine)
    return done


def _save_step(engine, model, tokenizer, paths, step, state, rank, zero3, keep_last) -> None:
    """A resumable checkpoint: DeepSpeed state (every rank), the Ola-format model, state.json, then COMPLETE."""
    step_dir = paths.step_dir(step)
    if rank == 0:
        shutil.rmtree(step_dir, ignore_errors=True)
        step_dir.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(step_dir / "ds"), tag="ds", save_latest=False, exclude_frozen_parameters=True)
    _save_model(model, step_dir / "model", tokenizer, rank, zero3)
    if rank == 0:
        ckpt.write_json_atomic(step_dir / "state.json", {**state, "step": step})
    _barrier()
    if rank == 0:
        ckpt.mark_complete(step_dir)
        ckpt.prune(paths, keep_last)
    _barrier()


def _release(engine) -> None:
    """Drop the engine's hooks and buffers, so the next stage in this process starts clean."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    gc.collect()


def _ray_report(metrics: dict[str, Any]) -> None:
    import ray.train

    ray.train.report(metrics)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the process group is Ray's (TorchConfig)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job: StageJob = loop_config["job"]
    if job.use_gpu:
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")
    train_stage(job)
    _barrier()


# ------------------------------------------------------------------------------------------------- the driver
def _fingerprint(job: StageJob, workers: int) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    config, stage = job.config, job.config.stage(job.stage)
    model = dataclasses.asdict(config.model)
    for key in ("vit_patches", "whisper_mels"):
        if model["init"][key] is None:  # unset: as before the key existed, so older runs still resume
            del model["init"][key]
    return {
        "stage": stage.to_dict(),
        "init_model": job.init_model,
        "model": model,
        "data_root": str(config.data_root(stage)),
        "split": config.data.split,
        "label_all_turn_markers": config.data.label_all_turn_markers,
        "workers": workers,
    }


def _check_fingerprint(paths: ckpt.StagePaths, fingerprint: dict[str, Any]) -> None:
    if paths.stage_json.is_file():
        before = json.loads(paths.stage_json.read_text())
        if before != fingerprint:
            keys = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            raise StageError(
                f"stage {paths.stage}: {paths.root} was started with different settings ({keys}); "
                f"run with the same config and workers, or remove {paths.root} to start the stage over"
            )
    else:
        ckpt.write_json_atomic(paths.stage_json, fingerprint)


def _worker_env() -> dict[str, str]:
    """Environment for Ray workers: this checkout on the path, the extension cache, offline hubs."""
    import workflows

    repo = str(Path(workflows.__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _run_on_ray(job: StageJob, workers: int, cpus_per_worker: float) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = False
    if not ray.is_initialized():
        env = _worker_env()
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": env})
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster
            cpus = max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker))
            ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
        started = True
    try:
        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": dataclasses.replace(job, on_ray=True)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=job.use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"stage-{job.stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(job.out_dir).resolve() / "ray"),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps the worker's exception
            raise StageError(f"stage {job.stage} failed on Ray Train: {exc}") from exc
    finally:
        if started:
            ray.shutdown()


def run_stage(
    config: TrainConfig,
    stage: str,
    out_dir: str | Path,
    init_model: str | Path | None = None,
    *,
    workers: int | None = None,
    use_gpu: bool | None = None,
    ray: bool | None = None,
    max_steps: int | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
) -> StageResult:
    """Run one stage of ``config`` into ``out_dir/stages/<stage>``, resuming it if it was interrupted.

    Args:
        config: the training config; stage: the stage's name.
        init_model: the model directory the stage starts from (the previous stage's output); None for the first
            stage: the config's preset and component checkpoints.
        workers: data-parallel workers (default ``config.resources.workers``); more than one runs on Ray Train.
        use_gpu: train on CUDA (default: ``config.resources.use_gpu``, else when CUDA is available).
        ray: run on Ray Train even with one worker (default ``config.resources.ray``).
        max_steps: stop after this global step without finishing the stage (for tests and smoke runs).
        callbacks: called on rank 0 after every optimizer step with the step's metrics (loss, lr, samples/s, ...).
    Returns:
        a :class:`StageResult`; an already finished stage (``DONE.json``) is not run again.
    """
    config.stage(stage)  # unknown stage -> ConfigError
    paths = ckpt.StagePaths(Path(out_dir), stage)
    if paths.is_done():
        log.info("stage %s is done (%s); skipping", stage, paths.done)
        return StageResult(stage, paths.model, finished=True, skipped=True, done=paths.read_done())
    res = config.resources
    workers = workers or res.workers
    if use_gpu is None:
        use_gpu = res.use_gpu if res.use_gpu is not None else torch.cuda.is_available()
    on_ray = (ray if ray is not None else res.ray) or workers > 1
    if init_model is not None and not (Path(init_model) / "config.json").is_file():
        raise StageError(f"stage {stage}: the model it starts from, {init_model}, is not a checkpoint directory")
    # Ray workers run in their own working directory: relative data roots and init paths are resolved here, against
    # ours (an init path that names no local file, as a hub id would, is left alone).
    init = {
        k: str(Path(v).resolve()) if v is not None and Path(v).exists() else v
        for k, v in dataclasses.asdict(config.model.init).items()
    }
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, init=dataclasses.replace(config.model.init, **init)),
        data=dataclasses.replace(config.data, root=str(Path(config.data.root).resolve())),
        stages=[
            dataclasses.replace(s, data_root=str(Path(s.data_root).resolve())) if s.data_root is not None else s
            for s in config.stages
        ],
    )
    job = StageJob(
        config=config,
        stage=stage,
        out_dir=str(Path(out_dir).resolve()),
        init_model=str(Path(init_model).resolve()) if init_model is not None else None,
        use_gpu=use_gpu,
        max_steps=max_steps,
        progress=progress,
        callbacks=tuple(callbacks),
    )
    paths.root.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(paths, _fingerprint(job, workers))
    log.info(
        "stage %s: %d worker(s)%s, %s",
        stage,
        workers,
        " on Ray Train" if on_ray else " in-process",
        "GPU" if use_gpu else "CPU",
    )
    if on_ray:
        _run_on_ray(job, workers, res.cpus_per_worker)
    else:
        ensure_distributed("nccl" if use_gpu else "gloo")
        if dist.get_world_size() != 1:
            raise StageError("the in-process path runs one worker; launch more through Ray Train (workers > 1)")
        train_stage(job)
    if paths.is_done():
        return StageResult(stage, paths.model, finished=True, done=paths.read_done())
    if max_steps is None:
        raise StageError(f"stage {stage} ended without {paths.done}")
    return StageResult(stage, paths.model, finished=False)


__all__ = [
    "StageError",
    "StageJob",
    "StageResult",
    "deepspeed_config",
    "ensure_distributed",
    "lr_factor",
    "run_stage",
    "shutdown_distributed",
    "train_stage",
]
