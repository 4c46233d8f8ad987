"""The autoregressive hit-transformer family: its modules and sampling (inference half).

One module ("model"): hits as token sequences (one per event and sensor, or per shower; cost ~
hits, never channels), conditions normalised by the family's `ConditionNorm`. The training half
(optimiser groups, law fitting, the teacher-forced step, validation) is
`uhg.train.transformer_family`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uhg.config.transformer import TransformerConfig
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.models.common import ConditionNorm
from uhg.models.transformer import HitTransformer
from uhg.models.transformer_sampling import sample_events
from uhg.models.transformer_tokens import layout_for_geometry


class TransformerFamily:
    """`ModelFamily` of the hit transformer for a pixel or calorimeter geometry."""

    name = "transformer"
    generator_name = "model"
    pads_partial_batches = False

    def __init__(self, geometry, cfg: TransformerConfig, condition_norm: ConditionNorm):
        self.geometry, self.cfg, self.condition_norm = geometry, cfg, condition_norm
        lo, hi = cfg.energy_range
        factorised = cfg.pixel_head == "factorised"
        if factorised and getattr(geometry, "layout", None) != "cartesian":
            raise ConfigError(f"model.pixel_head: factorised predicts a cell as (pixel row, pixel column) of a layer "
                              f"grid; geometry {geometry.name!r} has no pixel grid (use pixel_head: flat)")
        if factorised and cfg.cell_field and (geometry.nx % cfg.field_tile or geometry.ny % cfg.field_tile):
            raise ConfigError(f"model.field_tile ({cfg.field_tile}) must divide the {geometry.ny} x {geometry.nx} "
                              f"pixel grid of geometry {geometry.name!r}")
        if cfg.rotary_grid and getattr(geometry, "layout", None) != "cartesian":
            raise ConfigError(f"model.rotary_grid rotates by the pixel row and column of a layer grid; geometry "
                              f"{geometry.name!r} has no pixel grid (use rotary_grid: false)")
        if cfg.cell_neighbours and getattr(geometry, "layout", None) != "cartesian":
            raise ConfigError(f"model.cell_neighbours weights the fired neighbours of a cell on a layer's pixel grid; "
                              f"geometry {geometry.name!r} has no pixel grid (use cell_neighbours: false)")
        if cfg.energy_reference == "incident":
            self.layout = layout_for_geometry(geometry, cfg.energy_bins, energy_reference="incident",
                                              energy_min_fraction=lo, energy_max_fraction=hi, factorised=factorised)
        else:
            self.layout = layout_for_geometry(geometry, cfg.energy_bins, lo, hi, factorised=factorised)
        self.ema_decay = cfg.ema_decay
        if cfg.token == "cluster" and self.layout.kind != "pixel":
            raise ConfigError(f"model.token: cluster makes tokens of pixel clusters; geometry {geometry.name!r} is a "
                              f"calorimeter (use token: pixel)")
        if cfg.layer_counts and self.layout.kind != "calo":
            raise ConfigError(f"model.layer_counts draws the hits of each calorimeter layer; geometry {geometry.name!r} "
                              f"is a pixel detector")
        if cfg.response_model and self.layout.kind == "pixel":
            raise ConfigError(f"model.response_model is for calorimeters; geometry {geometry.name!r} is a pixel detector")

    def build_modules(self) -> dict[str, nn.Module]:
        if self.cfg.pixel_head == "factorised":  # the field lives on tiles the model lays out itself
            return {"model": HitTransformer(self.cfg, self.layout, grid=(self.geometry.ny, self.geometry.nx))}
        grid = (self.geometry.ny, self.geometry.nx) if self.cfg.rotary_grid or self.cfg.cell_neighbours else None
        return {"model": HitTransformer(self.cfg, self.layout, self._cell_xy() if self.cfg.cell_field else None, grid)}

    def _cell_xy(self) -> np.ndarray:
        """cell_field: (cells, 2) centres of a layer's cells in pixel pitches about the layer centre."""
        g = self.geometry
        if getattr(g, "layout", None) != "cartesian":
            raise ConfigError(f"model.cell_field needs a calorimeter of pixel layers on one grid (epical); geometry "
                              f"{g.name!r} is not")
        xs, ys = g.cell_centers(0)
        return np.stack([np.asarray(xs) / g.pitch_x_mm, np.asarray(ys) / g.pitch_y_mm], 1)


    @torch.no_grad()
    def sample(self, module: nn.Module, conditions: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> HitBatch:
        """Events for per-event `conditions`; event i's randomness derives only from seeds[i]
        (its latent from a torch.Generator seeded with it, its tokens from a counter-based
        hash of it), so events do not depend on the batch they are generated in."""
        device = next(module.parameters()).device
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        cond = self.condition_norm(conds).to(device)
        return sample_events(module, cond, list(seeds), {k: v.cpu().numpy() for k, v in conds.items()},
                             temperature=self.cfg.temperature, top_q=self.cfg.top_q, max_hits=self.cfg.max_hits,
                             batch_events=max(1, self.cfg.generate_batch_sequences // self.layout.n_units))
