"""Charged tracks from the interaction point through the two PXD layers (B = 1.5 T).

A track with transverse momentum pT (MeV) moves on a helix whose transverse projection is a
circle of radius R = pT / (0.3 B) = pT / 0.45 mm through the origin. It reaches radius r after
turning by psi = 2 asin(r / 2R) and sits there at azimuth phi0 + q psi / 2 and at
z = z0 + R psi cot(theta). Tracks with 2R > r cross a layer on the way out; tracks whose circle
stays inside the drift-chamber inner wall (2R < 160 mm) curl back and cross it again on the way
in, at turning angle 2 pi - psi; every further turn repeats both crossings shifted by
2 pi R cot(theta) in z. This is how low-momentum pairs ("curlers") put clusters at a few fixed
azimuths on several sensors, the main source of intra-event sensor correlations.

The layer is treated as a cylinder at the ladder radius; a crossing is assigned to the ladder
whose azimuth is nearest, at local r-phi coordinate u = r sin(phi - phi_ladder) and z along
the beam. Crossings outside the sensitive area are dropped.

Incidence: the track makes the angle psi/2 with the radial direction (the sensor normal) in the
transverse plane and has dip cot(theta) per unit transverse length, so the path through the
75 um sensor projects onto (u, z) as t * tan(psi/2) and t * cot(theta) / cos(psi/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from uhg.geometry.pxd import (
    LADDERS_PER_LAYER,
    RADIUS_MM,
    SENSOR_LENGTH_MM,
    SENSOR_WIDTH_MM,
    Z_CENTER_MM,
    PixelGeometry,
)

B_TESLA = 1.5
MM_PER_MEV = 1.0 / (0.3 * B_TESLA)  # R [mm] = pT [MeV] / (0.3 B [T])
SENSOR_THICKNESS_UM = 75.0


@dataclass
class Crossings:
    """Sensor crossings of many tracks, one row per crossing (all arrays (n,)).

    `sensor`: index in the geometry's canonical order; `u_mm`: r-phi position from the sensor
    centre line; `z_mm`: global z; `tan_u`, `tan_v`: projected path per unit thickness along
    r-phi and z; `track`: index of the track that made the crossing."""

    sensor: np.ndarray
    u_mm: np.ndarray
    z_mm: np.ndarray
    tan_u: np.ndarray
    tan_v: np.ndarray
    track: np.ndarray


def helix_crossings(pt_mev: np.ndarray, cot_theta: np.ndarray, phi0: np.ndarray, charge: np.ndarray,
                    z0_mm: np.ndarray, n_turns: np.ndarray, max_turns: int) -> Crossings:
    """Crossings of the two PXD layers by helices from (0, 0, z0). All inputs (n_tracks,);
    `n_turns` (>= 1) is how many turns a curling track makes before it ranges out or leaves
    the PXD; tracks that do not curl back (2R larger than the outer PXD radius times a margin)
    only cross on the way out."""
    radius = pt_mev * MM_PER_MEV
    rows = []
    for layer in (1, 2):
        r = RADIUS_MM[layer]
        reaches = 2 * radius > r
        psi_out = 2 * np.arcsin(np.minimum(r / (2 * radius), 1.0))
        # A track whose circle reaches far outside the PXD leaves the tracking volume
        # (CDC inner wall ~ 160 mm) instead of curling back.
        curls = 2 * radius < 160.0
        for turn in range(max_turns):
            for outgoing in (True, False):
                psi = psi_out if outgoing else 2 * np.pi - psi_out
                ok = reaches & (turn < n_turns) & ((turn == 0) & outgoing | curls)
                idx = np.nonzero(ok)[0]
                if len(idx) == 0:
                    continue
                total_psi = psi[idx] + 2 * np.pi * turn
                phi = phi0[idx] + charge[idx] * psi[idx] / 2
                z = z0_mm[idx] + radius[idx] * total_psi * cot_theta[idx]
                half = np.minimum(psi_out[idx] / 2, np.radians(80.0))  # grazing crossings cap
                rows.append((np.full(len(idx), layer), phi, z, np.tan(half),
                             cot_theta[idx] / np.cos(half), idx))
    if not rows:
        empty = np.zeros(0)
        return Crossings(np.zeros(0, np.int64), empty, empty, empty, empty, np.zeros(0, np.int64))
    layer, phi, z, tan_u, tan_v, track = (np.concatenate(c) for c in zip(*rows, strict=True))
    sensor, u = _ladder_position(layer, phi, z)
    keep = sensor >= 0
    return Crossings(sensor[keep], u[keep], z[keep], tan_u[keep], tan_v[keep], track[keep])


def _ladder_position(layer: np.ndarray, phi: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensor index or -1, u in mm) of points on the layer cylinders."""
    sensor = np.full(len(layer), -1, np.int64)
    u = np.zeros(len(layer))
    first = 0
    for lay in (1, 2):
        n = LADDERS_PER_LAYER[lay]
        sel = layer == lay
        step = 2 * math.pi / n
        ladder = np.rint(phi[sel] / step).astype(np.int64) % n
        uu = RADIUS_MM[lay] * np.sin(phi[sel] - ladder * step)
        zz = z[sel]
        fwd_lo = Z_CENTER_MM[(lay, 1)] - SENSOR_LENGTH_MM[lay] / 2
        fwd_hi = Z_CENTER_MM[(lay, 1)] + SENSOR_LENGTH_MM[lay] / 2
        bwd_lo = Z_CENTER_MM[(lay, 2)] - SENSOR_LENGTH_MM[lay] / 2
        bwd_hi = Z_CENTER_MM[(lay, 2)] + SENSOR_LENGTH_MM[lay] / 2
        number = np.where((zz >= fwd_lo) & (zz < fwd_hi), 0, np.where((zz >= bwd_lo) & (zz < bwd_hi), 1, -1))
        inside = (number >= 0) & (np.abs(uu) < SENSOR_WIDTH_MM / 2)
        s = np.where(inside, first + 2 * ladder + number, -1)
        sensor[sel] = s
        u[sel] = uu
        first += 2 * n
    return sensor, u


def crossing_pixels(geometry: PixelGeometry, crossings: Crossings) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (row, col) pixel coordinates of crossings in `geometry`'s grid."""
    layer = np.where(crossings.sensor < 2 * LADDERS_PER_LAYER[1], 1, 2)
    number = crossings.sensor % 2 + 1
    z_lo = np.empty(len(layer))
    length = np.empty(len(layer))
    for lay in (1, 2):
        for num in (1, 2):
            sel = (layer == lay) & (number == num)
            z_lo[sel] = Z_CENTER_MM[(lay, num)] - SENSOR_LENGTH_MM[lay] / 2
            length[sel] = SENSOR_LENGTH_MM[lay]
    row = (crossings.u_mm / SENSOR_WIDTH_MM + 0.5) * geometry.rows
    col = (crossings.z_mm - z_lo) / length * geometry.cols
    return np.clip(row, 0, geometry.rows - 1e-6), np.clip(col, 0, geometry.cols - 1e-6)
