"""Where a PXD GAN's count law parts from the reference beyond the training range, law only: the
pooled law fitted to the clusters per sensor of 4000 training events (2e35-8e35, seed 1, as the
training stores), once to all 8-connected clusters and once to the census the GAN's fitted start
counts (the clusters that fit its shape window, `cluster_shape_keys`), each against the same count
in two reference samples (seeds 101, 102) at 1x, 1.5x, 2x and 3x the top of the range; with the
floor (the two references against each other), the census's share of the clusters, the hits
outside it and the reference's pixels per census cluster.

    python tools/census_count_law.py SCENARIO [EVENTS_PER_REFERENCE] [all,census] [pooled,quadratic]

The third argument picks the counts the law is fitted to (default both), the fourth the law's
form(s) (`model.count_law`; default pooled).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from uhg.eval.features_pxd import clusters_per_image, per_image
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import CountLaw, fit_count_law
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS
from uhg.train.gan_family import cluster_shape_keys


def census(batch, g) -> np.ndarray:
    """Clusters per (event, sensor) that the GAN's fitted start counts (those that fit its shape window)."""
    _, s, e = cluster_shape_keys(batch, g)
    out = np.zeros((len(batch), g.n_sensors))
    np.add.at(out, (e, s), 1.0)
    return out


def census_hits(batch, g) -> np.ndarray:
    """Hits per (event, sensor) of the clusters in the census."""
    _, s, e, idx, _, _ = cluster_shape_keys(batch, g, pixels=True)
    out = np.zeros((len(batch), g.n_sensors))
    np.add.at(out, (e[idx], s[idx]), 1.0)
    return out


def pattern(rel: np.ndarray, noise2: np.ndarray) -> float:
    """Rms over the sensors of a relative error once its mean is out, less the reference's noise."""
    return float(np.sqrt(max(np.mean((rel - rel.mean()) ** 2) - np.mean(noise2), 0)))


def training_events(machine: str, g):
    """The 4000 training events of `machine` in 2e35-8e35 (seed 1, as the training stores), their
    condition norm and their normalised conditions (float64)."""
    train = simulate_pxd_background(g, 4000, seed=1, luminosity=2e35, luminosity_max=8e35, scenario=machine)
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    return train, norm, norm({k: torch.as_tensor(train.conditions[k]) for k in norm.names}).double()


def scenario_arguments(argv: list[str]):
    """One torch thread, and what these law studies start from: SCENARIO and EVENTS of the command
    line (default luminosity-dominated, 1000) and the pxd-mini geometry."""
    torch.set_num_threads(1)
    machine = argv[1] if len(argv) > 1 else "luminosity-dominated"
    n = int(argv[2]) if len(argv) > 2 else 1000
    return machine, n, get_geometry("pxd-mini")


def main() -> None:
    machine, n, g = scenario_arguments(sys.argv)

    t0 = time.time()
    train, norm, c_train = training_events(machine, g)
    fitted = {}
    kinds_fitted = sys.argv[3].split(",") if len(sys.argv) > 3 else ["all", "census"]
    forms = sys.argv[4].split(",") if len(sys.argv) > 4 else ["pooled"]
    for name, counts in (("all", clusters_per_image(train, g)), ("census", census(train, g))):
        if name not in kinds_fitted:
            continue
        for form in forms:
            law = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, form).double()
            out = fit_count_law(law, torch.as_tensor(counts).double(), c_train, seed=0)
            print(f"{form} law on {name}: ridges {out.get('law_shrink')} / {out.get('law_curvature_ridge')}", flush=True)
            fitted[(form, name)] = law
    print(f"training events and fits {time.time() - t0:.0f} s", flush=True)

    print("| L / training max | quantity | mean | rms over sensors |")
    print("|---|---|---|---|")
    kinds = (("hits", lambda b: per_image(b, g)), ("all", lambda b: clusters_per_image(b, g)),
             ("census", lambda b: census(b, g)), ("census hits", lambda b: census_hits(b, g)))
    for f in (1.0, 1.5, 2.0, 3.0):
        refs = [simulate_pxd_background(g, n, seed=s, luminosity=f * 8e35, scenario=machine) for s in (101, 102)]
        q = {k: [fn(r) for r in refs] for k, fn in kinds}
        both = {k: np.concatenate(v) for k, v in q.items()}
        m = {k: v.mean(0) for k, v in both.items()}
        var = {k: v.var(0) / len(v) for k, v in both.items()}
        cond = norm({k: torch.as_tensor(np.concatenate([r.conditions[k] for r in refs])) for k in norm.names}).double()
        for (form, name), law in fitted.items():
            with torch.no_grad():
                pred = law.mean(cond).mean(0).numpy()
            rel = pred / m[name] - 1
            print(f"| {f} | {form} law on {name} vs reference {name}: mean bias, pattern (noise out) | "
                  f"{100 * (pred.sum() / m[name].sum() - 1):+.2f} % | {100 * pattern(rel, var[name] / m[name] ** 2):.2f} % |")
        for k in ("hits", "census"):
            a, b = q[k][0].mean(0), q[k][1].mean(0)
            print(f"| {f} | floor {k}: reference / reference 2 - 1 | {100 * (a.sum() / b.sum() - 1):+.2f} % | "
                  f"{100 * np.sqrt(np.mean((a / b - 1) ** 2)):.2f} % (raw) |")
        print(f"| {f} | census / all clusters | {m['census'].sum() / m['all'].sum():.4f} | "
              f"{100 * np.std(m['census'] / m['all']):.2f} % |")
        print(f"| {f} | hits outside the census / hits | {1 - m['census hits'].sum() / m['hits'].sum():.4f} | "
              f"{100 * np.std(1 - m['census hits'] / m['hits']):.2f} % |")
        print(f"| {f} | pixels per census cluster | {m['census hits'].sum() / m['census'].sum():.4f} | "
              f"{100 * np.std(m['census hits'] / m['census']):.2f} % |")
        print(f"<!-- {f}: {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
