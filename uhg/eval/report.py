"""Metric tables (metrics.json, metrics.md) and the HTML report that links the plots."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhg.eval.compare import Comparison, MetricRow

HEADLINE = {
    "pixel": [("occupancy_per_sensor", "rel_diff_of_mean"), ("occupancy_per_sensor", "mean_abs_rel_error"),
              ("charge", "separation_power"), ("occupancy_per_image", "separation_power"),
              ("cluster_size", "separation_power"), ("cluster_charge", "separation_power"),
              ("hits_per_event", "separation_power"), ("sensor_occupancy_correlation", "mean_abs_diff"),
              ("classifier_high_level", "roc_auc"), ("classifier_low_level", "roc_auc")],
    "calo": [("response_vs_energy", "rel_diff_of_mean"), ("response_vs_energy", "mean_abs_rel_error_of_mean"),
             ("response_vs_energy", "mean_abs_rel_error_of_resolution"), ("response", "separation_power"),
             ("energy_per_layer", "mean_abs_rel_error"), ("shower_depth", "separation_power"),
             ("width_per_layer", "mean_abs_rel_error"), ("lateral_density_per_layer", "mean_abs_rel_error"),
             ("cell_energy", "separation_power"),
             ("hits_per_event", "separation_power"), ("classifier_high_level", "roc_auc"),
             ("classifier_low_level", "roc_auc")],
}
_LAYER = re.compile(r"^(.*)_layer(\d+)$")


@dataclass
class Report:
    """Everything one evaluation produced; rendered to JSON, Markdown and HTML."""

    title: str
    kind: str
    inputs: dict[str, Any]
    comparison: Comparison
    warnings: list[str] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)
    """(caption, file name relative to the output directory)"""

    def headline(self) -> list[MetricRow]:
        rows = [self.comparison.get(f, m) for f, m in HEADLINE.get(self.kind, [])]
        return [r for r in rows if r is not None]

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "kind": self.kind,
            "inputs": self.inputs,
            "headline": [r.to_dict() for r in self.headline()],
            "metrics": [r.to_dict() for r in self.comparison.rows],
            "skipped": [{"feature": s.feature, "reason": s.reason} for s in self.comparison.skipped],
            "warnings": self.warnings,
            "plots": [{"caption": c, "file": f} for c, f in self.plots],
        }


def fmt(mean: float, std: float) -> str:
    """`mean ± std` with 3 significant digits (std omitted when unknown)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if std is None or not math.isfinite(std):
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {std:.2g}"


def collapse_layers(rows: Sequence[MetricRow]) -> tuple[list[MetricRow], list[MetricRow]]:
    """(main rows, per-layer rows): per-layer rows (feature `<name>_layer<i>`) are summarised in
    the main rows as one row per (name, metric) holding the mean over layers."""
    main, per_layer, groups = [], [], {}
    for r in rows:
        m = _LAYER.match(r.feature)
        if m is None:
            main.append(r)
            continue
        per_layer.append(r)
        groups.setdefault((m.group(1), r.metric), []).append(r)
    for (base, metric), rs in groups.items():
        vals = [r.value for r in rs if math.isfinite(r.value)]
        floors = [r.floor for r in rs if math.isfinite(r.floor)]
        main.append(MetricRow(f"{base} (mean over {len(rs)} layers)", metric,
                              sum(vals) / len(vals) if vals else math.nan, math.nan,
                              sum(floors) / len(floors) if floors else math.nan, math.nan, rs[0].unit, rs[0].group))
    return main, per_layer


