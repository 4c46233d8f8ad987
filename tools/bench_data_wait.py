"""How long training steps wait for their batch: median `data_wait_fraction` (the metric every
run logs: wait / (wait + step)) of a short local run, for each `data.loader_workers` value.

    python tools/bench_data_wait.py --config configs/pxd_gan_mini.yaml --steps 30 --workers 0 2 \
        --set data.store=/tmp/mini.zarr --set data.simulate.n_events=200

Prints one JSON line per loader_workers value; the first `--warmup` steps are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile


def main() -> None:
    from uhg.config import load_config
    from uhg.train.loop import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.loader_workers values")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for workers in args.workers:
            cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps}", f"data.loader_workers={workers}",
                                            f"output_dir={out}/run{workers}", "train.checkpoint_every=0",
                                            "train.validate_every=0", "tracking.enabled=false"])
            steps = train(cfg).history[args.warmup:]
            med = lambda key: statistics.median(h[key] for h in steps)  # noqa: E731
            print(json.dumps({"config": args.config, "loader_workers": workers, "steps": len(steps),
                              "data_wait_fraction_median": round(med("data_wait_fraction"), 4),
                              "data_wait_s_median": round(med("data_wait_s"), 5),
                              "step_time_s_median": round(med("step_time_s"), 4),
                              "load_avg_1m": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
