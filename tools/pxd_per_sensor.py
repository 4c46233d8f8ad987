"""Where a generated PXD sample's per-sensor occupancy and charge differ from the reference: per
sensor, generated / reference of the mean hits, clusters, hits per cluster and pixel charge, with
a second reference / the reference beside it (the floor), and the per-layer mean and RMS of
those ratios. With --export (a GAN with a count law), also the law's expected clusters per
sensor at the reference's conditions / the reference's clusters, and the generated clusters /
the law's (what merging of the placed shapes loses).

    python tools/pxd_per_sensor.py --reference ref.zarr --reference2 ref2.zarr --generated gen.zarr \\
        [--events 1000] [--export run/export]

The per-sensor occupancy MRE of `uhg eval` is one number; this says which sensors carry it and
whether their clusters, their cluster sizes or their charge are off.
"""

from __future__ import annotations

import argparse

import numpy as np


def per_sensor(path: str, n: int) -> tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(geometry, per (event, sensor) arrays hits / clusters / charge sums, the store's conditions)."""
    from uhg.data.reader import open_store
    from uhg.eval.features_pxd import clusters_per_image, per_image

    store = open_store(path)
    batch = store.read(0, min(n, len(store)))
    geo = store.geometry
    out = {"hits": per_image(batch, geo), "clusters": clusters_per_image(batch, geo),
           "charge": per_image(batch, geo, "value")}
    return geo, out, dict(batch.conditions)


def ratios(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per sensor, a / b of the mean hits, clusters, hits per cluster and pixel charge."""
    return {
        "hits": a["hits"].mean(0) / b["hits"].mean(0),
        "clusters": a["clusters"].mean(0) / b["clusters"].mean(0),
        "hits per cluster": (a["hits"].sum(0) / a["clusters"].sum(0)) / (b["hits"].sum(0) / b["clusters"].sum(0)),
        "pixel charge": (a["charge"].sum(0) / a["hits"].sum(0)) / (b["charge"].sum(0) / b["hits"].sum(0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--reference2", required=True, help="an independent reference sample (the floor)")
    ap.add_argument("--generated", required=True)
    ap.add_argument("--events", type=int, default=1000, help="at most this many events of each store")
    ap.add_argument("--export", help="the generator export: its count law against the reference")
    args = ap.parse_args()
    geo, ref, conditions = per_sensor(args.reference, args.events)
    _, ref2, _ = per_sensor(args.reference2, args.events)
    _, gen, _ = per_sensor(args.generated, args.events)
    layer = np.array([s.layer for s in geo.sensors])
    value, floor = ratios(gen, ref), ratios(ref2, ref)
    print("sensor layer  " + "  ".join(f"{k} gen/ref (ref2/ref)" for k in value))
    for u in range(len(layer)):
        print(f"{u:6d} {layer[u]:5d}  " + "  ".join(f"{value[k][u]:.3f} ({floor[k][u]:.3f})" for k in value))
    for k in value:
        for lay in np.unique(layer):
            on = layer == lay
            print(f"{k:16s} layer {lay}: gen/ref mean {value[k][on].mean():.4f} rms dev {np.sqrt(((value[k][on] - 1) ** 2).mean()):.4f}"
                  f"  | ref2/ref mean {floor[k][on].mean():.4f} rms dev {np.sqrt(((floor[k][on] - 1) ** 2).mean()):.4f}")
        print(f"{k:16s} all: mean |gen/ref - 1| {np.abs(value[k] - 1).mean():.4f}  (ref2/ref {np.abs(floor[k] - 1).mean():.4f})")
    if args.export:
        import torch

        from uhg.models.generator import Generator

        model = Generator.load(args.export)
        law = getattr(model.module, "counts", None)
        if law is None:
            raise SystemExit(f"{args.export}: the generator has no count law")
        cond = model.family.condition_norm({k: torch.as_tensor(v) for k, v in conditions.items()})
        with torch.no_grad():
            expected = law.double().mean(cond.double()).mean(0).numpy()
        for name, r in (("law / reference clusters", expected / ref["clusters"].mean(0)),
                        ("generated clusters / law", gen["clusters"].mean(0) / expected)):
            print(f"{name:26s} mean {r.mean():.4f}  mean |dev| {np.abs(r - 1).mean():.4f}  "
                  + "  ".join(f"layer {lay} {r[layer == lay].mean():.4f}" for lay in np.unique(layer)))


if __name__ == "__main__":
    main()