def _md_table(rows: Sequence[MetricRow]) -> list[str]:
    lines = ["| feature | metric | generated vs reference | floor (reference vs reference) | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = r.value / r.floor if math.isfinite(r.value) and math.isfinite(r.floor) and r.floor != 0 else math.nan
        unit = f" [{r.unit}]" if r.unit else ""
        lines.append(f"| {r.feature} | {r.metric}{unit} | {fmt(r.value, r.value_std)} | {fmt(r.floor, r.floor_std)} "
                     f"| {fmt(ratio, math.nan)} |")
    return lines


def markdown(report: Report) -> str:
    main, per_layer = collapse_layers(report.comparison.rows)
    out = [f"# {report.title}", ""]
    for k, v in report.inputs.items():
        out.append(f"- **{k}**: {v}")
    out.append("")
    if report.warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    out += ["## Headline metrics", ""] + _md_table(report.headline()) + [""]
    out += ["## All metrics", ""] + _md_table(main) + [""]
    if per_layer:
        out += ["## Per-layer metrics", ""] + _md_table(per_layer) + [""]
    if report.comparison.skipped:
        out += ["## Not computed", ""] + [f"- {s.feature}: {s.reason}" for s in report.comparison.skipped] + [""]
    out += ["Values are mean ± std over repeated splits; the floor is the same metric between two "
            "independent reference samples of the same size (see docs/evaluation.md).", ""]
    return "\n".join(out)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
.warn { background: #fff4d6; border: 1px solid #e0b000; padding: 0.5em 1em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 560px; }
figcaption { font-size: 12px; }
details { margin-bottom: 1em; }
</style></head><body>
<h1>{{ title }}</h1>
<table>{% for k, v in inputs.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
{% if warnings %}<div class="warn"><h2>Warnings</h2><ul>{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul></div>{% endif %}
{% for section, rows in tables %}
{% if rows %}<h2>{{ section }}</h2>
<table><tr><th>feature</th><th>metric</th><th>generated vs reference</th><th>floor (reference vs reference)</th><th>ratio</th></tr>
{% for r in rows %}<tr><td>{{ r[0] }}</td><td>{{ r[1] }}</td><td>{{ r[2] }}</td><td>{{ r[3] }}</td><td>{{ r[4] }}</td></tr>{% endfor %}
</table>{% endif %}
{% endfor %}
{% if skipped %}<h2>Not computed</h2><ul>{% for s in skipped %}<li>{{ s.feature }}: {{ s.reason }}</li>{% endfor %}</ul>{% endif %}
<p>Values are mean ± std over repeated splits; the floor is the same metric between two independent
reference samples of the same size. A metric close to its floor means the generated sample cannot be told
from the reference with this many events.</p>
{% if plots %}<h2>Plots</h2>
{% for caption, file in plots %}<figure><a href="{{ file }}"><img src="{{ file }}" alt="{{ caption }}"></a><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}{% endif %}
{{ extra_html }}
</body></html>
"""


def _html_rows(rows: Sequence[MetricRow]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        ratio = r.value / r.floor if math.isfinite(r.value) and math.isfinite(r.floor) and r.floor != 0 else math.nan
        unit = f" [{r.unit}]" if r.unit else ""
        out.append((r.feature, r.metric + unit, fmt(r.value, r.value_std), fmt(r.floor, r.floor_std), fmt(ratio, math.nan)))
    return out


def render_html(title: str, inputs: dict, warnings: list[str], tables: list[tuple[str, list[MetricRow]]],
                skipped, plots: list[tuple[str, str]], extra_html: str = "") -> str:
    from jinja2 import Environment

    env = Environment(autoescape=True)
    from markupsafe import Markup

    return env.from_string(_HTML).render(
        title=title, inputs=inputs, warnings=warnings,
        tables=[(name, _html_rows(rows)) for name, rows in tables], skipped=skipped, plots=plots,
        extra_html=Markup(extra_html))


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """metrics.json, metrics.md and report.html in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "metrics.json", "markdown": out_dir / "metrics.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(finite_or_null(report.to_dict()), indent=2, default=_json_default))
    paths["markdown"].write_text(markdown(report))
    main, per_layer = collapse_layers(report.comparison.rows)
    paths["html"].write_text(render_html(report.title, {k: str(v) for k, v in report.inputs.items()}, report.warnings,
                                         [("Headline metrics", report.headline()), ("All metrics", main),
                                          ("Per-layer metrics", per_layer)],
                                         report.comparison.skipped, report.plots))
    return paths


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_or_null(obj):
    """The same structure with NaN / inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
