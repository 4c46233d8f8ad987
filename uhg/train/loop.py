"""The training loop, written once for every model family and every launcher.

`train(cfg)` runs as a plain process (a world of one), under torchrun (RANK/WORLD_SIZE from
the environment) and inside Ray Train workers (the process group Ray created is reused).
Read top to bottom: data -> family -> engines -> resume -> steps (log, validate, checkpoint)
-> export -> finish (rank 0: tracking and evaluation, `uhg.train.finish.finish_run`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from uhg.config.loading import config_to_dict, flatten
from uhg.config.schema import RunConfig
from uhg.data.loader import StepReader
from uhg.errors import CheckpointError, TrainingError
from uhg.models.common import EMA, ConditionNorm
from uhg.sparse.torch_hits import TorchHits
from uhg.tracking.logger import NullLogger, RunLogger
from uhg.train.evaluation import RunEvaluation
from uhg.train.family import ModelFamily, NonFiniteLoss, build_family
from uhg.train.finish import finish_run
from uhg.train.hooks import LocalHooks, TrainHooks
from uhg.train.preflight import check_run_inputs

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished `train` call leaves behind (per rank)."""

    run_dir: Path
    step: int
    """Last completed step (== cfg.train.steps unless resumed past it)."""
    checkpoint: Path | None
    export: Path | None
    """Generator export directory (rank 0; None on other ranks)."""
    skipped_steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    """This rank's metrics of every step run in this call (with a 'step' key)."""
    validation: dict[str, float] = field(default_factory=dict)
    generator_fingerprint: float = 0.0
    """Sum of |w| over the final (EMA) generator weights on this rank: equal on every rank of a
    correct data-parallel run."""
    evaluation: RunEvaluation | None = None
    """End-of-run evaluation outputs (rank 0; None on other ranks)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare_data(cfg: RunConfig, rank: int, world: int = 1):
    """Simulate the store first if it is missing and `data.simulate` says how (rank 0 only), then
    open the data on every rank (collective: with data.on_corrupt=skip the ranks agree on the
    parts left out)."""
    from uhg.train.data import TrainingData, simulate_store

    if cfg.data.simulate is not None and rank == 0:
        path = cfg.data.store[0]
        from uhg.data.layout import missing_parts

        if not path.exists() or missing_parts(path):
            simulate_store(path, cfg.geometry, cfg.data.simulate)
    _barrier()
    return TrainingData.open(cfg, rank, world)


LAW_FIT_CHUNK = 256  # events read at a time for a family's data-driven start


def _initialise_from_data(family, modules, data) -> dict[str, float]:
    """A family's optional data-driven start (`fit_sample` + `initialise_from_data`): the same
    training events on every rank and a deterministic fit, so ranks start identical."""
    pick = getattr(family, "fit_sample", None)
    if pick is None:
        return {}
    ids = data.train_ids[pick(data.n_train)]
    if not len(ids):
        return {}
    t0 = time.perf_counter()
    chunks = (data.events(ids[i:i + LAW_FIT_CHUNK]) for i in range(0, len(ids), LAW_FIT_CHUNK))
    fitted = family.initialise_from_data(modules, chunks)
    log.info("fitted the model's laws to %d training events in %.1f s: %s", len(ids), time.perf_counter() - t0,
             ", ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
    return fitted


def _finalise_from_data(family, module, gen_state, data) -> dict[str, torch.Tensor]:
    """A family's optional data-driven finish (`finalise_from_data`, e.g. noise laws fitted to the
    trained model's residuals on training events): the generator state with it applied."""
    finish = getattr(family, "finalise_from_data", None)
    pick = getattr(family, "fit_sample", None)
    if finish is None or pick is None:
        return gen_state
    ids = data.train_ids[pick(data.n_train)]
    module.load_state_dict(gen_state, strict=False)
    chunks = (data.events(ids[i:i + LAW_FIT_CHUNK]) for i in range(0, len(ids), LAW_FIT_CHUNK))
    fitted = finish(module, chunks)
    if not fitted:
        return gen_state
    log.info("fitted the trained model's noise laws to %d training events: %s", len(ids),
             ", ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _validate(family, module, state, data, cfg: RunConfig, device) -> dict[str, float]:
    """The family's validation metrics (`val_*`) of `module` with `state` on the validation events
    ({} without any)."""
    val_ids = data.validation_ids(cfg.data.validation_events)
    if not len(val_ids):
        return {}
    module.load_state_dict(state, strict=False)
    vb = TorchHits.from_batch(data.events(val_ids)).to(device)
    return {f"val_{k}": v for k, v in family.validation_metrics({family.generator_name: module}, vb).items()}


def _generator_state(family: ModelFamily, engines: Mapping, ema: EMA | None) -> dict[str, torch.Tensor]:
    """Full generator state for validation/export: the EMA of the floating-point tensors (or the
    gathered live weights), with the live non-floating buffers (counts, indices), which an
    average has no meaning for but the model needs."""
    from uhg.train.engine import full_parameters

    engine = engines[family.generator_name]
    if ema is not None:
        # buffers are never partitioned by ZeRO, so no gather is needed for them
        module = getattr(engine, "module", engine)
        live = {k: v.detach().clone() for k, v in module.state_dict().items() if not v.is_floating_point()}
        return live | ema.state_dict()
    with full_parameters(engine) as module:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train(cfg: RunConfig, *, hooks: TrainHooks | None = None, logger: RunLogger | None = None) -> TrainResult:
    """Train `cfg` to `cfg.train.steps` steps (resuming where `hooks.resume_dir()` says) and
    export the generator. Collective: every rank of the process group calls it."""
    from uhg.geometry import get_geometry
    from uhg.train.checkpoint import load_checkpoint, save_checkpoint
    from uhg.train.engine import build_engines, current_lr, full_parameters, init_distributed, select_device
    from uhg.train.export import export_generator

    rank, world, local_rank = init_distributed()
    device = select_device(cfg.train.device, local_rank)
    run_dir = cfg.run_dir
    hooks = hooks if hooks is not None else LocalHooks(run_dir)
    logger = logger if logger is not None and rank == 0 else NullLogger()
    micro = cfg.batch_size_for(world)
    protocol = check_run_inputs(cfg)  # a wrong file or setting fails now, not after simulation or training

    # data and the family bound to the training range of the conditions
    data = prepare_data(cfg, rank, world)
    norm = ConditionNorm.from_ranges(data.condition_ranges(cfg.model.conditions), cfg.model.conditions)
    geometry = get_geometry(cfg.geometry)
    family = build_family(geometry, cfg.model, norm)

    # identical initial weights on every rank; then per-rank noise streams
    resume = hooks.resume_dir()
    seed_everything(cfg.seed)
    modules = family.build_modules()
    law_fit = _initialise_from_data(family, modules, data) if resume is None else {}  # a checkpoint holds them
    eval_module = copy.deepcopy(modules[family.generator_name]).to(device).eval()
    ema = EMA(modules[family.generator_name].to(device), family.ema_decay) if family.ema_decay > 0 else None
    engines = build_engines(cfg, family, modules, micro, world, device)
    seed_everything(cfg.seed * 1_000_003 + rank)

    step, skipped, events_seen = 0, 0, 0
    if resume is not None:
        _check_same_schedule(resume, cfg)  # before the engines load the checkpoint's schedule state
        state = load_checkpoint(resume, engines, ema.shadow if ema else None, rank, world)
        step, skipped, events_seen = int(state["step"]), int(state["skipped_steps"]), int(state["events_seen"])
        if ema is not None:  # one update per completed step: the warm-up continues where it stopped
            ema.updates = step - skipped
    resumed_step = step if resume is not None else None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(__import__("json").dumps(config_to_dict(cfg), indent=1))
        logger.log_params({**flatten(config_to_dict(cfg)), "world_size": world, "device": str(device),
                           "train_events": data.n_train, "validation_events": data.n_validation})
        logger.set_tags({"family": family.name, "geometry": cfg.geometry, "resumed_from": str(resume or "")})
        logger.log_metrics({"data_skipped_events": float(data.skipped_events), **law_fit}, step=step)

    t = cfg.train
    history: list[dict[str, float]] = []
    validation: dict[str, float] = {}
    last_ckpt: Path | None = resume
    window_t0, window_events = time.perf_counter(), 0
    reader = StepReader(data.dataset, t.steps, ahead=cfg.data.loader_workers)
    hooks.on_start(step, t.steps)
    while step < t.steps:
        step += 1
        t_data = time.perf_counter()
        batch = reader.get(step).widen(geometry, device)  # compact to the device, widened there
        t0 = time.perf_counter()
        wait_s = t0 - t_data  # the step's wait for its batch: read (unless read ahead), copy and widen
        lr = current_lr(engines[family.generator_name])  # the rate this step applies (the schedule steps after it)
        try:
            metrics = family.train_step(engines, batch, step)
        except NonFiniteLoss as err:
            if t.nonfinite == "stop":
                raise TrainingError(f"step {step}: {err.name} is {err.value} (non-finite); stopping. Lower train.lr, "
                                    "set train.gradient_clipping, or set train.nonfinite=skip") from None
            skipped += 1
            if skipped > t.max_skipped_steps:
                raise TrainingError(f"step {step}: {err.name} is {err.value}; {skipped} steps skipped for non-finite "
                                    f"losses, more than train.max_skipped_steps={t.max_skipped_steps}") from None
            metrics = {"skipped_step": 1.0}
        else:
            if ema is not None:
                with full_parameters(engines[family.generator_name]) as g:
                    ema.update(g)
        step_s = time.perf_counter() - t0
        events_seen += micro * world
        window_events += micro
        metrics = {**metrics, "lr": lr, "step_time_s": step_s, "data_wait_s": wait_s,
                   "data_wait_fraction": wait_s / max(wait_s + step_s, 1e-12), "skipped_steps": float(skipped)}
        history.append({"step": float(step), **metrics})
        hooks.on_step(step, metrics)
        last = step == t.steps
        if step % t.log_every == 0 or last:
            elapsed = time.perf_counter() - window_t0
            logger.log_metrics({**metrics, "events_per_s_per_worker": window_events / max(elapsed, 1e-9),
                                "events_per_s": window_events * world / max(elapsed, 1e-9),
                                "events_seen": float(events_seen)}, step=step)
            window_t0, window_events = time.perf_counter(), 0
        # the last step's validation waits for the after-training fits below: it describes the export
        if t.validate_every and step % t.validate_every == 0 and not last:
            gen_state = _generator_state(family, engines, ema)
            if rank == 0:
                validation = _validate(family, eval_module, gen_state, data, cfg, device)
                if validation:
                    logger.log_metrics(validation, step=step)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last:
            trainer_state = {"step": step, "skipped_steps": skipped, "events_seen": events_seen, "world_size": world,
                             "seed": cfg.seed, "family": family.name, "metrics": _finite_only(metrics),
                             "lr_schedule": _schedule(cfg)}
            last_ckpt = save_checkpoint(run_dir / "checkpoints", step, engines, ema.shadow if ema else None,
                                        trainer_state, rank, t.keep_checkpoints)
            hooks.on_checkpoint(last_ckpt, step, metrics)

    reader.close()
    export = None
    gen_state = _generator_state(family, engines, ema)
    if rank == 0:
        # the fingerprint below stays that of the trained weights, the same on every rank
        export_state = _finalise_from_data(family, eval_module, gen_state, data)
        final = _validate(family, eval_module, export_state, data, cfg, device)
        if final:
            validation = final
            logger.log_metrics(validation, step=step)
        export = export_generator(run_dir / "export", family, cfg, export_state, step, validation)
    _barrier()
    fingerprint = float(sum(v.double().abs().sum() for v in gen_state.values()))
    evaluation = None
    if rank == 0 and export is not None:
        # after the barrier: the other ranks are finished, rank 0 needs no collective from here
        hooks.on_phase("evaluating")
        evaluation = finish_run(cfg, export, data, logger, step=step, resumed_step=resumed_step, device=str(device),
                                protocol=protocol)
    hooks.on_phase("done")
    return TrainResult(run_dir, step, last_ckpt, export, skipped, history, validation, fingerprint, evaluation)


def _schedule(cfg: RunConfig) -> dict[str, object]:
    """What fixes the learning-rate schedule of a run (its length only matters for cosine)."""
    t = cfg.train
    return {"name": t.lr_schedule, "warmup_steps": t.warmup_steps,
            "steps": t.steps if t.lr_schedule == "cosine" else None}


def _check_same_schedule(ckpt: Path, cfg: RunConfig) -> None:
    """Refuse to resume under another learning-rate schedule: the engines restore the
    checkpoint's scheduler state, which would silently continue the old schedule (a cosine
    restored past its end climbs again). Checkpoints from before schedules are constant."""
    from uhg.train.checkpoint import read_trainer_state

    try:
        saved = read_trainer_state(ckpt).get("lr_schedule")
    except CheckpointError:
        return  # load_checkpoint names the damage
    saved = saved or {"name": "constant", "warmup_steps": 0, "steps": None}
    if saved != _schedule(cfg):
        raise TrainingError(f"{ckpt}: written with the learning-rate schedule {saved}, this run asks for "
                            f"{_schedule(cfg)} (train.lr_schedule, train.warmup_steps, train.steps); resume with "
                            "the settings that wrote it, or start a new run")


def _finite_only(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
