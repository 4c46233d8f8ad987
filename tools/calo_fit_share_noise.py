"""Fit the after-training parts of a trained `calo_layers` export to training showers and write a
new export with them: the same weights plus, with `--share-noise`, each voxel's residual quantiles
(`empirical_correlated`: also their within-layer correlation), and with `--latent-prior mixture`
the conditional latent prior fitted to the encoder's latents, and with `--vae-fit-steps` the voxel VAE
trained further alone first (`vae_fit_steps`; the export's residual quantiles and latent prior are
then refitted to the new decoder); the sidecar carries the new settings. What `uhg train` does at the end of a training with those options, for an export
trained without them (only the parts asked for are fitted; the rest stays as exported).

    python tools/calo_fit_share_noise.py --model runs/calo_layers_ds1/export --train data/ds1_photons_24k.zarr
        --out runs/calo_layers_ds1_empirical/export [--events 4096] [--share-noise empirical_correlated]
        [--latent-prior mixture [--prior-components 8] [--prior-steps 3000]] [--vae-fit-steps 2000 [--vae-fit-lr 1e-3]]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import save_file

    from uhg.data import open_store
    from uhg.models.generator import FORMAT, SIDECAR, WEIGHTS, Generator
    from uhg.train.calo_layers_family import CaloLayersFamily

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="calo_layers export directory")
    ap.add_argument("--train", required=True, help="training store of the model")
    ap.add_argument("--out", required=True, help="new export directory (must not exist)")
    ap.add_argument("--events", type=int, default=4096, help="training showers (the first ones of the store)")
    ap.add_argument("--share-noise", choices=("empirical", "empirical_correlated"))
    ap.add_argument("--latent-prior", choices=("mixture",))
    ap.add_argument("--prior-components", type=int)
    ap.add_argument("--prior-steps", type=int)
    ap.add_argument("--vae-fit-steps", type=int, help="train the voxel VAE alone this many more steps first")
    ap.add_argument("--vae-fit-lr", type=float, help="start learning rate of that fit")
    ap.add_argument("--seed", type=int, default=0, help="torch's global seed: the prior's initial weights")
    a = ap.parse_args()
    if a.share_noise is None and a.latent_prior is None and not a.vae_fit_steps:
        raise SystemExit("nothing to fit: give --share-noise, --latent-prior and/or --vae-fit-steps")
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)  # the same export for the same inputs

    gen = Generator.load(a.model)
    if gen.family.name != "calo_layers":
        raise SystemExit(f"{a.model}: family {gen.family.name!r}, expected 'calo_layers'")
    if a.share_noise == "empirical_correlated" and gen.family.cfg.ring_correlation:
        raise SystemExit(f"{a.model}: trained with ring_correlation, which mixes the noise the fitted correlation would mix again")
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out}: exists")
    update = {k: v for k, v in (("share_noise", a.share_noise), ("latent_prior", a.latent_prior),
                                ("prior_components", a.prior_components), ("prior_steps", a.prior_steps),
                                ("vae_fit_steps", a.vae_fit_steps), ("vae_fit_lr", a.vae_fit_lr))
              if v is not None}
    sidecar = dict(gen.sidecar)
    sidecar["model"] = {**sidecar["model"], **update}
    fam = gen.family
    cfg = fam.cfg.model_copy(update=update)
    module = gen.module
    module.cfg = cfg
    store = open_store(a.train)
    n = min(len(store), a.events)  # the store's first showers: energies are drawn per event, any block spans the range
    chunks = [store.read(i, min(i + 1024, n)) for i in range(0, n, 1024)]
    if a.latent_prior is not None and not hasattr(module, "prior"):
        module.add_latent_prior()
    # the training's own after-training fit, asked for the parts given here only (never the law's
    # again); a refitted VAE needs the residual quantiles and latent prior of its new decoder
    keep_noise, keep_prior = (cfg.share_noise, cfg.latent_prior) if a.vae_fit_steps else ("gaussian", "standard")
    asked = cfg.model_copy(update={"share_noise": a.share_noise or keep_noise, "latent_prior": a.latent_prior or keep_prior,
                                   "law_fit_steps": 0, "vae_fit_steps": a.vae_fit_steps or 0})
    fitted = CaloLayersFamily(fam.geometry, asked, fam.condition_norm).finalise_from_data(module, chunks)
    print(", ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
    out.mkdir(parents=True)
    sidecar["format"] = FORMAT  # every tensor of the model is written, integer buffers included
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out / WEIGHTS),
              metadata={"format": FORMAT})
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    Generator.load(out)  # the new export loads
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
