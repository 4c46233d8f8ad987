"""Refit the share law of a hit-transformer export (model.layer_split) to its training showers with
or without `share_means` and with the curvatures `share_curvature` says, and (with --dispersion) the
total's count law with that `count_dispersion`, and write the export again with those laws. The
network does not see the laws in training (they are fitted before it and kept: law_lr 0; teacher
forcing uses the data's pixels per layer), so the result is the export a training run with the
other settings would make at the same seed, without the training.

    python tools/refit_share_law.py --export runs/ab_F/export --store data/epical_mini.zarr --means --out exportM
    python tools/refit_share_law.py --export runs/cp0/export --store data/epical_mini.zarr --means \
        --curvature forward --dispersion forward --out exportF

The training showers are the store's training split of the export's run (split seed = run seed,
validation fraction as in its config), at most `fit_events` of them evenly spread, as `uhg train`
fits them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from uhg.data.hits import HitBatch
from uhg.data.loader import split_mask, store_salt
from uhg.data.reader import open_store
from uhg.models.generator import Generator
from uhg.models.laws import COUNT_DISPERSIONS, SHARE_CURVATURES, CountLaw, LayerShareLaw, fit_count_law, fit_share_law
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import evenly_spread


def training_events(store_path: str, split_seed: int, val_fraction: float) -> HitBatch:
    """The events of a store that `uhg train` fits on: its training split (split seed = run seed)."""
    store = open_store(store_path)
    train = np.flatnonzero(~split_mask(store.event_ids, split_seed, store_salt(store), val_fraction))
    return store.read(0, len(store)).take(train)


def refit_parser(description: str, export_help: str, store_help: str) -> argparse.ArgumentParser:
    """The arguments every law-refit tool takes: the export, the store to fit on, the run's split
    (so the fit sees the training events `uhg train` used) and the new export directory."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--export", required=True, help=export_help)
    ap.add_argument("--store", required=True, help=store_help)
    ap.add_argument("--split-seed", type=int, default=0, help="the run's seed (default 0)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="data.validation_fraction of the run")
    ap.add_argument("--out", required=True, help="new export directory")
    return ap


def main() -> None:
    ap = refit_parser(__doc__.split("\n\n")[0], "export directory of a layer_split transformer", "its training store")
    ap.add_argument("--means", action="store_true", help="fit with share_means")
    ap.add_argument("--curvature", choices=SHARE_CURVATURES, default="free", help="share_curvature of the refit")
    ap.add_argument("--dispersion", choices=COUNT_DISPERSIONS, default=None,
                    help="also refit the total's count law with this count_dispersion (default: keep the law)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = Generator.load(args.export)
    model = gen.module if hasattr(gen, "module") else gen._module
    if model.shares is None:
        raise SystemExit(f"{args.export}: no share law (model.layer_split is off)")
    batch = training_events(args.store, args.split_seed, args.val_fraction)
    batch = batch.take(evenly_spread(len(batch), model.config.fit_events))  # as `uhg train` fits the laws
    n_train = len(batch)
    hits = TorchHits.from_batch(batch)
    n_layers = len(model.shares.bias)
    flat = hits.event_index() * n_layers + hits.columns["layer"].long()
    counts = torch.bincount(flat, minlength=n_train * n_layers).view(n_train, n_layers).double()
    cond = gen.family.condition_norm(hits.conditions).double()
    law = LayerShareLaw(n_layers, cond.shape[1]).double()
    fit = fit_share_law(law, counts, cond, means=args.means, curvature=args.curvature)
    out = Path(args.out)
    shutil.copytree(args.export, out, dirs_exist_ok=True)
    state = load_file(str(out / "generator.safetensors"))
    for k, v in law.state_dict().items():
        if f"shares.{k}" in state:
            state[f"shares.{k}"] = v.to(state[f"shares.{k}"].dtype).contiguous()
    side = json.loads((out / "generator.json").read_text())
    side["model"]["share_means"] = bool(args.means)
    side["model"]["share_curvature"] = args.curvature
    if args.dispersion is not None:  # a fresh law of the export's form and dtype, as `uhg train` builds and fits it
        old = model.counts
        total = CountLaw(1, cond.shape[1], int(old.positions.sum()), old.form, bootstrap=len(old.bootstrap),
                         dispersion=args.dispersion).to(old.bias.dtype)
        fit |= fit_count_law(total, counts.sum(1, keepdim=True), cond)
        state = {k: v for k, v in state.items() if not k.startswith("counts.")}
        state |= {f"counts.{k}": v.contiguous() for k, v in total.state_dict().items()}
        side["model"]["count_dispersion"] = args.dispersion
    save_file(state, str(out / "generator.safetensors"))
    (out / "generator.json").write_text(json.dumps(side, indent=2))
    print(f"{n_train} training showers; laws refitted ({fit}) -> {out}")


if __name__ == "__main__":
    main()
