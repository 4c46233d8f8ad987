"""Figures of the evaluation report (PNG via matplotlib's Agg canvas; no pyplot global state).

Conventions: reference in black, second reference in grey (dashed), generated in red, baseline
in blue; ratio panels show sample / reference with the reference's statistical band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from uhg.eval import distances
from uhg.eval.compare import binned_edges, binned_stats
from uhg.eval.features import Binned, Correlation, Observable, Profile, weighted_correlation

REF, REF2, GEN, BASE = "black", "0.55", "tab:red", "tab:blue"
STYLES = {"reference": dict(color=REF, lw=1.6), "reference 2": dict(color=REF2, lw=1.2, ls="--"),
          "generated": dict(color=GEN, lw=1.4), "baseline": dict(color=BASE, lw=1.2, ls="-."),
          "floor": dict(color=REF2, lw=1.2, ls="--")}


def _style(name: str) -> dict:
    return STYLES.get(name, dict(lw=1.2))


def _ratio_limits(ax, ratios: list[np.ndarray]) -> None:
    """Ratio panel range: at least 0.5..1.5, widened to the data up to 0..3."""
    finite = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in ratios] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    lo = min(0.5, float(finite.min()) * 0.95) if len(finite) else 0.5
    hi = max(1.5, float(finite.max()) * 1.05) if len(finite) else 1.5
    ax.set_ylim(max(0.0, lo), min(3.0, hi))


def _ratio_axes(fig: Figure):
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
    top = fig.add_subplot(gs[0])
    bottom = fig.add_subplot(gs[1], sharex=top)
    top.tick_params(labelbottom=False)
    return top, bottom


def distribution_figure(samples: dict[str, Observable], title: str = "") -> Figure:
    """Normalised histograms of one observable for named samples (first = reference) with a
    ratio panel."""
    obs = list(samples.values())
    binning = distances.common_binning([o.values for o in obs], obs[0].scale)
    fig = Figure(figsize=(6, 4.8))
    top, bottom = _ratio_axes(fig)
    edges = binning.edges
    ref_h = None
    ratios = []
    for name, o in samples.items():
        h = binning.histogram(o.values)
        counts = np.histogram(np.clip(o.values, edges[0], np.nextafter(edges[-1], edges[0])), edges)[0]
        top.stairs(h, edges, label=f"{name} ({len(np.unique(o.event))} ev.)", **_style(name))
        if ref_h is None:
            ref_h = h
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = 1 / np.sqrt(counts)
            bottom.stairs(1 + np.nan_to_num(rel, nan=0, posinf=0), edges, baseline=1 - np.nan_to_num(rel, nan=0, posinf=0),
                          fill=True, color="0.85")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref_h > 0, h / ref_h, np.nan)
            ratios.append(ratio)
            bottom.stairs(ratio, edges, **_style(name))
    top.set_ylabel("fraction")
    if obs[0].scale in ("log",) or (obs[0].scale == "integer" and len(edges) > 20):
        top.set_yscale("log")
    if binning.log:
        top.set_xscale("log")
    bottom.axhline(1, color=REF, lw=0.8)
    _ratio_limits(bottom, ratios)
    bottom.set_ylabel("ratio")
    bottom.set_xlabel(obs[0].label)
    top.legend(fontsize=8, frameon=False)
    if title:
        top.set_title(title, fontsize=10)
    return fig


def layer_grid_figure(base: str, per_layer: dict[str, dict[str, Observable]]) -> Figure:
    """Small normalised histograms of one per-layer observable, one panel per layer."""
    names = list(per_layer)
    n = len(names)
    ncol = min(6, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(2.4 * ncol, 1.9 * nrow + 0.4))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, feature in zip(axes.ravel(), names, strict=False):
        samples = per_layer[feature]
        obs = list(samples.values())
        binning = distances.common_binning([o.values for o in obs], obs[0].scale, n_bins=30)
        for name, o in samples.items():
            ax.stairs(binning.histogram(o.values), binning.edges, label=name, **_style(name))
        if binning.log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(numticks=3))
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.set_yticks([])  # shapes matter here; fractions are in the single-feature plots
        ax.set_title(feature.rsplit("_layer", 1)[-1].join(["layer ", ""]), fontsize=8)
        ax.tick_params(labelsize=6)
    axes.ravel()[0].legend(fontsize=6, frameon=False)
    fig.suptitle(obs[0].label.split(",")[0] if obs else base, fontsize=10)
    # fixed margins: tight_layout costs seconds per grid figure
    fig.subplots_adjust(left=0.03, right=0.98, bottom=0.08, top=1 - 0.5 / fig.get_figheight(), hspace=0.6, wspace=0.15)
    return fig


def profile_figure(samples: dict[str, Profile], title: str = "") -> Figure:
    """Column means (with standard errors) of a per-event matrix, e.g. occupancy per sensor,
    with a ratio panel."""
    profs = list(samples.values())
    k = profs[0].values.shape[1]
    x = np.arange(k)
    fig = Figure(figsize=(max(6, 0.16 * k + 2), 4.8))
    top, bottom = _ratio_axes(fig)
    ref_mean = None
    ratios = []
    for i, (name, p) in enumerate(samples.items()):
        n = max(len(p.values), 1)
        mean = p.values.mean(axis=0) if len(p.values) else np.full(k, np.nan)
        err = p.values.std(axis=0) / math.sqrt(n) if len(p.values) > 1 else np.zeros(k)
        style = _style(name)
        shift = (i - (len(samples) - 1) / 2) * 0.12
        top.errorbar(x + shift, mean, err, fmt="o", ms=3, color=style.get("color"), label=f"{name} ({len(p.values)} ev.)")
        if ref_mean is None:
            ref_mean = mean
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios.append(mean / ref_mean)
                bottom.errorbar(x + shift, mean / ref_mean, err / np.abs(ref_mean), fmt="o", ms=3, color=style.get("color"))
    top.set_ylabel(profs[0].label)
    positive = ref_mean[np.isfinite(ref_mean) & (ref_mean > 0)] if ref_mean is not None else np.zeros(0)
    if len(positive) and positive.max() > 100 * positive.min():
        top.set_yscale("log")
    bottom.axhline(1, color=REF, lw=0.8)
    _ratio_limits(bottom, ratios)
    bottom.set_ylabel("ratio")
    bottom.set_xlabel(profs[0].axis_label)
    step = max(1, k // 40)
    bottom.set_xticks(x[::step])
    bottom.set_xticklabels(profs[0].columns[::step], rotation=90, fontsize=6)
    top.legend(fontsize=8, frameon=False)
    if title:
        top.set_title(title, fontsize=10)
    fig.subplots_adjust(bottom=0.2)
    return fig


def correlation_figure(samples: dict[str, Correlation]) -> Figure:
    """Correlation matrices side by side (reference, generated, ...) and generated - reference."""
    mats = {name: weighted_correlation(c.values, np.ones(len(c.values))) for name, c in samples.items()}
    names = list(mats)
    panels = [*names, f"{names[-1]} - {names[0]}"] if len(names) > 1 else names
    fig = Figure(figsize=(4.2 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        if panel in mats:
            im = ax.imshow(mats[panel], vmin=-1, vmax=1, cmap="RdBu_r")
        else:
            im = ax.imshow(mats[names[-1]] - mats[names[0]], vmin=-0.5, vmax=0.5, cmap="RdBu_r")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("sensor index")
        ax.set_ylabel("sensor index")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.12, top=0.9, wspace=0.3)
    return fig


def binned_figure(samples: dict[str, Binned]) -> Figure:
    """Mean of y and its relative spread (resolution) per x bin, e.g. response vs E_inc."""
    bins = list(samples.values())
    edges = binned_edges([b.x for b in bins], bins[0].log_x)
    centres = np.sqrt(edges[1:] * edges[:-1]) if bins[0].log_x and edges[0] > 0 else 0.5 * (edges[1:] + edges[:-1])
    fig = Figure(figsize=(10, 4))
    ax_m, ax_s = fig.subplots(1, 2)
    for name, b in samples.items():
        mean, spread = binned_stats(b, edges, np.ones(len(b.x)), 3)
        style = _style(name)
        ax_m.plot(centres, mean, marker="o", ms=4, color=style.get("color"), ls=style.get("ls", "-"), label=name)
        ax_s.plot(centres, spread, marker="o", ms=4, color=style.get("color"), ls=style.get("ls", "-"), label=name)
    for ax, ylabel in ((ax_m, f"mean {bins[0].y_label}"), (ax_s, f"resolution std/mean of {bins[0].y_label}")):
        ax.set_xlabel(bins[0].x_label)
        ax.set_ylabel(ylabel, fontsize=8)
        if bins[0].log_x and edges[0] > 0:
            ax.set_xscale("log")
    ax_m.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.95, wspace=0.3)
    return fig


def metric_vs_condition_figure(condition: str, unit: str, x: Sequence[float],
                               series: dict[str, tuple[np.ndarray, np.ndarray]],
                               train_range: tuple[float, float], ylabel: str, log_x: bool = False,
                               title: str = "") -> Figure:
    """A metric vs the condition for several series (generated, baseline, floor), each (mean,
    std) per condition point; the training range is shaded."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.axvspan(*train_range, color="tab:green", alpha=0.15, label="training range")
    x = np.asarray(x, dtype=np.float64)
    for name, (mean, std) in series.items():
        style = _style(name)
        ax.errorbar(x, mean, yerr=np.nan_to_num(std), marker="o", ms=4, capsize=2, color=style.get("color"),
                    ls=style.get("ls", "-"), label=name)
    ax.set_xlabel(f"{condition} [{unit}]" if unit else condition)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if log_x:
        ax.set_xscale("log")
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.92)
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
