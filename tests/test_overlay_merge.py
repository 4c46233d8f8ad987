"""The overlay merge kernel on hand-made events: saturation, threshold, origin flags, order."""

from __future__ import annotations

import numpy as np
import pytest

from uhg.data.hits import ORIGIN_BACKGROUND, ORIGIN_BOTH, ORIGIN_SIGNAL, HitBatch, PixelEvent
from uhg.geometry import get_geometry
from uhg.sparse.overlay import merge_overlay

TINY = get_geometry("pxd-tiny")


def pixel_event(hits: list[tuple[int, int, int, int]], **conditions: float) -> PixelEvent:
    """Event from (sensor, row, col, adc) tuples."""
    a = np.array(hits, dtype=np.int64).reshape(-1, 4)
    return PixelEvent(a[:, 0].astype(np.uint8), a[:, 1].astype(np.uint16), a[:, 2].astype(np.uint16),
                      a[:, 3].astype(np.uint8), conditions=conditions)


def as_tuples(batch: HitBatch, i: int) -> list[tuple[int, int, int, int, int]]:
    e = batch.event(i)
    return list(zip(*(x.tolist() for x in (e.sensor, e.row, e.col, e.value, e.extra["origin"])), strict=True))


def test_merge_adds_saturates_thresholds_and_flags_origin() -> None:
    signal = HitBatch.from_events("pixel", [
        pixel_event([(0, 1, 2, 200), (0, 1, 3, 10), (3, 0, 0, 30), (39, 15, 47, 8)], luminosity=0.0),
        pixel_event([], luminosity=0.0),
        pixel_event([(5, 5, 5, 100)], luminosity=0.0),
    ])
    background = HitBatch.from_events("pixel", [
        # (0,1,2): 200 + 100 saturates at 255; (0,1,3): 10 + 3 = 13; (2,4,4) below threshold.
        pixel_event([(0, 1, 2, 100), (0, 1, 3, 3), (2, 4, 4, 5), (3, 0, 1, 9)], luminosity=2e34),
        pixel_event([(7, 0, 0, 6), (7, 0, 1, 7)], luminosity=2e34),
        pixel_event([], luminosity=2e34),
    ])
    out = merge_overlay(signal, background, TINY)
    assert out.extra_columns == ["origin"]
    assert out.columns["origin"].dtype == np.uint8
    assert as_tuples(out, 0) == [
        (0, 1, 2, 255, ORIGIN_BOTH),
        (0, 1, 3, 13, ORIGIN_BOTH),
        (3, 0, 0, 30, ORIGIN_SIGNAL),
        (3, 0, 1, 9, ORIGIN_BACKGROUND),
        (39, 15, 47, 8, ORIGIN_SIGNAL),
    ]
    # Threshold 7 ADU re-applied: the 6 ADU background pixel is not read out.
    assert as_tuples(out, 1) == [(7, 0, 1, 7, ORIGIN_BACKGROUND)]
    assert as_tuples(out, 2) == [(5, 5, 5, 100, ORIGIN_SIGNAL)]
    # Beam conditions of an overlay are those of its background.
    np.testing.assert_array_equal(out.conditions["luminosity"], [2e34] * 3)


def test_merge_output_sorted_unique_and_conserves_charge_below_saturation() -> None:
    rng = np.random.default_rng(3)

    def random_batch(n_events: int, n_hits: int) -> HitBatch:
        events = []
        for _ in range(n_events):
            channel = np.sort(rng.choice(TINY.n_channels, size=n_hits, replace=False))
            sensor, pixel = np.divmod(channel, TINY.pixels_per_sensor)
            row, col = np.divmod(pixel, TINY.cols)
            events.append(PixelEvent(sensor, row, col, rng.integers(7, 120, n_hits)))
        return HitBatch.from_events("pixel", events)

    signal, background = random_batch(4, 3000), random_batch(4, 5000)
    out = merge_overlay(signal, background, TINY)
    for i in range(len(out)):
        e = out.event(i)
        channel = (e.sensor.astype(np.int64) * TINY.rows + e.row) * TINY.cols + e.col
        assert np.all(np.diff(channel) > 0), "hits must stay sorted and unique"
        # Values < 120 each, so no sum reaches 255: total charge is conserved.
        assert int(e.value.sum()) == int(signal.event(i).value.sum()) + int(background.event(i).value.sum())
        n_both = int(np.sum(e.extra["origin"] == ORIGIN_BOTH))
        assert len(e) == len(signal.event(i)) + len(background.event(i)) - n_both
        assert n_both > 0  # 3000 x 5000 of 30720 pixels: coincidences are certain


def test_merge_rejects_mismatched_inputs() -> None:
    one = HitBatch.from_events("pixel", [pixel_event([(0, 0, 0, 9)])])
    two = HitBatch.from_events("pixel", [pixel_event([(0, 0, 0, 9)]), pixel_event([])])
    with pytest.raises(ValueError, match="1 events but background has 2"):
        merge_overlay(one, two, TINY)
    outside = HitBatch.from_events("pixel", [pixel_event([(0, 16, 0, 9)])])
    with pytest.raises(ValueError, match="row up to 16"):
        merge_overlay(one, outside, TINY)
    duplicated = HitBatch.from_events("pixel", [pixel_event([(0, 0, 0, 9), (0, 0, 0, 9)])])
    with pytest.raises(ValueError, match="unique"):
        merge_overlay(duplicated, one, TINY)
