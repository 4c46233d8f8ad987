"""Add a cluster code bank (`model.cluster_code_bank`) to a cluster-token transformer export,
fitted on the training split of its own store, and write the export again. The bank changes
generation only (training never reads it), so the result is what a training with the key set
gives for the same network.

    python tools/refit_code_bank.py --export runs/pxd_transformer_mini/export \
        --store data/pxd_mini_design_4000_seed1.zarr --split-seed 2 --bank 400000 --out runs/bank/export

The store's training split is the one `uhg train` uses (split seed = run seed, validation
fraction as in the config); the bank is fitted by `HitTransformer.fit_code_bank`, as in training
(there on the `fit_events` of the split, evenly spread; here on all of them).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from refit_share_law import refit_parser, training_events  # tools/, on the path when run as a script
from safetensors.torch import load_file, save_file

from uhg.models.generator import Generator

CHUNK = 250  # events tokenized at a time (padded token tensors of the whole split would take GBs)


def main() -> None:
    ap = refit_parser(__doc__.split("\n\n")[0], "export directory of a cluster-token transformer", "its training store")
    ap.add_argument("--bank", type=int, default=400_000, help="cluster_code_bank: pixels the bank holds")
    ap.add_argument("--per-sensor", action="store_true", help="cluster_code_bank_per_sensor")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.copytree(args.export, out, dirs_exist_ok=True)
    side = json.loads((out / "generator.json").read_text())
    if side["model"].get("token") != "cluster":
        raise SystemExit(f"{args.export}: not a cluster-token transformer")
    side["model"]["cluster_code_bank"] = args.bank
    side["model"]["cluster_code_bank_per_sensor"] = bool(args.per_sensor)
    (out / "generator.json").write_text(json.dumps(side, indent=2))
    state = load_file(str(out / "generator.safetensors"))
    # the new buffers' shapes, zero until fitted (the export must hold every tensor to load)
    m = side["model"]
    keys = m.get("cluster_shapes", 512) * m.get("cluster_charge_bins", 32)
    n_units = state["unit_features"].shape[0]
    state |= {"code_bank": torch.zeros(args.bank), "code_bank_count": torch.zeros(keys),
              "code_bank_start": torch.zeros(keys)}
    if args.per_sensor:
        state |= {"code_bank_unit_count": torch.zeros(n_units, keys), "code_bank_unit_first": torch.zeros(n_units, keys)}
    save_file(state, str(out / "generator.safetensors"))
    model = Generator.load(out).module
    batch = training_events(args.store, args.split_seed, args.val_fraction)
    t0 = time.time()
    fit = model.fit_code_bank(model.tokenize(batch.take(range(i, min(i + CHUNK, len(batch)))))
                              for i in range(0, len(batch), CHUNK))
    for k, v in model.state_dict().items():
        if k.startswith("code_bank"):
            state[k] = v.contiguous()
    save_file(state, str(out / "generator.safetensors"))
    print(f"{len(batch)} training events; code bank fitted in {time.time() - t0:.0f} s ({fit}) -> {out}")


if __name__ == "__main__":
    main()
