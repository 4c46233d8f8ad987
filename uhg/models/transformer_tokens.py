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
    n_values: value classes. Pixel: ADC codes adc_threshold..adc_max. Calo: log-energy bins of
        equal width in log E: with energy_reference "absolute" between energy_min_mev and
        energy_max_mev; with "incident" bins of log(E / E_inc) between energy_min_fraction and
        energy_max_fraction, so a class means the same share of the shower at every incident
        energy E_inc (MeV, passed per hit to encode_values / decode_values).
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
    energy_reference: str = "absolute"
    energy_min_fraction: float = 0.0
    energy_max_fraction: float = 0.0

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
                "energy_min_mev": self.energy_min_mev, "energy_max_mev": self.energy_max_mev, "digital": self.digital,
                "energy_reference": self.energy_reference, "energy_min_fraction": self.energy_min_fraction,
                "energy_max_fraction": self.energy_max_fraction}

    @property
    def relative_energy(self) -> bool:
        """True if calorimeter energy classes are bins of log(E / E_inc)."""
        return self.kind == "calo" and not self.digital and self.energy_reference == "incident"

    def _log_edges(self) -> tuple[float, float]:
        """Natural log of the lowest and highest bin edge (MeV, or fraction of E_inc)."""
        if self.energy_reference == "incident":
            return math.log(self.energy_min_fraction), math.log(self.energy_max_fraction)
        return math.log(self.energy_min_mev), math.log(self.energy_max_mev)

    def _reference(self, incident_mev: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.relative_energy:
            return None
        if incident_mev is None:
            raise ValueError("energy_reference=incident: cell energies are coded relative to the incident "
                             "energy, so the incident energy (MeV) of every hit is needed")
        if incident_mev.shape != like.shape:
            raise ValueError(f"incident energy per hit has shape {tuple(incident_mev.shape)}, "
                             f"expected {tuple(like.shape)}")
        return incident_mev.to(like.device, torch.float64)

    def encode_values(self, value: torch.Tensor, incident_mev: torch.Tensor | None = None) -> torch.Tensor:
        """Hit values (ADC in ADU, or energy in MeV) -> value classes (long). incident_mev: the
        incident energy of each hit's shower, same shape as value (energy_reference=incident)."""
        if self.kind == "pixel":
            return (value.round().long() - self.adc_threshold).clamp_(0, self.n_values - 1)
        if self.digital:
            return torch.zeros_like(value, dtype=torch.long)
        lo, hi = self._log_edges()
        x = value.double()
        ref = self._reference(incident_mev, value)
        if ref is not None:
            x = x / ref
        x = (torch.log(x.clamp_min(math.exp(lo))) - lo) / (hi - lo) * self.n_values
        return x.floor().long().clamp_(0, self.n_values - 1)

    def decode_values(self, cls: torch.Tensor, u: torch.Tensor, incident_mev: torch.Tensor | None = None) -> torch.Tensor:
        """Value classes -> physical values. Calo energies (MeV) are spread uniformly in log E
        inside their bin by `u` in [0, 1), so energies are continuous; with
        energy_reference=incident the bin is a fraction of `incident_mev` (same shape as cls).
        Pixel codes ignore `u`."""
        if self.kind == "pixel":
            return (cls + self.adc_threshold).float()
        if self.digital:
            return torch.ones_like(cls, dtype=torch.float32)
        lo, hi = self._log_edges()
        x = torch.exp(lo + (cls.double() + u.double()) * (hi - lo) / self.n_values)
        ref = self._reference(incident_mev, cls)
        return (x if ref is None else x * ref).float()


def layout_for_geometry(geometry, n_energy_bins: int = 128, energy_min_mev: float = 0.01515,
                        energy_max_mev: float = 1.0e6, energy_reference: str = "absolute",
                        energy_min_fraction: float = 1.0e-9, energy_max_fraction: float = 1.0,
                        factorised: bool = False) -> TokenLayout:
    """The token layout of a PXD (`PixelGeometry`) or calorimeter (`CaloGeometry`) geometry.
    Calorimeter energy bins: energy_min_mev..energy_max_mev (energy_reference="absolute") or
    energy_min_fraction..energy_max_fraction of the incident energy ("incident"). factorised: the
    model predicts a cell as (pixel row, pixel column), so a layer may exceed MAX_CELLS_PER_ROW."""
    if geometry.kind == "pixel":
        return TokenLayout(
            kind="pixel", n_units=geometry.n_sensors, n_rows=geometry.rows, n_cols=geometry.cols,
            row_width=(geometry.cols,) * geometry.rows, n_values=geometry.adc_max - geometry.adc_threshold + 1,
            unit_features=np.asarray(geometry.sensor_features, dtype=np.float32),
            adc_threshold=geometry.adc_threshold,
        )
    if geometry.kind == "calo":
        if energy_reference not in ("absolute", "incident"):
            raise GeometryError(f"energy_reference must be 'absolute' or 'incident', got {energy_reference!r}")
        if energy_reference == "absolute" and not 0 < energy_min_mev < energy_max_mev:
            raise GeometryError(f"calorimeter energy range must satisfy 0 < min < max, got {energy_min_mev}, {energy_max_mev}")
        if energy_reference == "incident" and not 0 < energy_min_fraction < energy_max_fraction:
            raise GeometryError(f"calorimeter energy fractions must satisfy 0 < min < max, "
                                f"got {energy_min_fraction}, {energy_max_fraction}")
        absolute = energy_reference == "absolute"
        widths = tuple(int(c) for c in geometry.cells_per_layer)
        if max(widths) > MAX_CELLS_PER_ROW and not factorised:
            raise GeometryError(f"geometry {geometry.name!r} has {max(widths)} cells in a layer; the hit transformer's "
                                f"flat cell head supports at most {MAX_CELLS_PER_ROW} (use model.pixel_head: factorised, "
                                f"or a coarser variant, e.g. epical-mini)")
        digital = getattr(geometry, "readout", "analog") == "digital"
        return TokenLayout(
            kind="calo", n_units=1, n_rows=geometry.n_layers, n_cols=max(widths), row_width=widths,
            n_values=1 if digital else n_energy_bins, unit_features=np.zeros((1, 1), np.float32),
            energy_min_mev=energy_min_mev if absolute else 0.0, energy_max_mev=energy_max_mev if absolute else 0.0,
            digital=digital, energy_reference=energy_reference,
            energy_min_fraction=0.0 if absolute else energy_min_fraction,
            energy_max_fraction=0.0 if absolute else energy_max_fraction,
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

    def hit_mask(self) -> torch.Tensor:
        """(S, T) bool: input positions that hold a hit (1 to length; position 0 is the start token)."""
        t = torch.arange(self.rows.shape[1], device=self.rows.device)[None]
        return (t >= 1) & (t <= self.lengths[:, None])

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
    incident = None
    if layout.relative_energy:
        if "incident_energy" not in hits.conditions:
            raise GeometryError("energy_reference=incident needs the incident_energy condition of every shower")
        incident = hits.conditions["incident_energy"][hits.event_index()][order]
    val = layout.encode_values(c["value"][order], incident)
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
    spreading calorimeter energies inside their bin; conditions: {name: (n_events,)} physical
    values (with energy_reference=incident, incident_energy in MeV decodes the energies).
    """
    S, T = rows.shape if rows.ndim == 2 else (len(lengths), 0)
    keep = torch.arange(T, device=rows.device)[None, :] < lengths[:, None]
    seq = torch.arange(S, device=rows.device)[:, None].expand(S, T)[keep]
    r, c, v = rows[keep], cols[keep], values[keep]
    u = value_u[keep] if value_u is not None else torch.full_like(v, 0.5, dtype=torch.float64)
    event_t = seq // layout.n_units
    incident = None
    if layout.relative_energy:
        if "incident_energy" not in conditions:
            raise GeometryError("energy_reference=incident needs the incident_energy condition to decode energies")
        e0 = torch.as_tensor(np.asarray(conditions["incident_energy"], dtype=np.float64), device=rows.device)
        incident = e0[event_t]
    phys = layout.decode_values(v, u, incident).cpu().numpy()
    event = event_t.cpu().numpy()
    counts = np.bincount(event, minlength=n_events)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if layout.kind == "pixel":
        columns = {"sensor": (seq % layout.n_units).cpu().numpy(), "row": r.cpu().numpy(),
                   "col": c.cpu().numpy(), "value": phys}
    else:
        columns = {"layer": r.cpu().numpy(), "cell": c.cpu().numpy(), "value": phys}
    return HitBatch(layout.kind, columns, offsets, conditions)
