"""Generated-vs-reference metrics, each with its reference-vs-reference floor.

Three samples take part: A (reference), B (a second, independent reference sample) and G
(generated). Every metric is computed for (A, G) -- the value -- and for (A, B) -- the floor,
the value a perfect generator would get with the same sample sizes. Repeats give uncertainties:

- without a second reference store, each repeat splits the reference at random into halves A
  and B, and draws |B| generated events without replacement (B shrinks to |G| when fewer
  generated events exist);
- with a second reference store, each repeat draws bootstrap samples of the reference (A), of
  the second reference (B) and of the generated events (G), B and G of equal size.

Results are `mean +- std` over repeats. Metrics that need more events than available are not
computed; they are listed with the reason instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from uhg.eval import distances
from uhg.eval.features import Binned, FeatureSet, Observable, Profile, weighted_correlation


@dataclass
class MetricRow:
    """One metric of one feature: value (generated vs reference) and floor (reference vs
    reference) as mean and std over repeats."""

    feature: str
    metric: str
    value: float
    value_std: float
    floor: float
    floor_std: float
    unit: str = ""
    group: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skipped:
    feature: str
    reason: str


@dataclass
class Comparison:
    rows: list[MetricRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def get(self, feature: str, metric: str) -> MetricRow | None:
        for row in self.rows:
            if row.feature == feature and row.metric == metric:
                return row
        return None


@dataclass(frozen=True)
class Draw:
    """Event weights of one repeat: a over the reference, b over the B source, g over generated."""

    a: np.ndarray
    b: np.ndarray
    g: np.ndarray


def draws(n_ref: int, n_gen: int, n_ref2: int | None, n_repeats: int, seed: int) -> Iterator[Draw]:
    """The resampling scheme of the module docstring, as event weights (counts per event)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_repeats):
        if n_ref2 is None:
            perm = rng.permutation(n_ref)
            half = n_ref // 2
            m = min(n_ref - half, n_gen)
            a = np.zeros(n_ref)
            a[perm[:half]] = 1
            b = np.zeros(n_ref)
            b[perm[half:half + m]] = 1
            g = np.zeros(n_gen)
            g[rng.choice(n_gen, m, replace=False)] = 1
        else:
            m = min(n_ref2, n_gen)
            a = np.bincount(rng.integers(0, n_ref, n_ref), minlength=n_ref).astype(np.float64)
            b = np.bincount(rng.integers(0, n_ref2, m), minlength=n_ref2).astype(np.float64)
            g = np.bincount(rng.integers(0, n_gen, m), minlength=n_gen).astype(np.float64)
        yield Draw(a, b, g)


def sample_sizes(n_ref: int, n_gen: int, n_ref2: int | None) -> tuple[int, int]:
    """(|A|, |B| = |G|) events per repeat."""
    if n_ref2 is None:
        return n_ref // 2, min(n_ref - n_ref // 2, n_gen)
    return n_ref, min(n_ref2, n_gen)


def compare(ref: FeatureSet, gen: FeatureSet, ref2: FeatureSet | None = None, n_repeats: int = 5,
            seed: int = 0) -> Comparison:
    """All distribution, profile, binned and correlation metrics of `gen` against `ref`."""
    b_src = ref2 if ref2 is not None else ref
    all_draws = list(draws(ref.n_events, gen.n_events, None if ref2 is None else ref2.n_events, n_repeats, seed))
    n_a, n_bg = sample_sizes(ref.n_events, gen.n_events, None if ref2 is None else ref2.n_events)
    out = Comparison()

    for name, obs in ref.distributions.items():
        if name not in gen.distributions:
            out.skipped.append(Skipped(name, "missing in the generated features"))
            continue
        if min(n_a, n_bg) < obs.min_events:
            out.skipped.append(Skipped(name, f"needs >= {obs.min_events} events per sample, have {min(n_a, n_bg)}"))
            continue
        _distribution_rows(out, obs, gen.distributions[name], b_src.distributions[name], all_draws)

    for name, prof in ref.profiles.items():
        if min(n_a, n_bg) < prof.min_events:
            out.skipped.append(Skipped(name, f"needs >= {prof.min_events} events per sample, have {min(n_a, n_bg)}"))
            continue
        _profile_rows(out, prof, gen.profiles[name], b_src.profiles[name], all_draws)

    for name, b in ref.binned.items():
        _binned_rows(out, b, gen.binned[name], b_src.binned[name], all_draws)

    for name, corr in ref.correlations.items():
        if min(n_a, n_bg) < corr.min_events:
            out.skipped.append(Skipped(name, f"needs >= {corr.min_events} events per sample, have {min(n_a, n_bg)}"))
            continue
        values, floors = [], []
        for d in all_draws:
            ca = weighted_correlation(corr.values, d.a)
            off = ~np.eye(len(ca), dtype=bool)
            values.append(np.mean(np.abs(weighted_correlation(gen.correlations[name].values, d.g) - ca)[off]))
            floors.append(np.mean(np.abs(weighted_correlation(b_src.correlations[name].values, d.b) - ca)[off]))
        out.rows.append(_row(name, "mean_abs_diff", values, floors, "", "correlation"))
    return out


