"""How stable is the share law's extrapolation against the training sample? Fits
`uhg.models.laws.LayerShareLaw` to the pixels per layer of simulated training showers (1-16 GeV,
seed 1, as configs/epical_transformer_mini.yaml) and to subsets of them, and prints the depth
(hit-weighted layer) of the fitted mean shares at a test energy beside that of simulated
reference showers there (seed 101).

    python tools/share_law_subset.py [--train-events 4000] [--subsets 3600] [--energy 32000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import LayerShareLaw, fit_share_law
from uhg.sim.calo import simulate_calo_showers

TRAIN = (1000.0, 16000.0)


def layer_counts(batch, n_layers: int) -> np.ndarray:
    idx = batch.event_index() * n_layers + batch.columns["layer"].astype(np.int64)
    return np.bincount(idx, minlength=len(batch) * n_layers).reshape(len(batch), n_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="epical-mini")
    parser.add_argument("--train-events", type=int, default=4000)
    parser.add_argument("--subsets", nargs="*", type=int, default=[3600], help="fit also to the first N showers")
    parser.add_argument("--energy", type=float, default=32000.0, help="test energy, MeV")
    parser.add_argument("--test-events", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(args.geometry)
    layers = np.arange(g.n_layers)
    train = simulate_calo_showers(g, args.train_events, seed=1, energy_min=TRAIN[0], energy_max=TRAIN[1])
    norm = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])
    n = torch.as_tensor(layer_counts(train, g.n_layers)).double()
    c = norm({"incident_energy": torch.as_tensor(train.conditions["incident_energy"])}).double()
    ref = layer_counts(simulate_calo_showers(g, args.test_events, seed=101, energy_min=args.energy,
                                             energy_max=args.energy), g.n_layers).mean(0)
    at = norm({"incident_energy": torch.tensor([args.energy])}).double()
    print(f"reference depth at {args.energy:g} MeV: {(ref * layers).sum() / ref.sum():.3f} layers")
    for k in [args.train_events, *args.subsets]:
        law = LayerShareLaw(g.n_layers, 1).double()
        t0 = time.perf_counter()
        fit_share_law(law, n[:k], c[:k])
        with torch.no_grad():
            shares = law.mean_shares(at)[0].numpy()
        print(f"first {k} training showers: depth of the mean shares {(shares * layers).sum():.3f} layers "
              f"(fit {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
