"""The evaluation at the end of a run (`evaluate:` section of the config), on rank 0 after the export.

- held-out (`evaluate.final`): the run's held-out events (the last `data.validation_fraction` of
  its dataset, at most `evaluate.events`) are the reference; the exported generator makes as many
  events at their conditions; every metric of `uhg eval`, with the floor from two random halves
  of the held-out events, goes to <output_dir>/eval/ (metrics.json, metrics.md, report.html,
  figures) and into the run's MLflow run as `eval/<feature>/<metric>[/floor]` and artifact
  folder `eval/`;
- zero-shot (`evaluate.extrapolation`): the protocol YAML (configs/extrapolate_*.yaml) with its
  `model` replaced by the run's export and its `training_range` by the run's own, written to
  <output_dir>/extrapolation/ and logged as `extrapolate/...` and artifact folder `extrapolate/`.

The same functions as `uhg eval` and `uhg eval extrapolate` do the work (uhg.eval.evaluate,
uhg.eval.extrapolate); this module only chooses the samples and the output folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhg.config.schema import RunConfig
from uhg.errors import ConfigError

log = logging.getLogger(__name__)

GENERATION_SEED_OFFSET = 104_729
"""Generated events of the held-out evaluation draw from seed cfg.seed + this (not a training stream)."""


@dataclass
class RunEvaluation:
    """Where the end-of-run evaluation wrote its outputs (rank 0), and what went wrong."""

    held_out: Path | None = None
    """<output_dir>/eval with metrics.json, metrics.md, report.html (None: not run)."""
    extrapolation: Path | None = None
    """<output_dir>/extrapolation with extrapolation.json/.md and report.html (None: not run)."""
    errors: list[str] = field(default_factory=list)


def load_extrapolation(cfg: RunConfig):
    """The zero-shot protocol of `evaluate.extrapolation`, checked against the run (geometry and
    scanned condition), or None. Called before the first step so a wrong file fails in seconds."""
    path = cfg.evaluate.extrapolation
    if path is None:
        return None
    from uhg.eval.extrapolate import load_protocol

    try:
        protocol = load_protocol(path)
    except ConfigError as err:
        raise ConfigError(f"evaluate.extrapolation: {err}") from None
    if protocol.geometry != cfg.geometry:
        raise ConfigError(f"evaluate.extrapolation: {path} is a protocol for geometry {protocol.geometry!r}, "
                          f"the run trains {cfg.geometry!r}")
    if protocol.condition not in cfg.model.conditions:
        raise ConfigError(f"evaluate.extrapolation: {path} scans {protocol.condition!r}, which is not one of the "
                          f"model's conditions {cfg.model.conditions}")
    return protocol


def evaluate_held_out(cfg: RunConfig, export: Path, data: Any, out_dir: Path, *, logger=None, step: int = 0,
                      device: str = "cpu"):
    """Held-out events of `data` (uhg.train.data.TrainingData) vs as many events of the export
    at their conditions; returns the uhg.eval Report (see the module docstring)."""
    from uhg.eval.evaluate import CONDITION_UNITS, condition_warnings, evaluate_features, features_of, log_report
    from uhg.models.generator import Generator
    from uhg.geometry import get_geometry

    e = cfg.evaluate
    indices = data.validation_indices(e.events)
    if len(indices) == 0:
        raise ConfigError(f"evaluate.final: the run has no held-out events (data.validation_fraction "
                          f"{cfg.data.validation_fraction} of {data.n_events})")
    reference = data.events(indices)
    generator = Generator.load(export, device=device)
    # every condition of the reference: the model's own, and the others passed through to the output
    generated = generator.generate(dict(reference.conditions), seed=cfg.seed + GENERATION_SEED_OFFSET,
                                   batch_size=cfg.batch_size_for(1))
    geometry = get_geometry(cfg.geometry)
    ref, gen = features_of(reference, geometry), features_of(generated, geometry)
    training_range = data.condition_ranges(cfg.model.conditions)
    inputs: dict[str, Any] = {
        "geometry": cfg.geometry,
        "reference": f"held-out events {int(indices[0])}..{int(indices[-1])} of {', '.join(map(str, cfg.data.store))} "
                     f"({ref.n_events} events)",
        "generated": f"{export} at step {step} ({gen.n_events} events at the reference's conditions)",
        "floor from": "two random halves of the held-out events",
        "repeats": f"{e.repeats} (classifier: {e.classifier_repeats})",
    }
    for name, (lo, hi) in training_range.items():
        inputs[f"training {name}"] = f"{lo:.4g} .. {hi:.4g} {CONDITION_UNITS.get(name, '')}"
    report = evaluate_features(ref, gen, out_dir, title=f"uhg evaluation of run {cfg.name}: held-out events vs "
                               f"generated", inputs=inputs, warnings=condition_warnings(ref, {"generated": gen},
                                                                                        training_range),
                               n_repeats=e.repeats, classifier_repeats=e.classifier_repeats, classifier=e.classifier,
                               plots=e.plots, seed=cfg.seed)
    if logger is not None:
        log_report(logger, report, out_dir, step=step)
    return report


def evaluate_extrapolation(cfg: RunConfig, protocol: Any, export: Path, data: Any, out_dir: Path, *, logger=None):
    """Run `protocol` with the run's export and training range; returns the ExtrapolationResult."""
    from uhg.eval.extrapolate import run_protocol

    lo, hi = data.condition_ranges([protocol.condition])[protocol.condition]
    run = protocol.model_copy(update={"model": str(export), "training_range": (lo, hi), "out": str(out_dir)})
    return run_protocol(run, logger=logger)


def evaluate_run(cfg: RunConfig, export: Path, data: Any, *, logger=None, step: int = 0, device: str = "cpu",
                 protocol: Any = None) -> RunEvaluation:
    """The end-of-run evaluation the config asks for. A failure is logged as a warning and as tag
    `uhg.eval_error` and returned in `errors`: the trained model and its checkpoints are saved."""
    result = RunEvaluation()
    jobs = []
    if cfg.evaluate.final:
        jobs.append(("held_out", cfg.run_dir / "eval", lambda out: evaluate_held_out(
            cfg, export, data, out, logger=logger, step=step, device=device)))
    if protocol is not None:
        jobs.append(("extrapolation", cfg.run_dir / "extrapolation", lambda out: evaluate_extrapolation(
            cfg, protocol, export, data, out, logger=logger)))
    for name, out, job in jobs:
        try:
            job(out)
        except Exception as err:  # evaluating must never lose a finished training run
            message = f"{name} evaluation failed: {type(err).__name__}: {err}"
            log.warning("%s", message)
            result.errors.append(message)
            if logger is not None:
                logger.set_tags({"uhg.eval_error": "; ".join(result.errors)[:500]})
            continue
        setattr(result, name, out)
        print(f"[uhg] {name.replace('_', '-')} evaluation: {out / 'report.html'}", flush=True)
    return result
