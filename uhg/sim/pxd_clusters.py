"""Pixel clusters: deposited charge, charge sharing, digitisation (ADC, threshold, saturation).

Each cluster is a straight path through the 75 um sensor, centred at a continuous pixel
position (row, col) with projected extent (du, dv) in pixels, carrying a total charge Q (ADU).

Charge per cluster type (constants in `ChargeModel`)
- track (minimum ionising, from the IP, curlers and beam-loss showers):
  Q = path * (mpv + width * M),  M ~ Moyal (M = -ln Z^2, Z ~ N(0,1), a Landau approximation),
  path = sqrt(1 + tan_u^2 + tan_v^2) the path length in units of the sensor thickness;
- photon (synchrotron and soft photons: a short photo/Compton electron):
  Q ~ Exponential(photon_mean), point-like;
- heavy (neutron-induced nuclear recoils, slow protons, stopping electrons):
  Q ~ LogNormal(median heavy_median, sigma heavy_sigma), point-like.

Charge sharing: the path is split into n = 1 + floor(2 * max(|du|, |dv|)) equidistant
sub-deposits whose shares fluctuate (weights uniform in 1 -+ share_spread, delta-ray like).
Each sub-deposit spreads by diffusion: along each axis the share Phi(-d / sigma) moves to the nearest neighbouring pixel
at distance d, so a sub-deposit feeds up to 2 x 2 pixels. Shares below 0.5 ADU are dropped
before merging (they cannot make a pixel fire on their own).

Digitisation: charges of all clusters are summed per pixel, Gaussian noise (noise ADU) added,
rounded to integer ADU, pixels below the threshold (7 ADU) removed, the rest clipped at 255.

Pixel units: clusters are shaped in pixels of the full Belle II PXD pitch (50 um in r-phi,
58.3 / 80 um along z in layer 1 / 2) on every geometry. Coarser variants (pxd-mini, pxd-tiny)
thus keep the full detector's cluster sizes, charge spectrum and occupancy fractions; they are
scaled-down images of the PXD, not a physical detector with larger pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.special import ndtr

from uhg.data.hits import HitBatch
from uhg.geometry.pxd import PixelGeometry
from uhg.sim.pxd_tracks import SENSOR_THICKNESS_UM

TRACK, PHOTON, HEAVY = 0, 1, 2
"""Cluster types."""

REFERENCE_PITCH_UM = {1: (50.0, 58.33), 2: (50.0, 80.0)}
"""Full-PXD pixel pitch (r-phi, z) per layer: the unit in which cluster extents are computed."""
MAX_EXTENT_PX = 4.0
"""Projected path length cap (pixels): longer grazing paths leave the depletion zone."""
MAX_PATH = 4.0
"""Path length cap in sensor thicknesses (for the deposited charge)."""


@dataclass(frozen=True)
class ChargeModel:
    """Constants of the charge model in ADU (the 38.5 ADU most probable MIP charge and ~6000 e-
    in 75 um of silicon make 1 ADU ~ 155 electrons). The defaults were tuned on
    pxd-mini events at L_CAL to the published charge quantiles (docs/calibration.md)."""

    mpv: float = 38.5
    """Most probable charge of a perpendicular minimum ionising track, ADU."""
    width: float = 3.0
    """Moyal width of the track charge, ADU."""
    photon_mean: float = 16.0
    """Mean charge of a soft-photon cluster, ADU."""
    heavy_median: float = 162.0
    """Median charge of a heavily ionising cluster, ADU."""
    heavy_sigma: float = 0.24
    """Log-normal sigma of the heavily ionising charge."""
    diffusion: float = 0.30
    """Diffusion sigma in pixels (full-PXD pitch)."""
    noise: float = 0.8
    """Pixel noise sigma, ADU."""
    share_spread: float = 0.2
    """Sub-deposit charge shares fluctuate uniformly in [1 - spread, 1 + spread] (delta rays)."""


CHARGE_MODEL = ChargeModel()


@dataclass
class Clusters:
    """Clusters of one event (all arrays (n,)): sensor index, continuous row/col centre,
    projected extent du/dv in full-PXD pixels, path length in sensor thicknesses (>= 1) and
    type (TRACK/PHOTON/HEAVY)."""

    sensor: np.ndarray
    row: np.ndarray
    col: np.ndarray
    du: np.ndarray
    dv: np.ndarray
    path: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return len(self.sensor)

    @classmethod
    def concat(cls, parts: list[Clusters]) -> Clusters:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


_FIELDS = ("sensor", "row", "col", "du", "dv", "path", "kind")


def incidence(tan_u: np.ndarray, tan_v: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(du, dv, path) for tracks with direction tangents `tan_u`, `tan_v` relative to the sensor
    normal: projected path in full-PXD pixels (capped at MAX_EXTENT_PX) and path length in
    units of the sensor thickness."""
    pitch_v = np.where(layer == 1, REFERENCE_PITCH_UM[1][1], REFERENCE_PITCH_UM[2][1])
    du = np.clip(SENSOR_THICKNESS_UM * tan_u / REFERENCE_PITCH_UM[1][0], -MAX_EXTENT_PX, MAX_EXTENT_PX)
    dv = np.clip(SENSOR_THICKNESS_UM * tan_v / pitch_v, -MAX_EXTENT_PX, MAX_EXTENT_PX)
    path = np.minimum(np.sqrt(1 + tan_u**2 + tan_v**2), MAX_PATH)
    return du, dv, path


