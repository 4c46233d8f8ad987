"""The one typed schema of a uhg run (`RunConfig`), section by section.

Every YAML in configs/ is validated against it; unknown keys and wrong types are errors
(`uhg.config.load_config` turns them into a ConfigError naming the file and the dotted key).
Relative paths written in a config file are relative to that file's folder (shipped configs: data
and output paths relative to the working directory); see `uhg.config.shipped`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from uhg.config.base import Section
from uhg.config.models import ModelConfig


class SimulateConfig(Section):
    """How to build the dataset with the reference simulator when the store does not exist yet."""

    n_events: int = Field(2000, gt=0, description="Events to simulate.")
    part_size: int = Field(250, gt=0, description="Events per store part.")
    seed: int = Field(1, description="Simulation seed (event i draws from event_rng(seed, i, ...)).")
    luminosity_min: float | None = Field(
        None, gt=0, description="Pixel detectors: lowest instantaneous luminosity, cm^-2 s^-1 (log-uniform up to luminosity_max)."
    )
    luminosity_max: float | None = Field(None, gt=0, description="Pixel detectors: highest luminosity, cm^-2 s^-1.")
    machine: str = Field(
        "design", description="Pixel detectors: machine scenario (design, squeeze, high-vacuum, luminosity-dominated or "
        "a scenario YAML file; docs/calibration.md): how currents and beta_y* follow the luminosity and how each "
        "background process scales.")
    energy_min: float | None = Field(None, gt=0, description="Calorimeters: lowest incident energy, MeV.")
    energy_max: float | None = Field(None, gt=0, description="Calorimeters: highest incident energy, MeV.")
    workers: int = Field(1, gt=0, description="Processes filling the store in parallel.")

    @model_validator(mode="after")
    def _ranges(self) -> SimulateConfig:
        for lo, hi in (("luminosity_min", "luminosity_max"), ("energy_min", "energy_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and b < a:
                raise ValueError(f"{hi} ({b}) must be >= {lo} ({a})")
        return self


class DataConfig(Section):
    """Training data: one or more Zarr stores of the run's geometry."""

    store: list[Path] = Field(description="Store path, or a list of store paths read as one dataset.")
    simulate: SimulateConfig | None = Field(
        None, description="If set and the (single) store is missing, simulate it first with these settings."
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of events held out for validation and the end-of-run "
        "evaluation (each event chosen by a hash of its event number: docs/data.md, 'Split')."
    )
    validation_events: int = Field(256, gt=0, description="At most this many held-out events per validation pass.")
    loader_workers: int = Field(
        0, ge=0, description="Batches read ahead by a background thread (0 = read inside each step)."
    )
    on_corrupt: Literal["stop", "skip"] = Field(
        "stop", description="A store part that cannot be read (corrupt or missing chunk, damaged part metadata) "
        "stops training with an error naming store, part, array and chunk (stop), or is left out of training and "
        "validation (skip: every part is read once before the first step; each left-out part is logged as a "
        "warning and the count of left-out events is the data_skipped_events metric)."
    )

    @field_validator("store", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str | Path) else v

    @model_validator(mode="after")
    def _simulate_one_store(self) -> DataConfig:
        if self.simulate is not None and len(self.store) != 1:
            raise ValueError("simulate needs exactly one store path")
        return self


