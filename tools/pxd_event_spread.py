"""Where the event-to-event spread of a PXD event's mean cluster size and charge comes from, and
whether a cluster-token transformer's event latent carries it.

    python tools/pxd_event_spread.py EXPORT --events 1000 [--cases prior,post_mean,post_sample]

Simulates two references at 8e35 (seeds --seed and --seed + 1; the second gives every floor) and
prints, per sample: the spread (sd) of the event's mean cluster size and charge, and the same for
sensor-shuffled events (each sensor taken from another event: what the spread would be if the
sensors of an event fluctuated independently; 1 - shuffled / actual variance is the share the
sensors of an event have in common), the share for clusters of at most 16 / 8 pixels, and the
correlation of the mean cluster size with log clusters and log hits. Then the encoder's posterior
q(z | event) of the first reference's events (KL per dimension, variance of the posterior means
across events, mean posterior variance, R^2 of the events' mean cluster size and charge on the
posterior means), and events generated at the first reference's conditions with the latent
drawn as in generation (`prior`), at the posterior mean of each reference event (`post_mean`) or
drawn from that posterior (`post_sample`): their spreads, one-feature AUCs against the first
reference and the high-level classifier AUC (`uhg.eval.classifier.classifier_auc`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.eval.classifier import classifier_auc
from uhg.eval.features_pxd import pixel_clusters, pxd_features
from uhg.models.generator import Generator
from uhg.models.modes import eval_mode
from uhg.models.transformer_clusters import decode_clusters, encode_clusters
from uhg.models.transformer_sampling import generate_tokens
from uhg.seeding import event_seed
from uhg.sim.pxd_background import simulate_pxd_background


def one_feature_auc(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])
    return max(auc, 1.0 - auc)


def spreads(batch: HitBatch, geometry, max_pixels: int | None = None, seed: int = 0) -> dict[str, float]:
    """sd of the event's mean cluster size and charge, actual and sensor-shuffled, counting only
    clusters of at most `max_pixels` pixels if given."""
    n, n_s = len(batch), geometry.n_sensors
    labels, n_cl = pixel_clusters(batch, geometry)
    size = np.bincount(labels, minlength=n_cl).astype(float)
    charge = np.bincount(labels, weights=np.asarray(batch.columns["value"], float), minlength=n_cl)
    first = np.full(n_cl, -1)
    first[labels[::-1]] = np.arange(len(labels))[::-1]
    image = batch.event_index()[first] * n_s + np.asarray(batch.columns["sensor"], np.int64)[first]
    keep = size <= max_pixels if max_pixels else np.ones(n_cl, bool)
    tables = [np.bincount(image[keep], weights=w, minlength=n * n_s).reshape(n, n_s)
              for w in (size[keep], charge[keep], np.ones(int(keep.sum())))]
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(n) for _ in range(n_s)], 1)
    out = {}
    for name, shuffle in (("", False), ("shuffled ", True)):
        s, q, c = (np.take_along_axis(t, idx, 0) if shuffle else t for t in tables)
        out[f"{name}size"] = float((s.sum(1) / np.maximum(c.sum(1), 1)).std())
        out[f"{name}charge"] = float((q.sum(1) / np.maximum(c.sum(1), 1)).std())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", help="cluster-token transformer export with an event latent")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--luminosity", type=float, default=8e35)
    ap.add_argument("--seed", type=int, default=202, help="reference seed (the second uses seed + 1); not a training seed")
    ap.add_argument("--generate-seed", type=int, default=7)
    ap.add_argument("--cases", default="prior,post_mean,post_sample")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    model, family, g, n = gen.module, gen.family, gen.geometry, args.events
    if not getattr(model, "clusters", False) or not model.latent_dim:
        ap.error(f"{args.export} is not a cluster-token transformer with an event latent")
    ref = simulate_pxd_background(g, n, args.seed, luminosity=args.luminosity)
    ref2 = simulate_pxd_background(g, n, args.seed + 1, luminosity=args.luminosity)
    high = {k: pxd_features(b, g).vectors["high_level"] for k, b in (("ref", ref), ("ref2", ref2))}
    size_r, q_r = high["ref"][:, 6], high["ref"][:, 7]
    print("| reference | sd mean cluster size (shuffled) | sd mean cluster charge (shuffled) | shared share size / charge: all, <= 16, <= 8 pixels | corr(size, log clusters / log hits) |")
    for name, b, h in (("first", ref, high["ref"]), ("second", ref2, high["ref2"])):
        sp = {m: spreads(b, g, m) for m in (None, 16, 8)}
        share = " / ".join(f"{1 - (s['shuffled size'] / s['size']) ** 2:.2f}, {1 - (s['shuffled charge'] / s['charge']) ** 2:.2f}"
                           for s in sp.values())
        a = sp[None]
        print(f"| {name} | {a['size']:.4f} ({a['shuffled size']:.4f}) | {a['charge']:.3f} ({a['shuffled charge']:.3f}) | {share} | "
              f"{np.corrcoef(h[:, 6], h[:, 5])[0, 1]:+.3f} / {np.corrcoef(h[:, 6], h[:, 0])[0, 1]:+.3f} |")
    conds = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in ref.conditions.items()}
    cond = family.condition_norm(conds)
    tok = encode_clusters(ref, model.layout, model.shape_vocab(), model.config.cluster_charge_bins)
    with torch.no_grad():
        mu, logvar = model.encoder(model.summaries(tok, n), model.unit_context(cond), cond)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)
    print("posterior: KL per dimension", " ".join(f"{x:.3f}" for x in kl.mean(0)),
          "| variance of the posterior means", " ".join(f"{x:.1e}" for x in mu.var(0)),
          f"| mean posterior variance {float(logvar.exp().mean()):.3f}")
    design = np.c_[np.ones(n), mu.double().numpy()]
    for name, y in (("mean cluster size", size_r), ("mean cluster charge", q_r)):
        r = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        print(f"R^2 of the reference events' {name} on the posterior means: {1 - r.var() / y.var():.3f}")
    print("| sample | sd mean cluster size (shuffled) | sd mean cluster charge (shuffled) | one-feature AUC size / charge | high-level AUC | corr. with the reference event's size |")

    def row(name: str, b: HitBatch) -> None:
        h, s = pxd_features(b, g).vectors["high_level"], spreads(b, g)
        print(f"| {name} | {s['size']:.4f} ({s['shuffled size']:.4f}) | {s['charge']:.3f} ({s['shuffled charge']:.3f}) | "
              f"{one_feature_auc(size_r, h[:, 6]):.3f} / {one_feature_auc(q_r, h[:, 7]):.3f} | "
              f"{classifier_auc(high['ref'], h, seed=1).auc:.3f} | {np.corrcoef(h[:, 6], size_r)[0, 1]:+.3f} |", flush=True)

    row("second reference (floor)", ref2)
    seeds = [event_seed(args.generate_seed, i, "generate") for i in range(n)]
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(args.generate_seed))
    latents = {"prior": None, "post_mean": mu, "post_sample": mu + eps * (0.5 * logvar).exp()}
    for case in args.cases.split(","):
        lat, parts, t0 = latents[case], [], time.perf_counter()
        with torch.inference_mode(), eval_mode(model):
            for lo in range(0, n, 100):
                hi = min(n, lo + 100)
                out = generate_tokens(model, cond[lo:hi], seeds[lo:hi], max_hits=family.cfg.max_hits,
                                      latent=None if lat is None else lat[lo:hi])
                parts.append(decode_clusters(out.rows, out.cols, out.values, out.lengths, model.layout, hi - lo,
                                             {k: v[lo:hi].numpy() for k, v in conds.items()}, *model.shape_table()))
        row(f"generated, latent {case} ({time.perf_counter() - t0:.0f} s)", HitBatch.concat(parts))


if __name__ == "__main__":
    main()
