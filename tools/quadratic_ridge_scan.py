"""Would a different per-sensor ridge make the `quadratic` count law (the shipped PXD GAN's) more
precise per sensor beyond the training range? Law only: the quadratic law fitted to the GAN's
census of clusters (`census_count_law.census`) of 4000 training events of SCENARIO (2e35-8e35,
simulator seed 1, as the training stores) at each strength of the ridge on the per-sensor slope
deviations, from SHRINK_GRID (the strengths `choose_shrink` chooses among) and stronger ones; for
each, the held-out negative log-likelihood per event (fitted to three quarters, the split of
`choose_shrink`) and the law's mean bias / per-sensor pattern (`census_count_law.pattern`)
against the census of two reference samples (seeds 101, 102, EVENTS each) at 1x, 1.5x, 2x and 3x
the top of the range. Names the strength the lowest held-out score chooses (as `choose_shrink`)
and the one `strongest_within_noise` would choose.

    python tools/quadratic_ridge_scan.py SCENARIO [EVENTS]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from census_count_law import census, pattern, scenario_arguments, training_events  # tools/, on the path when run as a script

from uhg.models.laws import HOLDOUT, SHRINK_GRID, CountEvents, CountLaw, fit_law, strongest_within_noise
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS

STRONGER = (1e4, 3e4, 1e5, 1e6)  # beyond the grid: towards one shared slope for every sensor
FACTORS = (1.0, 1.5, 2.0, 3.0)


def main() -> None:
    machine, n, g = scenario_arguments(sys.argv)
    t0 = time.time()
    train, norm, cond = training_events(machine, g)
    counts = torch.as_tensor(census(train, g)).double()
    refs = {}
    for f in FACTORS:
        samples = [simulate_pxd_background(g, n, seed=s, luminosity=f * 8e35, scenario=machine) for s in (101, 102)]
        both = np.concatenate([census(r, g) for r in samples])
        c = norm({k: torch.as_tensor(np.concatenate([r.conditions[k] for r in samples])) for k in norm.names})
        refs[f] = (both.mean(0), both.var(0) / len(both), c.double())
    print(f"events and census {time.time() - t0:.0f} s", flush=True)

    law = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, "quadratic").double()
    start = [p.detach().clone() for p in law.parameters()]

    def reset() -> None:
        with torch.no_grad():
            for p, s in zip(law.parameters(), start, strict=True):
                p.copy_(s)

    # the held-out split of choose_shrink (seed 0)
    perm = torch.randperm(len(counts), generator=torch.Generator().manual_seed(1))
    n_out = int(HOLDOUT * len(counts))
    out, fit = perm[:n_out], perm[n_out:]
    fit_events, all_events = CountEvents(counts, cond, fit), CountEvents(counts, cond)
    strengths = sorted({*SHRINK_GRID, *STRONGER})
    losses, rows = [], []
    for strength in strengths:
        reset()
        fit_law(law, lambda m, k=strength: fit_events.loss(m, k))
        with torch.no_grad():
            losses.append(-law.marginal_log_prob(counts[out], cond[out]).double())
        reset()
        fit_law(law, lambda m, k=strength: all_events.loss(m, k))
        cells = []
        with torch.no_grad():
            for f in FACTORS:
                mean, var, c = refs[f]
                pred = law.mean(c).mean(0).numpy()
                rel = pred / mean - 1
                cells.append(f"{100 * (pred.sum() / mean.sum() - 1):+.2f} % / {100 * pattern(rel, var / mean ** 2):.2f} %")
        rows.append(f"| {strength:g} | {float(losses[-1].mean()):.5f} | " + " | ".join(cells) + " |")
        print(rows[-1], f"<!-- {time.time() - t0:.0f} s -->", flush=True)
    lowest = min(range(len(losses)), key=lambda i: float(losses[i].mean()))
    strongest_first = list(reversed(range(len(losses))))
    rule = strongest_first[strongest_within_noise([losses[i] for i in strongest_first])]
    print(f"lowest held-out score: {strengths[lowest]:g}; strongest within noise: {strengths[rule]:g}")
    print("| per-sensor ridge | held-out NLL per event | " + " | ".join(f"{f}x: mean / pattern" for f in FACTORS) + " |")
    print("|---" * (2 + len(FACTORS)) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