class TrainConfig(Section):
    """The optimisation: steps, batch arithmetic, optimiser, DeepSpeed, checkpoints, logging."""

    steps: int = Field(description="Optimiser steps in total (a resumed run continues up to this number).", gt=0)
    batch_size: int | None = Field(
        None, gt=0, description="Events per worker per step (micro-batch). Derived from global_batch_size if omitted."
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="Events per step over all workers; must equal batch_size x distributed.workers."
    )
    lr: float = Field(2e-4, gt=0, description="Learning rate (GAN: generator).")
    lr_discriminator: float | None = Field(None, gt=0, description="GAN discriminator learning rate (default: lr).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate over the run, per applied optimiser step and for every engine: constant "
        "(train.lr throughout) or cosine (half a cosine from train.lr after the warm-up down to 0 at train.steps). "
        "Saved in checkpoints: a resumed run continues it, so it refuses a checkpoint of another schedule."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Steps over which the learning rate rises linearly from train.lr / warmup_steps to "
        "train.lr before the schedule (0 = none)."
    )
    betas: tuple[float, float] = Field((0.0, 0.99), description="Adam betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(3, gt=0, description="Keep the last K checkpoints.")
    validate_every: int = Field(0, ge=0, description="Validation metrics every N steps (0 = only at the end).")
    log_every: int = Field(10, gt=0, description="Log losses and throughput every N steps.")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/Inf loss stops training with an error (stop) or skips the update (skip)."
    )
    max_skipped_steps: int = Field(20, ge=0, description="With nonfinite=skip: stop after this many skipped steps.")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage (0 = plain data parallel).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 (CPU) or bf16 (GPU) training.")
    gradient_clipping: float = Field(
        0.0, ge=0, description="Global gradient-norm clip per engine, 0 = off (set explicitly: DeepSpeed's own default is 1.0)."
    )
    deepspeed: Path | None = Field(
        None, description="DeepSpeed preset: a shipped name (zero1, zero2, zero3) or a YAML file; batch, precision, stage and "
        "clipping are always taken from this section."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available, else cpu.")

    @model_validator(mode="after")
    def _batch(self) -> TrainConfig:
        if self.batch_size is None and self.global_batch_size is None:
            raise ValueError("set batch_size (events per worker) or global_batch_size")
        return self

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) leaves no step of the cosine schedule "
                             f"(train.steps {self.steps})")
        return self


class DistributedConfig(Section):
    """Workers of a Ray Train run (uhg.train.ray_launch); torchrun takes its world size from its own flags."""

    workers: int = Field(1, gt=0, description="Training workers (data-parallel ranks).")
    cpus_per_worker: int = Field(1, gt=0, description="CPU cores reserved per worker.")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (0 = CPU training).")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="Ray placement strategy of the workers.")
    max_failures: int = Field(0, ge=-1, description="Worker failures tolerated (restart from the last checkpoint); -1 = unlimited.")
    min_workers: int | None = Field(
        None, gt=0, description="Elastic run: after a node loss restart from the last checkpoint with as few as this "
        "many workers (shards resharded) instead of waiting for a replacement; grows back to `workers` when "
        "resources return. None = fixed size (wait for replacements)."
    )
    resize_interval_s: float = Field(
        60.0, ge=0, description="Elastic run: how often a healthy run checks whether more workers fit (then restarts "
        "from its last checkpoint with them)."
    )
    storage_path: Path | None = Field(None, description="Shared checkpoint storage for Ray (default: the run's output_dir).")

    @model_validator(mode="after")
    def _elastic_range(self) -> DistributedConfig:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"distributed.min_workers ({self.min_workers}) exceeds distributed.workers ({self.workers})")
        return self

    @property
    def worker_counts(self) -> range:
        """Every number of workers the run may have (one value unless elastic)."""
        return range(self.min_workers or self.workers, self.workers + 1)


class TrackingConfig(Section):
    """MLflow tracking (rank 0 only)."""

    enabled: bool = Field(True, description="Log the run to MLflow.")
    tracking_uri: str = Field("sqlite:///runs/mlflow.db", description="MLflow tracking URI (MLFLOW_TRACKING_URI overrides).")
    artifact_location: str | None = Field(None, description="Artifact root of a new experiment (default runs/mlartifacts).")
    experiment: str = Field("uhg", description="MLflow experiment name.")
    registered_model_name: str | None = Field(None, description="Register the exported generator under this name.")
    alias: str | None = Field(None, description="Alias set on the registered model version (e.g. champion).")


