"""The share law of hit-transformer exports (model.layer_split) against simulated showers, without
the network: the law splits each reference shower's own pixel total over the layers (the
network places exactly the pixels it draws per layer), and the mean pixels per layer of those
draws are compared with the reference's (MRE as `uhg eval`'s hits per layer; floor: a second
reference against the first), with the mean depth (hit-weighted layer) per energy bin.

    python tools/share_law_check.py --export runs/ab_F/export --export exportM \\
        --reference ref56.zarr --reference2 ref57.zarr
"""

from __future__ import annotations

import argparse

import torch

from uhg.data.reader import open_store
from uhg.eval.compare import mean_abs_rel_error
from uhg.models.generator import Generator
from uhg.sparse.torch_hits import TorchHits


def per_layer(path: str, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    store = open_store(path)
    hits = TorchHits.from_batch(store.read(0, len(store)))
    flat = hits.event_index() * n_layers + hits.columns["layer"].long()
    counts = torch.bincount(flat, minlength=len(store) * n_layers).view(len(store), n_layers).double()
    return counts, hits.conditions["incident_energy"].double()


def depth(counts: torch.Tensor) -> torch.Tensor:
    layer = torch.arange(counts.shape[1], dtype=counts.dtype)
    return (counts * layer).sum(1) / counts.sum(1).clamp_min(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", action="append", required=True, help="export directory (repeatable)")
    ap.add_argument("--reference", required=True, help="store of simulated showers")
    ap.add_argument("--reference2", default=None, help="a second one (floor)")
    ap.add_argument("--bins", default="1000,3000,8000,16001", help="incident-energy bin edges, MeV")
    ap.add_argument("--seed", type=int, default=3, help="seed of the law's uniforms")
    args = ap.parse_args()
    torch.set_num_threads(1)
    edges = [float(e) for e in args.bins.split(",")]
    ref = None
    for path in args.export:
        gen = Generator.load(path)
        law = (gen.module if hasattr(gen, "module") else gen._module).shares.double()
        n_layers = len(law.bias)
        if ref is None:
            ref, energy = per_layer(args.reference, n_layers)
            if args.reference2:
                ref2, _ = per_layer(args.reference2, n_layers)
                print(f"floor (reference2 vs reference): hits per layer MRE "
                      f"{mean_abs_rel_error(ref2.mean(0).numpy(), ref.mean(0).numpy()):.4f}")
        cond = gen.family.condition_norm({"incident_energy": energy.float()}).double()
        u = torch.rand(len(ref), 2 * n_layers, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
        draws = law.sample(ref.sum(1).long(), cond.float(), u, torch.full((n_layers,), 1 << 30)).double()
        with torch.no_grad():
            mean_depth = (law.mean_shares(cond) * torch.arange(n_layers, dtype=torch.float64)).sum(1)
        print(f"{path}: hits per layer MRE {mean_abs_rel_error(draws.mean(0).numpy(), ref.mean(0).numpy()):.4f}; "
              "drawn / reference pixels, every third layer: "
              + " ".join(f"{r:.2f}" for r in (draws.mean(0) / ref.mean(0)).numpy()[::3]))
        for lo, hi in zip(edges[:-1], edges[1:], strict=False):
            k = (energy >= lo) & (energy < hi)
            d_ref = float(depth(ref[k]).mean())
            print(f"  {lo:.0f}-{hi:.0f} MeV ({int(k.sum())} showers): mean depth reference {d_ref:.3f}, "
                  f"law's mean shares {float(mean_depth[k].mean()) - d_ref:+.3f}, draws {float(depth(draws[k]).mean()) - d_ref:+.3f}")


if __name__ == "__main__":
    main()
