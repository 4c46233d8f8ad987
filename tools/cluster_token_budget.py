"""Where a cluster-token transformer's per-sensor occupancy and cluster charge go wrong, step by
step from the count law to the decoded pixels, against simulated reference events.

    python tools/cluster_token_budget.py EXPORT [--machine design] [--events 300] [--luminosity 8e35] [--law-events 4000]
    python tools/cluster_token_budget.py EXPORT --training-store STORE   # the law against its training events

Per sensor, means over the events (reference: simulated with seed 101, encoded into the model's
shape vocabulary; generated: the model's own tokens before decoding, then the decoded events):

- law: the count law's mean tokens against the reference's tokens (a miss of the law);
- drawn: the tokens the law drew against its own mean (sampling noise of the draws);
- pixels per token: the drawn shapes' pixels per token against the reference's (the shape head);
- kept: decoded hits against the drawn shapes' pixels (pixels lost where tokens overlap);
- hits: decoded hits against the reference's hits (what the per-sensor occupancy MRE sees).

Each line gives the mean relative difference over sensors and its mean relative error (MRE);
floors compare a second reference sample of the same size (seed 102) with the first.
Then, per token size: the mean token charge (ADC summed over the token's pixels) generated
against the reference, the share of generated tokens whose summed charge lies outside the
charge class they were drawn with, and the mean charge of the evaluation's clusters by size.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.data.reader import open_store
from uhg.models.generator import Generator
from uhg.models.transformer_clusters import charge_classes, decode_clusters, encode_clusters
from uhg.models.transformer_sampling import generate_tokens
from uhg.seeding import event_seed
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.clusters import connected_pixels


def per_unit(values: np.ndarray, unit: np.ndarray, n_units: int, n_events: int) -> np.ndarray:
    return np.bincount(unit, weights=values, minlength=n_units) / n_events


def token_table(model, rows, values, lengths, first: int):
    """(unit of each token, size, summed ADC, charge class) of real tokens; `first` is the slot
    of the first token (1 in encoded sequences, whose slot 0 is the start token)."""
    t = torch.arange(rows.shape[1])[None]
    keep = (t >= first) & (t < lengths[:, None] + first)
    unit = (torch.arange(rows.shape[0])[:, None].expand_as(keep)[keep] % model.layout.n_units).numpy()
    v = values[keep]
    size = model.shape_table()[1][v[:, 0]]
    valid = torch.arange(v.shape[1] - 2)[None] < size[:, None]
    adc = ((v[:, 2:] + model.layout.adc_threshold) * valid).sum(1)
    return unit, size.numpy(), adc.double().numpy(), v[:, 1].numpy()


def cluster_charge_by_size(model, batch) -> dict[int, tuple[float, int]]:
    c = batch.columns
    image = batch.event_index() * model.layout.n_units + np.asarray(c["sensor"], np.int64)
    labels, n = connected_pixels(image, np.asarray(c["row"], np.int64), np.asarray(c["col"], np.int64),
                                 model.layout.n_rows, model.layout.n_cols)
    size = np.bincount(labels, minlength=n)
    charge = np.bincount(labels, weights=np.asarray(c["value"], np.float64), minlength=n)
    return {s: (float(charge[size == s].mean()), int((size == s).sum())) for s in range(1, 9) if (size == s).any()}


def law_on_training_store(model, family, path: str, geometry) -> None:
    """The count law's mean tokens against the training events' own tokens, per layer, in four
    luminosity slices equal in log L: tells a law that misfits its data from one that fits."""
    L, U = model.layout, model.layout.n_units
    counts, conds = [], {}
    for b in open_store(path).iter_batches():
        t = encode_clusters(b, L, model.shape_vocab(), model.config.cluster_charge_bins)
        counts.append(t.lengths.view(-1, U).double().numpy())
        for k, v in b.conditions.items():
            conds.setdefault(k, []).append(np.asarray(v, np.float64))
    n = np.concatenate(counts)
    c = {k: np.concatenate(v) for k, v in conds.items()}
    with torch.inference_mode():
        law = model.counts.mean(family.condition_norm({k: torch.as_tensor(v) for k, v in c.items()})).double().numpy()
    layer = np.asarray([s.layer for s in geometry.sensors])
    lum = c["luminosity"]
    edges = np.geomspace(lum.min(), lum.max() * (1 + 1e-9), 5)
    print("| luminosity slice | events | law / data - 1, per layer | MRE over sensors |")
    print("|---|---|---|---|")
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (lum >= lo) & (lum < hi)
        d = law[m].mean(0) / n[m].mean(0) - 1
        per_layer = " / ".join(f"{100 * d[layer == k].mean():+.2f} %" for k in np.unique(layer))
        print(f"| {lo:.2g}-{hi:.2g} | {int(m.sum())} | {per_layer} | {100 * np.abs(d).mean():.2f} % |")


def rel(a: np.ndarray, b: np.ndarray) -> str:
    d = a / b - 1
    return f"{100 * d.mean():+.2f} % | {100 * np.abs(d).mean():.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--machine", default="design")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--luminosity", type=float, default=8e35)
    parser.add_argument("--seed", type=int, default=7, help="generation seed")
    parser.add_argument("--batch", type=int, default=50, help="events generated together")
    parser.add_argument("--training-store", default=None,
                        help="only the count law against this training store's tokens, per layer in four luminosity slices")
    parser.add_argument("--law-events", type=int, default=0,
                        help="also the count law against this many further reference events (seed 103)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    model, family = gen.module, gen.family
    if not getattr(model, "clusters", False):
        parser.error(f"{args.export} is not a cluster-token transformer")
    L, E, U = model.layout, args.events, model.layout.n_units
    if args.training_store:
        law_on_training_store(model, family, args.training_store, gen.geometry)
        return
    ref = simulate_pxd_background(gen.geometry, E, seed=101, luminosity=args.luminosity, scenario=args.machine)
    conds = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in ref.conditions.items()}
    cond = family.condition_norm(conds)
    tok = encode_clusters(ref, L, model.shape_vocab(), model.config.cluster_charge_bins)
    r_unit, r_size, r_adc, _ = token_table(model, tok.rows, tok.values, tok.lengths, 1)
    parts, g_tabs, targets = [], [], []
    for lo in range(0, E, args.batch):
        hi = min(E, lo + args.batch)
        seeds = [event_seed(args.seed, i, "generate") for i in range(lo, hi)]
        with torch.inference_mode():
            g = generate_tokens(model, cond[lo:hi], seeds, max_hits=family.cfg.max_hits)
        parts.append(decode_clusters(g.rows, g.cols, g.values, g.lengths, L, hi - lo,
                                     {k: v[lo:hi].numpy() for k, v in conds.items()}, *model.shape_table()))
        g_tabs.append(token_table(model, g.rows, g.values, g.lengths, 0))
        targets.append(g.targets.view(-1, U).double().numpy())
    g_unit, g_size, g_adc, g_class = (np.concatenate(x) for x in zip(*g_tabs, strict=True))
    with torch.inference_mode():
        law_mean = model.counts.mean(cond).double().numpy().mean(0)
    drawn = np.concatenate(targets).mean(0)
    ref_tokens = per_unit(np.ones(len(r_unit)), r_unit, U, E)
    ref_pix = per_unit(r_size.astype(float), r_unit, U, E)
    gen_tokens = per_unit(np.ones(len(g_unit)), g_unit, U, E)
    gen_pix = per_unit(g_size.astype(float), g_unit, U, E)
    ref_hits = np.bincount(np.asarray(ref.columns["sensor"], np.int64), minlength=U) / E
    dec = HitBatch.concat(parts)
    gen_hits = np.bincount(np.asarray(dec.columns["sensor"], np.int64), minlength=U) / E

    print(f"{E} events at {args.luminosity:.3g} ({args.machine}); per sensor, mean rel. diff | MRE over sensors")
    print("| step | compared | mean rel. diff | MRE |")
    print("|---|---|---|---|")
    print(f"| law | law mean tokens vs reference tokens | {rel(law_mean, ref_tokens)} |")
    print(f"| drawn | drawn tokens vs law mean | {rel(drawn, law_mean)} |")
    print(f"| placed | generated tokens vs drawn | {rel(gen_tokens, drawn)} |")
    print(f"| tokens | generated tokens vs reference tokens | {rel(gen_tokens, ref_tokens)} |")
    print(f"| pixels per token | generated shapes vs reference | {rel(gen_pix / gen_tokens, ref_pix / ref_tokens)} |")
    print(f"| kept | decoded hits vs drawn shape pixels | {rel(gen_hits, gen_pix)} |")
    print(f"| hits | decoded hits vs reference hits | {rel(gen_hits, ref_hits)} |")
    # floors: a second reference of the same size (seed 102) against the first
    ref2 = simulate_pxd_background(gen.geometry, E, seed=102, luminosity=args.luminosity, scenario=args.machine)
    tok2 = encode_clusters(ref2, L, model.shape_vocab(), model.config.cluster_charge_bins)
    r2_unit, r2_size = token_table(model, tok2.rows, tok2.values, tok2.lengths, 1)[:2]
    ref2_tokens = per_unit(np.ones(len(r2_unit)), r2_unit, U, E)
    ref2_pix = per_unit(r2_size.astype(float), r2_unit, U, E)
    ref2_hits = np.bincount(np.asarray(ref2.columns["sensor"], np.int64), minlength=U) / E
    print(f"| floor: tokens | reference 2 vs reference | {rel(ref2_tokens, ref_tokens)} |")
    print(f"| floor: pixels per token | reference 2 vs reference | {rel(ref2_pix / ref2_tokens, ref_pix / ref_tokens)} |")
    print(f"| floor: hits | reference 2 vs reference | {rel(ref2_hits, ref_hits)} |")
    if args.law_events:
        big = simulate_pxd_background(gen.geometry, args.law_events, seed=103, luminosity=args.luminosity,
                                      scenario=args.machine)
        big_unit = np.zeros(0, np.int64)
        for lo in range(0, args.law_events, 500):
            part = big.slice(lo, min(args.law_events, lo + 500))
            t = encode_clusters(part, L, model.shape_vocab(), model.config.cluster_charge_bins)
            big_unit = np.r_[big_unit, token_table(model, t.rows, t.values, t.lengths, 1)[0]]
        big_tokens = per_unit(np.ones(len(big_unit)), big_unit, U, args.law_events)
        big_cond = family.condition_norm({k: torch.as_tensor(np.asarray(v, dtype=np.float64))
                                          for k, v in big.conditions.items()})
        with torch.inference_mode():
            big_law = model.counts.mean(big_cond).double().numpy().mean(0)
        print(f"| law, {args.law_events} reference events | law mean tokens vs reference tokens | {rel(big_law, big_tokens)} |")
    print(f"reference pixels per token {r_size.mean():.3f}, generated {g_size.mean():.3f}; "
          f"tokens per event {len(r_unit) / E:.1f} vs {len(g_unit) / E:.1f}")

    cls_of_sum = charge_classes(g_adc, L, model.config.cluster_max_pixels, model.config.cluster_charge_bins)
    print("\n| token size | reference tokens | mean token charge reference -> generated [ADU] | generated tokens outside their class (below / above) |")
    print("|---|---|---|---|")
    for s in range(1, 9):
        rs, gs = r_size == s, g_size == s
        if not rs.any() or not gs.any():
            continue
        print(f"| {s} | {int(rs.sum())} | {r_adc[rs].mean():.1f} -> {g_adc[gs].mean():.1f} ({100 * (g_adc[gs].mean() / r_adc[rs].mean() - 1):+.1f} %) | "
              f"{(cls_of_sum[gs] < g_class[gs]).mean():.3f} / {(cls_of_sum[gs] > g_class[gs]).mean():.3f} |")
    rc, gc = cluster_charge_by_size(model, ref), cluster_charge_by_size(model, dec)
    print("\n| cluster size (evaluation) | mean cluster charge reference -> generated [ADU] | clusters per event reference / generated |")
    print("|---|---|---|")
    for s in sorted(set(rc) & set(gc)):
        print(f"| {s} | {rc[s][0]:.1f} -> {gc[s][0]:.1f} ({100 * (gc[s][0] / rc[s][0] - 1):+.1f} %) | {rc[s][1] / E:.1f} / {gc[s][1] / E:.1f} |")


if __name__ == "__main__":
    main()
