"""Beam-induced background in the Belle II PXD: the reference simulator behind `uhg sim pxd`.

An event is one PXD readout (all 40 sensors). It is built from clusters of five processes
(`uhg.sim.pxd_machine`): two-photon QED pairs (curling tracks from the IP, generated as helices
by `uhg.sim.pxd_tracks`, so one particle leaves clusters on several sensors at fixed azimuths),
radiative Bhabha (soft photons, neutron-induced heavy clusters), Touschek and beam-gas losses
(shower particles entering at random angles, a few photons and heavy clusters) and synchrotron
radiation (soft photons). Clusters are digitised by `uhg.sim.pxd_clusters`.

Two-photon pairs reaching the PXD: pT from 3.2 MeV (2R = 14 mm, reaches layer 1) to 200 MeV
with dN/dpT ~ pT^-2.5, cot(theta) ~ N(0.25, 1.1) (forward boost), vertex z ~ N(0, 0.35 mm),
a geometric number of turns (mean 3, at most 10) before the particle ranges out in the beam
pipe and sensors. Non-curler clusters are placed uniformly on their sensor; beam-loss shower
particles enter with cos(incidence) uniform in [0.25, 1] and uniform azimuth.

Calibration (at `L_CAL` = 8e35 cm^-2 s^-1, design currents; targets in DESIGN.md section 4)
- `SENSOR_OCCUPANCY`: the 40 published per-sensor occupancies O_s. A pixel fires with
  probability 1 - exp(-lambda_s) for a Poisson density lambda_s of cluster pixels, so the
  simulator aims at lambda_s = -ln(1 - O_s) fired-pixel equivalents per pixel.
- Layer shares (the machine scenario's `share`): fraction of lambda_s from each process at the
  calibration point (design: layer 1 two-photon 0.45, radiative Bhabha 0.10, Touschek 0.15,
  beam-gas 0.14, SR 0.16; layer 2 proportions 0.13 : 0.22 : 0.22 : 0.10). The
  two-photon part of layer 1 is fixed by the curler rate; the curler geometry then
  fixes it on layer 2. The rest of lambda_s is split between the other four processes in the
  given proportions; its azimuthal modulation around the (layer, forward/backward) mean comes
  from beam losses, which concentrate in the horizontal plane, and is given to Touschek and
  beam-gas only. So the per-sensor pattern is exact at L_CAL and changes with the currents.
- Per-cluster fired-pixel means per process and layer, and fired pixels per curler per sensor,
  are measured once per pixel grid by Monte Carlo with a fixed seed (`calibration()`, cached;
  ~0.5 s). Cluster shapes are in full-PXD pixel units on every grid, so the rates scale with
  pixels per sensor; the Monte Carlo also accounts for the charge coarse grids lose over edges.
- Event-to-event fluctuations: luminosity-driven rates vary by a log-normal factor
  (sigma `LUMI_SIGMA`, bunch-to-bunch luminosity), beam-loss rates by a log-normal factor
  (sigma `BEAM_SIGMA`) and, in a fraction `BURST_PROB` of readouts (injection bunches passing
  the IR during the 20 us integration), by 1 + Exp(`BURST_SCALE`); all normalised to mean 1.
  Curlers add sensor-level, phi-correlated fluctuations on top.

Speed: everything is sparse and vectorised per event (clusters, then unique pixels); a full
PXD event at L_CAL (~70k fired pixels) takes ~35 ms of CPU on one core (docs/calibration.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import ConditionError, ConfigError, GeometryError
from uhg.geometry.pxd import LADDERS_PER_LAYER, PixelGeometry, pxd_geometry
from uhg.seeding import event_rng
from uhg.sim.pxd_clusters import (
    CHARGE_MODEL,
    HEAVY,
    PHOTON,
    TRACK,
    ChargeModel,
    Clusters,
    digitize,
    incidence,
    pixel_events,
    split_keys,
)
from uhg.sim.pxd_machine import L_CAL, MachineScenario, as_scenario, check_conditions
from uhg.sim.pxd_tracks import crossing_pixels, helix_crossings

SENSOR_OCCUPANCY = np.array([
    1.71, 1.61, 1.62, 1.57, 1.47, 1.47, 1.34, 1.37, 1.31, 1.32, 1.37, 1.39, 1.52, 1.51, 1.65, 1.58,
    0.63, 0.55, 0.62, 0.54, 0.57, 0.50, 0.52, 0.47, 0.50, 0.45, 0.48, 0.43, 0.47, 0.44, 0.48, 0.44,
    0.49, 0.45, 0.53, 0.48, 0.57, 0.51, 0.61, 0.54,
]) / 100.0
"""Mean occupancy per sensor at L_CAL (fraction; canonical sensor order, threshold 7 ADU)."""

PROCESS_CLUSTER_TYPES = {
    "rad_bhabha": {PHOTON: 0.40, HEAVY: 0.60},
    "touschek": {TRACK: 0.84, PHOTON: 0.10, HEAVY: 0.06},
    "beam_gas": {TRACK: 0.84, PHOTON: 0.10, HEAVY: 0.06},
    "synchrotron": {PHOTON: 1.0},
}
"""Cluster type mixture of the non-curler processes."""

# Two-photon pair kinematics (only particles reaching the PXD matter).
CURLER_PT_MIN_MEV = 3.2  # 2R = 14 mm: reaches layer 1
CURLER_PT_MAX_MEV = 200.0
CURLER_PT_INDEX = 2.5  # dN/dpT ~ pT^-2.5
CURLER_COT_THETA = (0.25, 1.1)  # mean (forward boost), sigma
CURLER_MEAN_TURNS = 3.0  # turns before ranging out / leaving the PXD (geometric)
CURLER_MAX_TURNS = 10
IP_SIGMA_Z_MM = 0.35

LUMI_SIGMA = 0.05
BEAM_SIGMA = 0.12
BURST_PROB = 0.04
BURST_SCALE = 0.8
LOSS_MIN_COS = 0.25  # beam-loss shower particles: cos(incidence) uniform in [LOSS_MIN_COS, 1]

N_LAYER1 = 2 * LADDERS_PER_LAYER[1]


@dataclass(frozen=True)
class Calibration:
    """Rates at L_CAL for one pixel grid.

    `cluster_rate`: (40, 4) mean clusters per event per sensor for rad_bhabha, touschek,
    beam_gas, synchrotron; `curler_rate`: mean curlers per event; `curler_fraction`: (40,)
    the fraction of lambda_s coming from curlers."""

    cluster_rate: np.ndarray
    curler_rate: float
    curler_fraction: np.ndarray


def _layer_of(sensor: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(sensor) < N_LAYER1, 1, 2)


def _group_mean(values: np.ndarray) -> np.ndarray:
    """(40,) mean over the ladders of the sensor's (layer, forward/backward) group."""
    out = np.empty_like(values)
    for lo, hi in ((0, N_LAYER1), (N_LAYER1, len(values))):
        for number in (0, 1):
            idx = np.arange(lo + number, hi, 2)
            out[idx] = values[idx].mean()
    return out


