"""Hits <-> token sequences for the autoregressive hit transformer.

A *sequence* holds the hits of one (event, unit): a PXD sensor, or a whole calorimeter shower.
Each hit is one token with three parts, predicted one after the other:

    row  (pixel row / calorimeter layer, or END)  ->  col (pixel column / cell in the layer)
         ->  value (ADC code above threshold / log-energy bin)

Hits are ordered by flat position `row * n_cols + col` inside their unit, so a sequence is a
strictly increasing walk over a grid whose row `r` has `row_width[r]` valid columns (all
`n_cols` for pixel sensors; `cells_per_layer[r]` for calorimeter layers). Only continuations
that keep this order are valid; the model masks the others, so every sample is a sorted set
of unique hits and the END token alone decides multiplicity.

`TokenLayout` describes the grid, the units and the value code; `encode_hits` builds padded
teacher-forcing tensors from a `TorchHits` batch (cost ~ number of hits, never channels) and
`decode_tokens` turns generated tokens back into a `HitBatch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.errors import GeometryError
from uhg.sparse.torch_hits import TorchHits


MAX_CELLS_PER_ROW = 65536
"""Largest calorimeter layer (cells) a single categorical cell head is built for."""


@dataclass(frozen=True)
class TokenLayout:
    """What a token means for one geometry.

    kind: "pixel" (one sequence per sensor) or "calo" (one sequence per shower, rows = layers).
    n_units: sequences per event (40 PXD sensors; 1 for a calorimeter shower).
    n_rows, n_cols: the position grid of one unit; END is row class `n_rows`.
    row_width: valid columns per row (n_rows,).
    n_values: value classes. Pixel: ADC codes adc_threshold..adc_max. Calo: log-energy bins
        between energy_min_mev and energy_max_mev (equal width in log E).
    unit_features: (n_units, F) float32 geometry features of each unit (PXD: r, phi, z, ...).
    """

    kind: str
    n_units: int
    n_rows: int
    n_cols: int
    row_width: tuple[int, ...]
    n_values: int
    unit_features: np.ndarray
    adc_threshold: int = 0
    energy_min_mev: float = 0.0
    energy_max_mev: float = 0.0
    digital: bool = False
    """Calorimeters with digital readout (EPICAL): every hit has value 1, one value class."""

    @property
    def end_row(self) -> int:
        return self.n_rows

    @property
    def positions_per_unit(self) -> int:
        return int(sum(self.row_width))

    def to_dict(self) -> dict:
        """JSON-able description (the unit features are rebuilt from the geometry)."""
        return {"kind": self.kind, "n_units": self.n_units, "n_rows": self.n_rows, "n_cols": self.n_cols,
                "n_values": self.n_values, "adc_threshold": self.adc_threshold,
                "energy_min_mev": self.energy_min_mev, "energy_max_mev": self.energy_max_mev, "digital": self.digital}

    def encode_values(self, value: torch.Tensor) -> torch.Tensor:
        """Hit values (ADC in ADU, or energy in MeV) -> value classes (long)."""
        if self.kind == "pixel":
            return (value.round().long() - self.adc_threshold).clamp_(0, self.n_values - 1)
        if self.digital:
            return torch.zeros_like(value, dtype=torch.long)
        lo, hi = math.log(self.energy_min_mev), math.log(self.energy_max_mev)
        x = (torch.log(value.double().clamp_min(self.energy_min_mev)) - lo) / (hi - lo) * self.n_values
        return x.floor().long().clamp_(0, self.n_values - 1)

    def decode_values(self, cls: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Value classes -> physical values. Calo energies are spread uniformly in log E inside
        their bin by `u` in [0, 1), so energies are continuous; pixel codes ignore `u`."""
        if self.kind == "pixel":
            return (cls + self.adc_threshold).float()
        if self.digital:
            return torch.ones_like(cls, dtype=torch.float32)
        lo, hi = math.log(self.energy_min_mev), math.log(self.energy_max_mev)
        return torch.exp(lo + (cls.double() + u.double()) * (hi - lo) / self.n_values).float()


