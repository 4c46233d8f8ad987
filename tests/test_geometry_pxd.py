"""Belle II PXD geometry: 40 sensors, Belle II ids, radii, channel counts, scaled variants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uhg.errors import GeometryError
from uhg.geometry import geometry_names, get_geometry


def test_full_pxd_has_40_sensors_and_7_68_m_channels():
    g = get_geometry("pxd")
    assert g.kind == "pixel"
    assert g.n_sensors == 40
    assert (g.rows, g.cols) == (250, 768)
    assert g.pixels_per_sensor == 192_000
    assert g.n_channels == 7_680_000
    assert g.adc_max == 255 and g.adc_threshold == 7


def test_sensor_ids_and_canonical_order():
    g = get_geometry("pxd")
    names = [s.name for s in g.sensors]
    expected = [f"1.{lad}.{sen}" for lad in range(1, 9) for sen in (1, 2)]
    expected += [f"2.{lad}.{sen}" for lad in range(1, 13) for sen in (1, 2)]
    assert names == expected
    assert [s.index for s in g.sensors] == list(range(40))
    for s in g.sensors:
        assert g.sensor_index(s.name) == s.index
    with pytest.raises(KeyError):
        g.sensor_index("3.1.1")


def test_layers_radii_and_forward_backward():
    g = get_geometry("pxd")
    inner = [s for s in g.sensors if s.layer == 1]
    outer = [s for s in g.sensors if s.layer == 2]
    assert len(inner) == 16 and len(outer) == 24
    assert {s.radius_mm for s in inner} == {14.0} and {s.radius_mm for s in outer} == {22.0}
    for s in g.sensors:
        assert s.forward == (s.number == 1)
        assert (s.z_mm > 0) == s.forward
    # ladders evenly spread in phi
    phis = sorted({round(s.phi_rad, 9) for s in inner})
    assert np.allclose(np.diff(phis), 2 * math.pi / 8)


def test_pixel_pitch_and_features():
    g = get_geometry("pxd")
    u1, v1 = g.pitch_um(1)
    u2, v2 = g.pitch_um(2)
    assert u1 == pytest.approx(50.0) and u2 == pytest.approx(50.0)
    assert 55 <= v1 <= 60 and 70 <= v2 <= 85
    f = g.sensor_features
    assert f.shape == (40, 6) and f.dtype == np.float32
    assert np.all(np.abs(f) <= 1.5)


@pytest.mark.parametrize(("name", "rows", "cols"), [("pxd-mini", 32, 96), ("pxd-tiny", 16, 48)])
def test_scaled_variants_keep_40_sensors(name, rows, cols):
    g = get_geometry(name)
    full = get_geometry("pxd")
    assert g.n_sensors == 40
    assert (g.rows, g.cols) == (rows, cols)
    assert g.n_channels == 40 * rows * cols
    assert [s.name for s in g.sensors] == [s.name for s in full.sensors]
    # same physical sensor: coarser pitch
    assert g.pitch_um(1)[0] * g.rows == pytest.approx(full.pitch_um(1)[0] * full.rows)


def test_geometry_registry():
    names = geometry_names()
    for n in ("pxd", "pxd-mini", "pxd-tiny", "ds1-photons", "ds2", "ds3", "epical", "epical-mini"):
        assert n in names
    assert get_geometry("pxd").to_dict()["n_channels"] == 7_680_000
    with pytest.raises(GeometryError, match="known geometries"):
        get_geometry("pxd-huge")