class EvaluateConfig(Section):
    """Evaluation at the end of the run (rank 0, after the export), into the run's output_dir and MLflow run."""

    final: bool = Field(
        False, description="Evaluate the export on the held-out events (data.validation_fraction) with every "
        "metric of `uhg eval` (floor from two halves of them): <output_dir>/eval, MLflow eval/... metrics and artifacts."
    )
    events: int = Field(1000, gt=0, description="At most this many held-out events; the generator makes as many.")
    repeats: int = Field(5, ge=2, description="Repeated splits for mean +- std of every metric.")
    classifier: bool = Field(True, description="Run the classifier two-sample test (AUC).")
    classifier_repeats: int = Field(3, ge=1, description="Repeats of the classifier test.")
    plots: bool = Field(True, description="Write the PNG figures (off: tables and report only).")
    extrapolation: Path | None = Field(
        None, description="Zero-shot protocol (a shipped name such as extrapolate_pxd_luminosity, or a YAML file) run with the run's export as `model` "
        "and the run's training range: <output_dir>/extrapolation, MLflow extrapolate/...; null = none."
    )


class RunConfig(Section):
    """A complete, validated uhg run."""

    name: str = Field(description="Run name; outputs go to output_dir (default runs/<name>).", pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(0, description="Seed of model initialisation, data order and training noise.")
    geometry: str = Field(description="Detector geometry name (pxd, pxd-mini, pxd-tiny, ds1-photons, ds2, epical-mini, ...).")
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    output_dir: Path | None = Field(None, description="Run directory (checkpoints, export, logs); default runs/<name>.")

    @field_validator("name")
    @classmethod
    def _name_stays_in_its_folder(cls, v: str) -> str:
        # The pattern allows dots; "." and ".." would put runs/<name> outside runs/.
        if v in {".", ".."}:
            raise ValueError(f"run name {v!r} names no folder of its own; use letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _held_out_events(self) -> RunConfig:
        if self.evaluate.final and self.data.validation_fraction == 0:
            raise ValueError("evaluate.final evaluates on the held-out events: set data.validation_fraction > 0")
        return self

    @field_validator("geometry")
    @classmethod
    def _known_geometry(cls, v: str) -> str:
        from uhg.geometry import geometry_names

        try:
            names = geometry_names()
        except ImportError:  # calorimeter geometries not importable: only check pixel names
            from uhg.geometry.pxd import PXD_VARIANTS

            names = list(PXD_VARIANTS)
            if v not in names and not v.startswith(("ds", "epical")):
                raise ValueError(f"unknown geometry {v!r}; known: {', '.join(names)}") from None
            return v
        if v not in names:
            raise ValueError(f"unknown geometry {v!r}; known: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> RunConfig:
        t, workers = self.train, self.distributed.workers
        if t.global_batch_size is not None:
            uneven = [n for n in self.distributed.worker_counts if t.global_batch_size % n]
            if uneven and self.distributed.min_workers is not None:
                raise ValueError(
                    f"train.global_batch_size ({t.global_batch_size}) is not divisible by {uneven[0]} workers, which "
                    f"the elastic range distributed.min_workers..workers ({self.distributed.min_workers}..{workers}) allows"
                )
            if t.global_batch_size % workers:
                raise ValueError(
                    f"train.global_batch_size ({t.global_batch_size}) is not divisible by distributed.workers ({workers})"
                )
            per_worker = t.global_batch_size // workers
            if t.batch_size is not None and t.batch_size != per_worker:
                raise ValueError(
                    f"train.batch_size ({t.batch_size}) x distributed.workers ({workers}) != "
                    f"train.global_batch_size ({t.global_batch_size})"
                )
            t.batch_size = per_worker
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    def batch_size_for(self, world_size: int) -> int:
        """Events per rank for an actual world size (torchrun may differ from distributed.workers)."""
        from uhg.errors import ConfigError

        t = self.train
        if t.global_batch_size is None or world_size == self.distributed.workers:
            return int(t.batch_size)  # type: ignore[arg-type]
        if t.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) is not divisible by the world size ({world_size})"
            )
        return t.global_batch_size // world_size
