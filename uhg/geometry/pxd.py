"""Belle II pixel vertex detector (PXD) geometry.

Two layers of DEPFET sensors around the beam pipe: layer 1 with 8 ladders at r ~ 14 mm,
layer 2 with 12 ladders at r ~ 22 mm, two sensors per ladder (1 = forward, z > 0;
2 = backward, z < 0): 40 sensors of 250 x 768 pixels, 7.68 M channels.

Coordinates: `row` runs over the 250 pixels in r-phi (u, pitch 50 um), `col` over the 768
pixels along the beam axis z (v). The real sensors have two pitch zones along z (L1: 55/60 um,
L2: 70/85 um); we use the length-weighted mean pitch per layer (58.33 um, 80.0 um), which keeps
the sensitive lengths (44.8 mm, 61.44 mm) right. Sensor centres in z are approximate (the real
PXD is shifted forward because of the asymmetric beam energies).

Scaled variants keep the 40-sensor structure and physical sensor size but use coarser pixels,
so tests and demos exercise the same code on 1000x fewer channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

LADDERS_PER_LAYER = {1: 8, 2: 12}
RADIUS_MM = {1: 14.0, 2: 22.0}
SENSOR_WIDTH_MM = 12.5  # 250 pixels x 50 um in r-phi
SENSOR_LENGTH_MM = {1: 44.8, 2: 61.44}  # 768 pixels x mean pitch along z
# Sensor centre along z (mm) for (layer, sensor number); forward sensors sit at z > 0.
Z_CENTER_MM = {(1, 1): 23.4, (1, 2): -21.4, (2, 1): 32.7, (2, 2): -28.7}


@dataclass(frozen=True)
class Sensor:
    """One PXD sensor. `index` is the position in the canonical order used everywhere in uhg:
    layer 1 ladders 1-8 x sensors 1-2, then layer 2 ladders 1-12 x sensors 1-2."""

    index: int
    layer: int
    ladder: int
    number: int
    radius_mm: float
    phi_rad: float
    z_mm: float

    @property
    def name(self) -> str:
        """Belle II style id `layer.ladder.sensor`, e.g. `1.3.2`."""
        return f"{self.layer}.{self.ladder}.{self.number}"

    @property
    def forward(self) -> bool:
        return self.number == 1


@dataclass(frozen=True)
class PixelGeometry:
    """A pixel vertex detector: identical-grid sensors, each `rows` x `cols` pixels."""

    name: str
    rows: int
    cols: int
    sensors: tuple[Sensor, ...] = field(repr=False)
    kind: str = "pixel"
    adc_bits: int = 8
    adc_threshold: int = 7
    """Zero-suppression threshold in ADC units: pixels below it are not read out."""

    @property
    def n_sensors(self) -> int:
        return len(self.sensors)

    @property
    def pixels_per_sensor(self) -> int:
        return self.rows * self.cols

    @property
    def n_channels(self) -> int:
        return self.n_sensors * self.pixels_per_sensor

    @property
    def adc_max(self) -> int:
        return 2**self.adc_bits - 1

    def pitch_um(self, layer: int) -> tuple[float, float]:
        """(r-phi, z) pixel pitch in micrometres for a layer."""
        return SENSOR_WIDTH_MM * 1000 / self.rows, SENSOR_LENGTH_MM[layer] * 1000 / self.cols

    @cached_property
    def sensor_features(self) -> np.ndarray:
        """(n_sensors, 6) float32 features for sensor embeddings: layer (0/1), r / 22 mm,
        cos phi, sin phi, z / 40 mm, forward flag. Normalised to O(1)."""
        f = [
            (s.layer - 1, s.radius_mm / 22.0, math.cos(s.phi_rad), math.sin(s.phi_rad), s.z_mm / 40.0, float(s.forward))
            for s in self.sensors
        ]
        return np.asarray(f, dtype=np.float32)

    def sensor_index(self, name: str) -> int:
        """Index of the sensor with Belle II id `layer.ladder.sensor`."""
        for s in self.sensors:
            if s.name == name:
                return s.index
        raise KeyError(f"no sensor {name!r} in geometry {self.name!r}")

    def to_dict(self) -> dict:
        """JSON-able description stored in Zarr attributes."""
        return {"name": self.name, "kind": self.kind, "rows": self.rows, "cols": self.cols,
                "n_sensors": self.n_sensors, "n_channels": self.n_channels}


def _pxd_sensors() -> tuple[Sensor, ...]:
    sensors = []
    for layer in (1, 2):
        n_ladders = LADDERS_PER_LAYER[layer]
        for ladder in range(1, n_ladders + 1):
            phi = 2 * math.pi * (ladder - 1) / n_ladders
            for number in (1, 2):
                sensors.append(Sensor(len(sensors), layer, ladder, number, RADIUS_MM[layer], phi,
                                      Z_CENTER_MM[(layer, number)]))
    return tuple(sensors)


def pxd_geometry(name: str = "pxd", rows: int = 250, cols: int = 768) -> PixelGeometry:
    """The Belle II PXD, optionally with a coarser pixel grid of the same sensor size."""
    return PixelGeometry(name=name, rows=rows, cols=cols, sensors=_pxd_sensors())


PXD_VARIANTS = {
    "pxd": (250, 768),  # full Belle II PXD: 7.68 M channels
    "pxd-mini": (32, 96),  # demos and CPU training: 122 880 channels, same 40 sensors
    "pxd-tiny": (16, 48),  # unit tests: 30 720 channels
}
