"""Where a PXD GAN's occupancy beyond the training range parts from the reference, stage by stage:
per event at the conditions of simulated reference events (seed 101) at each factor of the
training maximum, the reference's hits, clusters (8-connected) and census (the clusters the GAN's
fitted start counts, `census_count_law.census`) against the export's count-law mean, the seeds it
places (the law's draws), the pixels of the shapes those seeds draw, the hits placed and the
clusters the placed hits make (4-connected, as the fitted start counts them); generation seeds
103 x 1000003 + i, as `tools/gan_merge_loss.py`.

    python tools/gan_count_split.py EXPORT SCENARIO [EVENTS] [FACTORS, e.g. 1,1.5,2,3]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from census_count_law import census, census_hits  # tools/, on the path when run as a script

from uhg.eval.features_pxd import clusters_per_image, per_image
from uhg.models.generator import Generator
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.clusters import connected_pixels
from uhg.train.gan_family import drawn_shape_pixels

TOP = 8e35  # the top of the training range


def main() -> None:
    torch.set_num_threads(1)
    export, machine = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    factors = [float(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "1,1.5,2,3").split(",")]
    gen = Generator.load(export)
    fam, g, geo = gen.family, gen.module, gen.geometry
    lay = g.layout
    print("| L / training max | reference hits / clusters / census / pixels per census cluster | law mean vs census | "
          "seeds vs census | drawn pixels per seed vs reference per census cluster | placed / drawn pixels | "
          "generated clusters vs reference | generated hits vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for f in factors:
        ref = simulate_pxd_background(geo, n, seed=101, luminosity=f * TOP, scenario=machine)
        hits, clusters = per_image(ref, geo).sum(1).mean(), clusters_per_image(ref, geo).sum(1).mean()
        counted, counted_hits = census(ref, geo).sum(1).mean(), census_hits(ref, geo).sum(1).mean()
        law = seeds = drawn = placed = made = 0.0
        with torch.no_grad():
            for at in range(0, n, 20):
                part = list(range(at, min(at + 20, n)))
                cond = {k: torch.as_tensor(ref.conditions[k][part]) for k in gen.condition_names}
                law += float(g.counts.mean(fam.condition_norm(cond).to(g.counts.positions.dtype)).sum())
                d = fam.draw(g, cond, [103 * 1_000_003 + i for i in part])
                seeds += float(d.seeds.sum())
                drawn += float(drawn_shape_pixels(g, d).sum())
                placed += float(d.mask.sum())
                on = d.mask.nonzero().cpu().numpy()
                made += connected_pixels(on[:, 0] * lay.n_units + on[:, 1], on[:, 2], on[:, 3], lay.height, lay.width)[1]
        law, seeds, drawn, placed, made = (x / n for x in (law, seeds, drawn, placed, made))
        per_census = counted_hits / counted
        print(f"| {f:g}x | {hits:.0f} / {clusters:.1f} / {counted:.1f} / {per_census:.3f} | {law / counted - 1:+.1%} | "
              f"{seeds / counted - 1:+.1%} | {drawn / seeds / per_census - 1:+.1%} | {placed / drawn:.3f} | "
              f"{made / clusters - 1:+.1%} | {placed / hits - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
