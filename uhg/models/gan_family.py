"""The sensor-conditioned GAN family: its modules and sampling (inference half).

An event is `n_units` same-shape images (PXD sensors or calorimeter layers, `unit_layout`); the
generator maps event noise, per-sensor noise (and, for pixel detectors, per-pixel noise) and the
normalised conditions to a hit-gate logit and an encoded charge per pixel, plus the neighbour
logits of cluster growth where it is on. The training half (two engines, losses, validation
metrics, the data-driven start) is `uhg.train.gan_family`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uhg.config.gan import GanConfig
from uhg.data.hits import HitBatch
from uhg.models.common import ConditionNorm
from uhg.models.gan import Discriminator, Generator
from uhg.models.gan_layout import decode_hits, hit_index, unit_layout
from uhg.models.modes import eval_mode


class GanFamily:
    """`ModelFamily` of the sensor-conditioned GAN for a pixel or calorimeter geometry."""

    name = "gan"
    generator_name = "generator"
    pads_partial_batches = True

    def __init__(self, geometry, cfg: GanConfig, condition_norm: ConditionNorm):
        self.geometry, self.cfg, self.condition_norm = geometry, cfg, condition_norm
        self.layout = unit_layout(geometry, cfg.cell_threshold_mev)
        self.ema_decay = cfg.ema_decay
        self._valid: dict[torch.device, torch.Tensor] = {}

    # -- modules
    def build_modules(self) -> dict[str, nn.Module]:
        n_cond = len(self.condition_norm.names)
        return {"generator": Generator(self.layout, self.cfg, n_cond),
                "discriminator": Discriminator(self.layout, self.cfg, n_cond)}

    def valid(self, device: torch.device) -> torch.Tensor:
        if device not in self._valid:
            self._valid[device] = torch.as_tensor(self.layout.valid, device=device).float()
        return self._valid[device]

    @torch.no_grad()
    def sample(self, module: nn.Module, conditions: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> HitBatch:
        lay, cfg = self.layout, self.cfg
        device = next(module.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]
        z = torch.stack([torch.randn(cfg.z_dim, generator=g, device=device) for g in gens])
        un = torch.stack([torch.randn(lay.n_units, cfg.sensor_noise_dim, generator=g, device=device) for g in gens])
        # A pixel fires when gate + logistic noise > 0, i.e. with probability sigmoid(gate): drawn
        # here as uniform u < sigmoid(gate), which needs no logarithms over 7.68 M pixels. Noise maps
        # are drawn in place, event by event: torch.rand/randn's numbers without stacking copies.
        u = torch.empty((len(gens), lay.n_units, lay.height, lay.width), device=device)
        for row, g in zip(u, gens, strict=True):
            row.uniform_(generator=g)
        p = module.pixel_noise_channels
        pn = None
        if p:
            pn = torch.empty((len(gens), lay.n_units, p, lay.height, lay.width), device=device)
            for row, g in zip(pn, gens, strict=True):
                row.normal_(generator=g)
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        cond = self.condition_norm(conds).to(device)
        with eval_mode(module):
            gate, head, clusters = module.sample_maps(z, un, cond)
        mask = torch.lt(u, gate.sigmoid_())
        if clusters is not None:  # clusters grow from the seeds, drawn per event from its own generator
            n_seeds = np.count_nonzero(mask.cpu().numpy().reshape(len(gens), -1), axis=1)  # 10x a bool sum()
            k = module.draws_per_seed
            draws = [torch.rand(int(n), k, generator=g, device=device) for g, n in zip(gens, n_seeds, strict=True)]
            mask = module.place_clusters(mask, clusters, torch.cat(draws))
        index = hit_index(lay, mask)
        at = tuple(torch.from_numpy(i).to(device) for i in index)
        code = module.code_at(head, at, pn[at[0], at[1], 0, at[2], at[3]] if pn is not None else None)
        return decode_hits(lay, index, code.float().cpu().numpy(), len(seeds), {k: conds[k] for k in conds})
