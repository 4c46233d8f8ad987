"""Reference simulators that stand in for Geant4/basf2 when no real data is at hand.

- `simulate_pxd_background`: beam-induced background in the Belle II PXD (pixel hits), as a
  function of luminosity and beam currents, calibrated at SuperKEKB design conditions
  (`L_CAL`); see `uhg.sim.pxd_background` and docs/calibration.md.
- `simulate_pxd_signal`: a few charged tracks from the interaction point crossing both layers.
- `simulate_calo_showers`: electromagnetic showers in a calorimeter geometry (`uhg.sim.calo`).

All simulators draw event i from `uhg.seeding.event_rng(seed, first_event + i, stream)`, so a
run's events do not depend on how it is split into parts or processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uhg.sim.pxd_background import SENSOR_OCCUPANCY, simulate_pxd_background
from uhg.sim.pxd_machine import I_HER_DESIGN, I_LER_DESIGN, L_CAL, currents_for_luminosity
from uhg.sim.pxd_signal import simulate_pxd_signal

if TYPE_CHECKING:
    from uhg.sim.calo import simulate_calo_showers


def __getattr__(name: str):
    # The shower simulator pulls in the calorimeter geometries; load it only when asked for.
    if name == "simulate_calo_showers":
        from uhg.sim.calo import simulate_calo_showers

        return simulate_calo_showers
    raise AttributeError(f"module 'uhg.sim' has no attribute {name!r}")


__all__ = [
    "I_HER_DESIGN",
    "I_LER_DESIGN",
    "L_CAL",
    "SENSOR_OCCUPANCY",
    "currents_for_luminosity",
    "simulate_calo_showers",
    "simulate_pxd_background",
    "simulate_pxd_signal",
]
