"""The count law of an exported transformer against reference events, in the law's own units:
hits per pixel, or with `token: cluster` the reference's clusters split into the model's shape
vocabulary per pixel (what the law counts). Tells a miss of the law apart from a miss of the
network that places the hits.

    python tools/count_law_check.py EXPORT --machine SCENARIO [--events 200] [--seed 101]

Prints, at 1x, 1.5x, 2x and 3x the training maximum (8e35 unless --top), the law's predicted
mean occupancy as error against the reference with its bootstrap band, and the reference's
token and hit occupancies.
"""

from __future__ import annotations

import argparse

import torch

from uhg.eval.extrapolate import count_law_band
from uhg.models.generator import Generator
from uhg.sim.pxd_background import simulate_pxd_background


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--machine", default="design")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--top", type=float, default=8e35)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    g = gen.geometry
    print("| L / training max | law error [band] | reference law units [%] | reference hits [%] |")
    print("|---|---|---|---|")
    for f in (1.0, 1.5, 2.0, 3.0):
        ref = simulate_pxd_background(g, args.events, seed=args.seed, luminosity=f * args.top, scenario=args.machine)
        band = count_law_band(gen, ref)["law mean occupancy [%]"]
        r = band["reference"]
        print(f"| {f:g} | {100 * (band['predicted'] / r - 1):+.1f} % [{100 * (band['band low'] / r - 1):+.1f}, "
              f"{100 * (band['band high'] / r - 1):+.1f}] | {r:.3f} | {100 * ref.n_hits / (len(ref) * g.n_channels):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
