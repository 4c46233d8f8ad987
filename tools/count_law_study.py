"""Which count-law form extrapolates the PXD background occupancy: fit each form of
`uhg.models.laws.CountLaw` to hits per sensor of every machine scenario in the
training range, compare its predicted mean and per-sensor occupancy beyond the range with
simulated reference events.

    python tools/count_law_study.py [--geometry pxd-mini] [--train-events 2000] [--test-events 300]

Training events: 2e35-8e35 (log-uniform, seed 1 or --train-seed); test points 1.5x, 2x, 3x the training
maximum (seeds 101 and 102: reference and an independent second reference, the floor). Prints a
Markdown table: per scenario, form and point, the error of the predicted mean occupancy, the
per-sensor mean relative error (MRE) against its floor (reference vs second reference) and
whether the band (+- one standard deviation of the bootstrap refits) covers the reference. The law sees only simulated counts and the
recorded conditions (luminosity, both currents, beta_y*), never the scenario's exponents.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import CountLaw, fit_count_law
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS, SHIPPED_SCENARIOS

FORMS = {"power": ("power", 1), "powers K=2": ("powers", 2), "quadratic": ("quadratic", 1)}
TRAIN = (2e35, 8e35)
FACTORS = (1.5, 2.0, 3.0)


def counts_of(batch, n_sensors: int) -> np.ndarray:
    idx = batch.event_index() * n_sensors + batch.columns["sensor"]
    return np.bincount(idx, minlength=len(batch) * n_sensors).reshape(len(batch), n_sensors)


def conditions_tensor(norm: ConditionNorm, batch) -> torch.Tensor:
    return norm({k: torch.as_tensor(batch.conditions[k]) for k in norm.names}).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pxd-mini")
    parser.add_argument("--train-events", type=int, default=2000)
    parser.add_argument("--test-events", type=int, default=300)
    parser.add_argument("--bootstrap", type=int, default=16)
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--forms", nargs="*", default=list(FORMS))
    parser.add_argument("scenarios", nargs="*", default=list(SHIPPED_SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(args.geometry)
    positions = g.pixels_per_sensor
    print("| scenario | form | L / training max | mean occupancy error | in band | per-sensor MRE | floor |")
    print("|---|---|---|---|---|---|---|")
    for scenario in args.scenarios:
        t0 = time.perf_counter()
        train = simulate_pxd_background(g, args.train_events, seed=args.train_seed, luminosity=TRAIN[0], luminosity_max=TRAIN[1],
                                        scenario=scenario)
        ranges = {k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()}
        norm = ConditionNorm.from_ranges(ranges, list(CONDITIONS))
        n_train = torch.as_tensor(counts_of(train, g.n_sensors)).double()
        c_train = conditions_tensor(norm, train)
        tests = []
        for f in FACTORS:
            lum = f * TRAIN[1]
            ref = simulate_pxd_background(g, args.test_events, seed=101, luminosity=lum, scenario=scenario)
            ref2 = simulate_pxd_background(g, args.test_events, seed=102, luminosity=lum, scenario=scenario)
            tests.append((f, ref, counts_of(ref, g.n_sensors).mean(0), counts_of(ref2, g.n_sensors).mean(0)))
        sim_s = time.perf_counter() - t0
        for label in args.forms:
            form, terms = FORMS[label]
            torch.manual_seed(0)
            law = CountLaw(g.n_sensors, len(CONDITIONS), positions, form, terms, bootstrap=args.bootstrap).double()
            t1 = time.perf_counter()
            fit_count_law(law, n_train, c_train, seed=0)
            fit_s = time.perf_counter() - t1
            for f, ref, per_ref, per_ref2 in tests:
                cond = conditions_tensor(norm, ref)
                with torch.no_grad():
                    per_law = (law.mean(cond).mean(0)).numpy()
                pred, lo, hi = law.occupancy_band(cond)
                occ_ref = per_ref.sum() / (positions * g.n_sensors)
                mre = np.mean(np.abs(per_law / per_ref - 1))
                floor = np.mean(np.abs(per_ref2 / per_ref - 1))
                inside = "yes" if lo <= occ_ref <= hi else "no"
                print(f"| {scenario} | {label} | {f:g} | {100 * (pred / occ_ref - 1):+.1f} % "
                      f"([{100 * (lo / occ_ref - 1):+.1f}, {100 * (hi / occ_ref - 1):+.1f}]) | {inside} | "
                      f"{100 * mre:.1f} % | {100 * floor:.1f} % |", flush=True)
            print(f"<!-- {scenario} {label}: fit {fit_s:.1f} s (with {args.bootstrap} bootstrap refits), "
                  f"simulation {sim_s:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
