"""Merge background hits into signal hits, event by event, without densifying.

Signal event i and background event i are merged the way a pixel readout sees them: charges
of a pixel fired by both add, saturate at the ADC maximum (255 for 8 bits), and the
zero-suppression threshold is applied again. Every output hit carries an `origin` flag
(uint8): 1 = signal only, 2 = background only, 3 = both (see `uhg.data.hits.ORIGIN_*`), so
users can count signal pixels lost to or altered by background (efficiency) and background
pixels that remain (fakes).

Cost is O(hits): each input is sorted within events, so a linear pixel key is globally sorted
in each input and one stable sort merges the two runs.
"""

from __future__ import annotations

import numpy as np

from uhg.data.hits import (
    COLUMNS,
    ORIGIN_BACKGROUND,
    ORIGIN_SIGNAL,
    HitBatch,
)
from uhg.geometry.pxd import PixelGeometry


def pixel_keys(batch: HitBatch, geometry: PixelGeometry) -> np.ndarray:
    """(n_hits,) int64 key `event * n_channels + sensor * rows * cols + row * cols + col`,
    increasing along a batch whose events hold sorted, unique hits."""
    c = batch.columns
    channel = (c["sensor"].astype(np.int64) * geometry.rows + c["row"]) * geometry.cols + c["col"]
    return batch.event_index() * np.int64(geometry.n_channels) + channel


def _check_in_geometry(name: str, batch: HitBatch, geometry: PixelGeometry) -> None:
    limits = {"sensor": geometry.n_sensors, "row": geometry.rows, "col": geometry.cols}
    for column, limit in limits.items():
        values = batch.columns[column]
        if values.size and int(values.max()) >= limit:
            raise ValueError(f"{name} hits have {column} up to {int(values.max())}, but geometry "
                             f"{geometry.name!r} has {limit}")


def merge_overlay(signal: HitBatch, background: HitBatch, geometry: PixelGeometry,
                  threshold: int | None = None) -> HitBatch:
    """Overlay `background` event i onto `signal` event i, for all i.

    Both batches: pixel hits of `geometry`, the same number of events, hits sorted and unique
    within each event. Returns a pixel batch with an extra `origin` column; its conditions are
    the signal's, overridden by the background's where both name the same condition (the beam
    conditions of an overlay are those of its background).

    `threshold` (ADU) defaults to `geometry.adc_threshold`; summed charges saturate at
    `geometry.adc_max`.
    """
    if signal.kind != "pixel" or background.kind != "pixel":
        raise ValueError(f"overlay merges pixel hits, got {signal.kind!r} and {background.kind!r}")
    if len(signal) != len(background):
        raise ValueError(f"signal has {len(signal)} events but background has {len(background)}")
    threshold = geometry.adc_threshold if threshold is None else int(threshold)
    n_events = len(signal)
    for name, batch in (("signal", signal), ("background", background)):
        _check_in_geometry(name, batch, geometry)

    keys = np.concatenate([pixel_keys(signal, geometry), pixel_keys(background, geometry)])
    value = np.concatenate([signal.columns["value"], background.columns["value"]]).astype(np.int32)
    origin = np.concatenate([np.full(signal.n_hits, ORIGIN_SIGNAL, np.uint8),
                             np.full(background.n_hits, ORIGIN_BACKGROUND, np.uint8)])
    # Two sorted runs: the stable sort (timsort for int64) merges them in linear time, and
    # keeps a coinciding pair adjacent, signal first.
    order = np.argsort(keys, kind="stable")
    keys, value, origin = keys[order], value[order], origin[order]
    first = np.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    repeat = np.flatnonzero(~first)
    if repeat.size:
        # Coinciding pixels must come one from each input: (signal, background) pairs.
        if np.any(origin[repeat] != ORIGIN_BACKGROUND) or np.any(origin[repeat - 1] != ORIGIN_SIGNAL):
            raise ValueError("a pixel appears twice within one event of the signal or of the background; "
                             "hits must be unique within each event")
        starts = np.flatnonzero(first)
        value = np.add.reduceat(value, starts)
        origin = np.bitwise_or.reduceat(origin, starts)
        keys = keys[starts]
    value = np.minimum(value, geometry.adc_max)
    keep = value >= threshold
    keys, value, origin = keys[keep], value[keep], origin[keep]

    event, channel = np.divmod(keys, np.int64(geometry.n_channels))
    sensor, pixel = np.divmod(channel, np.int64(geometry.pixels_per_sensor))
    row, col = np.divmod(pixel, np.int64(geometry.cols))
    counts = np.bincount(event, minlength=n_events)
    offsets = np.zeros(n_events + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    spec = COLUMNS["pixel"]
    columns = {
        "sensor": sensor.astype(spec["sensor"]),
        "row": row.astype(spec["row"]),
        "col": col.astype(spec["col"]),
        "value": value.astype(spec["value"]),
        "origin": origin,
    }
    conditions = dict(signal.conditions) | dict(background.conditions)
    return HitBatch("pixel", columns, offsets, conditions)
