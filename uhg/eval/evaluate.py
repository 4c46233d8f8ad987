"""`uhg eval`: compare a generated store with a reference store and write the report.

    report = evaluate_stores("ref.zarr", "gen.zarr", "eval_out", reference2="ref2.zarr")

writes to the output directory: metrics.json, metrics.md, report.html and one PNG per figure.
Bad input (stores of different kinds, geometries or schemas, empty stores) raises a
`uhg.errors.UhgError` with the store path and what was expected; conditions outside the
reference's or the model's range and metrics that need more events are flagged in the report.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import CONDITION_UNITS, HitBatch
from uhg.errors import ConditionError, GeometryError, StoreError
from uhg.eval.classifier import add_classifier_rows
from uhg.eval.compare import compare
from uhg.eval.features import FeatureSet
from uhg.eval.report import Report, write_report

READ_CHUNK_EVENTS = 2000


def features_of(batch: HitBatch, geometry) -> FeatureSet:
    """The features of `batch` for its detector kind."""
    if batch.kind == "pixel":
        from uhg.eval.features_pxd import pxd_features

        return pxd_features(batch, geometry)
    from uhg.eval.features_calo import calo_features

    return calo_features(batch, geometry)


def store_features(store, max_events: int | None = None, chunk: int = READ_CHUNK_EVENTS) -> FeatureSet:
    """Features of the first `max_events` events of an open store, read in chunks."""
    n = len(store) if max_events is None else min(len(store), max_events)
    parts = [features_of(store.read(lo, min(lo + chunk, n)), store.geometry) for lo in range(0, n, chunk)]
    return FeatureSet.concat(parts)


def check_compatible(stores: dict[str, Any]) -> None:
    """All stores hold the same kind, geometry and schema and at least one event."""
    items = list(stores.items())
    for role, store in items:
        if len(store) == 0:
            raise StoreError(f"{role} store {store.path} holds no events; nothing to evaluate")
    ref_role, ref = items[0]
    for role, store in items[1:]:
        if store.attrs.get("schema") != ref.attrs.get("schema"):
            raise StoreError(f"{role} store {store.path} has schema {store.attrs.get('schema')!r} but the {ref_role} "
                             f"store {ref.path} has {ref.attrs.get('schema')!r}; re-create one of them with this uhg")
        if store.kind != ref.kind:
            raise GeometryError(f"{role} store {store.path} holds {store.kind} events but the {ref_role} store "
                                f"{ref.path} holds {ref.kind} events; compare stores of the same detector")
        if store.geometry.name != ref.geometry.name:
            raise GeometryError(f"{role} store {store.path} has geometry {store.geometry.name!r} but the {ref_role} "
                                f"store {ref.path} has {ref.geometry.name!r}; compare stores of the same geometry")


def condition_warnings(ref: FeatureSet, others: dict[str, FeatureSet],
                       training_range: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """Human-readable flags: conditions missing or differently distributed between samples, and
    generated events outside the model's declared training range (allowed: extrapolation)."""
    from scipy import stats

    out = []
    for role, fs in others.items():
        for name, ref_vals in ref.conditions.items():
            if name not in fs.conditions:
                out.append(f"{role} events carry no condition {name!r}; the reference does")
                continue
            vals = fs.conditions[name]
            if len(vals) == 0 or len(ref_vals) == 0:
                continue
            lo, hi = float(ref_vals.min()), float(ref_vals.max())
            outside = np.mean((vals < lo * (1 - 1e-9)) | (vals > hi * (1 + 1e-9)))
            if outside > 0:
                out.append(f"{100 * outside:.1f}% of the {role} events have {name} outside the reference's range "
                           f"[{lo:.4g}, {hi:.4g}] {CONDITION_UNITS.get(name, '')}: the samples are not like-for-like")
            elif len(vals) >= 20 and len(ref_vals) >= 20 and np.ptp(np.concatenate([vals, ref_vals])) > 0:
                p = stats.ks_2samp(ref_vals, vals).pvalue
                if p < 1e-3:
                    out.append(f"{name} is distributed differently in the {role} and reference events "
                               f"(KS p = {p:.1e}); condition effects mix into the metrics")
    for name, (lo, hi) in (training_range or {}).items():
        vals = others.get("generated", ref).conditions.get(name)
        if vals is None or len(vals) == 0:
            continue
        # relative tolerance: ranges read back from a log-scaled normalisation carry rounding
        outside = np.mean((vals < lo * (1 - 1e-6)) | (vals > hi * (1 + 1e-6)))
        if outside > 0:
            out.append(f"{100 * outside:.1f}% of the generated events have {name} outside the model's training range "
                       f"[{lo:.4g}, {hi:.4g}] {CONDITION_UNITS.get(name, '')} (extrapolation)")
    return out


