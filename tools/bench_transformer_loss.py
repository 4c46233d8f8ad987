"""CPU time of the hit transformer's teacher-forced loss and its backward pass on the first showers
of a store (no optimiser, no data loading): the model's own cost per training step, steadier than a
whole step on a loaded machine. Weights of seed 0, as initialised.

    uhg sim calo --geometry epical --energy-min 1000 --energy-max 4000 --events 24 --seed 9 --out full24.zarr
    python tools/bench_transformer_loss.py --config configs/epical_transformer.yaml --store full24.zarr

Run it against two checkouts (PYTHONPATH pointing at each) to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformer_fingerprint import seeded_model  # tools/, on the path when run as a script

from uhg.data.reader import open_store
from uhg.sparse.torch_hits import TorchHits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config (a transformer on a calorimeter)")
    ap.add_argument("--store", required=True, help="store of simulated showers of the config's geometry")
    ap.add_argument("--showers", type=int, default=16, help="showers per loss (default 16, the shipped batch)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up pass")
    args = ap.parse_args()
    _, model, norm = seeded_model(args.config)
    hits = TorchHits.from_batch(open_store(args.store).read(0, args.showers))
    cond = norm({"incident_energy": hits.conditions["incident_energy"]})
    tokens = model.tokenize(hits)
    times = []
    for _ in range(args.repeats + 1):
        model.zero_grad()
        t = time.process_time()
        model.loss(tokens, cond)["loss"].backward()
        times.append(time.process_time() - t)
    times = times[1:]
    print(f"{int(tokens.lengths.sum())} tokens: CPU s per loss + backward, median {statistics.median(times):.3f}, "
          f"min {min(times):.3f} ({args.repeats} passes, one thread)")


if __name__ == "__main__":
    main()
