"""Does training the count law with the network move its extrapolation? Fit the default count
law to hits per sensor of one machine scenario in the training range (as `uhg train` starts it),
then train it further the way the transformer's optimiser would: AdamW on 8-event batches of the
law's own log-likelihood per hit (the only term of the loss that depends on the law's parameters),
at `law_lr` x the network's learning rate, for as many steps as the shipped mini config. Prints,
per law_lr, the predicted mean occupancy at 1x, 1.5x, 2x and 3x the training maximum as error
against simulated reference events: mean and standard deviation over `--orders` batch orders.

    python tools/count_law_drift.py [--scenario high-vacuum] [--train-events 2000] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import CountLaw, fit_count_law
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS

TRAIN = (2e35, 8e35)
FACTORS = (1.0, 1.5, 2.0, 3.0)


def counts_of(batch, n_sensors: int) -> np.ndarray:
    idx = batch.event_index() * n_sensors + batch.columns["sensor"]
    return np.bincount(idx, minlength=len(batch) * n_sensors).reshape(len(batch), n_sensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="pxd-mini")
    parser.add_argument("--scenario", default="high-vacuum")
    parser.add_argument("--train-events", type=int, default=2000)
    parser.add_argument("--test-events", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--law-lr", type=float, nargs="*", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--orders", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(args.geometry)
    train = simulate_pxd_background(g, args.train_events, seed=1, luminosity=TRAIN[0], luminosity_max=TRAIN[1],
                                    scenario=args.scenario)
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    counts = torch.as_tensor(counts_of(train, g.n_sensors)).float()
    cond = norm({k: torch.as_tensor(train.conditions[k]) for k in norm.names}).float()
    tests = []
    for f in FACTORS:
        ref = simulate_pxd_background(g, args.test_events, seed=101, luminosity=f * TRAIN[1], scenario=args.scenario)
        c = norm({k: torch.as_tensor(ref.conditions[k]) for k in norm.names}).float()
        tests.append((f, c, ref.hits_per_event.mean() / g.n_channels))
    torch.manual_seed(0)
    fitted = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, "quadratic", bootstrap=0)
    fit_count_law(fitted, counts.double(), cond.double())
    print(f"| law_lr (x {args.lr:g}) | " + " | ".join(f"{f:g}x" for f in FACTORS) + " |")
    print("|---|" + "---|" * len(FACTORS))
    for scale in args.law_lr:
        errors = np.array([drifted_errors(fitted, counts, cond, tests, args, scale, order)
                           for order in range(args.orders if scale > 0 else 1)])
        cells = [f"{m:+.1f} ± {sd:.1f} %" for m, sd in zip(errors.mean(0), errors.std(0), strict=True)]
        print(f"| {scale:g} | " + " | ".join(cells) + " |", flush=True)


def drifted_errors(fitted, counts, cond, tests, args, scale: float, order: int) -> list[float]:
    """Errors (%) of the mean occupancy predicted at the test points after `args.steps` AdamW
    steps at lr x scale on batches drawn in batch order `order`."""
    law = copy.deepcopy(fitted)
    opt = torch.optim.AdamW(law.parameters(), lr=args.lr * scale, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(order)
    for _ in range(args.steps if scale > 0 else 0):
        idx = torch.randint(len(counts), (args.batch_size,), generator=gen)
        loss = -law.log_prob(counts[idx], cond[idx]).sum() / counts[idx].sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [100 * (float(law.mean_occupancy(c).mean()) / ref - 1) for _, c, ref in tests]

if __name__ == "__main__":
    main()