def _fired_per_cluster(geometry: PixelGeometry, clusters: Clusters, rng: np.random.Generator, model: ChargeModel) -> np.ndarray:
    """(n,) fired pixels of each cluster alone (no overlaps) in `geometry`'s grid."""
    alone = Clusters(np.arange(len(clusters)), clusters.row, clusters.col, clusters.du, clusters.dv,
                     clusters.path, clusters.kind)
    keys, _ = digitize(geometry, alone, rng, model)
    owner, _, _ = split_keys(geometry, keys)
    return np.bincount(owner, minlength=len(clusters))


def _sample_curlers(n: int, rng: np.random.Generator):
    u = rng.random(n)
    a = 1 - CURLER_PT_INDEX
    pt = (CURLER_PT_MIN_MEV**a + u * (CURLER_PT_MAX_MEV**a - CURLER_PT_MIN_MEV**a)) ** (1 / a)
    cot = rng.normal(*CURLER_COT_THETA, n)
    phi0 = rng.uniform(0, 2 * np.pi, n)
    charge = rng.choice(np.array([-1.0, 1.0]), n)
    z0 = rng.normal(0.0, IP_SIGMA_Z_MM, n)
    turns = np.minimum(rng.geometric(1 / CURLER_MEAN_TURNS, n), CURLER_MAX_TURNS)
    return helix_crossings(pt, cot, phi0, charge, z0, turns, CURLER_MAX_TURNS)


def _curler_clusters(geometry: PixelGeometry, n: int, rng: np.random.Generator) -> Clusters:
    crossings = _sample_curlers(n, rng)
    row, col = crossing_pixels(geometry, crossings)
    du, dv, path = incidence(crossings.tan_u, crossings.tan_v, _layer_of(crossings.sensor))
    return Clusters(crossings.sensor, row, col, du, dv, path, np.full(len(row), TRACK))


