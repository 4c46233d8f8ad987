"""Generation cost of a trained generator export on one CPU thread, with a digest of its output.

    python tools/bench_generate_export.py --model runs/fr_tf/export --conditions conds.npz \
        --events 8 --seed 7 --batch-size 8

The conditions file is a NPZ of per-event conditions {name: (n,) array} (as for `uhg generate
--conditions`); its first --events entries are used. Prints process CPU seconds per event
(the stable per-core figure on a shared machine), hits, and a SHA-256 digest of the generated
hits, so two code versions can be checked to give the same events for the same seed.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="generator export directory")
    ap.add_argument("--conditions", required=True, help="per-event conditions file")
    ap.add_argument("--events", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=8, help="events per pass")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from uhg.models.generator import Generator

    with np.load(args.conditions, allow_pickle=False) as npz:
        conds = {k: np.asarray(npz[k], dtype=np.float64)[:args.events] for k in npz.files}
    gen = Generator.load(args.model)
    t0, w0 = time.process_time(), time.perf_counter()
    batch = gen.generate(conds, seed=args.seed, batch_size=args.batch_size)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    digest = hashlib.sha256()
    for name in sorted(batch.columns):
        digest.update(np.ascontiguousarray(batch.columns[name]).tobytes())
    digest.update(np.ascontiguousarray(batch.event_index()).tobytes())
    print(f"events {args.events}  batch {args.batch_size}  hits {batch.n_hits}  "
          f"cpu_s_per_event {cpu / args.events:.2f}  wall_s_per_event {wall / args.events:.2f}  "
          f"digest {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
