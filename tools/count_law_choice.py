"""The pooled count law's ridge choices on a scenario's training clusters: every candidate's mean
held-out loss, its difference to the best and the paired standard error of that difference, the
lowest-score choice and `strongest_within_noise`'s, for the forward validation of both ridges and
then the held-out events' per-unit ridge (`choose_pooled`). Counts: all 8-connected clusters per
sensor or the census a PXD GAN fits (clusters in its shape window) of 4000 training events
(2e35-8e35, seed 1, as the training stores).

    python tools/count_law_choice.py SCENARIO all,census
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

import uhg.models.laws as laws
from uhg.eval.features_pxd import clusters_per_image
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS
from uhg.train.gan_family import cluster_shape_keys


def main() -> None:
    torch.set_num_threads(1)
    machine, g = sys.argv[1], get_geometry("pxd-mini")
    train = simulate_pxd_background(g, 4000, seed=1, luminosity=2e35, luminosity_max=8e35, scenario=machine)
    _, sensors, events = cluster_shape_keys(train, g)
    census = np.zeros((len(train), g.n_sensors))
    np.add.at(census, (events, sensors), 1.0)
    counts_of = {"all": clusters_per_image(train, g), "census": census}
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    cond = norm({k: torch.as_tensor(train.conditions[k]) for k in CONDITIONS}).double()
    choose = laws.strongest_within_noise

    def logged(losses):
        means = [float(x.mean()) for x in losses]
        best = int(np.argmin(means))
        for i, x in enumerate(losses):
            diff = x - losses[best]
            print(f"    candidate {i}: mean {means[i]:.4e}, difference {means[i] - means[best]:+.2e}, "
                  f"paired se {float(diff.std() / math.sqrt(len(diff))):.1e}", flush=True)
        chosen = choose(losses)
        print(f"   lowest score -> {best}, strongest within the noise -> {chosen}", flush=True)
        return chosen

    laws.strongest_within_noise = logged
    for name in sys.argv[2].split(","):
        counts = torch.as_tensor(counts_of[name]).double()
        law = laws.CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, "pooled").double()
        print(f"{name}: forward validation (strongest first: curvature ridge 1e8, 1e5, 0 x per-unit ridge "
              f"3e5 .. 300), then the per-unit ridge on held-out events (3e5 .. 300)", flush=True)
        print(f"  chosen (per-unit, curvature): {laws.choose_pooled(law, counts, cond)}", flush=True)


if __name__ == "__main__":
    main()