def cluster_charge(clusters: Clusters, rng: np.random.Generator, model: ChargeModel = CHARGE_MODEL) -> np.ndarray:
    """(n,) total deposited charge per cluster in ADU."""
    kind = clusters.kind
    charge = np.empty(len(clusters))
    track = kind == TRACK
    nt = int(track.sum())
    moyal = -np.log(np.square(rng.standard_normal(nt)) + 1e-300)
    charge[track] = np.maximum(clusters.path[track] * (model.mpv + model.width * moyal), 0.0)
    photon = kind == PHOTON
    charge[photon] = rng.exponential(model.photon_mean, int(photon.sum()))
    heavy = kind == HEAVY
    charge[heavy] = model.heavy_median * np.exp(model.heavy_sigma * rng.standard_normal(int(heavy.sum())))
    return charge


def digitize(geometry: PixelGeometry, clusters: Clusters, rng: np.random.Generator,
             model: ChargeModel = CHARGE_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """Fired pixels of one event: (keys, adc), sorted unique flat pixel keys
    `(sensor * rows + row) * cols + col` (int64) and their ADC values (uint8)."""
    if len(clusters) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    charge = cluster_charge(clusters, rng, model)
    # Sub-deposits along the projected path.
    extent = np.maximum(np.abs(clusters.du), np.abs(clusters.dv))
    n_sub = 1 + np.floor(2 * extent).astype(np.int64)
    owner = np.repeat(np.arange(len(clusters)), n_sub)
    first = np.cumsum(n_sub) - n_sub
    step = np.arange(len(owner)) - first[owner]
    frac = (step + 0.5) / n_sub[owner] - 0.5
    u = clusters.row[owner] + clusters.du[owner] * frac
    v = clusters.col[owner] + clusters.dv[owner] * frac
    weight = rng.uniform(1 - model.share_spread, 1 + model.share_spread, len(owner))
    weight_sum = np.bincount(owner, weight, minlength=len(clusters))
    q = charge[owner] * weight / weight_sum[owner]
    # Diffusion to the nearest neighbour along each axis: share Phi(-d / sigma) at distance d.
    pu, pv = np.floor(u), np.floor(v)
    fu, fv = u - pu, v - pv
    table = _diffusion_table(model.diffusion)
    au = table[(np.minimum(fu, 1 - fu) * _TABLE_STEPS).astype(np.int64)]
    av = table[(np.minimum(fv, 1 - fv) * _TABLE_STEPS).astype(np.int64)]
    row = pu.astype(np.int64)
    col = pv.astype(np.int64)
    step_u = np.where(fu < 0.5, -1, 1)
    step_v = np.where(fv < 0.5, -1, 1)
    # Sub-deposits of long clusters may lie beyond the sensor edge: that charge is lost.
    in_u = (row >= 0) & (row < geometry.rows)
    in_v = (col >= 0) & (col < geometry.cols)
    ok_u = (row + step_u >= 0) & (row + step_u < geometry.rows)
    ok_v = (col + step_v >= 0) & (col + step_v < geometry.cols)
    # The own pixel and its neighbours along u, v and both; each kept only where its share of
    # charge is >= 0.5 ADU and it lies on the sensor.
    base = (clusters.sensor[owner].astype(np.int64) * geometry.rows + row) * geometry.cols + col
    packed = []
    for share, inside, offset in (
        ((1 - au) * (1 - av), in_u & in_v, None),
        (au * (1 - av), ok_u & in_v, step_u * geometry.cols),
        ((1 - au) * av, in_u & ok_v, step_v),
        (au * av, ok_u & ok_v, step_u * geometry.cols + step_v),
    ):
        qq = q * share
        idx = np.flatnonzero((qq >= 0.5) & inside)
        key = base[idx] if offset is None else base[idx] + offset[idx]
        # Pack (pixel key, charge in 1/64 ADU) into one int64, so one plain sort groups pixels.
        packed.append((key << _CHARGE_BITS) | np.minimum(qq[idx] * 64, _CHARGE_MAX).astype(np.int64))
    packed = np.sort(np.concatenate(packed))
    key = packed >> _CHARGE_BITS
    qsum = (packed & _CHARGE_MAX).astype(np.float64) / 64
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    key = key[starts]
    total = np.add.reduceat(qsum, starts) if len(starts) else qsum[:0]
    adc = np.rint(total + model.noise * rng.standard_normal(len(total)))
    fired = adc >= geometry.adc_threshold
    return key[fired], np.minimum(adc[fired], geometry.adc_max).astype(np.uint8)


_TABLE_STEPS = 4096


@cache
def _diffusion_table(sigma: float) -> np.ndarray:
    """Phi(-d / sigma) for d = 0 .. 0.5 pixel in _TABLE_STEPS steps (faster than ndtr per call)."""
    d = (np.arange(_TABLE_STEPS // 2 + 1) + 0.5) / _TABLE_STEPS
    return ndtr(-d / sigma)


_CHARGE_BITS = 20
_CHARGE_MAX = (1 << _CHARGE_BITS) - 1  # 16384 ADU in 1/64 ADU steps, far above saturation


def split_keys(geometry: PixelGeometry, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sensor, row, col) of flat pixel keys."""
    sensor_row, col = np.divmod(keys, geometry.cols)
    sensor, row = np.divmod(sensor_row, geometry.rows)
    return sensor, row, col


def pixel_events(geometry: PixelGeometry, keys: list[np.ndarray], adc: list[np.ndarray],
                 conditions: dict[str, np.ndarray]) -> HitBatch:
    """A pixel HitBatch of events given as per-event flat keys and ADC codes."""
    flat = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    sensor, row, col = split_keys(geometry, flat)
    counts = np.array([len(k) for k in keys], np.int64)
    return HitBatch(
        "pixel",
        {"sensor": sensor, "row": row, "col": col,
         "value": np.concatenate(adc) if adc else np.zeros(0, np.uint8)},
        np.concatenate([[0], np.cumsum(counts)]),
        conditions,
    )
