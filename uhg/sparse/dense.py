"""Flat channel indices and dense views of sparse hits (numpy).

Every hit has one flat channel index in its geometry:
- pixel detectors: `channel = (sensor * rows + row) * cols + col`, in [0, n_sensors*rows*cols);
- calorimeters: `channel = layer_offsets[layer] + cell`, the CaloChallenge voxel index
  (voxel order layer, alpha, radial), in [0, n_cells).
Stores keep hits as this index (sorted within an event, so it delta-encodes well); the public
columns (`sensor`, `row`, `col` / `layer`, `cell`) are recovered here exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # uhg.data imports this module: no runtime import back
    from uhg.data.hits import CaloEvent, HitBatch, PixelEvent


def n_channels(geometry: Any) -> int:
    """Number of readout channels (pixels or voxels) of a geometry."""
    return int(geometry.n_channels if geometry.kind == "pixel" else geometry.n_cells)


def channel_index(kind: str, columns: dict[str, np.ndarray], geometry: Any) -> np.ndarray:
    """(n_hits,) int64 flat channel index of hit columns (see module docstring)."""
    if kind == "pixel":
        sensor = columns["sensor"].astype(np.int64)
        return (sensor * geometry.rows + columns["row"]) * geometry.cols + columns["col"]
    offsets = np.asarray(geometry.layer_offsets, dtype=np.int64)
    return offsets[columns["layer"].astype(np.int64)] + columns["cell"]


def columns_from_channel(kind: str, channel: np.ndarray, geometry: Any) -> dict[str, np.ndarray]:
    """Inverse of `channel_index`: hit columns (without `value`) in the HitBatch dtypes."""
    if kind == "pixel":
        per_sensor = geometry.rows * geometry.cols
        # uint32 floor division by a scalar is exact here (channel < 2**32) and several times
        # faster than np.divmod or int64 arithmetic.
        ch = channel.astype(np.uint32, copy=False)
        sensor = ch // np.uint32(per_sensor)
        rest = ch - sensor * np.uint32(per_sensor)
        row = rest // np.uint32(geometry.cols)
        col = rest - row * np.uint32(geometry.cols)
        return {"sensor": sensor.astype(np.uint8), "row": row.astype(np.uint16), "col": col.astype(np.uint16)}
    offsets = np.asarray(geometry.layer_offsets, dtype=np.int64)
    layer = np.searchsorted(offsets, channel, side="right") - 1
    cell = channel.astype(np.int64) - offsets[layer]
    return {"layer": layer.astype(np.uint16), "cell": cell.astype(np.uint32)}


def check_in_geometry(kind: str, columns: dict[str, np.ndarray], geometry: Any) -> str | None:
    """None if all hits lie inside the geometry, else a message naming the first bad column."""
    if len(columns["value"]) == 0:
        return None
    if kind == "pixel":
        limits = {"sensor": geometry.n_sensors, "row": geometry.rows, "col": geometry.cols}
        for name, limit in limits.items():
            top = int(columns[name].max())
            if top >= limit:
                return f"column {name!r} has value {top}, geometry {geometry.name!r} allows 0..{limit - 1}"
        return None
    layer = columns["layer"].astype(np.int64)
    if int(layer.max()) >= geometry.n_layers:
        return f"column 'layer' has value {int(layer.max())}, geometry {geometry.name!r} has {geometry.n_layers} layers"
    cells = np.asarray(geometry.cells_per_layer, dtype=np.int64)
    bad = np.flatnonzero(columns["cell"] >= cells[layer])
    if len(bad):
        i = bad[0]
        return (f"column 'cell' has value {int(columns['cell'][i])} in layer {int(layer[i])}, geometry "
                f"{geometry.name!r} has {int(cells[layer[i]])} cells there")
    return None


def dense_event(event: PixelEvent | CaloEvent, geometry: Any) -> np.ndarray:
    """Dense view of one event: (n_sensors, rows, cols) uint8 ADC for pixel detectors,
    (n_cells,) float32 MeV in CaloChallenge voxel order for calorimeters."""
    if hasattr(event, "sensor"):
        out = np.zeros((geometry.n_sensors, geometry.rows, geometry.cols), dtype=np.uint8)
        out[event.sensor, event.row, event.col] = event.value
        return out
    out = np.zeros(geometry.n_cells, dtype=np.float32)
    out[np.asarray(geometry.layer_offsets, dtype=np.int64)[event.layer] + event.cell] = event.value
    return out


def dense_batch(batch: HitBatch, geometry: Any) -> np.ndarray:
    """Dense views of all events: (B, n_sensors, rows, cols) uint8 or (B, n_cells) float32."""
    ev = batch.event_index()
    ch = channel_index(batch.kind, batch.columns, geometry)
    if batch.kind == "pixel":
        out = np.zeros((len(batch), geometry.n_sensors * geometry.rows * geometry.cols), dtype=np.uint8)
        out[ev, ch] = batch.columns["value"]
        return out.reshape(len(batch), geometry.n_sensors, geometry.rows, geometry.cols)
    out = np.zeros((len(batch), geometry.n_cells), dtype=np.float32)
    out[ev, ch] = batch.columns["value"]
    return out