def layout_for_geometry(geometry, n_energy_bins: int = 128, energy_min_mev: float = 0.01515,
                        energy_max_mev: float = 1.0e6) -> TokenLayout:
    """The token layout of a PXD (`PixelGeometry`) or calorimeter (`CaloGeometry`) geometry."""
    if geometry.kind == "pixel":
        return TokenLayout(
            kind="pixel", n_units=geometry.n_sensors, n_rows=geometry.rows, n_cols=geometry.cols,
            row_width=(geometry.cols,) * geometry.rows, n_values=geometry.adc_max - geometry.adc_threshold + 1,
            unit_features=np.asarray(geometry.sensor_features, dtype=np.float32),
            adc_threshold=geometry.adc_threshold,
        )
    if geometry.kind == "calo":
        if not 0 < energy_min_mev < energy_max_mev:
            raise GeometryError(f"calorimeter energy range must satisfy 0 < min < max, got {energy_min_mev}, {energy_max_mev}")
        widths = tuple(int(c) for c in geometry.cells_per_layer)
        if max(widths) > MAX_CELLS_PER_ROW:
            raise GeometryError(f"geometry {geometry.name!r} has {max(widths)} cells in a layer; the hit transformer's "
                                f"cell head supports at most {MAX_CELLS_PER_ROW} (use a coarser variant, e.g. epical-mini)")
        digital = getattr(geometry, "readout", "analog") == "digital"
        return TokenLayout(
            kind="calo", n_units=1, n_rows=geometry.n_layers, n_cols=max(widths), row_width=widths,
            n_values=1 if digital else n_energy_bins, unit_features=np.zeros((1, 1), np.float32),
            energy_min_mev=energy_min_mev, energy_max_mev=energy_max_mev, digital=digital,
        )
    raise GeometryError(f"geometry {geometry.name!r} has unknown kind {geometry.kind!r}")


@dataclass
class TokenBatch:
    """Padded token sequences, S = n_events * n_units, T = longest sequence + 1.

    rows, cols, values: (S, T) long. Input position t holds hit t-1 (t = 0 is the start token,
        whose row/col/value are 0 and never read); the target at position t is hit t, or END
        (row = n_rows) at t = length. Padding after the END target is 0.
    lengths: (S,) hits per sequence. event: (S,) event of each sequence. unit: (S,) unit.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    event: torch.Tensor
    unit: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Real targets (hits + one END per sequence)."""
        return int(self.lengths.sum()) + len(self.lengths)

    def target_mask(self) -> torch.Tensor:
        """(S, T) bool: positions whose target is a hit or END (not padding)."""
        t = torch.arange(self.rows.shape[1], device=self.rows.device)
        return t[None, :] <= self.lengths[:, None]


def encode_hits(hits: TorchHits, layout: TokenLayout) -> TokenBatch:
    """Padded token sequences of a batch; hits are sorted here, so any order is accepted."""
    c, dev = hits.columns, hits.device
    n_events, U = len(hits), layout.n_units
    if layout.kind == "pixel":
        unit, row, col = c["sensor"].long(), c["row"].long(), c["col"].long()
    else:
        unit, row, col = torch.zeros_like(c["layer"].long()), c["layer"].long(), c["cell"].long()
    if len(row) and (int(row.max()) >= layout.n_rows or int(col.max()) >= layout.n_cols or int(unit.max()) >= U):
        raise GeometryError(f"hits outside the {layout.kind} grid of {U} units x {layout.n_rows} x {layout.n_cols}")
    seq = hits.event_index() * U + unit
    pos = row * layout.n_cols + col
    order = torch.argsort(seq * (layout.n_rows * layout.n_cols) + pos, stable=True)
    seq, row, col = seq[order], row[order], col[order]
    val = layout.encode_values(c["value"][order])
    S = n_events * U
    lengths = torch.bincount(seq, minlength=S)
    starts = torch.cumsum(lengths, 0) - lengths
    slot = torch.arange(len(seq), device=dev) - starts[seq] + 1  # +1: slot 0 is the start token
    T = int(lengths.max()) + 1 if S else 1
    out = [torch.zeros(S, T, dtype=torch.long, device=dev) for _ in range(3)]
    for tensor, src in zip(out, (row, col, val), strict=True):
        tensor[seq, slot] = src
    seq_ids = torch.arange(S, device=dev)
    return TokenBatch(*out, lengths=lengths, event=seq_ids // U, unit=seq_ids % U)


def decode_tokens(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                  layout: TokenLayout, n_events: int, conditions: dict[str, np.ndarray],
                  value_u: torch.Tensor | None = None) -> HitBatch:
    """Generated tokens -> a sorted `HitBatch`.

    rows, cols, values: (S, T) hit tokens (position t = hit t), S = n_events * n_units in
    (event, unit) order; lengths: (S,) hits per sequence; value_u: optional (S, T) uniforms
    spreading calorimeter energies inside their bin.
    """
    S, T = rows.shape if rows.ndim == 2 else (len(lengths), 0)
    keep = torch.arange(T, device=rows.device)[None, :] < lengths[:, None]
    seq = torch.arange(S, device=rows.device)[:, None].expand(S, T)[keep]
    r, c, v = rows[keep], cols[keep], values[keep]
    u = value_u[keep] if value_u is not None else torch.full_like(v, 0.5, dtype=torch.float64)
    phys = layout.decode_values(v, u).cpu().numpy()
    event = (seq // layout.n_units).cpu().numpy()
    counts = np.bincount(event, minlength=n_events)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if layout.kind == "pixel":
        columns = {"sensor": (seq % layout.n_units).cpu().numpy(), "row": r.cpu().numpy(),
                   "col": c.cpu().numpy(), "value": phys}
    else:
        columns = {"layer": r.cpu().numpy(), "cell": c.cpu().numpy(), "value": phys}
    return HitBatch(layout.kind, columns, offsets, conditions)