def _process_clusters(geometry: PixelGeometry, sensor: np.ndarray, process: np.ndarray,
                      rng: np.random.Generator) -> Clusters:
    """Clusters of the non-curler processes; `process` indexes PROCESS_CLUSTER_TYPES."""
    n = len(sensor)
    kind = np.empty(n, np.int64)
    u = rng.random(n)
    for p, name in enumerate(PROCESS_CLUSTER_TYPES):
        sel = process == p
        types = PROCESS_CLUSTER_TYPES[name]
        edges = np.cumsum(list(types.values()))
        kind[sel] = np.asarray(list(types))[np.minimum(np.searchsorted(edges, u[sel], side="right"), len(edges) - 1)]
    cos_inc = rng.uniform(LOSS_MIN_COS, 1.0, n)
    tan_inc = np.sqrt(1 - cos_inc**2) / cos_inc
    azimuth = rng.uniform(0, 2 * np.pi, n)
    track = kind == TRACK
    tan_u = np.where(track, tan_inc * np.cos(azimuth), 0.0)
    tan_v = np.where(track, tan_inc * np.sin(azimuth), 0.0)
    du, dv, path = incidence(tan_u, tan_v, _layer_of(sensor))
    row = rng.uniform(0, geometry.rows, n)
    col = rng.uniform(0, geometry.cols, n)
    return Clusters(sensor, row, col, du, dv, path, kind)


def calibration(geometry: PixelGeometry, model: ChargeModel = CHARGE_MODEL,
                scenario: MachineScenario | str | None = None) -> Calibration:
    """Rates reproducing `SENSOR_OCCUPANCY` and the scenario's layer shares at L_CAL on
    `geometry`'s grid (Monte Carlo with a fixed seed, so deterministic; computed once per grid,
    charge model and shares: coarse grids lose a larger share of cluster charge over the sensor
    edges)."""
    shares = as_scenario(scenario).layer_shares()
    key = tuple((layer, tuple(sorted(s.items()))) for layer, s in sorted(shares.items()))
    return _calibration(geometry.rows, geometry.cols, model, key)


@cache
def _calibration(rows: int, cols: int, model: ChargeModel, shares_key: tuple) -> Calibration:
    layer_shares = {layer: dict(items) for layer, items in shares_key}
    rng = np.random.default_rng(20240611)
    grid = pxd_geometry("calibration", rows, cols)
    lam = -np.log1p(-SENSOR_OCCUPANCY)  # fired-pixel equivalents per pixel
    n_sensors = len(lam)

    # Curlers: fired pixels per curler per sensor, symmetrised over azimuth.
    n_mc = 20000
    curl = _curler_clusters(grid, n_mc, rng)
    fired = _fired_per_cluster(grid, curl, rng, model)
    per_curler = _group_mean(np.bincount(curl.sensor, fired, minlength=n_sensors) / n_mc) / grid.pixels_per_sensor
    layer1 = slice(0, N_LAYER1)
    curler_rate = layer_shares[1]["two_photon"] * lam[layer1].mean() / per_curler[layer1].mean()
    curler_lam = curler_rate * per_curler

    # Other processes: mean fired pixels per cluster and layer.
    names = list(PROCESS_CLUSTER_TYPES)
    n_mc = 20000
    mean_fired = np.empty((n_sensors, len(names)))
    for sensors in (np.arange(N_LAYER1), np.arange(N_LAYER1, n_sensors)):
        for p in range(len(names)):
            cl = _process_clusters(grid, rng.choice(sensors, n_mc), np.full(n_mc, p), rng)
            mean_fired[sensors, p] = _fired_per_cluster(grid, cl, rng, model).mean()

    rest = lam - curler_lam
    if np.any(rest <= 0):
        raise ConfigError("machine scenario: the curlers of processes.two_photon.share.layer1 exceed a sensor's "
                          "target occupancy; lower it")
    mean_rest = _group_mean(lam) - curler_lam
    modulation = lam - _group_mean(lam)
    shares = np.array([[layer_shares[int(layer)][n] for n in names] for layer in _layer_of(np.arange(n_sensors))])
    shares /= shares.sum(axis=1, keepdims=True)
    process_lam = shares * mean_rest[:, None]
    loss = np.array([n in ("touschek", "beam_gas") for n in names])
    process_lam[:, loss] += modulation[:, None] * shares[:, loss] / shares[:, loss].sum(axis=1, keepdims=True)
    if np.any(process_lam <= 0):
        raise ConfigError("machine scenario: the touschek and beam_gas shares are too small to carry the "
                          "azimuthal modulation of the per-sensor occupancy; raise processes.touschek.share or "
                          "processes.beam_gas.share")
    cluster_rate = process_lam * grid.pixels_per_sensor / mean_fired
    return Calibration(cluster_rate, float(curler_rate), curler_lam / lam)


