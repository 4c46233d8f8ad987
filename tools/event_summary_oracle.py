"""Diagnostic, not a model: an export whose event-summary trend is refitted (same design, least
squares) on its training events plus the second reference sample of a protocol run beyond the range,
so that one can see what generation would give if the trend carried beyond the range.

    python tools/event_summary_oracle.py --export EXPORT --store STORE --npz S_point0.npz ... --out DIR

NPZ: the per-point dumps of `tools/extrapolate_event_summary.py`; only their `reference 2` events
enter the fit, so the protocol's first reference, against which generated events are compared,
stays out of it. Prints the refitted trend's bias against the first reference of each NPZ.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import torch
from extrapolate_event_summary import event_features  # tools/, on the path when run as a script
from refit_share_law import training_events
from safetensors.torch import load_file, save_file

from uhg.models.generator import Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--store", required=True, help="the export's training store")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--npz", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shutil.copytree(args.export, args.out, dirs_exist_ok=True)
    gen = Generator.load(args.export)
    m = gen.module
    batch = training_events(args.store, args.split_seed, 0.1)
    parts = [event_features(m, gen.family.condition_norm, batch.take(range(i, min(i + 250, len(batch)))))
             for i in range(0, len(batch), 250)]
    dumps = [np.load(p) for p in args.npz]
    parts += [{k: d[f"reference 2_{k}"] for k in ("f", "cond", "counts")} for d in dumps]
    f, c, n = (torch.as_tensor(np.concatenate([p[k] for p in parts])) for k in ("f", "cond", "counts"))
    trend = torch.linalg.lstsq(m.summary_design(c, n), f.double(), driver="gelsd").solution
    for path, d in zip(args.npz, dumps, strict=True):
        x = m.summary_design(torch.as_tensor(d["reference_cond"]), torch.as_tensor(d["reference_counts"]))
        for name, w in (("shipped", m.summary_trend.double()), ("refitted", trend)):
            bias = (x @ w - torch.as_tensor(d["reference_f"])).mean(0)
            print(f"{path}: {name} trend - reference: log size {float(bias[0]):+.4f}, charge class {float(bias[1]):+.4f}")
    state = load_file(f"{args.out}/generator.safetensors")
    state["summary_trend"] = trend.to(state["summary_trend"].dtype).contiguous()
    save_file(state, f"{args.out}/generator.safetensors")
    print(f"{len(f)} events ({len(f) - sum(len(d['reference 2_f']) for d in dumps)} training) -> {args.out}")


if __name__ == "__main__":
    main()
