"""Does a per-layer count law carry the longitudinal profile of a digital calorimeter beyond its
training range? Fits `uhg.models.laws.CountLaw` with one unit per layer to the hits per layer of
simulated training showers and compares, in the training range and at multiples of its top
energy, the law's mean hits per layer (and the shower depth of showers drawn from it) with
simulated reference showers.

    python tools/layer_count_study.py [--geometry epical-mini] [--train-events 4000] [--test-events 300] [--split]

Training showers: log-uniform 1-16 GeV (seed 1, as configs/epical_transformer_mini.yaml);
references: seeds 101 and 102 (the second gives the floor: reference vs reference). Prints a
Markdown table per form and factor count: hits-per-layer mean relative error (MRE, the
`energy_per_layer` profile of `uhg eval`) and the relative error of the mean depth (hit-weighted
layer), each with its floor, and the separation power of the pixels per shower (`uhg eval`'s
hits per shower) with its floor. The law sees only the counts and the incident energies.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uhg.eval.distances import common_binning, separation_power_samples
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import CountLaw, LayerShareLaw, fit_count_law, fit_share_law
from uhg.sim.calo import simulate_calo_showers

TRAIN = (1000.0, 16000.0)
FACTORS = (1.0, 2.0, 5.0)


def layer_counts(batch, n_layers: int) -> np.ndarray:
    idx = batch.event_index() * n_layers + batch.columns["layer"].astype(np.int64)
    return np.bincount(idx, minlength=len(batch) * n_layers).reshape(len(batch), n_layers)


def mre(test: np.ndarray, ref: np.ndarray) -> float:
    keep = ref != 0
    return float(np.mean(np.abs(test[keep] / ref[keep] - 1)))


def depth(counts: np.ndarray) -> np.ndarray:
    layers = np.arange(counts.shape[1])
    return (counts * layers).sum(1) / np.maximum(counts.sum(1), 1)


def spread(counts: np.ndarray) -> float:
    total = counts.sum(1)
    return float(total.std() / total.mean())


def total_sp(test: np.ndarray, ref: np.ndarray) -> float:
    """Separation power of the pixels per shower (log bins, as `uhg eval`'s hits per shower)."""
    a, b = test.sum(1).astype(np.float64), ref.sum(1).astype(np.float64)
    return separation_power_samples(a, b, common_binning([a, b], "log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="epical-mini")
    parser.add_argument("--train-events", type=int, default=4000)
    parser.add_argument("--test-events", type=int, default=300)
    parser.add_argument("--forms", nargs="*", default=["quadratic", "power", "unit_quadratic"])
    parser.add_argument("--factors", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--split", action="store_true",
                        help="also the hierarchical law: total from a one-unit law of each form, split by LayerShareLaw")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(args.geometry)
    n_lay = g.n_layers
    t0 = time.perf_counter()
    train = simulate_calo_showers(g, args.train_events, seed=1, energy_min=TRAIN[0], energy_max=TRAIN[1])
    norm = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])
    n_train = torch.as_tensor(layer_counts(train, n_lay)).double()
    c_train = norm({"incident_energy": torch.as_tensor(train.conditions["incident_energy"])}).double()
    tests = []
    for f in FACTORS:
        kw = ({"energy_min": TRAIN[0], "energy_max": TRAIN[1]} if f == 1.0
              else {"energy_min": f * TRAIN[1], "energy_max": f * TRAIN[1]})
        ref = simulate_calo_showers(g, args.test_events, seed=101, **kw)
        ref2 = simulate_calo_showers(g, args.test_events, seed=102, **kw)
        tests.append((f, ref, layer_counts(ref, n_lay), layer_counts(ref2, n_lay)))
    sim_s = time.perf_counter() - t0
    print("| law | copula factors | E / training max | hits per layer MRE (floor) | mean depth error (floor) "
          "| depth std: law / reference | pixels per shower, std / mean: law / reference (reference 2) "
          "| hits per shower SP (floor) |")
    print("|---|---|---|---|---|---|---|---|")
    variants = [(form, k, False) for form in args.forms for k in args.factors]
    variants += [(form, 1, True) for form in args.forms] if args.split else []
    for form, k, split in variants:
        torch.manual_seed(0)
        t1 = time.perf_counter()
        if split:
            law = CountLaw(1, 1, sum(g.cells_per_layer), form).double()
            fit_count_law(law, n_train.sum(1, keepdim=True), c_train, seed=0)
            shares = LayerShareLaw(n_lay, 1).double()
            fit_share_law(shares, n_train, c_train)
        else:
            law = CountLaw(n_lay, 1, list(g.cells_per_layer), form, factors=k).double()
            fit_count_law(law, n_train, c_train, seed=0)
        fit_s = time.perf_counter() - t1
        for f, ref, n_ref, n_ref2 in tests:
            cond = norm({"incident_energy": torch.as_tensor(ref.conditions["incident_energy"])}).double()
            B = len(cond)
            gen = torch.Generator().manual_seed(7)
            units = 1 if split else n_lay
            with torch.no_grad():
                draws, _ = law.sample(torch.rand(B * units, generator=gen, dtype=torch.float64),
                                      torch.rand(B, k, generator=gen, dtype=torch.float64), cond, 1 << 20)
            if split:
                n_law = shares.sample(draws, cond, torch.rand(B, 2 * n_lay, generator=gen, dtype=torch.float64),
                                      torch.tensor(g.cells_per_layer)).numpy()
            else:
                n_law = draws.view(B, n_lay).numpy()
            d_ref, d_ref2, d_law = depth(n_ref), depth(n_ref2), depth(n_law)
            name = f"{form} total + shares" if split else form
            print(f"| {name} | {'-' if split else k} | {f:g} | {mre(n_law.mean(0), n_ref.mean(0)):.3f} "
                  f"({mre(n_ref2.mean(0), n_ref.mean(0)):.3f}) | {100 * (d_law.mean() / d_ref.mean() - 1):+.2f} % "
                  f"({100 * (d_ref2.mean() / d_ref.mean() - 1):+.2f} %) | {d_law.std():.3f} / {d_ref.std():.3f} | "
                  f"{spread(n_law):.4f} / {spread(n_ref):.4f} ({spread(n_ref2):.4f}) | "
                  f"{total_sp(n_law, n_ref):.3f} ({total_sp(n_ref2, n_ref):.3f}) |", flush=True)
        print(f"<!-- {name}: fit {fit_s:.1f} s; simulation {sim_s:.0f} s -->", flush=True)

if __name__ == "__main__":
    main()
