"""Nearly empty calorimeter layers, sample by sample: per layer, the fraction of showers that put
energy in it, the mean number of hit cells when they do, the fraction with one hit cell, the
spread (std) of the centre of energy in x and the energy-weighted mean radius of the hits; with
--model, the fraction of the showers the model gives energy in a layer whose voxel hit draws all
miss (the layer then keeps its energy in one voxel, `empty_layer_voxel`).

    python tools/calo_tail_layers.py --geometry ds2 --samples REF1.zarr REF2.zarr GEN.zarr --layers 30,36,40,44 [--model EXPORT]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def layer_table(path: str, geometry, layers: list[int]) -> list[str]:
    from uhg.data import open_store
    from uhg.eval.features_calo import cell_xy

    store = open_store(path)
    b = store.read(0, len(store))
    ev, lay = b.event_index(), b.columns["layer"].astype(np.int64)
    e = b.columns["value"].astype(np.float64)
    x, y = cell_xy(geometry, lay, b.columns["cell"])
    rows = []
    for layer in layers:
        m = lay == layer
        e_l = np.bincount(ev[m], e[m], len(b))
        n_hit = np.bincount(ev[m], None, len(b))
        has = e_l > 0
        cx = np.bincount(ev[m], e[m] * x[m], len(b))[has] / e_l[has]
        r = np.average(np.hypot(x[m], y[m]), weights=e[m]) if m.any() else float("nan")
        rows.append(f"L{layer} {has.mean():.3f} {n_hit[has].mean():.2f} {(n_hit[has] == 1).mean():.2f} "
                    f"{cx.std():.2f} {r:.2f}")
    return rows


def no_hit_fraction(export: str, layers: list[int], n: int, seed: int) -> list[str]:
    """Of n showers (log-uniform over the export's training range), per layer with energy the
    fraction whose voxel hit draws all miss."""
    from uhg.models.generator import Generator

    gen = Generator.load(export)
    fam, model = gen.family, gen.module
    rng = torch.Generator().manual_seed(seed)
    norm = fam.condition_norm
    k = norm.names.index("incident_energy")  # log-scaled: the training range is [-1, 1]
    e_inc = torch.exp(norm.center[k] + norm.scale[k] * torch.empty(n).uniform_(-1.0, 1.0, generator=rng))
    cond = fam.condition_norm({"incident_energy": e_inc.double()})
    noise = {k: (torch.rand if k.endswith("_u") else torch.randn)((n, *s), generator=rng)
             for k, s in model.noise_shapes().items()}
    with torch.no_grad():
        y, e_layer = model.sample_layers(e_inc, cond, noise["law_u"], noise["law_eps"])
        ctx = torch.cat([cond, y], -1)
        z = model.prior.sample(ctx, noise["prior_u"], noise["z"]) if hasattr(model, "prior") else noise["z"]
        logit = model.vae.decode(z, ctx)[0]
        hits = torch.zeros(n, model.n_layers).index_add_(
            1, model.voxel_layer, (noise["voxel_u"] < torch.sigmoid(logit)).float())
    active = list(fam.geometry.active_layers)
    out = []
    for layer in layers:
        i = active.index(layer)
        has = e_layer[:, i] > 0
        out.append(f"L{layer} {float((hits[has, i] == 0).float().mean()):.3f}")
    return out


def main() -> None:
    from uhg.geometry import get_geometry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated layer numbers")
    ap.add_argument("--model", help="a calo_layers export: also its no-hit fraction per layer")
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = get_geometry(a.geometry)
    layers = [int(v) for v in a.layers.split(",")]
    print("sample | layer: showers with energy, hits when hit, one-hit fraction, std centre x [mm], "
          "energy-weighted hit radius [mm]")
    for path in a.samples:
        print(path, "|", " | ".join(layer_table(path, g, layers)))
    if a.model:
        print(a.model, "| layer: of the showers with energy, fraction whose hit draws all miss |",
              " | ".join(no_hit_fraction(a.model, layers, a.events, a.seed)))


if __name__ == "__main__":
    main()
