"""Measure how the total PXD background occupancy of each machine scenario scales with luminosity.

    python tools/scenario_scaling.py [--geometry pxd-mini] [--events 400] [--seed 11] [SCENARIO ...]

For each scenario (default: every shipped one) it simulates `--events` readouts at each
luminosity of LUMINOSITIES and prints, as a Markdown table for docs/calibration.md, the mean
occupancy, the effective exponent p of occupancy ~ L^p fitted over the whole range
(least squares in log-log) and the local exponent between neighbouring luminosities.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from uhg.geometry import get_geometry
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import SHIPPED_SCENARIOS

LUMINOSITIES = (2e35, 4e35, 8e35, 1.2e36, 1.6e36, 2.4e36)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=list(SHIPPED_SCENARIOS))
    parser.add_argument("--geometry", default="pxd-mini")
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    geometry = get_geometry(args.geometry)
    print(f"{args.events} events per point, {args.geometry}, {platform.machine()} {platform.python_version()}\n")
    print("| scenario | " + " | ".join(f"{lum:.3g}" for lum in LUMINOSITIES)
          + " | fitted exponent | local exponents | seconds |")
    print("|---|" + "---|" * (len(LUMINOSITIES) + 3))
    for name in args.scenarios:
        start = time.perf_counter()
        occupancy = []
        for lum in LUMINOSITIES:
            batch = simulate_pxd_background(geometry, args.events, seed=args.seed, luminosity=lum, scenario=name)
            occupancy.append(batch.offsets[-1] / args.events / (geometry.n_sensors * geometry.pixels_per_sensor))
        log_l, log_o = np.log(LUMINOSITIES), np.log(occupancy)
        fitted = np.polyfit(log_l, log_o, 1)[0]
        local = np.diff(log_o) / np.diff(log_l)
        print(f"| {name} | " + " | ".join(f"{100 * o:.3f} %" for o in occupancy) + f" | {fitted:.2f} | "
              + " ".join(f"{p:.2f}" for p in local) + f" | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
