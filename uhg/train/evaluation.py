"""The evaluation at the end of a run (`evaluate:` section of the config), on rank 0 after the
export, called by `uhg.train.finish.finish_run`.

- one held-out sample: the run's held-out events (its validation split, `data.validation_fraction`
  of its events by the one split rule of uhg.data.loader; the first `evaluate.events` of them by
  event number, the same events the validation passes during training start from) are the
  reference; the exported generator makes as many
  events at their conditions (seed cfg.seed + GENERATION_SEED_OFFSET). The physics plots of a
  tracked run (plots/*.png) and the held-out report are both made from it;
- held-out (`evaluate.final`): every metric of `uhg eval`, with the floor from two random halves
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
from collections.abc import Callable
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
    if cfg.data.simulate is not None:
        from uhg.eval.extrapolate import seed_conflict

        if problem := seed_conflict(protocol, [cfg.data.simulate.seed]):
            raise ConfigError(f"evaluate.extrapolation: {path}: {problem}")
    return protocol


@dataclass
class HeldOutSample:
    """The end-of-run sample: held-out events of the run's data and as many events of the export
    at their conditions, with their features. The physics plots and the held-out report both
    use it, so they describe the same events."""

    indices: Any
    """Global event numbers of the reference events (uhg.train.data.TrainingData.validation_ids)."""
    reference: Any
    generated: Any
    """FeatureSets of the reference and the generated events."""
    training_range: dict[str, tuple[float, float]]


def held_out_sample(cfg: RunConfig, export: Path, data: Any, device: str = "cpu") -> HeldOutSample:
    """The run's held-out events (at most `evaluate.events` of `data`, a uhg.train.data.TrainingData)
    and as many events of the export at their conditions, drawn from seed cfg.seed +
    GENERATION_SEED_OFFSET."""
    from uhg.eval.evaluate import features_of
    from uhg.geometry import get_geometry
    from uhg.models.generator import Generator

    indices = data.validation_ids(cfg.evaluate.events)
    if len(indices) == 0:
        raise ConfigError(f"the run has no held-out events to evaluate on (data.validation_fraction "
                          f"{cfg.data.validation_fraction} of {data.n_events})")
    reference = data.events(indices)
    generator = Generator.load(export, device=device)
    # every condition of the reference: the model's own, and the others passed through to the output
    generated = generator.generate(dict(reference.conditions), seed=cfg.seed + GENERATION_SEED_OFFSET,
                                   batch_size=cfg.batch_size_for(1))
    geometry = get_geometry(cfg.geometry)
    return HeldOutSample(indices, features_of(reference, geometry), features_of(generated, geometry),
                         data.condition_ranges(cfg.model.conditions))


def evaluate_held_out(cfg: RunConfig, export: Path, sample: HeldOutSample, out_dir: Path, *, logger=None,
                      step: int = 0):
    """Every metric of `uhg eval` on the held-out sample; returns the uhg.eval Report (see the
    module docstring)."""
    from uhg.data.hits import CONDITION_UNITS
    from uhg.eval.evaluate import condition_warnings, evaluate_features, log_report

    e = cfg.evaluate
    ref, gen, indices = sample.reference, sample.generated, sample.indices
    inputs: dict[str, Any] = {
        "geometry": cfg.geometry,
        "reference": f"{ref.n_events} held-out events (validation split, event numbers {int(indices[0])}.."
                     f"{int(indices[-1])}) of {', '.join(map(str, cfg.data.store))}",
        "generated": f"{export} at step {step} ({gen.n_events} events at the reference's conditions)",
        "floor from": "two random halves of the held-out events",
        "repeats": f"{e.repeats} (classifier: {e.classifier_repeats})",
    }
    for name, (lo, hi) in sample.training_range.items():
        inputs[f"training {name}"] = f"{lo:.4g} .. {hi:.4g} {CONDITION_UNITS.get(name, '')}"
    report = evaluate_features(ref, gen, out_dir, title=f"uhg evaluation of run {cfg.name}: held-out events vs "
                               f"generated", inputs=inputs, warnings=condition_warnings(ref, {"generated": gen},
                                                                                        sample.training_range),
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
                 protocol: Any = None, physics_plots: bool = False) -> RunEvaluation:
    """The end-of-run evaluation: one held-out sample (when `evaluate.final` or `physics_plots`)
    for the held-out report and the physics plots (logged to `logger`), then the zero-shot
    protocol. A failed evaluation is logged as a warning and as tag `uhg.eval_error` and returned
    in `errors`: the trained model and its checkpoints are saved."""
    result = RunEvaluation()

    def attempt(name: str, job: Callable[[], Any]) -> Any:
        """job()'s value, or None after a failure (warned, tagged and kept in `errors`)."""
        try:
            return job()
        except Exception as err:  # evaluating must never lose a finished training run
            message = f"{name} evaluation failed: {type(err).__name__}: {err}"
            log.warning("%s", message)
            result.errors.append(message)
            if logger is not None:
                logger.set_tags({"uhg.eval_error": "; ".join(result.errors)[:500]})
            return None

    sample = None
    plots = physics_plots and len(data.validation_ids(1)) > 0  # no held-out events: no plots, no error
    if cfg.evaluate.final or plots:
        sample = attempt("held_out", lambda: held_out_sample(cfg, export, data, device))
    if sample is not None and plots and logger is not None:
        from uhg.tracking.physics_plots import log_physics_plots

        log_physics_plots(logger, sample.reference, sample.generated, cfg.name)
    if sample is not None and cfg.evaluate.final:
        out = cfg.run_dir / "eval"
        if attempt("held_out", lambda: evaluate_held_out(cfg, export, sample, out, logger=logger, step=step)):
            result.held_out = out
            print(f"[uhg] held-out evaluation: {out / 'report.html'}", flush=True)
    if protocol is not None:
        out = cfg.run_dir / "extrapolation"
        if attempt("extrapolation", lambda: evaluate_extrapolation(cfg, protocol, export, data, out, logger=logger)):
            result.extrapolation = out
            print(f"[uhg] extrapolation evaluation: {out / 'report.html'}", flush=True)
    return result
