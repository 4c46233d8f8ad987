"""The layer-energy calorimeter family: its module and sampling (inference half).

One module ("model", `uhg.models.calo_layers.CaloLayersModel`). The training half (optimiser,
standardisation of the layer energies from training showers, the likelihood step, validation)
is `uhg.train.calo_layers_family`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uhg.config.calo_layers import CaloLayersConfig
from uhg.data.calochallenge import dense_to_hits
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.models.calo_layers import CaloLayersModel
from uhg.models.common import ConditionNorm

ENERGY = "incident_energy"


def voxel_rings(geometry) -> torch.Tensor:
    """(n_cells,) long: the ring of every voxel, numbered over (layer, radial bin) of the layers
    with voxels (cell = alpha_bin * n_r + r_bin in the polar CaloChallenge layout)."""
    if geometry.layout == "cartesian":
        raise ConfigError(f"model.ring_correlation needs a polar (r, alpha) geometry; {geometry.name!r} is cartesian")
    rings, first = [], 0
    for lay in geometry.active_layers:
        n_alpha, n_r = geometry.layer_shape(lay)
        rings.append(first + np.tile(np.arange(n_r), n_alpha))
        first += n_r
    return torch.as_tensor(np.concatenate(rings), dtype=torch.long)


class CaloLayersFamily:
    """`ModelFamily` of the layer-energy model for an analog calorimeter geometry."""

    name = "calo_layers"
    generator_name = "model"
    pads_partial_batches = False

    def __init__(self, geometry, cfg: CaloLayersConfig, condition_norm: ConditionNorm):
        if geometry.kind != "calo" or getattr(geometry, "readout", "analog") != "analog":
            raise ConfigError(f"model.family calo_layers models analog calorimeter showers; geometry "
                              f"{geometry.name!r} is {geometry.kind} / {getattr(geometry, 'readout', '-')}")
        if ENERGY not in cfg.conditions:
            raise ConfigError(f"model.conditions must contain {ENERGY!r} for calo_layers, got {cfg.conditions}")
        self.geometry, self.cfg, self.condition_norm = geometry, cfg, condition_norm
        self.ema_decay = cfg.ema_decay
        offsets = np.asarray(geometry.layer_offsets)
        active = list(geometry.active_layers)
        layer_of_voxel = np.searchsorted(offsets, np.arange(geometry.n_cells), side="right") - 1
        self.voxel_layer = torch.as_tensor(np.searchsorted(active, layer_of_voxel), dtype=torch.long)
        self.voxel_ring = voxel_rings(geometry) if cfg.ring_correlation else None

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": CaloLayersModel(self.voxel_layer, len(self.cfg.conditions), self.cfg, self.voxel_ring)}

    @torch.no_grad()
    def sample(self, module: nn.Module, conditions: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> HitBatch:
        """Showers for per-event `conditions`; shower i draws all its noise from a torch.Generator
        seeded with seeds[i], so it does not depend on the batch it is generated in."""
        device = next(module.parameters()).device
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        shapes = module.noise_shapes()
        parts = []
        for lo in range(0, len(seeds), self.cfg.generate_batch):
            ids = list(seeds[lo:lo + self.cfg.generate_batch])
            noise: dict[str, list[torch.Tensor]] = {k: [] for k in shapes}
            for s in ids:
                gen = torch.Generator().manual_seed(int(s))
                for k, shape in shapes.items():
                    noise[k].append(torch.rand(shape, generator=gen) if k.endswith("_u")
                                    else torch.randn(shape, generator=gen))
            part = {k: v[lo:lo + len(ids)] for k, v in conds.items()}
            cond = self.condition_norm(part).to(device)
            e_inc = part[ENERGY].to(device, torch.float32)
            dense = module.sample(e_inc, cond, {k: torch.stack(v).to(device) for k, v in noise.items()})
            parts.append(dense_to_hits(dense.cpu().numpy(), part[ENERGY].double().cpu().numpy(), self.geometry))
        if not parts:
            return dense_to_hits(np.zeros((0, self.geometry.n_cells), np.float32), np.zeros(0), self.geometry)
        return HitBatch.concat(parts) if len(parts) > 1 else parts[0]
