"""Distances between two 1-D samples, with per-value weights.

Weights let one resampling machinery serve every metric: a random half split gives weights
0/1 per event, a bootstrap gives the number of times an event was drawn, and each hit, cluster
or image inherits the weight of its event. All functions accept unweighted samples too.

Definitions (p, q: normalised histograms on common bins; F, G: empirical CDFs)
- separation power  S = 1/2 sum_i (p_i - q_i)^2 / (p_i + q_i)   (CaloChallenge 2022, in [0, 1];
  0 for identical histograms, 1 for disjoint ones)
- Wasserstein-1     W1 = integral |F(x) - G(x)| dx                  (in the unit of the values)
- Kolmogorov-Smirnov D = max_x |F(x) - G(x)|                        (in [0, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

MAX_BINS = 100


@dataclass(frozen=True)
class Binning:
    """Common histogram edges for all samples of one observable; values outside the edges
    are counted in the first / last bin so that no sample loses content."""

    edges: np.ndarray
    log: bool = False

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def histogram(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(n_bins,) float64 histogram normalised to unit sum (all zeros for an empty sample)."""
        values = np.asarray(values, dtype=np.float64)
        lo, hi = self.edges[0], self.edges[-1]
        # nextafter keeps clipped maxima inside the last (right-closed) bin
        clipped = np.clip(values, lo, np.nextafter(hi, lo))
        h, _ = np.histogram(clipped, bins=self.edges, weights=weights)
        total = h.sum()
        return h / total if total > 0 else h.astype(np.float64)


def common_binning(samples: list[np.ndarray], scale: str = "linear", n_bins: int = 50,
                   quantile: float = 1e-3) -> Binning:
    """Edges shared by `samples` (e.g. reference, second reference, generated).

    scale: "linear" (equal width), "log" (equal width in log10 of the positive values) or
    "integer" (one bin per integer value, merged to at most MAX_BINS bins). The range spans
    the union of the samples' [quantile, 1 - quantile] ranges so that one far outlier does not
    squeeze everything into one bin, while samples that do not overlap still land in
    different bins.
    """
    nonempty = [np.asarray(s, dtype=np.float64) for s in samples if len(s)]
    if not nonempty:
        return Binning(np.array([0.0, 1.0]))
    if scale == "integer":
        lo = min(float(np.min(s)) for s in nonempty)
        hi = max(float(np.max(s)) for s in nonempty)
        lo, hi = np.floor(lo), np.ceil(hi)
        width = max(1.0, np.ceil((hi - lo + 1) / MAX_BINS))
        edges = np.arange(lo - 0.5, hi + 0.5 + width, width)
        return Binning(edges)
    if scale == "log":
        positive = [s[s > 0] for s in nonempty]
        positive = [s for s in positive if len(s)]
        if not positive:
            return common_binning(samples, "linear", n_bins, quantile)
        lo = min(float(np.quantile(s, quantile)) for s in positive)
        hi = max(float(np.quantile(s, 1 - quantile)) for s in positive)
        if hi <= lo:
            hi = lo * 1.001 + 1e-12
        return Binning(np.geomspace(lo, hi, n_bins + 1), log=True)
    lo = min(float(np.quantile(s, quantile)) for s in nonempty)
    hi = max(float(np.quantile(s, 1 - quantile)) for s in nonempty)
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-3, 1e-12)
    return Binning(np.linspace(lo, hi, n_bins + 1))


def separation_power(p: np.ndarray, q: np.ndarray) -> float:
    """1/2 sum (p-q)^2/(p+q) of two histograms on the same bins (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"histograms have different shapes {p.shape} and {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    q = q / q.sum()
    s = p + q
    mask = s > 0
    return float(0.5 * np.sum((p[mask] - q[mask]) ** 2 / s[mask]))


def separation_power_samples(u: np.ndarray, v: np.ndarray, binning: Binning,
                             u_weights: np.ndarray | None = None,
                             v_weights: np.ndarray | None = None) -> float:
    """Separation power of two samples histogrammed with `binning`."""
    return separation_power(binning.histogram(u, u_weights), binning.histogram(v, v_weights))


def wasserstein1(u: np.ndarray, v: np.ndarray, u_weights: np.ndarray | None = None,
                 v_weights: np.ndarray | None = None) -> float:
    """Wasserstein-1 (earth mover's) distance, in the unit of the values."""
    u, u_weights = _nonzero(u, u_weights)
    v, v_weights = _nonzero(v, v_weights)
    if len(u) == 0 or len(v) == 0:
        return float("nan")
    return float(stats.wasserstein_distance(u, v, u_weights, v_weights))


def ks_statistic(u: np.ndarray, v: np.ndarray, u_weights: np.ndarray | None = None,
                 v_weights: np.ndarray | None = None) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_u - F_v| of weighted empirical CDFs."""
    u, u_weights = _nonzero(u, u_weights)
    v, v_weights = _nonzero(v, v_weights)
    if len(u) == 0 or len(v) == 0:
        return float("nan")
    grid = np.union1d(u, v)
    return float(np.max(np.abs(_ecdf(u, u_weights, grid) - _ecdf(v, v_weights, grid))))


def _nonzero(values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    if weights is None:
        return values, np.ones(len(values))
    weights = np.asarray(weights, dtype=np.float64)
    keep = weights > 0
    return values[keep], weights[keep]


def _ecdf(values: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    return cum[np.searchsorted(values[order], grid, side="right")] / cum[-1]
