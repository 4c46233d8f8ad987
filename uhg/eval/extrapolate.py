"""Zero-shot extrapolation protocol: `uhg eval extrapolate --config FILE`.

A generator trained on conditions in [lo, hi] (luminosity for the PXD, incident energy for
calorimeters) is asked for events at test conditions, typically beyond hi (1.5x, 2x, 3x the
highest training luminosity; 2x, 5x, 10x the highest training energy). At every test condition
the protocol
1. simulates a reference sample and an independent second reference sample (the floor) with
   the reference simulator (uhg.sim) at exactly that condition,
2. generates the same number of events with the model, for the reference events' conditions,
3. builds the naive baseline (uhg.eval.baselines: overlay / scaling of training-range events),
4. computes every metric of `uhg eval` for generated and baseline against the reference, with
   the floor and repeats,
and writes per-condition reports, tables (extrapolation.json / .md) and plots of each headline
metric vs the condition with the training range shaded, linked from report.html.
Without a model (`model: null`) only the baseline is evaluated.

Independence: reference, second reference and baseline draw simulator seeds `seed + 1`,
`seed + 2` and `seed + 4` (`simulator_seeds`); a protocol whose simulator seeds include a seed
of the model's training data (`training_seeds`, or the seeds the export recorded) is refused,
since reference event i would then be training event i.

Machine scenarios (PXD): `machine` names the scenario (uhg.sim.pxd_machine) the reference and
the baseline are simulated with; a list of scenarios runs the protocol once per scenario
(`run_scenarios`), with `model` a template holding `{machine}`, and writes scenarios.md/.json.
When the model has a count law with parameter uncertainty, the protocol reports its predicted
mean occupancy with a band at every point ("law mean occupancy").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from uhg.data.hits import CONDITION_UNITS, HitBatch
from uhg.errors import ConditionError, ConfigError
from uhg.eval import baselines
from uhg.eval.classifier import add_classifier_rows
from uhg.eval.compare import Comparison, MetricRow, compare
from uhg.eval.evaluate import features_of, make_plots
from uhg.eval.features import FeatureSet
from uhg.eval.report import HEADLINE, finite_or_null, fmt, render_html

SCANNED = {"pixel": "luminosity", "calo": "incident_energy"}


class ExtrapolationConfig(BaseModel):
    """The protocol file (see configs/extrapolate_*.yaml for commented examples)."""

    model_config = ConfigDict(extra="forbid")

    geometry: str = Field(description="detector geometry of the model and the reference simulator")
    model: str | None = Field(None, description="generator export directory (uhg.models.generator.Generator); "
                                                "null evaluates only the naive baseline")
    device: str = Field("cpu", description="device for generation: cpu or cuda")
    condition: Literal["luminosity", "incident_energy"] = Field(description="the condition that is scanned")
    training_range: tuple[float, float] = Field(description="[min, max] of the condition in the training data")
    test_factors: list[float] = Field(default_factory=list,
                                      description="test conditions as multiples of the training maximum")
    test_values: list[float] = Field(default_factory=list, description="test conditions in physical units")
    n_events: int = Field(500, ge=1, description="events per sample (reference, second reference, generated, baseline)")
    seed: int = Field(0, description="base seed of simulation, generation, splits and baseline")
    batch_size: int = Field(32, ge=1, description="generation micro-batch size")
    baseline: Literal["auto", "overlay", "scale", "none"] = Field(
        "auto", description="naive baseline: overlay (pixel, digital calo), scale (analog calo), auto picks by detector")
    repeats: int = Field(5, ge=2, description="repeated splits for mean +- std of every metric")
    classifier: bool = Field(True, description="run the classifier two-sample test")
    classifier_repeats: int = Field(2, ge=1)
    plots_per_condition: bool = Field(True, description="write the full set of figures for every test condition")
    out: str = Field("extrapolation", description="output directory")
    machine: str | list[str] | None = Field(
        None, description="PXD: machine scenario(s) of the reference simulator (shipped name or YAML file); "
                          "a list runs the protocol per scenario, model may then contain {machine}")
    training_seeds: list[int] | None = Field(
        None, description="simulator seeds of the model's training data; null: read from the model export")

    @model_validator(mode="after")
    def _check(self) -> ExtrapolationConfig:
        if isinstance(self.machine, list) and not self.machine:
            raise ValueError("machine: give at least one scenario (or null)")
        if self.model is not None and "{machine}" in self.model and not isinstance(self.machine, list):
            raise ValueError("model contains {machine}, which needs machine to be a list of scenarios")
        if self.training_seeds is not None and (problem := seed_conflict(self, self.training_seeds)):
            raise ValueError(problem)
        lo, hi = self.training_range
        if not 0 < lo <= hi:
            raise ValueError(f"training_range must be 0 < min <= max, got {list(self.training_range)}")
        if not self.test_factors and not self.test_values:
            raise ValueError("give test_factors (multiples of the training maximum) or test_values")
        if any(v <= 0 for v in [*self.test_factors, *self.test_values]):
            raise ValueError("test conditions must be positive")
        return self

    def test_points(self) -> list[float]:
        hi = self.training_range[1]
        return sorted({*(f * hi for f in self.test_factors), *self.test_values})

    def simulator_seeds(self) -> dict[str, int]:
        """Seeds the reference simulator runs with (the generator's own seed is `seed + 3`)."""
        return {"reference": self.seed + 1, "reference 2": self.seed + 2, "baseline": self.seed + 4}


def seed_conflict(cfg: ExtrapolationConfig, training_seeds: list[int]) -> str | None:
    """Why the protocol's reference or baseline would reuse a seed of the training data, or None."""
    shared = {role: s for role, s in cfg.simulator_seeds().items() if s in set(training_seeds)}
    if not shared:
        return None
    used = sorted(cfg.simulator_seeds().values())
    free = next(s for s in range(100, 10**6, 100) if not {s + 1, s + 2, s + 4} & set(training_seeds))
    return (f"seed {cfg.seed}: the protocol simulates its samples with seeds {used}, and "
            + ", ".join(f"the {r} seed {s}" for r, s in shared.items())
            + f" is a seed of the training data (training seeds {sorted(set(training_seeds))}): its events would "
            f"be the training events; choose another seed (e.g. seed: {free})")


def training_seeds_of(cfg: ExtrapolationConfig, generator: Any) -> list[int] | None:
    """The training data's simulator seeds: the protocol's, else those the export recorded."""
    if cfg.training_seeds is not None:
        return list(cfg.training_seeds)
    recorded = getattr(generator, "sidecar", {}).get("training_data", {}).get("seeds")
    return None if recorded is None else [int(s) for s in recorded]


def load_protocol(path: str | Path) -> ExtrapolationConfig:
    """Read and validate a protocol YAML (a file or a shipped name); ConfigError names the file
    and the key."""
    from uhg.config.loading import describe_errors, read_yaml_mapping
    from uhg.config.shipped import find_config, is_name, resolve_reference

    path = find_config(path, "protocol")
    raw = read_yaml_mapping(path, "protocol file", "(geometry, model, condition, training_range, ...)")
    machine = raw.get("machine")
    if isinstance(machine, str | list):  # scenario files resolve from the protocol's folder; names stay names
        files = [m if not isinstance(m, str) or is_name(m) else str(resolve_reference(m, path.parent, "machine"))
                 for m in (machine if isinstance(machine, list) else [machine])]
        raw["machine"] = files if isinstance(machine, list) else files[0]
    try:
        cfg = ExtrapolationConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: " + describe_errors(err)) from None
    from uhg.geometry import get_geometry

    geom = get_geometry(cfg.geometry)
    if SCANNED[geom.kind] != cfg.condition:
        raise ConfigError(f"{path}: condition {cfg.condition!r} does not apply to {geom.kind} geometry "
                          f"{cfg.geometry!r}; use {SCANNED[geom.kind]!r}")
    if cfg.machine is not None:
        if geom.kind != "pixel":
            raise ConfigError(f"{path}: machine: scenarios are for the PXD background simulator, not {cfg.geometry!r}")
        from uhg.sim.pxd_machine import load_scenario

        for m in cfg.machine if isinstance(cfg.machine, list) else [cfg.machine]:
            try:
                load_scenario(m)
            except ConfigError as err:
                raise ConfigError(f"{path}: machine: {err}") from None
    return cfg


class EventGenerator(Protocol):
    """What the protocol needs of a model (uhg.models.generator.Generator satisfies it)."""

    condition_names: list[str]

    def generate(self, conditions: dict[str, np.ndarray], seed: int, first_event: int = 0,
                 batch_size: int = 16) -> HitBatch: ...


def simulate_reference(geometry, condition: str, value: float, n_events: int, seed: int, first_event: int,
                       machine: str | None = None) -> HitBatch:
    """Reference events at exactly `value` of `condition` from the reference simulator
    (PXD: with machine scenario `machine`, default design)."""
    if geometry.kind == "pixel":
        from uhg.sim.pxd_background import simulate_pxd_background

        return simulate_pxd_background(geometry, n_events, seed, first_event=first_event, luminosity=value,
                                       scenario=machine)
    from uhg.sim.calo import simulate_calo_showers

    return simulate_calo_showers(geometry, n_events, seed, first_event=first_event,
                                 energies=np.full(n_events, float(value)))


def training_range_of(generator: Any) -> dict[str, tuple[float, float]]:
    """The model's own training range, read from its condition normalisation when it has one."""
    norm = getattr(getattr(generator, "family", None), "condition_norm", None)
    if norm is None:
        return {}
    out = {}
    for name, lg, c, s in zip(norm.names, norm.log, norm.center, norm.scale, strict=True):
        lo, hi = (math.exp(c - s), math.exp(c + s)) if lg else (c - s, c + s)
        out[name] = (lo, hi)
    return out


@dataclass
class PointResult:
    value: float
    factor: float
    in_training_range: bool
    generated: Comparison | None
    baseline: Comparison | None
    observables: dict[str, dict[str, float]] = field(default_factory=dict)
    """{observable: {sample: mean}}: mean occupancy (%), or mean response and hits per shower, per sample."""
    directory: str = ""


@dataclass
class ExtrapolationResult:
    config: ExtrapolationConfig
    points: list[PointResult]
    warnings: list[str]
    plots: list[tuple[str, str]]

    def summary(self) -> str:
        return markdown(self)


def _observables(kind: str, samples: dict[str, FeatureSet]) -> dict[str, dict[str, float]]:
    if kind == "pixel":
        return {"mean occupancy [%]": {k: float(fs.profiles["occupancy_per_sensor"].values.mean())
                                       for k, fs in samples.items()}}
    # Hits per shower: whether the generator's multiplicity follows the reference beyond the range.
    # Resolution: std / mean of E_dep / E_inc, all showers of a test point share one energy.
    def resolution(fs: FeatureSet) -> float:
        r = fs.distributions["response"].values
        return float(r.std() / r.mean())

    return {"mean response": {k: float(fs.distributions["response"].values.mean()) for k, fs in samples.items()},
            "resolution": {k: resolution(fs) for k, fs in samples.items()},
            "mean shower depth": {k: float(fs.distributions["shower_depth"].values.mean()) for k, fs in samples.items()},
            "mean hits per shower": {k: float(fs.distributions["hits_per_event"].values.mean())
                                     for k, fs in samples.items()}}


def run_protocol(cfg: ExtrapolationConfig, generator: EventGenerator | None = None, logger=None) -> ExtrapolationResult:
    """Run the protocol of `cfg`; `generator` overrides `cfg.model` (an object with
    `generate(conditions, seed, first_event, batch_size)` and `condition_names`)."""
    from uhg.geometry import get_geometry

    if isinstance(cfg.machine, list):
        raise ConfigError("machine lists several scenarios: run them with run_scenarios")
    geometry = get_geometry(cfg.geometry)
    warnings: list[str] = []
    if generator is None and cfg.model is not None:
        from uhg.models.generator import Generator

        generator = Generator.load(cfg.model, device=cfg.device)
    if generator is None:
        warnings.append("no model given (model: null): only the naive baseline is evaluated")
    else:
        seeds = training_seeds_of(cfg, generator)
        if seeds is None:
            raise ConfigError(f"model {cfg.model} does not record the seeds of its training data, so the protocol "
                              "cannot check that its reference samples are independent of them: set training_seeds")
        if problem := seed_conflict(cfg, seeds):
            raise ConfigError(f"model {cfg.model}: {problem}")
        model_geometry = getattr(getattr(generator, "geometry", None), "name", cfg.geometry)
        if model_geometry != cfg.geometry:
            raise ConfigError(f"model {cfg.model} was trained for geometry {model_geometry!r}, the protocol names "
                              f"{cfg.geometry!r}")
        if cfg.condition not in generator.condition_names:
            raise ConditionError(f"model {cfg.model} takes conditions {list(generator.condition_names)}, "
                                 f"not the scanned {cfg.condition!r}")
        declared = training_range_of(generator).get(cfg.condition)
        if declared is not None and not np.allclose(declared, cfg.training_range, rtol=1e-3):
            warnings.append(f"the model declares the training range [{declared[0]:.4g}, {declared[1]:.4g}] for "
                            f"{cfg.condition}, the protocol says [{cfg.training_range[0]:.4g}, "
                            f"{cfg.training_range[1]:.4g}]; points are flagged against the protocol's range")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = geometry.kind
    method = cfg.baseline if cfg.baseline != "auto" else (
        "scale" if kind == "calo" and getattr(geometry, "readout", "analog") == "analog" else "overlay")
    lo, hi = cfg.training_range
    unit = CONDITION_UNITS.get(cfg.condition, "")
    n = cfg.n_events
    points = []
    for k, value in enumerate(cfg.test_points()):
        label = f"{cfg.condition}_{value:.4g}".replace("+", "")
        point_dir = out / label
        point_dir.mkdir(parents=True, exist_ok=True)
        first = k * n  # distinct event streams per condition point
        seeds = cfg.simulator_seeds()
        ref_b = simulate_reference(geometry, cfg.condition, value, n, seeds["reference"], first, cfg.machine)
        ref2_b = simulate_reference(geometry, cfg.condition, value, n, seeds["reference 2"], first, cfg.machine)
        feats = {"reference": features_of(ref_b, geometry), "reference 2": features_of(ref2_b, geometry)}
        if generator is not None:
            conds = {name: ref_b.conditions[name] for name in generator.condition_names if name in ref_b.conditions}
            missing = [name for name in generator.condition_names if name not in conds]
            if missing:
                raise ConditionError(f"the model needs conditions {missing}, which the reference simulator does not set")
            gen_b = generator.generate(conds, seed=cfg.seed + 3, first_event=first, batch_size=cfg.batch_size)
            if gen_b.kind != kind or len(gen_b) != n:
                raise ConditionError(f"the model returned {len(gen_b)} {gen_b.kind} events for {n} requested {kind} events")
            feats["generated"] = features_of(gen_b, geometry)
        if method != "none":
            base_b = _baseline(method, geometry, cfg, value, n, first)
            feats["baseline"] = features_of(base_b, geometry)
        comparisons: dict[str, Comparison] = {}
        for role in ("generated", "baseline"):
            if role not in feats:
                continue
            c = compare(feats["reference"], feats[role], feats["reference 2"], n_repeats=cfg.repeats, seed=cfg.seed)
            if cfg.classifier:
                add_classifier_rows(c, feats["reference"], feats[role], feats["reference 2"],
                                    n_repeats=cfg.classifier_repeats, seed=cfg.seed)
            comparisons[role] = c
        figures = make_plots(feats, point_dir) if cfg.plots_per_condition else []
        observables = _observables(kind, feats)
        if generator is not None and kind == "pixel":
            observables |= count_law_band(generator, ref_b)
        point = PointResult(value, value / hi, lo <= value <= hi * (1 + 1e-9), comparisons.get("generated"),
                            comparisons.get("baseline"), observables, label)
        _write_point(point, cfg, point_dir, figures, unit)
        points.append(point)

    result = ExtrapolationResult(cfg, points, warnings, [])
    result.plots = _trend_plots(result, kind, out, unit)
    _write_summary(result, out, unit)
    if logger is not None:
        _log(logger, result, out)
    return result


def count_law_band(generator: Any, reference: HitBatch) -> dict[str, dict[str, float]]:
    """The count law's predicted mean occupancy (%) at the reference events' conditions with its
    parameter-uncertainty band, and the reference's own value in the law's units (hits, or with
    cluster tokens the reference's clusters split into the model's vocabulary, per position), so
    the law's error is told apart from the network's; empty when the model has no such law."""
    module = getattr(generator, "module", None)
    law = getattr(module, "counts", None)
    norm = getattr(getattr(generator, "family", None), "condition_norm", None)
    if law is None or norm is None or not hasattr(law, "occupancy_band"):
        return {}
    import torch

    from uhg.sparse.torch_hits import TorchHits

    device = next(law.parameters()).device
    cond = norm({k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in reference.conditions.items() if k in norm.names})
    band = law.occupancy_band(cond.to(device))
    if band is None:
        return {}
    mean, low, high = (100 * float(x) for x in band)
    with torch.no_grad():
        units = module.tokenize(TorchHits.from_batch(reference).to(device)).lengths if getattr(module, "clusters", False) else None
    counted = float(units.sum()) if units is not None else float(reference.n_hits)
    ref = 100 * counted / (len(reference) * float(law.positions.sum()))
    return {"law mean occupancy [%]": {"predicted": mean, "band low": low, "band high": high, "reference": ref}}


def run_scenarios(cfg: ExtrapolationConfig, logger=None) -> list[ExtrapolationResult]:
    """The protocol once per machine scenario of `cfg.machine` (a list), into out/<scenario>,
    with `model` formatted with {machine}; writes out/scenarios.md and scenarios.json."""
    from uhg.sim.pxd_machine import load_scenario

    machines = cfg.machine if isinstance(cfg.machine, list) else [cfg.machine]
    out = Path(cfg.out)
    results = []
    for m in machines:
        name = load_scenario(m).name
        model = cfg.model.format(machine=name) if cfg.model is not None else None
        one = cfg.model_copy(update={"machine": m, "model": model, "out": str(out / name)})
        results.append(run_protocol(one, logger=logger))
    out.mkdir(parents=True, exist_ok=True)
    table = scenario_table(results)
    (out / "scenarios.json").write_text(json.dumps(finite_or_null(table), indent=2))
    (out / "scenarios.md").write_text(scenario_markdown(table))
    return results


def scenario_table(results: list[ExtrapolationResult]) -> list[dict[str, Any]]:
    """One row per (scenario, point): mean occupancy of every sample, relative errors and the
    per-sensor occupancy MRE of generated and baseline with its floor."""
    rows = []
    for res in results:
        for p in res.points:
            occ = p.observables.get("mean occupancy [%]", {})
            ref = occ.get("reference", math.nan)
            row = {"machine": res.config.machine, "model": res.config.model, "value": p.value, "factor": p.factor,
                   "in_training_range": p.in_training_range, "occupancy": occ,
                   "law": p.observables.get("law mean occupancy [%]")}
            for role in ("generated", "baseline", "reference 2"):
                if role in occ:
                    row[f"{role} mean occupancy error"] = occ[role] / ref - 1
            for role in ("generated", "baseline"):
                c = getattr(p, role)
                r = c.get("occupancy_per_sensor", "mean_abs_rel_error") if c else None
                if r is not None:
                    row[f"{role} per-sensor MRE"] = r.value
                    row["per-sensor MRE floor"] = r.floor
            rows.append(row)
    return rows


def scenario_markdown(rows: list[dict[str, Any]]) -> str:
    def pct(x):
        return "—" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} %"

    def num(x):
        return "—" if x is None or not math.isfinite(x) else f"{x:.3g}"

    md = ["# Zero-shot extrapolation per machine scenario", "",
          "Mean occupancy error = sample / reference - 1 (floor: the second reference sample); per-sensor MRE: "
          "mean relative error of the per-sensor occupancy (floor: reference vs reference 2). Law prediction: the "
          "count law's predicted mean occupancy [+- 1 sd band] against the reference counted in the law's units "
          "(hits, or cluster tokens of the model's vocabulary).", "",
          "| scenario | L / training max | reference occ. [%] | generated | law prediction [band] | naive baseline | "
          "floor | per-sensor MRE generated | baseline | floor |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        law = r.get("law")
        law_text = "—" if not law else (f"{pct(law['predicted'] / law['reference'] - 1)} [{pct(law['band low'] / law['reference'] - 1)}, "
                                         f"{pct(law['band high'] / law['reference'] - 1)}]")
        md.append(f"| {r['machine']} | {r['factor']:.3g}{'' if r['in_training_range'] else ' (outside)'} | "
                  f"{num(r['occupancy'].get('reference'))} | {pct(r.get('generated mean occupancy error'))} | {law_text} | "
                  f"{pct(r.get('baseline mean occupancy error'))} | {pct(r.get('reference 2 mean occupancy error'))} | "
                  f"{num(r.get('generated per-sensor MRE'))} | {num(r.get('baseline per-sensor MRE'))} | "
                  f"{num(r.get('per-sensor MRE floor'))} |")
    return "\n".join(md) + "\n"


def _baseline(method: str, geometry, cfg: ExtrapolationConfig, value: float, n: int, first: int) -> HitBatch:
    hi = cfg.training_range[1]
    ratio = value / hi
    seed = cfg.simulator_seeds()["baseline"]
    rng = np.random.default_rng([seed, first])
    if method == "scale":
        train = simulate_reference(geometry, cfg.condition, hi, n, seed, first)
        return baselines.scale_baseline(train, ratio)
    # overlay: training events come from a stream disjoint from the reference's
    batch = baselines.overlay_baseline(
        lambda m, offset: simulate_reference(geometry, cfg.condition, hi, m, seed, first * 16 + offset, cfg.machine),
        geometry, ratio, n, rng)
    conds = {k: np.full(n, value) if k == cfg.condition else v for k, v in batch.conditions.items()}
    return HitBatch(batch.kind, batch.columns, batch.offsets, conds)


# ------------------------------------------------------------------------------------- output
def _rows(point: PointResult) -> list[dict[str, Any]]:
    """One row per (feature, metric): generated, baseline, floor."""
    keys: list[tuple[str, str]] = []
    for c in (point.generated, point.baseline):
        for r in (c.rows if c else []):
            if (r.feature, r.metric) not in keys:
                keys.append((r.feature, r.metric))
    rows = []
    for feature, metric in keys:
        g = point.generated.get(feature, metric) if point.generated else None
        b = point.baseline.get(feature, metric) if point.baseline else None
        any_row: MetricRow = g or b
        rows.append({"feature": feature, "metric": metric, "unit": any_row.unit,
                     "generated": g.value if g else None, "generated_std": g.value_std if g else None,
                     "baseline": b.value if b else None, "baseline_std": b.value_std if b else None,
                     "floor": any_row.floor, "floor_std": any_row.floor_std})
    return rows


def _skipped(point: PointResult) -> list[dict[str, str]]:
    seen, out = set(), []
    for c in (point.generated, point.baseline):
        for s in (c.skipped if c else []):
            if s.feature not in seen:
                seen.add(s.feature)
                out.append({"feature": s.feature, "reason": s.reason})
    return out


def _point_table(rows: list[dict[str, Any]], only: list[tuple[str, str]] | None = None) -> list[str]:
    lines = ["| feature | metric | generated | naive baseline | floor |", "|---|---|---|---|---|"]
    for r in rows:
        if only is not None and (r["feature"], r["metric"]) not in only:
            continue
        unit = f" [{r['unit']}]" if r["unit"] else ""
        lines.append(f"| {r['feature']} | {r['metric']}{unit} | {_f(r['generated'], r['generated_std'])} | "
                     f"{_f(r['baseline'], r['baseline_std'])} | {_f(r['floor'], r['floor_std'])} |")
    return lines


def _f(mean, std) -> str:
    return "—" if mean is None else fmt(mean, math.nan if std is None else std)


def _point_title(point: PointResult, cfg: ExtrapolationConfig, unit: str) -> str:
    where = "inside" if point.in_training_range else "OUTSIDE"
    return (f"{cfg.condition} = {point.value:.4g} {unit} ({point.factor:.3g} x training max; {where} the "
            f"training range [{cfg.training_range[0]:.4g}, {cfg.training_range[1]:.4g}])")


def _write_point(point: PointResult, cfg: ExtrapolationConfig, point_dir: Path, figures, unit: str) -> None:
    rows = _rows(point)
    doc = {"condition": cfg.condition, "value": point.value, "factor_of_training_max": point.factor,
           "in_training_range": point.in_training_range, "observables": point.observables, "metrics": rows,
           "skipped": _skipped(point), "plots": [{"caption": c, "file": f} for c, f in figures]}
    (point_dir / "metrics.json").write_text(json.dumps(finite_or_null(doc), indent=2))
    md = [f"# {_point_title(point, cfg, unit)}", ""]
    for name, per_sample in point.observables.items():
        md.append(f"- {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in per_sample.items()))
    md += ["", *_point_table(rows), ""]
    if doc["skipped"]:
        md += ["Not computed:", ""] + [f"- {s['feature']}: {s['reason']}" for s in doc["skipped"]] + [""]
    (point_dir / "metrics.md").write_text("\n".join(md))
    html_rows = [MetricRow(r["feature"], r["metric"], _nan(r["generated"]), _nan(r["generated_std"]), _nan(r["floor"]),
                           _nan(r["floor_std"]), r["unit"]) for r in rows]
    base_rows = [MetricRow(r["feature"], r["metric"], _nan(r["baseline"]), _nan(r["baseline_std"]), _nan(r["floor"]),
                           _nan(r["floor_std"]), r["unit"]) for r in rows]
    inputs = {"condition": _point_title(point, cfg, unit)} | {
        name: ", ".join(f"{k} {v:.4g}" for k, v in per.items()) for name, per in point.observables.items()}
    (point_dir / "report.html").write_text(render_html(
        f"uhg zero-shot evaluation: {cfg.condition} = {point.value:.4g} {unit}", inputs,
        [] if point.in_training_range else ["this condition lies outside the training range (extrapolation)"],
        [("Generated vs reference", html_rows), ("Naive baseline vs reference", base_rows)],
        doc["skipped"], figures))


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _trend_plots(result: ExtrapolationResult, kind: str, out: Path, unit: str) -> list[tuple[str, str]]:
    from uhg.eval import plots

    cfg = result.config
    xs = [p.value for p in result.points]
    log_x = max(xs + [cfg.training_range[1]]) / min(xs + [cfg.training_range[0]]) > 20
    figures = []
    for feature, metric in HEADLINE[kind]:
        series = {}
        for role in ("generated", "baseline"):
            rows = [getattr(p, role).get(feature, metric) if getattr(p, role) else None for p in result.points]
            if any(r is not None for r in rows):
                series[role] = (np.array([r.value if r else np.nan for r in rows]),
                                np.array([r.value_std if r else np.nan for r in rows]))
                floors = (np.array([r.floor if r else np.nan for r in rows]),
                          np.array([r.floor_std if r else np.nan for r in rows]))
        if not series:
            continue
        series["reference 2"] = floors  # the floor is the reference-vs-reference value
        fig = plots.metric_vs_condition_figure(cfg.condition, unit, xs, {("floor" if k == "reference 2" else k): v
                                                                          for k, v in series.items()},
                                               cfg.training_range, metric, log_x, title=feature)
        file = f"trend_{feature}_{metric}.png"
        plots.save(fig, out / file)
        figures.append((f"{feature} {metric} vs {cfg.condition} (floor = reference vs reference)", file))
    for name in result.points[0].observables:
        samples = list(result.points[0].observables[name])
        series = {s: (np.array([p.observables[name].get(s, np.nan) for p in result.points]), np.zeros(len(xs)))
                  for s in samples}
        fig = plots.metric_vs_condition_figure(cfg.condition, unit, xs, series, cfg.training_range, name, log_x)
        file = f"trend_{name.split(' [')[0].replace(' ', '_')}.png"
        plots.save(fig, out / file)
        figures.insert(0, (f"{name} vs {cfg.condition}", file))
    return figures


def markdown(result: ExtrapolationResult) -> str:
    cfg = result.config
    unit = CONDITION_UNITS.get(cfg.condition, "")
    kind = "pixel" if cfg.condition == "luminosity" else "calo"
    md = [f"# Zero-shot extrapolation in {cfg.condition}", "",
          f"- geometry: {cfg.geometry}", f"- model: {cfg.model}",
          f"- training range: [{cfg.training_range[0]:.4g}, {cfg.training_range[1]:.4g}] {unit}",
          f"- events per sample: {cfg.n_events}; repeats: {cfg.repeats}; seed: {cfg.seed}", ""]
    md += [f"- warning: {w}" for w in result.warnings]
    for p in result.points:
        md += ["", f"## {_point_title(p, cfg, unit)}", ""]
        for name, per_sample in p.observables.items():
            md.append(f"- {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in per_sample.items()))
        md += ["", *_point_table(_rows(p), HEADLINE[kind]), "", f"All metrics: {p.directory}/metrics.md"]
    return "\n".join(md) + "\n"


def _write_summary(result: ExtrapolationResult, out: Path, unit: str) -> None:
    cfg = result.config
    doc = {"config": cfg.model_dump(), "warnings": result.warnings,
           "points": [{"value": p.value, "factor_of_training_max": p.factor, "in_training_range": p.in_training_range,
                       "directory": p.directory, "observables": p.observables, "metrics": _rows(p),
                       "skipped": _skipped(p)} for p in result.points],
           "plots": [{"caption": c, "file": f} for c, f in result.plots]}
    (out / "extrapolation.json").write_text(json.dumps(finite_or_null(doc), indent=2))
    (out / "extrapolation.md").write_text(markdown(result))
    kind = "pixel" if cfg.condition == "luminosity" else "calo"
    links = "".join(f'<li><a href="{p.directory}/report.html">{_point_title(p, cfg, unit)}</a></li>'
                    for p in result.points)
    tables = []
    for p in result.points:
        rows = [r for r in _rows(p) if (r["feature"], r["metric"]) in HEADLINE[kind]]
        tables.append((f"{_point_title(p, cfg, unit)}: generated vs reference",
                       [MetricRow(r["feature"], r["metric"], _nan(r["generated"]), _nan(r["generated_std"]),
                                  _nan(r["floor"]), _nan(r["floor_std"]), r["unit"]) for r in rows]))
        tables.append((f"{_point_title(p, cfg, unit)}: naive baseline vs reference",
                       [MetricRow(r["feature"], r["metric"], _nan(r["baseline"]), _nan(r["baseline_std"]),
                                  _nan(r["floor"]), _nan(r["floor_std"]), r["unit"]) for r in rows]))
    inputs = {"geometry": cfg.geometry, "model": str(cfg.model), "condition": cfg.condition,
              "training range": f"[{cfg.training_range[0]:.4g}, {cfg.training_range[1]:.4g}] {unit}",
              "test points": ", ".join(f"{p.value:.4g}" for p in result.points),
              "events per sample": str(cfg.n_events)}
    (out / "report.html").write_text(render_html(
        f"uhg zero-shot extrapolation in {cfg.condition}", inputs, result.warnings, tables, [], result.plots,
        extra_html=f"<h2>Per-condition reports</h2><ul>{links}</ul>"))


def _log(logger, result: ExtrapolationResult, out: Path) -> None:
    metrics = {}
    for i, p in enumerate(result.points):
        for r in _rows(p):
            for role in ("generated", "baseline", "floor"):
                v = r[role]
                if v is not None and math.isfinite(v):
                    metrics[f"extrapolate/{r['feature']}/{r['metric']}/{role}"] = v
        logger.log_metrics(metrics, step=i)
        metrics = {}
    logger.log_artifact(out, artifact_path="extrapolate")
