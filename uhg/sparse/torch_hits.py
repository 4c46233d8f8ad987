"""Hits as torch tensors: the batch type every model and training step consumes.

`TorchHits` mirrors `uhg.data.hits.HitBatch` with tensors (integer columns as int64, `value`
as float32) so it can move to a device; dense per-sensor (or per-layer) images are built only
where a dense model asks for them, and hits become `torch.sparse_coo_tensor`s on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uhg.data.hits import HitBatch


@dataclass
class TorchHits:
    """A batch of B events. `columns` hold (n_hits,) tensors, `offsets` is (B+1,) int64,
    `conditions` hold (B,) float64 tensors in physical units."""

    kind: str
    columns: dict[str, torch.Tensor]
    offsets: torch.Tensor
    conditions: dict[str, torch.Tensor]

    @classmethod
    def from_batch(cls, batch: HitBatch) -> TorchHits:
        cols = {
            k: torch.from_numpy(v.astype(np.float32 if k == "value" else np.int64)) for k, v in batch.columns.items()
        }
        return cls(
            batch.kind,
            cols,
            torch.from_numpy(batch.offsets.astype(np.int64)),
            {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in batch.conditions.items()},
        )

    def to_batch(self) -> HitBatch:
        return HitBatch(
            self.kind,
            {k: v.detach().cpu().numpy() for k, v in self.columns.items()},
            self.offsets.cpu().numpy(),
            {k: v.cpu().numpy() for k, v in self.conditions.items()},
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def to(self, device: torch.device | str) -> TorchHits:
        return TorchHits(
            self.kind,
            {k: v.to(device, non_blocking=True) for k, v in self.columns.items()},
            self.offsets.to(device),
            {k: v.to(device) for k, v in self.conditions.items()},
        )

    def event_index(self) -> torch.Tensor:
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), counts)

    def pixel_sparse(self, n_sensors: int, rows: int, cols: int) -> torch.Tensor:
        """Sparse COO tensor (B, n_sensors, rows, cols) of ADC values (pixel detectors)."""
        c = self.columns
        idx = torch.stack([self.event_index(), c["sensor"], c["row"], c["col"]])
        return torch.sparse_coo_tensor(idx, c["value"], (len(self), n_sensors, rows, cols)).coalesce()

    def pixel_dense(self, n_sensors: int, rows: int, cols: int) -> torch.Tensor:
        """Dense (B, n_sensors, rows, cols) float32 ADC images, built by scatter from hits."""
        c = self.columns
        out = torch.zeros(len(self), n_sensors, rows, cols, device=self.device)
        out[self.event_index(), c["sensor"], c["row"], c["col"]] = c["value"]
        return out

    def calo_dense(self, layer_offsets: torch.Tensor | np.ndarray, n_voxels: int) -> torch.Tensor:
        """Dense (B, n_voxels) float32 energies in CaloChallenge voxel order; `layer_offsets`
        gives the first voxel of each layer."""
        c = self.columns
        lo = torch.as_tensor(np.asarray(layer_offsets), device=self.device, dtype=torch.int64)
        out = torch.zeros(len(self), n_voxels, device=self.device)
        out[self.event_index(), lo[c["layer"]] + c["cell"]] = c["value"]
        return out


@dataclass
class CompactHits:
    """A batch as the loader ships it: `channel` (n_hits,) int32 holding the flat channel index
    (`uhg.sparse.dense.channel_index`, always < 2**31), `columns` with `value` in the store's dtype
    (uint8 ADC for pixels, float32 MeV for calorimeters) and any extra columns, `offsets` (B+1,)
    int64, `conditions` (B,) float64. A pixel hit costs 5 bytes instead of the 28 of `TorchHits`;
    `widen` builds the `TorchHits` a model consumes, on the device that runs it."""

    kind: str
    channel: torch.Tensor
    columns: dict[str, torch.Tensor]
    offsets: torch.Tensor
    conditions: dict[str, torch.Tensor]

    @classmethod
    def from_channels(cls, batch) -> CompactHits:
        """From a `uhg.data.hits.ChannelBatch` (zero-copy: the tensors share its arrays)."""
        return cls(batch.kind, torch.from_numpy(batch.channel.view(np.int32)),
                   {k: torch.from_numpy(v) for k, v in batch.columns.items()}, torch.from_numpy(batch.offsets),
                   {k: torch.from_numpy(v) for k, v in batch.conditions.items()})

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_hits(self) -> int:
        return len(self.channel)

    def to(self, device: torch.device | str) -> CompactHits:
        return CompactHits(self.kind, self.channel.to(device, non_blocking=True),
                           {k: v.to(device, non_blocking=True) for k, v in self.columns.items()},
                           self.offsets.to(device), {k: v.to(device) for k, v in self.conditions.items()})

    def pin_memory(self) -> CompactHits:
        """Called by DataLoader(pin_memory=True): page-locked copies for asynchronous copies to a GPU."""
        return CompactHits(self.kind, self.channel.pin_memory(), {k: v.pin_memory() for k, v in self.columns.items()},
                           self.offsets.pin_memory(), {k: v.pin_memory() for k, v in self.conditions.items()})

    def widen(self, geometry, device: torch.device | str | None = None) -> TorchHits:
        """The `TorchHits` of this batch (int64 index columns, float32 value), computed on `device`
        (default: where the batch is) after moving only the compact columns there."""
        src = self if device is None else self.to(device)
        ch = src.channel.long()
        if self.kind == "pixel":
            per_sensor = geometry.rows * geometry.cols
            sensor = torch.div(ch, per_sensor, rounding_mode="floor")
            rest = ch - sensor * per_sensor
            row = torch.div(rest, geometry.cols, rounding_mode="floor")
            cols = {"sensor": sensor, "row": row, "col": rest - row * geometry.cols}
        else:
            lo = torch.as_tensor(np.asarray(geometry.layer_offsets), dtype=torch.int64, device=ch.device)
            layer = torch.searchsorted(lo, ch, right=True) - 1
            cols = {"layer": layer, "cell": ch - lo[layer]}
        cols["value"] = src.columns["value"].float()
        cols |= {k: v.long() for k, v in src.columns.items() if k != "value"}
        return TorchHits(self.kind, cols, src.offsets, dict(src.conditions))

    def dense(self, n_channels: int) -> torch.Tensor:
        """Dense (B, n_channels) float32 values in flat channel order, scattered from the hits;
        reshape to (B, n_sensors, rows, cols) for pixels."""
        counts = self.offsets[1:] - self.offsets[:-1]
        event = torch.repeat_interleave(torch.arange(len(self), device=self.channel.device), counts)
        out = torch.zeros(len(self), n_channels, device=self.channel.device)
        out[event, self.channel.long()] = self.columns["value"].float()
        return out
