"""Where the pixels of a cluster-token transformer go, against the reference, at multiples of
the training maximum: tells a shape head that draws too small clusters apart from tokens placed
on top of each other.

    python tools/cluster_token_pacing.py EXPORT --machine SCENARIO [--events 30] [--factors 1,2]

For the reference (simulated, seed 101, encoded into the model's shape vocabulary) and for the
model's own tokens before decoding, per event: hits, tokens, hits per token, pixels per token of
the drawn shapes, share of single-pixel tokens, connected clusters, and the share of token
anchors in each quarter of the sensor's rows. Generated hits per token below the drawn shapes'
pixels per token are pixels lost where tokens overlap; generated clusters well below the
tokens are tokens that touch.

    python tools/cluster_token_pacing.py EXPORT --events 400 --factors 1 --last-rows 4 \
        [--set cluster_merge_redraws=0 --set cluster_exclusive=false]

--last-rows K adds, per factor, the anchors' share of each of the sensor's last K rows against
the reference, and the drawn pixels per token with the generated tokens' pixels per token in each
row weighted by the reference's share of anchors in that row: what the drawn shapes would give if
the tokens sat in the rows where the reference's anchors sit (the rest of the difference is
where they sit; shapes in the last rows are cut by the sensor's edge), and how many tokens of
their sensor follow the tokens anchored in the last row (a sensor that fell behind places
several there). --set changes a generation setting of the export's model config (applied in
order, validated) for this run only.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from uhg.models.generator import Generator
from uhg.models.transformer_clusters import decode_clusters, encode_clusters
from uhg.models.transformer_sampling import generate_tokens
from uhg.seeding import event_seed
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.clusters import connected_pixels


def token_stats(model, rows: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, first: int) -> dict[str, float]:
    """first: slot of the first token (1 in teacher-forcing sequences, whose slot 0 is the start)."""
    t = torch.arange(rows.shape[1])[None]
    keep = (t >= first) & (t < lengths[:, None] + first)
    size = model.shape_table()[1][values[..., 0][keep]].double()
    row = rows[keep].numpy()
    quarter = np.histogram(row / model.layout.n_rows, bins=4, range=(0, 1))[0]
    n_rows = model.layout.n_rows
    per_row = np.bincount(row, minlength=n_rows)[:n_rows]
    # how many tokens of its sensor follow each token in the last row: a sensor that fell behind
    # places several there, where the data's last row holds almost only a sensor's last token
    after = (lengths[:, None] + first - 1 - t).expand_as(rows)[keep].numpy()
    after_last = np.bincount(np.minimum(after[row == n_rows - 1], 2), minlength=3)
    return {"tokens": len(size), "shape pixels": float(size.sum()), "single": float((size == 1).sum()),
            "last row followed by": after_last / max(after_last.sum(), 1),
            "quarters": quarter / max(len(size), 1), "row share": per_row / max(len(size), 1),
            "row pixels": np.bincount(row, weights=size.numpy(), minlength=n_rows)[:n_rows] / np.maximum(per_row, 1)}


def clusters(model, batch) -> int:
    """Connected clusters of a batch (the evaluation's clustering)."""
    c = batch.columns
    image = batch.event_index() * model.layout.n_units + np.asarray(c["sensor"], np.int64)
    return connected_pixels(image, np.asarray(c["row"], np.int64), np.asarray(c["col"], np.int64),
                            model.layout.n_rows, model.layout.n_cols)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--machine", default="design")
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--factors", default="1,2")
    parser.add_argument("--top", type=float, default=8e35)
    parser.add_argument("--seed", type=int, default=7, help="generation seed")
    parser.add_argument("--last-rows", type=int, default=0, help="anchor shares of the last K rows (see above)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="generation setting of the model config, e.g. cluster_merge_redraws=0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    model, family = gen.module, gen.family
    if not getattr(model, "clusters", False):
        parser.error(f"{args.export} is not a cluster-token transformer")
    for item in args.set:
        key, _, value = item.partition("=")
        setattr(model.config, key, value)  # validated on assignment
    if args.set:
        print("generation settings:", ", ".join(f"{k.partition('=')[0]}={getattr(model.config, k.partition('=')[0])}"
                                                for k in args.set))
    rows_out = []
    print("| L / training max | sample | hits/event | tokens/event | hits/token | drawn pixels/token | single-pixel tokens | clusters/event | anchors per row quarter |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in (float(x) for x in args.factors.split(",")):
        ref = simulate_pxd_background(gen.geometry, args.events, seed=101, luminosity=f * args.top, scenario=args.machine)
        conds = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in ref.conditions.items()}
        seeds = [event_seed(args.seed, i, "generate") for i in range(args.events)]
        with torch.inference_mode():
            g = generate_tokens(model, family.condition_norm(conds), seeds, max_hits=family.cfg.max_hits)
        out = decode_clusters(g.rows, g.cols, g.values, g.lengths, model.layout, args.events,
                              {k: v.numpy() for k, v in conds.items()}, *model.shape_table())
        tok = encode_clusters(ref, model.layout, model.shape_vocab(), model.config.cluster_charge_bins)
        stats = {}
        for name, batch, s in (("reference", ref, token_stats(model, tok.rows, tok.values, tok.lengths, 1)),
                               ("generated", out, token_stats(model, g.rows, g.values, g.lengths, 0))):
            n, q = max(s["tokens"], 1), " / ".join(f"{x:.2f}" for x in s["quarters"])
            print(f"| {f:g} | {name} | {batch.n_hits / args.events:.0f} | {s['tokens'] / args.events:.0f} | "
                  f"{batch.n_hits / n:.3f} | {s['shape pixels'] / n:.3f} | {s['single'] / n:.3f} | "
                  f"{clusters(model, batch) / args.events:.0f} | {q} |", flush=True)
            stats[name] = s
        if args.last_rows:
            rs, gs = stats["reference"], stats["generated"]
            last = range(model.layout.n_rows - args.last_rows, model.layout.n_rows)
            ref_ppt = rs["shape pixels"] / max(rs["tokens"], 1)
            at_ref = float((rs["row share"] * gs["row pixels"]).sum())
            rows_out.append(f"L {f:g}: drawn pixels/token {gs['shape pixels'] / max(gs['tokens'], 1) / ref_ppt - 1:+.2%}, "
                            f"at the reference's anchor rows {at_ref / ref_ppt - 1:+.2%} against the reference; anchors "
                            "generated / reference in rows " + ", ".join(
                                f"{i}: {gs['row share'][i] / max(rs['row share'][i], 1e-12):.3f} "
                                f"(reference {rs['row pixels'][i]:.2f} pixels/token)" for i in last)
                            + "; tokens in the last row followed by 0 / 1 / more tokens of their sensor: generated "
                            + " / ".join(f"{x:.1%}" for x in gs["last row followed by"]) + ", reference "
                            + " / ".join(f"{x:.1%}" for x in rs["last row followed by"]))
    for line in rows_out:
        print(line)


if __name__ == "__main__":
    main()
