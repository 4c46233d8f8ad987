"""Classifier two-sample test: can a classifier tell generated from reference events?

A classifier is trained on per-event feature vectors of two equally large samples (label 1 =
generated), its scores are calibrated with isotonic regression on a separate split, and the ROC
AUC of the calibrated probabilities is measured on a held-out split (the CaloChallenge 2022
procedure). AUC 0.5: indistinguishable; 1.0: fully separable. Two classifiers:

- `"dnn"` (calorimeters): the CaloChallenge kind of fully connected network
  (`uhg.eval.classifier_dnn`); splits 60% train, 20% test (epoch selection and calibration),
  20% held out for the AUC, as in the CaloChallenge evaluation script;
- `"trees"` (pixel detectors): gradient-boosted trees (scikit-learn
  HistGradientBoostingClassifier), seconds on a CPU; splits 50% train, 20% calibration, 30% test.

The floor is the same test between two independent reference samples (two halves of the
reference, or the reference and a second reference store) of the same size; repeats with new
random splits give mean +- std.

Recommended sample sizes: >= 1000 events per sample (the AUC floor of two identical samples is
0.5 + O(1/sqrt(n_test))); below `MIN_EVENTS` per sample the test is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_EVENTS = 100
SINGLE_THREAD_BELOW = 20_000
"""Fits on fewer events run single-threaded: OpenMP start-up and spinning cost more than the
fit itself there (measured 0.2 s vs 4.9 s CPU for 600 events on a busy 2-core machine)."""


METHODS = ("dnn", "trees")
SPLITS = {"dnn": (0.6, 0.2), "trees": (0.5, 0.2)}
"""(train, calibration) fractions; the rest is the held-out test split."""


@dataclass(frozen=True)
class ClassifierResult:
    auc: float
    n_train: int
    n_test: int


def classifier_for(kind: str) -> str:
    """The classifier used for events of `kind`: the CaloChallenge DNN for calorimeters."""
    return "dnn" if kind == "calo" else "trees"


def classifier_auc(x_ref: np.ndarray, x_gen: np.ndarray, seed: int = 0, max_iter: int = 200,
                   method: str = "trees") -> ClassifierResult:
    """ROC AUC of a calibrated classifier (`method`: "dnn" or "trees") separating x_gen (n, d)
    from x_ref (m, d). The larger sample is subsampled so that both classes are equally large."""
    if method not in METHODS:
        raise ValueError(f"classifier method must be one of {METHODS}, got {method!r}")
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = min(len(x_ref), len(x_gen))
    if n < MIN_EVENTS:
        raise ValueError(f"classifier test needs >= {MIN_EVENTS} events per sample, got {n}")
    x = np.concatenate([x_ref[rng.choice(len(x_ref), n, replace=False)],
                        x_gen[rng.choice(len(x_gen), n, replace=False)]]).astype(np.float32)
    y = np.concatenate([np.zeros(n), np.ones(n)])
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    # stratified split: the same permutation pattern for both classes
    parts = {}
    for label in (0, 1):
        idx = np.nonzero(y == label)[0][rng.permutation(n)]
        n_train, n_cal = (int(f * n) for f in SPLITS[method])
        for name, sel in (("train", idx[:n_train]), ("cal", idx[n_train:n_train + n_cal]),
                          ("test", idx[n_train + n_cal:])):
            parts.setdefault(name, []).append(sel)
    train, cal, test = (np.concatenate(parts[k]) for k in ("train", "cal", "test"))
    if method == "dnn":
        from uhg.eval.classifier_dnn import dnn_scores

        s_cal, s_test = dnn_scores(x[train], y[train], x[cal], y[cal], [x[cal], x[test]],
                                   seed=int(rng.integers(2**31)))
        prob = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(s_cal, y[cal]).predict(s_test)
        return ClassifierResult(float(roc_auc_score(y[test], prob)), len(train), len(test))
    model = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.1, max_leaf_nodes=15,
                                           early_stopping=True, validation_fraction=0.15,
                                           n_iter_no_change=15, random_state=int(rng.integers(2**31)))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1 if len(x) < SINGLE_THREAD_BELOW else None):
        model.fit(x[train], y[train])
        calibrator = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        calibrator.fit(model.predict_proba(x[cal])[:, 1], y[cal])
        prob = calibrator.predict(model.predict_proba(x[test])[:, 1])
    return ClassifierResult(float(roc_auc_score(y[test], prob)), len(train), len(test))


def classifier_draws(n_ref: int, n_gen: int, n_ref2: int | None, n_repeats: int, seed: int):
    """Index sets (a, b, g) per repeat, disjoint within the reference when B is a half of it:
    without a second reference, A and B are random halves of the reference; with one, A is the
    reference and B the second reference. Sizes are balanced inside `classifier_auc`."""
    rng = np.random.default_rng(seed)
    for _ in range(n_repeats):
        if n_ref2 is None:
            perm = rng.permutation(n_ref)
            yield perm[: n_ref // 2], perm[n_ref // 2:], np.arange(n_gen)
        else:
            yield np.arange(n_ref), np.arange(n_ref2), np.arange(n_gen)


def add_classifier_rows(comparison, ref, gen, ref2=None, n_repeats: int = 3, seed: int = 0,
                        vectors: tuple[str, ...] = ("high_level", "low_level")) -> None:
    """Append `classifier_auc` rows (value and floor, mean +- std over repeats) for each per-event
    vector set of the FeatureSets to `comparison` (a uhg.eval.compare.Comparison), with the
    classifier of their kind (`classifier_for`); too small samples are listed as skipped."""
    from uhg.eval.compare import Skipped, _row

    method = classifier_for(ref.kind)
    b_src = ref2 if ref2 is not None else ref
    n_ref2 = None if ref2 is None else ref2.n_events
    for name in vectors:
        if name not in ref.vectors:
            continue
        feature = f"classifier_{name}"
        a_size = ref.n_events // 2 if ref2 is None else ref.n_events
        b_size = ref.n_events - ref.n_events // 2 if ref2 is None else ref2.n_events
        n = min(a_size, b_size, gen.n_events)
        if n < MIN_EVENTS:
            comparison.skipped.append(Skipped(feature, f"needs >= {MIN_EVENTS} events per sample, have {n}"))
            continue
        values, floors = [], []
        for r, (a, b, g) in enumerate(classifier_draws(ref.n_events, gen.n_events, n_ref2, n_repeats, seed)):
            xa = ref.vectors[name][a]
            values.append(classifier_auc(xa, gen.vectors[name][g], seed=seed * 1000 + 2 * r, method=method).auc)
            floors.append(classifier_auc(xa, b_src.vectors[name][b], seed=seed * 1000 + 2 * r + 1, method=method).auc)
        comparison.rows.append(_row(feature, "roc_auc", values, floors, "", "classifier"))
