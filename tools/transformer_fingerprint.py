"""SHA-256 fingerprints of a hit-transformer config's model path, to show that a code change leaves
it bit for bit as it was: the initial weights (seed 0), the teacher-forced loss and its gradients
on the showers of a store (seed 1 for the training noise), and showers generated at fixed
energies and seeds (count laws as initialised, not fitted).

    uhg sim calo --geometry epical-mini --energy-min 1000 --energy-max 16000 --events 24 --seed 9 --out mini24.zarr
    python tools/transformer_fingerprint.py --config configs/epical_transformer_mini.yaml --store mini24.zarr

Run it against two checkouts (PYTHONPATH pointing at each) and compare the three lines.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import torch

from uhg.config.loading import load_config
from uhg.data.reader import open_store
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import build_family


def seeded_model(config: str):
    """(family, model, condition norm) of a calorimeter transformer config, the model's weights as
    initialised with seed 0 on one thread (tools/bench_transformer_loss.py times the same model)."""
    torch.set_num_threads(1)
    cfg = load_config(config)
    sim = cfg.data.simulate
    norm = ConditionNorm.from_ranges({"incident_energy": (sim.energy_min, sim.energy_max)}, cfg.model.conditions)
    family = build_family(get_geometry(cfg.geometry), cfg.model, norm)
    torch.manual_seed(0)
    return family, family.build_modules()["model"], norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config (a transformer on a calorimeter)")
    ap.add_argument("--store", required=True, help="store of simulated showers of the config's geometry")
    ap.add_argument("--energies", default="2000,8000,15000", help="MeV of the generated showers, comma-separated")
    args = ap.parse_args()
    family, model, norm = seeded_model(args.config)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    print("initial weights", h.hexdigest())
    store = open_store(args.store)
    hits = TorchHits.from_batch(store.read(0, len(store)))
    cond = norm({"incident_energy": hits.conditions["incident_energy"]})
    torch.manual_seed(1)
    out = model.loss(model.tokenize(hits), cond)
    out["loss"].backward()
    h = hashlib.sha256(np.float64(out["loss"].item()).tobytes())
    for p in model.parameters():
        if p.grad is not None:
            h.update(p.grad.numpy().tobytes())
    print(f"loss {out['loss'].item():.9g} and gradients", h.hexdigest())
    model.eval()
    energies = torch.tensor([float(e) for e in args.energies.split(",")])
    showers = family.sample(model, {"incident_energy": energies}, list(range(1, len(energies) + 1)))
    h = hashlib.sha256(showers.offsets.tobytes())
    for k in sorted(showers.columns):
        h.update(np.ascontiguousarray(showers.columns[k]).tobytes())
    print(f"generated showers ({showers.hits_per_event.tolist()} pixels)", h.hexdigest())


if __name__ == "__main__":
    main()
