"""How a detector becomes the GAN's tokens and images.

The GAN sees an event as `n_units` images of one shape: the 40 PXD sensors (rows x cols
pixels), or a calorimeter's active layers (alpha x radial bins, or a Cartesian pixel grid),
zero-padded to the largest layer shape with a validity mask. Pixel values are encoded to
[0, 1] for the networks:
- pixel ADC charge a >= threshold: v = log1p(a) / log1p(255); no hit: 0;
- calorimeter energy E of a shower of incident energy E0: v = 1 + log10(E / E0) / DECADES,
  clipped to (0, 1]; no hit: 0; digital calorimeters: 1 per fired pixel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.sparse.torch_hits import TorchHits

CALO_DECADES = 7.0  # cell energies down to 1e-7 of the incident energy are representable


@dataclass(frozen=True)
class UnitLayout:
    """Readout units (sensors or layers) of one geometry as same-shape images."""

    kind: str  # "pixel" | "calo"
    n_units: int
    height: int
    width: int
    features: np.ndarray  # (n_units, n_features) float32 geometry features of each unit
    valid: np.ndarray  # (n_units, height, width) bool: cell exists
    unit_layer: np.ndarray  # (n_units,) int64: sensor index / calorimeter layer of each unit
    layer_offsets: np.ndarray | None  # calo: first flat voxel of each layer
    layer_width: np.ndarray | None  # calo: columns of each layer (cell = row * width + col)
    digital: bool
    adc_threshold: int
    adc_max: int
    min_value: float  # pixel: smallest encoded charge (threshold); calo: cell threshold in MeV

    @functools.cached_property
    def all_valid(self) -> bool:
        """Every cell of every unit exists (pixel sensors): no validity mask to apply."""
        return bool(self.valid.all())

    @property
    def min_code(self) -> float:
        """Smallest encoded value a hit can take (pixel threshold), 0 for calorimeters."""
        if self.kind == "pixel":
            return math.log1p(self.adc_threshold) / math.log1p(self.adc_max)
        return 0.0


def unit_layout(geometry, cell_threshold_mev: float = 0.0) -> UnitLayout:
    """The layout of a PixelGeometry or CaloGeometry."""
    if geometry.kind == "pixel":
        n = geometry.n_sensors
        return UnitLayout("pixel", n, geometry.rows, geometry.cols, np.asarray(geometry.sensor_features, np.float32),
                          np.ones((n, geometry.rows, geometry.cols), bool), np.arange(n, dtype=np.int64), None, None,
                          False, geometry.adc_threshold, geometry.adc_max, float(geometry.adc_threshold))
    layers = list(geometry.active_layers)
    shapes = [geometry.layer_shape(layer) for layer in layers]
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    valid = np.zeros((len(layers), h, w), bool)
    for u, (rh, rw) in enumerate(shapes):
        valid[u, :rh, :rw] = True
    depth = np.array([geometry.layer_depth_x0[layer] for layer in layers], np.float32)
    max_depth = max(float(depth.max()), 1e-6)
    features = np.stack([
        np.array(layers, np.float32) / max(geometry.n_layers - 1, 1),
        depth[:, 0] / max_depth, depth[:, 1] / max_depth,
        np.array([s[0] for s in shapes], np.float32) / h, np.array([s[1] for s in shapes], np.float32) / w,
    ], axis=1)
    widths = np.array([geometry.layer_shape(i)[1] if geometry.cells_per_layer[i] else 1
                       for i in range(geometry.n_layers)], np.int64)
    threshold = max(float(cell_threshold_mev), float(getattr(geometry, "threshold_mev", 0.0)))
    return UnitLayout("calo", len(layers), h, w, features.astype(np.float32), valid, np.array(layers, np.int64),
                      np.asarray(geometry.layer_offsets, np.int64), widths, geometry.readout == "digital", 0, 0,
                      threshold)


def encode_hits(layout: UnitLayout, hits: TorchHits) -> torch.Tensor:
    """(B, n_units, H, W) float32 encoded images of a batch of real events."""
    b = len(hits)
    out = torch.zeros(b, layout.n_units, layout.height, layout.width, device=hits.device)
    ev = hits.event_index()
    c = hits.columns
    if layout.kind == "pixel":
        out[ev, c["sensor"], c["row"], c["col"]] = torch.log1p(c["value"]) / math.log1p(layout.adc_max)
        return out
    unit_of_layer = torch.full((int(layout.unit_layer.max()) + 1,), -1, dtype=torch.int64, device=hits.device)
    unit_of_layer[torch.as_tensor(layout.unit_layer, device=hits.device)] = torch.arange(layout.n_units, device=hits.device)
    width = torch.as_tensor(layout.layer_width, device=hits.device)[c["layer"]]
    row, col = c["cell"] // width, c["cell"] % width
    if layout.digital:
        v = torch.ones_like(c["value"])
    else:
        e0 = hits.conditions["incident_energy"].to(torch.float32)[ev]
        v = (1 + torch.log10(c["value"].clamp_min(1e-30) / e0) / CALO_DECADES).clamp(1e-6, 1.0)
    out[ev, unit_of_layer[c["layer"]], row, col] = v
    return out


def hit_index(layout: UnitLayout, mask: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(event, unit, row, col) int64 arrays of the hits of a (B, n_units, H, W) bool `mask` in the
    layout's valid cells, in row-major order (a flat search: several times faster than
    `torch.nonzero` on CPU)."""
    m = mask.cpu().numpy()
    flat = np.flatnonzero(m)
    if not layout.all_valid:
        flat = flat[layout.valid.reshape(-1)[flat % layout.valid.size]]
    return tuple(i.astype(np.int64, copy=False) for i in np.unravel_index(flat, m.shape))


def decode_hits(layout: UnitLayout, index: tuple[np.ndarray, ...], vals: np.ndarray, n_events: int,
                conditions: dict[str, torch.Tensor]) -> HitBatch:
    """Sparse hits from generated hits at `index` (`hit_index`) with encoded values `vals`.

    Pixel: ADC = round(expm1(code * log1p(255))) clipped to [threshold, 255]. Calorimeter:
    E = E0 * 10^((code - 1) * DECADES) MeV; cells below the threshold are dropped; digital: 1."""
    ev, unit, row, col = index
    conds = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in conditions.items()}
    if layout.kind == "pixel":
        adc = np.rint(np.expm1(vals.astype(np.float64) * math.log1p(layout.adc_max)))
        adc = np.clip(adc, layout.adc_threshold, layout.adc_max)
        counts = np.bincount(ev, minlength=n_events)
        return HitBatch("pixel", {"sensor": unit, "row": row, "col": col, "value": adc.astype(np.uint8)},
                        np.concatenate([[0], np.cumsum(counts)]), conds)
    layer = layout.unit_layer[unit]
    cell = row.astype(np.int64) * layout.layer_width[layer] + col
    if layout.digital:
        energy = np.ones(len(vals), np.float32)
        keep = np.ones(len(vals), bool)
    else:
        e0 = conds["incident_energy"][ev]
        energy = (e0 * 10.0 ** ((vals.astype(np.float64) - 1.0) * CALO_DECADES)).astype(np.float32)
        keep = energy >= layout.min_value
    ev, layer, cell, energy = ev[keep], layer[keep], cell[keep], energy[keep]
    counts = np.bincount(ev, minlength=n_events)
    return HitBatch("calo", {"layer": layer, "cell": cell, "value": energy}, np.concatenate([[0], np.cumsum(counts)]),
                    conds)
