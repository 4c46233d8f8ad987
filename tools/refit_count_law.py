"""Refit the count law of a pixel hit-transformer export (cluster tokens) on the training split
of another store of the same simulation, and write the export again with that law. The network
does not see the law in training (law_lr 0; teacher forcing uses the data's counts), so the
result is what the same network gives with a law fitted on more (or other) training events.

    python tools/refit_count_law.py --export runs/pxd_transformer_mini/export \
        --store data/pxd_mini_design_16000_seed1.zarr --out runs/law16k/export

The store's training split is the one `uhg train` uses (split seed = run seed, validation
fraction as in the config); the law is fitted by `fit_count_law`, as in training.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch
from refit_share_law import refit_parser, training_events  # tools/, on the path when run as a script
from safetensors.torch import load_file, save_file

from uhg.models.generator import Generator
from uhg.models.laws import fit_count_law
from uhg.models.transformer_clusters import ShapeCensus


def main() -> None:
    args = refit_parser(__doc__.split("\n\n")[0], "export directory of a cluster-token transformer with a count law",
                        "training store to fit the law on").parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    model, family = gen.module, gen.family
    if model.counts is None or not model.clusters:
        raise SystemExit(f"{args.export}: not a cluster-token transformer with a count law")
    batch = training_events(args.store, args.split_seed, args.val_fraction)
    census = ShapeCensus(model.layout)
    census.add(batch)
    counts = census.token_counts(model.shape_vocab()).double()
    cond = family.condition_norm({k: torch.as_tensor(v) for k, v in batch.conditions.items()}).double()
    law = copy.deepcopy(model.counts).double()
    t0 = time.time()
    fit = fit_count_law(law, counts, cond)
    out = Path(args.out)
    shutil.copytree(args.export, out, dirs_exist_ok=True)
    state = load_file(str(out / "generator.safetensors"))
    for k, v in law.state_dict().items():
        key = f"counts.{k}"
        if key not in state or state[key].shape != v.shape:
            raise SystemExit(f"{args.export}: its count law has no tensor {key} of shape {tuple(v.shape)}")
        state[key] = v.to(state[key].dtype).contiguous()
    save_file(state, str(out / "generator.safetensors"))
    print(f"{len(batch)} training events; count law refitted in {time.time() - t0:.0f} s ({fit}) -> {out}")


if __name__ == "__main__":
    main()
