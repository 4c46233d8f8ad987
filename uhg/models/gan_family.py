"""The sensor-conditioned GAN family: its modules and sampling (inference half).

An event is `n_units` same-shape images (PXD sensors or calorimeter layers, `unit_layout`); the
generator maps event noise, per-sensor noise (and, for pixel detectors, per-pixel noise) and the
normalised conditions to a hit-gate logit and an encoded charge per pixel, plus the neighbour
logits of cluster growth where it is on. The training half (two engines, losses, validation
metrics, the data-driven start) is `uhg.train.gan_family`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from uhg.config.gan import GanConfig
from uhg.data.hits import HitBatch
from uhg.models.common import ConditionNorm
from uhg.models.gan import Discriminator, Generator, HeadMaps
from uhg.models.gan_layout import decode_hits, hit_index, unit_layout
from uhg.models.gan_seeds import counted_seed_index
from uhg.models.modes import eval_mode
from uhg.models.stages import stage


@dataclass(frozen=True)
class GanDraw:
    """One batch of generated images before their charges are read (`GanFamily.draw`)."""

    mask: torch.Tensor
    """(B, U, H, W) bool: the hits."""
    seeds: torch.Tensor
    """(B, U, H, W) bool: the cluster seeds (the hits themselves without cluster growth)."""
    clusters: torch.Tensor | None
    """the cluster logits of `Generator.sample_maps`, or None."""
    cluster_draws: torch.Tensor | None
    """(seeds, draws_per_seed) uniforms `place_clusters` took, or None."""
    head: HeadMaps
    """the head output of `Generator.sample_maps` (charges are read from it at the hits)."""
    charges: tuple[torch.Tensor, ...]
    """the charge maps of `Generator.sample_clusters` at the hits (with a charge profile), else ()."""
    generators: tuple[torch.Generator, ...]
    """each event's generator, after the draws above: `sample` draws the pixel noise at the hits from it."""
    conditions: dict[str, torch.Tensor]


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
        d = self.draw(module, conditions, seeds)
        with stage("hits and charges"):  # the sparse conversion: hit search, charges at the hits
            index = hit_index(self.layout, d.mask)
            at = tuple(torch.from_numpy(i).to(d.mask.device) for i in index)
            pn = None
            if module.pixel_noise_channels and not module.charge_bank:  # the bank's charges need no noise
                # The charge noise is read at the hits only (~1% of the pixels), so it is drawn there,
                # each event's after all its other draws: the same law as a full noise map read at the
                # hits (i.i.d. standard normal, independent of where the hits are), without 7.68 M
                # normal draws per full PXD event (~30 ms of its 0.22 CPU s).
                n_hits = np.bincount(index[0], minlength=len(seeds))
                pn = torch.cat([torch.randn(int(n), generator=g, device=d.mask.device)
                                for g, n in zip(d.generators, n_hits, strict=True)])
            if module.charge_profile:
                code = module.profile_code_at(d.head, at, pn, d.charges)
            else:
                code = module.code_at(d.head, at, pn)
            return decode_hits(self.layout, index, code.float().cpu().numpy(), len(seeds), d.conditions)

    @torch.no_grad()
    def draw(self, module: nn.Module, conditions: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> GanDraw:
        """The images of `sample` before the charges are read at the hits (`GanDraw`)."""
        lay, cfg = self.layout, self.cfg
        device = next(module.parameters()).device
        with stage("noise"):
            gens = [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]
            z = torch.stack([torch.randn(cfg.z_dim, generator=g, device=device) for g in gens])
            un = torch.stack([torch.randn(lay.n_units, cfg.sensor_noise_dim, generator=g, device=device) for g in gens])
            # A pixel fires when gate + logistic noise > 0, i.e. with probability sigmoid(gate): drawn
            # here as uniform u < sigmoid(gate), which needs no logarithms over 7.68 M pixels. The map is
            # drawn in place, event by event: torch.rand's numbers without stacking copies.
            u = torch.empty((len(gens), lay.n_units, lay.height, lay.width), device=device)
            for row, g in zip(u, gens, strict=True):
                row.uniform_(generator=g)
            counted = getattr(module, "counts", None) is not None
            if counted:  # the count law's uniforms: one per sensor and one for the event-wide factor
                law_u = torch.stack([torch.rand(lay.n_units + 1, generator=g, device=device) for g in gens])
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        cond = self.condition_norm(conds).to(device)
        with eval_mode(module), stage("decoder"):
            head, offset, clusters = module.sample_maps(z, un, cond)
        b, at = len(gens), None
        with stage("seeds"):
            if counted:  # exactly the law's count of seeds, where the gate puts them (u as Gumbel noise)
                counts = module.draw_counts(cond, law_u[:, 1:], law_u[:, 0])
                flat = counted_seed_index(counts, u.view(b * lay.n_units, -1),
                                          lambda r, q: module.gate_at(head, offset, r, q), module.gate_max(head, offset),
                                          lambda: module.gate_map(head, offset).reshape(b * lay.n_units, -1))
                seed_mask = torch.zeros(u.numel(), dtype=torch.bool, device=device)
                seed_mask[flat] = True
                seed_mask = seed_mask.view(u.shape)
                at = torch.stack(torch.unravel_index(flat, u.shape), dim=1)  # = seed_mask.nonzero(), without the search
                n_seeds = np.bincount(at[:, 0].cpu().numpy(), minlength=b)
            else:
                seed_mask = torch.lt(u, module.gate_map(head, offset).sigmoid_())
                n_seeds = np.count_nonzero(seed_mask.cpu().numpy().reshape(b, -1), axis=1)  # 10x a bool sum()
        mask, draws, charges = seed_mask, None, ()
        with stage("clusters"):
            if clusters is not None:  # clusters grow from the seeds, drawn per event from its own generator
                k = module.draws_per_seed
                draws = torch.cat([torch.rand(int(n), k, generator=g, device=device)
                                   for g, n in zip(gens, n_seeds, strict=True)])
                if module.n_shapes:  # shapes drawn and placed once, for the hits and their charges
                    mask, charges = module.sample_clusters(seed_mask, clusters, draws, at=at, at_hits=True)
                else:
                    mask = module.place_clusters(seed_mask, clusters, draws)
        return GanDraw(mask, seed_mask, clusters, draws, head, charges, tuple(gens), conds)
