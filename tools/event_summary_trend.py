"""The event summary's trend (`model.event_summary`) in and beyond the training range: which
regressors of an event's log mean cluster-token size and mean charge class carry to the top of the
range and beyond it.

    python tools/event_summary_trend.py EXPORT STORE [--split-seed 0] [NPZ ...]
    python tools/event_summary_trend.py EXPORT STORE --machine M [--factors 1 1.5 2 3] [--events 400]

The export's own tokenisation of the store's training split (`uhg train`'s; all of it, as the
summary's fit takes up to `fit_events`) gives per event the two features, its normalised
conditions c and tokens per sensor b. Each candidate design (the shipped one is
[1, c, log(1 + b)]) is fitted by least squares to the lower half of the range (`forward_split`,
as the count law's forward validation) and its bias on the upper half printed in units of each
feature's spread; then each, fitted to all training events, against the reference samples that
`tools/extrapolate_event_summary.py` kept (NPZ: one per protocol point), at their own counts.

With --machine the export's network is not used: its shape vocabulary and the summary's trend are
refitted on STORE (a training store of scenario M, `ShapeCensus` and `fit_event_summary` as the
fitted start of `uhg train` does them; the trend's predictions along the scenario's conditions do
not depend on the export's condition scaling, an affine map of the regressors), and the reference
events are simulated here, the protocol's first reference (seed 101, the same events as
`configs/extrapolate_pxd_scenarios.yaml`'s at 1.5x, 2x, 3x) at each factor of the training top
8e35. It answers whether the trend carries beyond the range on a scenario without a training.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from extrapolate_event_summary import event_features  # tools/, on the path when run as a script
from refit_share_law import training_events

from uhg.models.generator import Generator
from uhg.models.laws import forward_split
from uhg.models.transformer_clusters import ShapeCensus

CANDIDATES = {  # columns of each candidate design, from conditions c (B, C) and tokens per sensor b (B, 1)
    "[1, c, log(1+b)] (shipped)": lambda one, c, b: [one, c, torch.log1p(b)],
    "[1, c]": lambda one, c, b: [one, c],
    "[1, log(1+b)]": lambda one, c, b: [one, torch.log1p(b)],
    "[1, c, b]": lambda one, c, b: [one, c, b],
    "[1, b]": lambda one, c, b: [one, b],
    "[1, c, log(1+b), b]": lambda one, c, b: [one, c, torch.log1p(b), b],
    "[1, log(1+b), log(1+b)^2]": lambda one, c, b: [one, torch.log1p(b), torch.log1p(b).square()],
    "[1, c, c^2]": lambda one, c, b: [one, c, c.square()],
    "[1, c, log(1+b), log(1+b)^2]": lambda one, c, b: [one, c, torch.log1p(b), torch.log1p(b).square()],
}


def design(name: str, cond: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    b = counts.double().mean(1, keepdim=True)
    return torch.cat(CANDIDATES[name](torch.ones_like(b), cond.double(), b), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("store")
    ap.add_argument("npz", nargs="*")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--machine", help="refit vocabulary and trend on STORE, simulate references of this scenario")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--events", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    batch = training_events(args.store, args.split_seed, 0.1)
    if args.machine:
        census = ShapeCensus(gen.module.layout)
        census.add(batch)
        cfg = gen.module.config
        gen.module.set_shapes(census.vocabulary(cfg.cluster_shapes, cfg.cluster_max_pixels))
    parts = [event_features(gen.module, gen.family.condition_norm, batch.take(range(i, min(i + 250, len(batch)))))
             for i in range(0, len(batch), 250)]
    f, c, n = (torch.as_tensor(np.concatenate([p[k] for p in parts])) for k in ("f", "cond", "counts"))
    fit, out = forward_split(n, c)
    sd = f.std(0)
    print(f"{len(f)} training events; features mean {f.mean(0).tolist()}, sd {sd.tolist()}; "
          f"tokens per sensor up to {float(n.double().mean(1)[fit].max()):.2f} in the lower half")
    print("| design | upper-half bias, log size (sd) | upper-half bias, charge class (sd) | upper-half mse (sd^2, both) |")
    print("|---|---|---|---|")
    for name in CANDIDATES:
        x = design(name, c, n)
        w = torch.linalg.lstsq(x[fit], f[fit], driver="gelsd").solution
        r = (f[out] - x[out] @ w) / sd
        print(f"| {name} | {float(r[:, 0].mean()):+.3f} | {float(r[:, 1].mean()):+.3f} | {float(r.square().sum(1).mean()):.3f} |")
    full = {name: torch.linalg.lstsq(design(name, c, n), f, driver="gelsd").solution for name in CANDIDATES}
    samples = [(path, np.load(path)) for path in args.npz]
    if args.machine:
        from uhg.eval.extrapolate import simulate_reference

        geometry = gen.family.geometry
        ref_factors = [x for x in args.factors if x != 1.0]  # the protocol's points: event streams k * events
        for x in args.factors:
            first = args.events * (ref_factors.index(x) if x in ref_factors else len(ref_factors))
            ref = simulate_reference(geometry, "luminosity", x * 8e35, args.events, 101, first, args.machine)
            e = event_features(gen.module, gen.family.condition_norm, ref)
            samples.append((f"{args.machine} {x}x", {f"reference_{k}": v for k, v in e.items()}))
    for path, d in samples:
        for role in ("reference", "reference 2", "generated"):
            if f"{role}_f" not in d:
                continue
            rf, rc, rn = (torch.as_tensor(d[f"{role}_{k}"]) for k in ("f", "cond", "counts"))
            print(f"{path} {role}: c[0] {float(rc[:, 0].mean()):.2f}, tokens per sensor {float(rn.double().mean()):.1f}, "
                  f"log size {float(rf[:, 0].mean()):.4f} (sd {float(rf[:, 0].std()):.4f}), charge class "
                  f"{float(rf[:, 1].mean()):.4f} (sd {float(rf[:, 1].std()):.4f})")
            if role == "generated":
                continue
            for name, w in full.items():
                e = (design(name, rc, rn) @ w - rf).mean(0)
                print(f"    {name:28s} trend - observed: log size {float(e[0]):+.4f}, charge class {float(e[1]):+.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
