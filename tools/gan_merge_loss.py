"""How many of a PXD GAN's placed pixels the overlaps of its cluster shapes take, per sensor, at and
beyond the training range. The fitted start raises each sensor's count-law level by the pixels
lost at the conditions of training events (overlap correction), one factor per sensor for all
conditions; this measures how the loss moves with the luminosity.

    python tools/gan_merge_loss.py EXPORT --machine SCENARIO [--events 200] [--factors 1 1.5 2 3]

For each factor f: `--events` events at the conditions of simulated events at f x the training
maximum (seed 101, the protocol's reference), drawn by the export (seeds 103 ..); per sensor the
pixels of the shapes its seeds drew and the hits placed. Prints the mean loss (1 - placed / drawn
over all sensors), its rms spread over the sensors, and the rms over sensors of the change of each
sensor's log(drawn / placed) since the first factor once its mean is taken out: the per-sensor
pattern a correction fixed at the first factor's conditions leaves.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from uhg.models.generator import Generator
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.train.gan_family import drawn_shape_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--machine", default="design")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--top", type=float, default=8e35)
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    fam, g = gen.family, gen.module
    first = None
    print("| L / training max | pixels lost to overlaps (mean) | spread over sensors (rms) | "
          "per-sensor change since the first factor (rms, mean removed) |")
    print("|---|---|---|---|")
    for f in args.factors:
        ref = simulate_pxd_background(gen.geometry, args.events, seed=101, luminosity=f * args.top,
                                      scenario=args.machine)
        drawn = torch.zeros(g.layout.n_units, dtype=torch.float64)
        placed = torch.zeros(g.layout.n_units, dtype=torch.float64)
        with torch.no_grad():
            for at in range(0, args.events, args.chunk):
                part = range(at, min(at + args.chunk, args.events))
                cond = {k: torch.as_tensor(ref.conditions[k][list(part)]) for k in gen.condition_names}
                d = fam.draw(g, cond, [103 * 1_000_003 + i for i in part])
                drawn += drawn_shape_pixels(g, d).cpu()
                placed += d.mask.sum(dim=(0, 2, 3)).double().cpu()
        loss = 1 - placed / drawn
        log_ratio = torch.log(drawn / placed).numpy()
        first = log_ratio if first is None else first
        change = log_ratio - first
        print(f"| {f:g} | {100 * float(1 - placed.sum() / drawn.sum()):.1f} % | "
              f"{100 * float(np.std(loss.numpy())):.1f} % | {100 * float(np.std(change)):.1f} % |", flush=True)


if __name__ == "__main__":
    main()