def _row(feature: str, metric: str, values: list[float], floors: list[float], unit: str, group: str) -> MetricRow:
    v = np.asarray(values, dtype=np.float64)
    f = np.asarray(floors, dtype=np.float64)
    return MetricRow(feature, metric, _nanmean(v), _nanstd(v), _nanmean(f), _nanstd(f), unit, group)


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _nanstd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _distribution_rows(out: Comparison, a: Observable, g: Observable, b: Observable, all_draws: list[Draw]) -> None:
    binning = distances.common_binning([a.values, b.values, g.values], a.scale)
    unit = a.label[a.label.rfind("[") + 1:-1] if a.label.endswith("]") else ""
    sp, w1, ks = ([], []), ([], []), ([], [])
    for d in all_draws:
        wa = a.weights(d.a)
        for k, (other, w) in enumerate(((g, g.weights(d.g)), (b, b.weights(d.b)))):
            sp[k].append(distances.separation_power_samples(a.values, other.values, binning, wa, w))
            w1[k].append(distances.wasserstein1(a.values, other.values, wa, w))
            ks[k].append(distances.ks_statistic(a.values, other.values, wa, w))
    out.rows.append(_row(a.name, "separation_power", *sp, "", "distribution"))
    out.rows.append(_row(a.name, "wasserstein1", *w1, unit, "distribution"))
    out.rows.append(_row(a.name, "ks", *ks, "", "distribution"))


def mean_abs_rel_error(test: np.ndarray, ref: np.ndarray) -> float:
    """mean_k |test_k - ref_k| / |ref_k| over columns where ref_k != 0."""
    keep = np.isfinite(ref) & np.isfinite(test) & (ref != 0)
    return float(np.mean(np.abs(test[keep] - ref[keep]) / np.abs(ref[keep]))) if keep.any() else math.nan


def _profile_rows(out: Comparison, a: Profile, g: Profile, b: Profile, all_draws: list[Draw]) -> None:
    mre, total = ([], []), ([], [])
    for d in all_draws:
        ma = a.mean(d.a)
        for k, m in enumerate((g.mean(d.g), b.mean(d.b))):
            mre[k].append(mean_abs_rel_error(m, ma))
            total[k].append((m.sum() - ma.sum()) / ma.sum() if ma.sum() != 0 else math.nan)
    out.rows.append(_row(a.name, "mean_abs_rel_error", *mre, "", "profile"))
    out.rows.append(_row(a.name, "rel_diff_of_mean", *total, "", "profile"))


def binned_stats(b: Binned, edges: np.ndarray, weights: np.ndarray, min_events: int) -> tuple[np.ndarray, np.ndarray]:
    """Per x bin: weighted mean of y and relative spread std(y)/mean(y); nan where a bin holds
    fewer than `min_events` distinct events."""
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, b.x, side="right") - 1, 0, n_bins - 1)
    w_sum = np.bincount(idx, weights=weights, minlength=n_bins)
    present = np.bincount(idx, weights=(weights > 0).astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(idx, weights=weights * b.y, minlength=n_bins) / w_sum
        var = np.bincount(idx, weights=weights * b.y**2, minlength=n_bins) / w_sum - mean**2
        spread = np.sqrt(np.clip(var, 0, None)) / mean
    bad = present < min_events
    mean[bad] = np.nan
    spread[bad] = np.nan
    return mean, spread


def binned_edges(xs: list[np.ndarray], log: bool, max_bins: int = 8) -> np.ndarray:
    """Bins of the condition: one per distinct value when there are few (fixed-energy samples),
    else up to `max_bins` equal-width (log) bins over the pooled range."""
    pooled = np.concatenate(xs)
    unique = np.unique(pooled)
    if len(unique) <= max_bins:
        mids = 0.5 * (unique[1:] + unique[:-1])
        return np.concatenate([[unique[0] - 0.5 * abs(unique[0]) - 1e-9], mids,
                               [unique[-1] + 0.5 * abs(unique[-1]) + 1e-9]])
    lo, hi = float(unique[0]), float(unique[-1])
    if log and lo > 0:
        return np.geomspace(lo, hi * (1 + 1e-9), max_bins + 1)
    return np.linspace(lo, hi + 1e-9 * max(1.0, abs(hi)), max_bins + 1)


def _binned_rows(out: Comparison, a: Binned, g: Binned, b: Binned, all_draws: list[Draw]) -> None:
    edges = binned_edges([a.x, b.x, g.x], a.log_x)
    resp, reso, overall = ([], []), ([], []), ([], [])
    for d in all_draws:
        ma, sa = binned_stats(a, edges, d.a, a.min_events_per_bin)
        for k, (other, w) in enumerate(((g, d.g), (b, d.b))):
            m, s = binned_stats(other, edges, w, a.min_events_per_bin)
            resp[k].append(mean_abs_rel_error(m, ma))
            reso[k].append(mean_abs_rel_error(s, sa))
            mean_a = np.sum(d.a * a.y) / d.a.sum()
            overall[k].append((np.sum(w * other.y) / w.sum() - mean_a) / mean_a)
    if not np.isfinite(resp[0]).any():
        out.skipped.append(Skipped(a.name, f"no {a.x_label} bin holds >= {a.min_events_per_bin} events in every sample"))
    else:
        out.rows.append(_row(a.name, "mean_abs_rel_error_of_mean", *resp, "", "binned"))
        out.rows.append(_row(a.name, "mean_abs_rel_error_of_resolution", *reso, "", "binned"))
    out.rows.append(_row(a.name, "rel_diff_of_mean", *overall, "", "binned"))
