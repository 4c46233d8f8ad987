"""Where a cluster-token PXD transformer's clusters per sensor go, from the count law's draw to
the clusters of the decoded events, at one luminosity, against simulated reference events.

    python tools/pxd_count_accounting.py --model runs/pxd_transformer_mini/export --events 1000
    python tools/pxd_count_accounting.py --model ... --train data/pxd_mini_bg_design_4k.zarr

Prints, per event at the reference's conditions (reference: seed --reference-seed; generation:
the event seeds of --seed, as `Generator.generate`):
- the count law: its mean and its draws per sensor against the reference's tokens (the reference
  encoded with the model's vocabulary): mean relative difference, its rms over the sensors (and
  that of the reference's own noise), the event-to-event standard deviation per sensor and of the
  event total, the total's skewness, kurtosis and upper percentiles;
- the tokens the model placed (exactly the law's draws) and how many of them touch an earlier
  token of their sequence (8-neighbourhood), split into touching the token just before and an older
  one (decoded, touching tokens make one cluster), and how many form, with the clusters they touch,
  a cluster whose pattern is a vocabulary shape (the encoder would have made that one token);
- clusters per event of the decoded events against the reference's.
With --train: the law's relative residual (data / law mean - 1) over slices of the training
events' luminosity, per sensor (rms over the sensors, and the rms of the slice's own noise).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import stats


def touching(rows, cols, shapes, lengths, offsets, sizes, vocab) -> tuple[float, float, float]:
    """Per token: (touching the token just before, touching only older ones, forming with the
    clusters it touches a cluster whose pattern is a vocabulary shape). The encoder splits only
    clusters that are not vocabulary shapes, largest pieces first, so encoded data rarely if ever
    hold the last."""
    from uhg.models.transformer_clusters import shape_key_base

    base, n_cols = shape_key_base(vocab.n_cols), vocab.n_cols

    def key(pixels: set) -> tuple:
        px = sorted(pixels)
        return tuple((r - px[0][0]) * base + (c - px[0][1]) + n_cols for r, c in px)

    prev = old = in_vocab = n = 0
    for s in range(len(lengths)):
        placed: list[set] = []
        clusters: list[set] = []
        for t in range(int(lengths[s])):
            k = int(shapes[s, t])
            pix = {(int(rows[s, t] + offsets[k, i, 0]), int(cols[s, t] + offsets[k, i, 1])) for i in range(int(sizes[k]))}
            halo = {(r + a, c + b) for r, c in pix for a in (-1, 0, 1) for b in (-1, 0, 1)}
            near = [j for j, q in enumerate(placed) if q & halo]
            if near:
                prev += max(near) == t - 1
                old += max(near) != t - 1
            joined = [j for j, q in enumerate(clusters) if q & halo]
            merged = set(pix).union(*(clusters[j] for j in joined))
            in_vocab += bool(joined) and key(merged) in vocab.index
            clusters = [q for j, q in enumerate(clusters) if j not in joined] + [merged]
            placed.append(pix)
            n += 1
    return prev / max(n, 1), old / max(n, 1), in_vocab / max(n, 1)


def describe(name: str, x: np.ndarray, ref: np.ndarray) -> None:
    rel = x.mean(0) / ref.mean(0) - 1
    total = x.sum(1)
    print(f"{name:34s} mean {rel.mean() * 100:+.2f} % (sensors rms {np.sqrt((rel ** 2).mean()) * 100:.2f} %, "
          f"{rel.min() * 100:+.1f} .. {rel.max() * 100:+.1f})  sd/ref {(x.std(0) / ref.std(0)).mean():.3f}  "
          f"total {total.mean():.1f} sd {total.std():.1f} skew {stats.skew(total):.2f} kurt {stats.kurtosis(total):.1f} "
          f"p95/p99 {np.percentile(total, 95):.0f}/{np.percentile(total, 99):.0f}")


def main() -> None:
    from uhg.data.reader import open_store
    from uhg.eval.classifier import classifier_auc
    from uhg.eval.features_pxd import clusters_per_image
    from uhg.models.generator import Generator
    from uhg.models.modes import eval_mode
    from uhg.models.transformer_clusters import ShapeCensus, encode_clusters
    from uhg.models.transformer_sampling import generate_tokens
    from uhg.seeding import event_seed
    from uhg.sim.pxd_background import simulate_pxd_background

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory of a cluster-token transformer with a count law")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--luminosity", type=float, default=8e35)
    ap.add_argument("--reference-seed", type=int, default=202)
    ap.add_argument("--seed", type=int, default=7, help="generation seed")
    ap.add_argument("--touch-events", type=int, default=150, help="events whose tokens are checked for touching")
    ap.add_argument("--train", help="training store: the law's residuals over luminosity slices")
    a = ap.parse_args()
    torch.set_num_threads(1)

    gen = Generator.load(a.model)
    m, fam = gen.module, gen.family
    if not getattr(m, "clusters", False) or m.counts is None:
        raise SystemExit(f"{a.model}: not a cluster-token transformer with a count law")
    n = a.events
    vocab, bins = m.shape_vocab(), m.config.cluster_charge_bins
    ref = simulate_pxd_background(fam.geometry, n, a.reference_seed, luminosity=a.luminosity)
    ref_tok = encode_clusters(ref, m.layout, vocab, bins)
    tr = ref_tok.lengths.view(n, -1).double().numpy()
    cond = fam.condition_norm({k: torch.as_tensor(v) for k, v in ref.conditions.items()})
    seeds = [event_seed(a.seed, i, "generate") for i in range(n)]
    with eval_mode(m), torch.no_grad():
        law_mean = m.counts.mean(cond).double().numpy()
        toks = generate_tokens(m, cond, seeds, max_hits=m.config.max_hits)
    placed = toks.lengths.view(n, -1).double().numpy()
    noise = tr.std(0) / np.sqrt(n) / tr.mean(0)
    print(f"{n} events at {a.luminosity:.3g}; reference tokens per sensor: noise of the mean rms "
          f"{np.sqrt((noise ** 2).mean()) * 100:.2f} %")
    rel = law_mean.mean(0) / tr.mean(0) - 1
    print(f"{'law mean':34s} mean {rel.mean() * 100:+.2f} % (sensors rms {np.sqrt((rel ** 2).mean()) * 100:.2f} %)")
    describe("reference tokens", tr, tr)
    describe("tokens placed (the law's draws)", placed, tr)
    tail = tr.sum(1) > np.percentile(placed.sum(1), 99.5)
    keep = ~tail
    full = np.mean([classifier_auc(tr, placed, seed=s).auc for s in (1, 2, 3)])
    cut = np.mean([classifier_auc(tr[keep], placed[:int(keep.sum())], seed=s).auc for s in (1, 2, 3)])
    print(f"classifier on tokens per sensor, reference vs the law's draws (3 seeds): AUC {full:.3f}; without the "
          f"{100 * tail.mean():.2f} % of reference events whose total lies above the draws' 99.5th percentile "
          f"(their tokens per sensor {np.median(tr[tail] / tr.mean(0)):.2f}x the mean, median): {cut:.3f}")
    offsets, sizes = m.shape_table()
    k = min(a.touch_events, n) * len(m.counts.positions)
    r = touching(ref_tok.rows[:k, 1:], ref_tok.cols[:k, 1:], ref_tok.values[:k, 1:, 0], ref_tok.lengths[:k], offsets, sizes, vocab)
    g = touching(toks.rows[:k], toks.cols[:k], toks.values[:k, :, 0], toks.lengths[:k], offsets, sizes, vocab)
    for name, (t_prev, t_old, t_vocab) in (("reference", r), ("model", g)):
        print(f"{name} tokens ({min(a.touch_events, n)} events) touching an earlier one: {100 * t_prev:.2f} % the one before + "
              f"{100 * t_old:.2f} % an older one; forming a vocabulary shape with what they touch: {100 * t_vocab:.2f} %")
    fake = gen.generate(dict(ref.conditions), seed=a.seed, batch_size=100)
    cr, cg = clusters_per_image(ref, fam.geometry), clusters_per_image(fake, fam.geometry)
    describe("clusters (decoded events)", cg, cr)
    print(f"clusters per token: reference {cr.sum() / tr.sum():.4f}, model {cg.sum() / placed.sum():.4f}")

    if a.train:
        b = open_store(a.train).read()
        census = ShapeCensus(m.layout)
        census.add(b)
        counts = census.token_counts(vocab).double().numpy()
        lum = np.asarray(b.conditions["luminosity"], np.float64)
        tc = fam.condition_norm({k: torch.as_tensor(v) for k, v in b.conditions.items()})
        with torch.no_grad():
            mu = m.counts.mean(tc).double().numpy()
        print(f"law residual over the training events ({len(lum)}), by luminosity percentile:")
        for lo, hi in ((0, 20), (20, 40), (40, 60), (60, 80), (80, 90), (90, 100)):
            sel = (lum >= np.percentile(lum, lo)) & (lum <= np.percentile(lum, hi))
            res = counts[sel].mean(0) / mu[sel].mean(0) - 1
            nz = counts[sel].std(0) / np.sqrt(sel.sum()) / counts[sel].mean(0)
            print(f"  {lo:3d}-{hi:3d} % ({sel.sum()} events): total {100 * (counts[sel].sum() / mu[sel].sum() - 1):+.2f} %, "
                  f"sensors rms {100 * np.sqrt((res ** 2).mean()):.2f} % (noise {100 * np.sqrt((nz ** 2).mean()):.2f} %)")


if __name__ == "__main__":
    main()