def training_range_from_store(store) -> dict[str, tuple[float, float]]:
    """The generating model's training range: declared by the generated store under
    attributes.generated.training_conditions ({name: {min, max}}), else read from the condition
    normalisation in the sidecar (generator.json) of the model export the store names, when that
    export is on this machine. Empty when neither is available."""
    gen = store.attrs.get("attributes", {}).get("generated", {})
    if not isinstance(gen, dict):
        return {}
    declared = gen.get("training_conditions", {})
    out = {k: (float(v["min"]), float(v["max"])) for k, v in declared.items()
           if isinstance(v, dict) and "min" in v and "max" in v}
    if out or not isinstance(gen.get("model"), str):
        return out
    return training_range_of_export(gen["model"])


def training_range_of_export(path: str | Path) -> dict[str, tuple[float, float]]:
    """{condition: (min, max)} from a generator export's condition normalisation (log-scaled
    conditions map [min, max] to [-1, 1]); empty if `path` holds no readable export."""
    import json

    sidecar = Path(path) / "generator.json"
    try:
        norm = json.loads(sidecar.read_text())["condition_norm"]
        rows = zip(norm["names"], norm["log"], norm["center"], norm["scale"], strict=True)
        return {n: ((math.exp(c - s), math.exp(c + s)) if lg else (c - s, c + s)) for n, lg, c, s in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def make_plots(samples: dict[str, FeatureSet], out_dir: Path, prefix: str = "") -> list[tuple[str, str]]:
    """One PNG per figure in `out_dir`; returns (caption, file name) pairs. Samples with no
    events are left out of the figures."""
    from uhg.eval import plots

    samples = {k: v for k, v in samples.items() if v is not None and v.n_events > 0}
    if not samples:
        return []
    first = next(iter(samples.values()))
    out: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        file = f"{prefix}{_slug(name)}.png"
        plots.save(fig, out_dir / file)
        out.append((caption, file))

    layer_groups: dict[str, list[str]] = {}
    for name, obs in first.distributions.items():
        m = re.match(r"^(.*)_layer(\d+)$", name)
        if m:
            layer_groups.setdefault(m.group(1), []).append(name)
            continue
        save(plots.distribution_figure({k: fs.distributions[name] for k, fs in samples.items()}), f"dist_{name}",
             obs.label)
    for base, names in layer_groups.items():
        per_layer = {n: {k: fs.distributions[n] for k, fs in samples.items()} for n in names}
        save(plots.layer_grid_figure(base, per_layer), f"layers_{base}", f"{base} per layer")
    for name, prof in first.profiles.items():
        save(plots.profile_figure({k: fs.profiles[name] for k, fs in samples.items()}), f"profile_{name}",
             f"{prof.label} per {prof.axis_label}")
    for name, b in first.binned.items():
        save(plots.binned_figure({k: fs.binned[name] for k, fs in samples.items()}), f"binned_{name}",
             f"{b.y_label} vs {b.x_label}: mean and resolution")
    for name, corr in first.correlations.items():
        save(plots.correlation_figure({k: fs.correlations[name] for k, fs in samples.items()
                                       if k in ("reference", "generated", "baseline")}), f"corr_{name}", corr.label)
    return out


def evaluate_features(ref: FeatureSet, gen: FeatureSet, out_dir: str | Path, ref2: FeatureSet | None = None, *,
                      title: str = "uhg evaluation", inputs: dict[str, Any] | None = None,
                      warnings: list[str] | None = None, n_repeats: int = 5, classifier_repeats: int = 3,
                      classifier: bool = True, plots: bool = True, seed: int = 0) -> Report:
    """Metrics, plots and report files for features already computed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(ref, gen, ref2, n_repeats=n_repeats, seed=seed)
    if classifier:
        add_classifier_rows(comparison, ref, gen, ref2, n_repeats=classifier_repeats, seed=seed)
    figures = make_plots({"reference": ref, "reference 2": ref2, "generated": gen}, out_dir) if plots else []
    report = Report(title, ref.kind, dict(inputs or {}), comparison, list(warnings or []), figures)
    write_report(report, out_dir)
    return report


def evaluate_stores(reference: str | Path, generated: str | Path, out_dir: str | Path,
                    reference2: str | Path | None = None, *, max_events: int | None = None,
                    n_repeats: int = 5, classifier_repeats: int = 3, classifier: bool = True, plots: bool = True,
                    training_range: dict[str, tuple[float, float]] | None = None, seed: int = 0,
                    logger=None) -> Report:
    """Evaluate the generated store against the reference (and the optional second reference
    for the floor); see the module docstring. `logger` is a uhg.tracking RunLogger."""
    from uhg.data.reader import open_store

    stores = {"reference": open_store(reference), "generated": open_store(generated)}
    if reference2 is not None:
        stores["second reference"] = open_store(reference2)
    check_compatible(stores)
    if max_events is not None and max_events < 1:
        raise ConditionError(f"--max-events must be at least 1, got {max_events}")
    feats = {role: store_features(s, max_events) for role, s in stores.items()}
    ref, gen, ref2 = feats["reference"], feats["generated"], feats.get("second reference")
    declared = dict(training_range_from_store(stores["generated"]))
    declared.update(training_range or {})
    others = {"generated": gen} | ({"second reference": ref2} if ref2 is not None else {})
    warnings = condition_warnings(ref, others, declared)
    inputs: dict[str, Any] = {
        "geometry": stores["reference"].geometry.name,
        "reference": f"{stores['reference'].path} ({ref.n_events} events)",
        "generated": f"{stores['generated'].path} ({gen.n_events} events)",
        "floor from": (f"second reference {stores['second reference'].path} ({ref2.n_events} events)"
                       if ref2 is not None else "two random halves of the reference"),
        "repeats": f"{n_repeats} (classifier: {classifier_repeats})",
    }
    for name, vals in gen.conditions.items():
        if len(vals):
            inputs[f"generated {name}"] = f"{vals.min():.4g} .. {vals.max():.4g} {CONDITION_UNITS.get(name, '')}"
    report = evaluate_features(ref, gen, out_dir, ref2, title=f"uhg evaluation: {Path(generated).name} vs "
                               f"{Path(reference).name}", inputs=inputs, warnings=warnings, n_repeats=n_repeats,
                               classifier_repeats=classifier_repeats, classifier=classifier, plots=plots, seed=seed)
    if logger is not None:
        log_report(logger, report, Path(out_dir))
    return report


def log_report(logger, report: Report, out_dir: Path, prefix: str = "eval", step: int = 0) -> None:
    """Metrics (`<prefix>/<feature>/<metric>` and `.../floor`, at `step`: 0 for `uhg eval`, the
    last training step for the end-of-run evaluation) and the output directory as artifacts,
    through the RunLogger interface."""
    metrics = {}
    for r in report.comparison.rows:
        key = f"{prefix}/{_slug(r.feature)}/{r.metric}"
        if math.isfinite(r.value):
            metrics[key] = r.value
        if math.isfinite(r.floor):
            metrics[f"{key}/floor"] = r.floor
    logger.log_metrics(metrics, step=step)
    logger.log_artifact(out_dir, artifact_path=prefix)
