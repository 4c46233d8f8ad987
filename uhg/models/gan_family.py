"""The sensor-conditioned GAN family: its modules and sampling (inference half).

An event is `n_units` same-shape images (PXD sensors or calorimeter layers, `unit_layout`); the
generator maps event noise, per-sensor noise (and, for pixel detectors, per-pixel noise) and the
normalised conditions to a hit-gate logit and an encoded charge per pixel, plus the neighbour
logits of cluster growth where it is on. The training half (two engines, losses, validation
metrics, the data-driven start) is `uhg.train.gan_family`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from uhg.config.gan import GanConfig
from uhg.data.hits import HitBatch
from uhg.models.common import ConditionNorm
from uhg.models.gan import Discriminator, Generator, place_counted_seeds
from uhg.models.gan_layout import decode_images, unit_layout
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
        mask, code, _, _ = self.draw(module, conditions, seeds)
        return decode_images(self.layout, mask, code, {k: torch.as_tensor(v) for k, v in conditions.items()})

    @torch.no_grad()
    def draw(self, module: nn.Module, conditions: Mapping[str, torch.Tensor],
             seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The images of `sample`: (hit mask (B, U, H, W) bool, encoded charges (B, U, H, W), the cluster
        seeds (B, U, H, W) bool (the mask itself without clusters), the cluster logits or None)."""
        lay, cfg = self.layout, self.cfg
        device = next(module.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]
        z = torch.stack([torch.randn(cfg.z_dim, generator=g, device=device) for g in gens])
        un = torch.stack([torch.randn(lay.n_units, cfg.sensor_noise_dim, generator=g, device=device) for g in gens])
        # A pixel fires when gate + logistic noise > 0, i.e. with probability sigmoid(gate): drawn
        # here as uniform u < sigmoid(gate), which needs no logarithms over 7.68 M pixels.
        u = torch.stack([torch.rand((lay.n_units, lay.height, lay.width), generator=g, device=device) for g in gens])
        p = module.pixel_noise_channels
        pn = torch.stack([torch.randn((lay.n_units, p, lay.height, lay.width), generator=g, device=device)
                          for g in gens]) if p else None
        counted = getattr(module, "counts", None) is not None
        if counted:  # the count law's uniforms: one per sensor and one for the event-wide factor
            law_u = torch.stack([torch.rand(lay.n_units + 1, generator=g, device=device) for g in gens])
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        cond = self.condition_norm(conds).to(device)
        with eval_mode(module):
            gate, code, clusters = module(z, un, cond, pn)
        if counted:  # exactly the law's count of seeds, where the gate puts them (u as Gumbel noise)
            mask = place_counted_seeds(gate, module.draw_counts(cond, law_u[:, 1:], law_u[:, 0]), u)
        else:
            mask = u < torch.sigmoid(gate)
        seeds = mask
        if clusters is not None:  # clusters grow from the seeds, drawn per event from its own generator
            n_seeds = mask.sum(dim=(1, 2, 3)).tolist()
            k = module.draws_per_seed
            draws = [torch.rand(int(n), k, generator=g, device=device) for g, n in zip(gens, n_seeds, strict=True)]
            draws = torch.cat(draws)
            mask = module.place_clusters(seeds, clusters, draws)
            if module.charge_profile:
                code = module.profile_code(code, pn, seeds, clusters, draws)
        return mask, code, seeds, clusters
