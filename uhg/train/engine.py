"""The one place where DeepSpeed engines are built (and the process group joined).

Each trainable module of a family gets its own engine with its own config dict (its own
batch arithmetic): a GAN has two. The DeepSpeed config is the optional preset YAML
(`train.deepspeed`) with the values uhg owns written over it: batch sizes, ZeRO stage,
precision (bf16 via torch autocast with fp32 master weights) and gradient clipping
(always explicit: DeepSpeed's own default is 1.0). Optimisers are torch optimisers from the
family, so no DeepSpeed op is JIT-compiled.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uhg.config.schema import RunConfig, TrainConfig
from uhg.errors import ConfigError, TrainingError
from uhg.train.family import ModelFamily
from uhg.train.preflight import read_deepspeed_preset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefer_environment_ninja() -> None:
    """Put this interpreter's bin folder (with the pip `ninja`) first on PATH before DeepSpeed
    JIT-builds its CPU comm op. Otherwise processes with and without the environment on PATH
    use different ninja versions (here 1.13 from pip, 1.11 from the system), each rewrites the
    shared build log in its own format and rebuilds the op (minutes on 2 cores) while every
    other training process waits on the build lock."""
    import sys

    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if (Path(bin_dir) / "ninja").is_file() and path[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in path if p != bin_dir]])


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_rank).

    Under torchrun or Ray Train the launcher's environment / process group is reused; a plain
    process becomes a world of one (RANK=0, WORLD_SIZE=1 on a free local port)."""
    import torch.distributed as dist

    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in launcher if k not in os.environ]
    if not dist.is_initialized() and missing:
        if os.environ.get("WORLD_SIZE", "1") != "1" or os.environ.get("RANK", "0") != "0":
            # Part of a launcher's environment: DeepSpeed would fall back to MPI discovery and
            # fail on a missing mpi4py, which names neither the cause nor the variables.
            raise TrainingError(f"a distributed launch (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
                                f"RANK={os.environ.get('RANK')}) lacks {', '.join(missing)}: start the "
                                "workers with torchrun, Ray Train or `uhg train`, which set all of "
                                + ", ".join(launcher))
        # A plain process (or one that inherited part of a world of one): a world of one.
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for key in missing:
            os.environ[key] = defaults[key] if key in defaults else str(_free_port())
    elif dist.is_initialized() and dist.get_world_size() == 1:
        # A world of one made by an earlier run in this process (tests, notebooks): DeepSpeed's
        # engine still asserts on the launcher variables, which the caller may have cleared.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _prefer_environment_ninja()
    import deepspeed

    if not torch.cuda.is_available() and os.environ.get("UHG_DEEPSPEED_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up (45 s on 2 cores, needs
        # a C++ toolchain) that only its tensor-parallel *inference* all-reduce uses; training
        # collectives go through torch.distributed (gloo) either way.
        # (importlib: the attribute deepspeed.comm.torch is PyTorch itself, not the module)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def select_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was requested but no GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def deepspeed_config(cfg: RunConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine."""
    t = cfg.train
    preset = read_deepspeed_preset(cfg)
    ds = dict(preset)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch * world_size
    ds["gradient_clipping"] = float(t.gradient_clipping)
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = t.zero_stage
    ds["zero_optimization"] = zero
    if t.precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds.setdefault("steps_per_print", 10**9)  # uhg logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def build_lr_scheduler(optimizer: torch.optim.Optimizer,
                       train: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`train.lr_schedule` with `train.warmup_steps` on `optimizer` (every parameter group, in
    proportion to its own lr), stepped once per applied optimiser step; None for a constant rate
    without warm-up, so such a run steps exactly as it did before schedules existed."""
    from torch.optim import lr_scheduler as sched

    warmup = train.warmup_steps
    if train.lr_schedule == "constant" and not warmup:
        return None
    ramp = sched.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup) if warmup else None
    if train.lr_schedule == "constant":
        return ramp  # after its last step LinearLR keeps the full rate
    cosine = sched.CosineAnnealingLR(optimizer, T_max=train.steps - warmup)
    return sched.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup]) if ramp is not None else cosine


def current_lr(engine: Any) -> float:
    """The learning rate the engine's next step applies (its optimiser's first parameter group)."""
    return float(engine.optimizer.param_groups[0]["lr"])


def check_zero_stage(family: ModelFamily, stage: int) -> None:
    """Refuse ZeRO stages a family is known not to train correctly under."""
    reasons: Mapping[int, str] = getattr(family, "unsupported_zero_stages", {})
    if stage in reasons:
        raise TrainingError(f"train.zero_stage={stage} is not supported for the {family.name} family: {reasons[stage]}")


def build_engines(cfg: RunConfig, family: ModelFamily, modules: Mapping[str, nn.Module], micro_batch: int,
                  world_size: int, device: torch.device) -> dict[str, Any]:
    """One DeepSpeed engine per module, each with its own optimiser and config dict."""
    import deepspeed

    check_zero_stage(family, cfg.train.zero_stage)
    engines = {}
    for name, module in modules.items():
        module.to(device)
        optimizer = family.build_optimizer(name, module, cfg.train)
        # the engine steps the scheduler after each applied step and saves it in its checkpoints
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                          lr_scheduler=build_lr_scheduler(optimizer, cfg.train),
                                          config=deepspeed_config(cfg, micro_batch, world_size))
        engines[name] = engine
    return engines


@contextlib.contextmanager
def full_parameters(engine: Any) -> Iterator[nn.Module]:
    """The engine's module with complete parameters (ZeRO-3 gathers its shards; a no-op below)."""
    module = getattr(engine, "module", engine)
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


class PlainEngine:
    """A module + torch optimiser with the `Engine` interface, for single-device use without
    DeepSpeed (unit tests, quick experiments)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, gradient_clipping: float = 0.0,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.module, self.optimizer, self.gradient_clipping = module, optimizer, gradient_clipping
        self.lr_scheduler = lr_scheduler
        self._grad_norm: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.gradient_clipping or float("inf"))
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm


def grad_norm_metric(engine: Any, key: str = "grad_norm") -> dict[str, float]:
    """{key: the global gradient norm of the engine's last step}, or {} when the engine does not
    know it (DeepSpeed before its first step, ZeRO stages that skip it) or it is not finite."""
    get = getattr(engine, "get_global_grad_norm", None)
    value = get() if get is not None else None
    if value is None or not math.isfinite(float(value)):
        return {}
    return {key: float(value)}
