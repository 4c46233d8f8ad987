"""Detector geometries, selected by name.

`get_geometry("pxd")` is the Belle II PXD (7.68 M channels); `pxd-mini` and `pxd-tiny` keep its
40 sensors with coarser pixels. Calorimeters: `ds1-photons`, `ds1-pions`, `ds2`, `ds3`
(CaloChallenge 2022 binnings) and `epical` / `epical-mini` (a digital pixel calorimeter).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Union

from uhg.errors import GeometryError
from uhg.geometry.pxd import PXD_VARIANTS, PixelGeometry, Sensor, pxd_geometry

if TYPE_CHECKING:
    from uhg.geometry.calo import CaloGeometry

Geometry = Union[PixelGeometry, "CaloGeometry"]


def geometry_names() -> list[str]:
    from uhg.geometry.calo import CALO_VARIANTS

    return [*PXD_VARIANTS, *CALO_VARIANTS]


@cache
def get_geometry(name: str) -> Geometry:
    """The geometry called `name`; raises GeometryError listing the known names otherwise."""
    if name in PXD_VARIANTS:
        rows, cols = PXD_VARIANTS[name]
        return pxd_geometry(name, rows, cols)
    from uhg.geometry.calo import CALO_VARIANTS, calo_geometry

    if name in CALO_VARIANTS:
        return calo_geometry(name)
    raise GeometryError(f"unknown geometry {name!r}; known geometries: {', '.join(geometry_names())}")


__all__ = ["Geometry", "PixelGeometry", "Sensor", "geometry_names", "get_geometry"]
