"""Why a sample's per-sensor occupancy misses the reference beyond the training range: its
per-sensor error split into a mean bias (the same on every sensor), a per-sensor pattern bias
and sampling noise, for the generated events of an export, the naive overlay baseline and count
laws fitted to the training events' clusters per sensor.

    python tools/per_sensor_error.py --machine SCENARIO [--export EXPORT] [--events 2000]
        [--factors 1.5 2 3] [--forms quadratic ...] [--train-events 4000] [--protocol-events 400]

Truth per sensor: the mean of two independent reference samples of `--events` each (seeds 101,
102, as the protocol's reference and second reference); overlay: training-maximum events of
seed 104 superimposed as in `uhg eval extrapolate`; generated: the export at the reference's
conditions, seed 103. For each sample and test point (rows): the relative error of the mean
occupancy (the mean bias), the rms over sensors of the relative error once the mean bias is
taken out, corrected for the noise of the two sample means (the pattern bias; 0 when the noise
explains it all), the rms noise of one sensor's relative error at `--events`, the MRE against
the truth at `--events`, and the MRE the protocol would expect at `--protocol-events` per sample
(its bootstrap resampling doubles each sample's variance): sum of the biases and that noise,
averaged over Gaussian noise draws. Laws: CountLaw fitted to clusters per sensor (8-connected
pixels) of `--train-events` training events (2e35-8e35 log-uniform, seed 1, the training
stores' seed), compared with the truth's clusters per sensor (no sampling noise on the law).
An export with a count law (the GAN's) adds two rows in clusters: its generated events' clusters
and its own law's expected seeds per sensor (the fit after the overlap and merge corrections,
which raise each level by the hits that placed shapes lose to merging), against the truth's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uhg.eval.baselines import overlay_baseline
from uhg.eval.features_pxd import clusters_per_image, per_image
from uhg.geometry import get_geometry
from uhg.models import laws as laws_module
from uhg.models.common import ConditionNorm
from uhg.models.laws import CountLaw, fit_count_law
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS

TRAIN = (2e35, 8e35)
DEFAULT_GRID = laws_module.SHRINK_GRID


def split(mean_s: np.ndarray, var_s: np.ndarray | None, n_s: int, truth: np.ndarray, var_truth: np.ndarray,
          var_ref: np.ndarray, n_protocol: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean bias, pattern bias, noise and MREs of a sample's per-sensor means `mean_s` against `truth`."""
    rel = mean_s / truth - 1
    mean_bias = mean_s.sum() / truth.sum() - 1
    noise2 = var_truth / truth ** 2 + (0 if var_s is None else var_s / n_s / truth ** 2)
    pattern = rel - mean_bias
    pattern_rms = float(np.sqrt(max(np.mean(pattern ** 2) - np.mean(noise2), 0.0)))
    # the protocol compares bootstrap resamples of two samples of n_protocol events: each sample
    # mean carries its variance twice (sampling + resampling); the law has no sampling noise
    sd = np.sqrt(2 * (var_ref + (0 if var_s is None else var_s)) / n_protocol) / truth
    z = rng.standard_normal((400, len(truth)))
    expected = float(np.mean(np.abs(rel[None] + sd[None] * z)))
    return {"mean bias": float(mean_bias), "pattern bias": pattern_rms, "noise": float(np.sqrt(np.mean(noise2))),
            "MRE": float(np.mean(np.abs(rel))), "expected protocol MRE": expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="design")
    parser.add_argument("--export", default=None)
    parser.add_argument("--geometry", default="pxd-mini")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--protocol-events", type=int, default=400)
    parser.add_argument("--factors", type=float, nargs="*", default=[1.5, 2.0, 3.0])
    parser.add_argument("--forms", nargs="*", default=[],
                        help="count law forms to fit: FORM, or FORM@RIDGE with the quadratic law's per-unit ridge "
                             "fixed at RIDGE instead of chosen on held-out events (quadratic only: the pooled law "
                             "always chooses its curvature ridge by forward validation and its per-unit ridge on "
                             "held-out events)")
    parser.add_argument("--train-events", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(args.geometry)
    rng = np.random.default_rng(0)
    laws = {}
    if args.forms:
        train = simulate_pxd_background(g, args.train_events, seed=1, luminosity=TRAIN[0], luminosity_max=TRAIN[1],
                                        scenario=args.machine)
        norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                         list(CONDITIONS))
        n_train = torch.as_tensor(clusters_per_image(train, g)).double()
        c_train = norm({k: torch.as_tensor(train.conditions[k]) for k in norm.names}).double()
        for label in args.forms:
            form, _, fixed = label.partition("@")
            laws_module.SHRINK_GRID = (float(fixed),) if fixed else DEFAULT_GRID
            law = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, form).double()
            fitted = fit_count_law(law, n_train, c_train, seed=0)
            curvature = f", curvature ridge {fitted['law_curvature_ridge']}" if "law_curvature_ridge" in fitted else ""
            print(f"<!-- law {label}: per-unit ridge {fitted['law_shrink']}{curvature} -->", flush=True)
            laws[label] = law
    gen = None
    if args.export:
        from uhg.models.generator import Generator

        gen = Generator.load(args.export)
    n = args.events
    print(f"{args.machine}: per-sensor occupancy error against the truth of {2 * n} reference events; "
          f"expected protocol MRE at {args.protocol_events} events per sample")
    print("| L / training max | sample | mean bias | pattern bias (rms) | noise per sensor at N (rms) | MRE at N | "
          "expected protocol MRE |")
    print("|---|---|---|---|---|---|---|")
    for f in args.factors:
        t0 = time.perf_counter()
        lum = f * TRAIN[1]
        ref = simulate_pxd_background(g, n, seed=101, luminosity=lum, scenario=args.machine)
        ref2 = simulate_pxd_background(g, n, seed=102, luminosity=lum, scenario=args.machine)
        base_rng = np.random.default_rng([104, 0])
        base = overlay_baseline(lambda m, off: simulate_pxd_background(g, m, 104, first_event=off, luminosity=TRAIN[1],
                                                                       scenario=args.machine), g, f, n, base_rng)
        h = {"reference 2": per_image(ref2, g), "overlay": per_image(base, g)}
        h_ref = per_image(ref, g)
        made = None
        if gen is not None:
            conds = {k: ref.conditions[k] for k in gen.condition_names}
            made = gen.generate(conds, seed=103, batch_size=args.batch_size)
            h["generated"] = per_image(made, g)
        both = np.concatenate([h_ref, h["reference 2"]])
        truth, var_truth = both.mean(0), both.var(0) / len(both)
        var_ref = h_ref.var(0)
        rows = {}
        for name, x in h.items():
            rows[name] = split(x.mean(0), x.var(0), len(x), truth, var_truth, var_ref, args.protocol_events, rng)
        law_of_export = getattr(gen.module, "counts", None) if gen is not None else None
        if laws or law_of_export is not None:
            c_both = np.concatenate([clusters_per_image(ref, g), clusters_per_image(ref2, g)])
            c_truth, c_var = c_both.mean(0), c_both.var(0) / len(c_both)
        if law_of_export is not None:  # a GAN's count law: where its hits per sensor part from the truth's
            c_made = clusters_per_image(made, g)
            rows["generated (clusters)"] = split(c_made.mean(0), c_made.var(0), len(c_made), c_truth, c_var,
                                                 c_both.var(0), args.protocol_events, rng)
            cond = gen.family.condition_norm({k: torch.as_tensor(ref.conditions[k]) for k in gen.condition_names})
            with torch.no_grad():
                pred = law_of_export.mean(cond.to(law_of_export.bias)).double().mean(0).numpy()
            rows["export's law, seeds (clusters)"] = split(pred, None, 1, c_truth, c_var, c_both.var(0),
                                                            args.protocol_events, rng)
        if laws:
            for name, law in laws.items():
                cond = norm({k: torch.as_tensor(ref.conditions[k]) for k in norm.names}).double()
                with torch.no_grad():
                    pred = law.mean(cond).mean(0).numpy()
                rows[f"law {name} (clusters)"] = split(pred, None, 1, c_truth, c_var, c_both.var(0),
                                                       args.protocol_events, rng)
            c_base = clusters_per_image(base, g)
            rows["overlay (clusters)"] = split(c_base.mean(0), c_base.var(0), len(c_base), c_truth, c_var,
                                               c_both.var(0), args.protocol_events, rng)
        for name, r in rows.items():
            print(f"| {f:g} | {name} | {100 * r['mean bias']:+.1f} % | {100 * r['pattern bias']:.1f} % | "
                  f"{100 * r['noise']:.1f} % | {r['MRE']:.3f} | {r['expected protocol MRE']:.3f} |", flush=True)
        print(f"<!-- {f:g}x: {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