def _event_factors(rng: np.random.Generator) -> tuple[float, float]:
    """(luminosity factor, beam-loss factor), each with mean 1."""
    f_lumi = math.exp(LUMI_SIGMA * rng.standard_normal() - LUMI_SIGMA**2 / 2)
    f_beam = math.exp(BEAM_SIGMA * rng.standard_normal() - BEAM_SIGMA**2 / 2)
    burst = 1.0 + (rng.exponential(BURST_SCALE) if rng.random() < BURST_PROB else 0.0)
    return f_lumi, f_beam * burst / (1 + BURST_PROB * BURST_SCALE)


def simulate_event(geometry: PixelGeometry, rates: np.ndarray, rng: np.random.Generator,
                   model: ChargeModel = CHARGE_MODEL, scenario: MachineScenario | str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One event: (keys, adc) as from `digitize`; `rates` (5,) process rates relative to L_CAL."""
    scenario = as_scenario(scenario)
    cal = calibration(geometry, model, scenario)
    f_lumi, f_beam = _event_factors(rng)
    factor = rates * np.where(scenario.luminosity_driven(), f_lumi, f_beam)
    n_curlers = rng.poisson(cal.curler_rate * factor[0])
    counts = rng.poisson(cal.cluster_rate * factor[1:][None, :])  # (40, 4)
    flat = counts.ravel()
    sensor = np.repeat(np.repeat(np.arange(counts.shape[0]), counts.shape[1]), flat)
    process = np.repeat(np.tile(np.arange(counts.shape[1]), counts.shape[0]), flat)
    clusters = Clusters.concat([_curler_clusters(geometry, n_curlers, rng),
                                _process_clusters(geometry, sensor, process, rng)])
    return digitize(geometry, clusters, rng, model)


def simulate_pxd_background(geometry: PixelGeometry, n_events: int, seed: int, first_event: int = 0,
                            luminosity: float = L_CAL, her_current: float | None = None,
                            ler_current: float | None = None, luminosity_max: float | None = None,
                            model: ChargeModel = CHARGE_MODEL,
                            scenario: MachineScenario | str | None = None) -> HitBatch:
    """`n_events` PXD background readouts (pixel HitBatch, hits sorted and unique per event).

    Event i draws from `event_rng(seed, first_event + i, "pxd")`, so any split of a run into
    parts gives the same events. `scenario`: a `MachineScenario`, a shipped scenario name or a
    YAML path (default: design). Conditions per event (`uhg.sim.pxd_machine.CONDITIONS`):
    `luminosity` (cm^-2 s^-1; log-uniform in [luminosity, luminosity_max] when a maximum is
    given), `her_current`, `ler_current` (A; the given values, or the scenario's currents for
    the event's luminosity) and `beta_y_star` (mm, from the luminosity and the currents)."""
    if not isinstance(geometry, PixelGeometry):
        raise GeometryError(f"the PXD simulator needs a pixel geometry, got {getattr(geometry, 'name', geometry)!r}")
    if geometry.n_sensors != len(SENSOR_OCCUPANCY):
        raise GeometryError(f"geometry {geometry.name!r} has {geometry.n_sensors} sensors; the PXD simulator needs 40")
    if int(n_events) != n_events or n_events < 0:
        raise ConditionError(f"number of events must be a non-negative integer, got {n_events!r}")
    check_conditions(luminosity, luminosity_max, her_current, ler_current)
    scenario = as_scenario(scenario)
    keys_all, adc_all = [], []
    lum = np.empty(n_events)
    for i in range(n_events):
        rng = event_rng(seed, first_event + i, "pxd")
        if luminosity_max is not None and luminosity_max > luminosity:
            draw = math.exp(rng.uniform(math.log(luminosity), math.log(luminosity_max)))
            lum[i] = min(max(draw, luminosity), luminosity_max)  # exp(log(x)) may round past x
        else:
            lum[i] = luminosity
        rates = scenario.process_rates(scenario.conditions(lum[i], her_current, ler_current))
        keys, adc = simulate_event(geometry, rates, rng, model, scenario)
        keys_all.append(keys)
        adc_all.append(adc)
    return pixel_events(geometry, keys_all, adc_all, scenario.conditions(lum, her_current, ler_current))
