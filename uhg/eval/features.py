"""Containers for what the metrics compare: features of a set of events.

A `FeatureSet` holds, for n events,
- `distributions`: 1-D observables, each a flat array of values with the event each value
  belongs to (one value per event, per hit, per cluster, per sensor image ...);
- `profiles`: per-event matrices (n_events, k) whose column means are compared (occupancy per
  sensor, energy per layer ...);
- `binned`: a per-event quantity y in bins of a per-event x (response vs incident energy);
- `correlations`: per-event matrices (n_events, k) whose k x k correlation matrix is compared;
- `vectors`: fixed-length per-event vectors (n_events, d) for the classifier test.

Every metric resamples events, never hits: `weights` per event select a split or a bootstrap
sample and each value inherits the weight of its event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Observable:
    """A 1-D distribution. values: (n_values,) float; event: (n_values,) int32 event index."""

    name: str
    label: str
    values: np.ndarray
    event: np.ndarray
    scale: str = "linear"
    """Histogram binning: "linear", "log" or "integer" (see distances.common_binning)."""
    min_events: int = 10

    def weights(self, event_weights: np.ndarray) -> np.ndarray:
        return event_weights[self.event]


@dataclass(frozen=True)
class Profile:
    """A per-event matrix (n_events, k) compared through its weighted column means."""

    name: str
    label: str
    values: np.ndarray
    columns: list[str]
    axis_label: str = ""
    min_events: int = 10

    def mean(self, event_weights: np.ndarray) -> np.ndarray:
        """(k,) weighted column means."""
        total = event_weights.sum()
        if total <= 0:
            return np.full(self.values.shape[1], np.nan)
        return event_weights @ self.values / total


@dataclass(frozen=True)
class Binned:
    """Per-event y in bins of per-event x: weighted mean and relative spread of y per x bin."""

    name: str
    x_label: str
    y_label: str
    x: np.ndarray
    y: np.ndarray
    log_x: bool = True
    min_events_per_bin: int = 10


@dataclass(frozen=True)
class Correlation:
    """A per-event matrix (n_events, k) whose k x k Pearson correlation matrix is compared."""

    name: str
    label: str
    values: np.ndarray
    columns: list[str]
    min_events: int = 30


@dataclass
class FeatureSet:
    kind: str
    n_events: int
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    distributions: dict[str, Observable] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    binned: dict[str, Binned] = field(default_factory=dict)
    correlations: dict[str, Correlation] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, item: Observable | Profile | Binned | Correlation) -> None:
        target = {Observable: self.distributions, Profile: self.profiles, Binned: self.binned,
                  Correlation: self.correlations}[type(item)]
        target[item.name] = item

    @classmethod
    def concat(cls, parts: list[FeatureSet]) -> FeatureSet:
        """Features of consecutive event chunks as one set (event indices shifted)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        shifts = np.concatenate([[0], np.cumsum([p.n_events for p in parts])])
        out = cls(first.kind, int(shifts[-1]),
                  {k: np.concatenate([p.conditions[k] for p in parts]) for k in first.conditions})
        for name, obs in first.distributions.items():
            out.add(Observable(name, obs.label,
                               np.concatenate([p.distributions[name].values for p in parts]),
                               np.concatenate([p.distributions[name].event + s
                                               for p, s in zip(parts, shifts, strict=False)]).astype(np.int32),
                               obs.scale, obs.min_events))
        for name, prof in first.profiles.items():
            out.add(Profile(name, prof.label, np.concatenate([p.profiles[name].values for p in parts]),
                            prof.columns, prof.axis_label, prof.min_events))
        for name, b in first.binned.items():
            out.add(Binned(name, b.x_label, b.y_label, np.concatenate([p.binned[name].x for p in parts]),
                           np.concatenate([p.binned[name].y for p in parts]), b.log_x, b.min_events_per_bin))
        for name, c in first.correlations.items():
            out.add(Correlation(name, c.label, np.concatenate([p.correlations[name].values for p in parts]),
                                c.columns, c.min_events))
        out.vectors = {k: np.concatenate([p.vectors[k] for p in parts]) for k in first.vectors}
        return out


def weighted_correlation(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(k, k) Pearson correlation of the columns of values (n, k) with event weights (n,).
    Columns without spread get correlation 0 off the diagonal (and 1 on it)."""
    w = weights / weights.sum()
    centred = values - w @ values
    cov = (centred * w[:, None]).T @ centred
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(sd, sd)
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(corr, 1.0)
    return corr
