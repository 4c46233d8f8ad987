"""Fit the empirical log-share noise (`share_noise: empirical`) of a trained `calo_layers` export
to training showers and write a new export with it: the same weights plus each voxel's residual
quantiles (with `--share-noise empirical_correlated` also their within-layer correlation), and that
`share_noise` in the sidecar. What `uhg train` does at the end of a training with that option, for
an export trained without it.

    python tools/calo_fit_share_noise.py --model runs/calo_layers_ds1/export --train data/ds1_photons_24k.zarr
        --out runs/calo_layers_ds1_empirical/export [--events 4096] [--share-noise empirical_correlated]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import save_file

    from uhg.data import open_store
    from uhg.models.generator import SIDECAR, WEIGHTS, Generator
    from uhg.train.calo_layers_family import CaloLayersFamily

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="calo_layers export directory")
    ap.add_argument("--train", required=True, help="training store of the model")
    ap.add_argument("--out", required=True, help="new export directory (must not exist)")
    ap.add_argument("--events", type=int, default=4096, help="training showers (the first ones of the store)")
    ap.add_argument("--share-noise", choices=("empirical", "empirical_correlated"), default="empirical")
    a = ap.parse_args()
    torch.set_num_threads(1)

    gen = Generator.load(a.model)
    if gen.family.name != "calo_layers":
        raise SystemExit(f"{a.model}: family {gen.family.name!r}, expected 'calo_layers'")
    if a.share_noise == "empirical_correlated" and gen.family.cfg.ring_correlation:
        raise SystemExit(f"{a.model}: trained with ring_correlation, which mixes the noise the fitted correlation would mix again")
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out}: exists")
    sidecar = dict(gen.sidecar)
    sidecar["model"] = {**sidecar["model"], "share_noise": a.share_noise}
    fam = gen.family
    cfg = fam.cfg.model_copy(update={"share_noise": a.share_noise})
    trainer = CaloLayersFamily(fam.geometry, cfg, fam.condition_norm)
    module = gen.module
    module.cfg = cfg
    store = open_store(a.train)
    n = min(len(store), a.events)  # the store's first showers: energies are drawn per event, any block spans the range
    chunks = (store.read(i, min(i + 1024, n)) for i in range(0, n, 1024))
    fitted = trainer.finalise_from_data(module, chunks)
    print(", ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
    out.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items() if v.is_floating_point()},
              str(out / WEIGHTS))
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    Generator.load(out)  # the new export loads
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
