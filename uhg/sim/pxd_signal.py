"""PXD signal events: a few charged tracks from the interaction point (`uhg sim signal`).

Each event has n_tracks ~ uniform integer in [tracks_min, tracks_max] primary tracks, e.g. the
charged daughters of a B-meson pair that reach the vertex detector. Per track:
- transverse momentum pT = 50 MeV + Gamma(shape 1.5, scale 300 MeV) (mean 500 MeV);
- polar angle with cos(theta) uniform in [cos 145 deg, cos 20 deg]: the range in which a track
  from the IP crosses both PXD layers (the outer layer covers 19 - 150 deg);
- azimuth uniform, charge +-1, vertex z ~ N(0, 0.35 mm) (luminous region);
- a helix in B = 1.5 T (`uhg.sim.pxd_tracks`), one cluster per crossed sensor: no track curls
  back at these momenta (2R > 160 mm above 36 MeV), so each crosses each layer once.
Clusters are minimum ionising (`uhg.sim.pxd_clusters`, TRACK type) with the charge-sharing and
digitisation of the background simulator, so signal and background overlay consistently.

Condition per event: `n_tracks`.
"""

from __future__ import annotations

import math

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import ConditionError, GeometryError
from uhg.geometry.pxd import PixelGeometry
from uhg.seeding import event_rng
from uhg.sim.pxd_clusters import CHARGE_MODEL, TRACK, Clusters, digitize, incidence, pixel_events
from uhg.sim.pxd_tracks import crossing_pixels, helix_crossings

THETA_RANGE_DEG = (20.0, 145.0)
PT_MIN_MEV = 50.0
PT_GAMMA = (1.5, 300.0)  # shape, scale (MeV)
IP_SIGMA_Z_MM = 0.35
N_LAYER1 = 16


def simulate_signal_event(geometry: PixelGeometry, n_tracks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One event with `n_tracks` tracks: (keys, adc) as from `uhg.sim.pxd_clusters.digitize`."""
    pt = PT_MIN_MEV + rng.gamma(PT_GAMMA[0], PT_GAMMA[1], n_tracks)
    cos_lo, cos_hi = (math.cos(math.radians(t)) for t in reversed(THETA_RANGE_DEG))
    cos_theta = rng.uniform(cos_lo, cos_hi, n_tracks)
    cot_theta = cos_theta / np.sqrt(1 - cos_theta**2)
    phi0 = rng.uniform(0, 2 * np.pi, n_tracks)
    charge = rng.choice(np.array([-1.0, 1.0]), n_tracks)
    z0 = rng.normal(0.0, IP_SIGMA_Z_MM, n_tracks)
    crossings = helix_crossings(pt, cot_theta, phi0, charge, z0, np.ones(n_tracks, np.int64), max_turns=1)
    row, col = crossing_pixels(geometry, crossings)
    layer = np.where(crossings.sensor < N_LAYER1, 1, 2)
    du, dv, path = incidence(crossings.tan_u, crossings.tan_v, layer)
    clusters = Clusters(crossings.sensor, row, col, du, dv, path, np.full(len(row), TRACK))
    return digitize(geometry, clusters, rng, CHARGE_MODEL)


def simulate_pxd_signal(geometry: PixelGeometry, n_events: int, seed: int, first_event: int = 0,
                        tracks_min: int = 2, tracks_max: int = 10) -> HitBatch:
    """`n_events` signal events (pixel HitBatch, hits sorted and unique per event; condition
    `n_tracks`). Event i draws from `event_rng(seed, first_event + i, "signal")`."""
    if not isinstance(geometry, PixelGeometry) or geometry.n_sensors != 40:
        raise GeometryError(f"the PXD signal simulator needs a 40-sensor pixel geometry, got {getattr(geometry, 'name', geometry)!r}")
    if int(n_events) != n_events or n_events < 0:
        raise ConditionError(f"number of events must be a non-negative integer, got {n_events!r}")
    if not (0 <= tracks_min <= tracks_max):
        raise ConditionError(f"need 0 <= tracks_min <= tracks_max, got tracks_min={tracks_min}, tracks_max={tracks_max}")
    keys_all, adc_all = [], []
    n_tracks = np.empty(n_events)
    for i in range(n_events):
        rng = event_rng(seed, first_event + i, "signal")
        n_tracks[i] = rng.integers(tracks_min, tracks_max + 1)
        keys, adc = simulate_signal_event(geometry, int(n_tracks[i]), rng)
        keys_all.append(keys)
        adc_all.append(adc)
    return pixel_events(geometry, keys_all, adc_all, {"n_tracks": n_tracks})
