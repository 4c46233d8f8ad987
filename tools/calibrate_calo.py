"""Measure the calorimeter reference simulator: response, resolution, shower depth and speed vs energy.

    python tools/calibrate_calo.py --geometry ds2 --events 400 [--energies 1e3,1e4,1e5,1e6] [--markdown]

For each fixed incident energy (MeV) it simulates `--events` showers and prints
- response <E_dep / E_inc> (analog) or hits per GeV (digital),
- relative resolution sigma(E_dep) / <E_dep> (or of the hit count), with its statistical error,
- energy-weighted mean layer (shower depth) and mean hits per shower,
- wall-clock and process CPU time per shower (ms, single process; CPU time is the figure to
  trust on a shared machine).
The table in docs/calorimeter.md comes from this script.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers


def measure(name: str, energy_mev: float, n_events: int, seed: int = 12345) -> dict[str, float]:
    geometry = get_geometry(name)
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = simulate_calo_showers(geometry, n_events, seed, energies=np.full(n_events, energy_mev))
    ms = (time.perf_counter() - start) / n_events * 1e3
    cpu_ms = (time.process_time() - cpu_start) / n_events * 1e3
    event = batch.event_index()
    value = batch.columns["value"].astype(np.float64)
    e_dep = np.bincount(event, weights=value, minlength=n_events)
    depth = np.bincount(event, weights=value * batch.columns["layer"], minlength=n_events) / np.maximum(e_dep, 1e-30)
    mean, std = e_dep.mean(), e_dep.std(ddof=1)
    res = std / mean
    return {
        "energy_gev": energy_mev / 1e3,
        "response": mean / energy_mev if geometry.readout == "analog" else mean / (energy_mev / 1e3),
        "resolution": res,
        "resolution_err": res / math.sqrt(2 * (n_events - 1)),
        "mean_layer": float(depth.mean()),
        "hits": float(batch.hits_per_event.mean()),
        "ms_per_shower": ms,
        "cpu_ms_per_shower": cpu_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="ds2")
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--energies", default="1e3,1e4,1e5,1e6", help="comma-separated MeV")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    digital = get_geometry(args.geometry).readout == "digital"
    head = ["E (GeV)", "hits/GeV" if digital else "E_dep/E_inc", "sigma/E", "sigma/E * sqrt(E/GeV)",
            "mean layer", "hits/shower", "wall ms/shower", "CPU ms/shower"]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(head))
    for e in (float(v) for v in args.energies.split(",")):
        m = measure(args.geometry, e, args.events)
        err = m["response"] * m["resolution"] / math.sqrt(args.events)  # statistical error of the mean
        row = [f"{m['energy_gev']:g}",
               f"{m['response']:.4f} ± {err:.4f}" if not digital else f"{m['response']:.1f} ± {err:.1f}",
               f"{m['resolution']:.4f} ± {m['resolution_err']:.4f}",
               f"{m['resolution'] * math.sqrt(m['energy_gev']):.3f}", f"{m['mean_layer']:.2f}",
               f"{m['hits']:.0f}", f"{m['ms_per_shower']:.2f}", f"{m['cpu_ms_per_shower']:.2f}"]
        print(("| " + " | ".join(row) + " |") if args.markdown else "  ".join(row))


if __name__ == "__main__":
    main()
