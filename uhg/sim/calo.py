"""Reference simulator of electromagnetic showers in the uhg calorimeters (GFlash parameterisation).

Each shower is built from energy *spots* sampled from the Grindhammer-Peters parameterisation
(G. Grindhammer, S. Peters, hep-ex/0001020; constants as in Geant4's GFlash sampling tuning):

Longitudinal profile (depth t in X0 of the effective medium, from the calorimeter face)
    f(t) = (beta t)^(alpha-1) beta exp(-beta t) / Gamma(alpha),  T = (alpha - 1) / beta (maximum)
with y = E / E_c and, per shower, correlated log-normal fluctuations of (T, alpha):
    <ln T_hom>     = ln(ln y - 0.812)           <ln alpha_hom> = ln(0.81 + (0.458 + 2.26 / Z) ln y)
    <ln T>         = ln(T_hom + t1 F_S^-1 + t2 (1 - ehat)),  t1 = -0.55, t2 = -0.69
    <ln alpha>     = ln(alpha_hom + a1 F_S^-1),              a1 = -0.476
    sigma(ln T)    = 1 / (-2.5 + 1.25 ln y),    sigma(ln alpha) = 1 / (-0.82 + 0.79 ln y)  (<= 0.5)
    rho(ln T, ln alpha) = 0.784 - 0.023 ln y
so the shower maximum moves as ln E. Photons first travel an exponential distance of mean 9/7 X0.

Lateral profile (r in Moliere radii, tau = t / T, E in GeV) of each depth slice
    f(r) = p 2 r R_C^2 / (r^2 + R_C^2)^2 + (1 - p) 2 r R_T^2 / (r^2 + R_T^2)^2
    R_C = 0.0251 + 0.00319 ln E + (0.1162 - 0.000381 Z) tau - 0.0203 (1 - ehat) + 0.0397 F_S^-1 e^-tau
    R_T = (0.659 - 0.00309 Z) (e^(-2.59 (tau - 0.645)) + e^((0.3585 + 0.0412 ln E)(tau - 0.645)))
          - 0.14 (1 - ehat) - 0.495 F_S^-1 e^-tau
    p   = (2.632 - 0.00094 Z) exp(v - e^v),  v = (0.401 + 0.00187 Z - tau) / (1.313 - 0.0686 ln E)
          + (1 - ehat)(0.348 - 0.642 F_S^-1 exp(-(tau - 1)^2)),   clipped to [0, 1]
and a uniform azimuth; radii are drawn by inverting the CDF: r = R sqrt(u / (1 - u)).

Analog readout (CaloChallenge DS1/DS2/DS3)
- N_spot = min(93 ln(Z) (E/GeV)^0.876, 20 000) spots (GFlash's spot count, capped for speed:
  a 1 TeV shower keeps 20 000 spots), each with depth, radius and azimuth drawn as above.
- Sampling fluctuations: spot energies are i.i.d. Gamma(k) with mean E_scale / N_spot and
  k = (E/GeV) / (a^2 N_spot), so the total visible energy has sigma/E = a / sqrt(E/GeV) exactly
  (a sum of Gamma variables); a per-shower factor (1 + b N(0, 1)) adds the constant term b.
  E_scale = E for calibrated (EM-scale) readouts, E * sampling_fraction otherwise.
- Spots deeper than the last layer, in dead material or outside the outermost radial bin leak:
  the response E_dep / E_inc is the containment (flat in E up to longitudinal leakage).
- Spots are binned with CaloGeometry.cell_index; cells below `threshold_mev` are dropped.

Digital readout (EPICAL-like MAPS calorimeter)
- Charged-particle crossings of the sensor planes: N ~ Poisson(crossings_per_gev * E/GeV), depths
  from the same longitudinal profile, positions from the same lateral profile.
- Each crossing fires the pixel it crosses plus Poisson(cluster_extra_pixels) candidate pixels
  displaced by N(0, cluster_sigma_mm) in x and y (charge sharing); a pixel fires once however
  often it is hit, so dense cores saturate at very high energy, as in a real digital calorimeter.

Every event draws from `uhg.seeding.event_rng(seed, first_event + i, "calo")`: output does not depend
on how events are split into parts or processes.
"""

from __future__ import annotations

import math

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import ConditionError, GeometryError
from uhg.geometry.calo import CaloGeometry
from uhg.seeding import event_rng

DEFAULT_ENERGY_MIN_MEV = 1.0e3
DEFAULT_ENERGY_MAX_MEV = 1.0e6
MAX_SPOTS = 20_000
"""Cap on energy spots per analog shower (GFlash would use ~1.7 M at 1 TeV)."""
MAX_CROSSINGS = 2_000_000
"""Cap on sensor crossings per digital shower (memory guard; ~23 TeV in EPICAL)."""
PHOTON_CONVERSION_X0 = 9.0 / 7.0
DENSE_BINNING_CELLS = 1 << 20
"""Geometries up to this many cells bin spots with a dense bincount, larger ones by sorting."""


def simulate_calo_showers(
    geometry: CaloGeometry,
    n_events: int,
    seed: int,
    first_event: int = 0,
    energy_min: float = DEFAULT_ENERGY_MIN_MEV,
    energy_max: float = DEFAULT_ENERGY_MAX_MEV,
    energies: np.ndarray | None = None,
) -> HitBatch:
    """Simulate `n_events` EM showers in `geometry`.

    Incident energies (MeV) are drawn log-uniform in [energy_min, energy_max] per event, or taken
    from `energies` ((n_events,) MeV). Returns a calo HitBatch (layer, cell, value in MeV or 1 for
    digital hits; hits unique and sorted per event) with condition `incident_energy` (MeV).
    """
    if geometry.kind != "calo":
        raise GeometryError(f"geometry {geometry.name!r} is not a calorimeter")
    if geometry.particle == "pion":
        raise GeometryError(
            f"geometry {geometry.name!r} holds pion (hadronic) showers, which the EM shower simulator "
            "does not model; import the CaloChallenge pion data instead (uhg data import-calochallenge)")
    if n_events < 0:
        raise ConditionError(f"n_events must be >= 0, got {n_events}")
    if energies is None:
        if not 0 < energy_min <= energy_max:
            raise ConditionError(
                f"need 0 < energy_min <= energy_max (MeV), got energy_min={energy_min}, energy_max={energy_max}")
    else:
        energies = np.asarray(energies, dtype=np.float64)
        if energies.shape != (n_events,) or not np.all(energies > 0):
            raise ConditionError(f"energies must be {n_events} positive values in MeV, got shape {energies.shape}")

    model = _ShowerModel(geometry)
    flats, counts, e_inc = [], [], np.empty(n_events)
    for i in range(n_events):
        rng = event_rng(seed, first_event + i, "calo")
        if energies is None:
            # exp(log(x)) can round just outside the declared range (always, when min == max)
            e = min(max(math.exp(rng.uniform(math.log(energy_min), math.log(energy_max))), energy_min), energy_max)
        else:
            e = float(energies[i])
            rng.uniform()  # keep the stream aligned with drawn-energy runs
        e_inc[i] = e
        flat, value = model.shower(e, rng)
        flats.append((flat, value))
        counts.append(len(flat))

    flat = np.concatenate([f for f, _ in flats]) if flats else np.zeros(0, np.int64)
    value = np.concatenate([v for _, v in flats]) if flats else np.zeros(0, np.float32)
    layer = np.searchsorted(geometry.layer_offsets, flat, side="right") - 1
    cell = flat - geometry.layer_offsets[layer]
    return HitBatch(
        "calo",
        {"layer": layer.astype(np.uint16), "cell": cell.astype(np.uint32), "value": value.astype(np.float32)},
        np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
        {"incident_energy": e_inc},
    )


class _ShowerModel:
    """Per-geometry constants of the parameterisation, and one-shower sampling."""

    def __init__(self, g: CaloGeometry) -> None:
        self.g = g
        active = list(g.active_layers)
        fronts = np.array([g.layer_depth_x0[i][0] for i in active])
        backs = np.array([g.layer_depth_x0[i][1] for i in active])
        order = np.argsort(fronts)
        self.layers = np.array(active, dtype=np.int64)[order]
        self.fronts, self.backs = fronts[order], backs[order]
        self.fs_inv = g.sampling_layer_x0
        self.one_m_ehat = 1.0 - g.ehat
        self.ln_z = math.log(g.z_eff)

    # ------------------------------------------------------------------ longitudinal
    def longitudinal(self, e_mev: float, rng: np.random.Generator) -> tuple[float, float]:
        """(alpha, beta) of this shower's Gamma profile (beta in 1/X0)."""
        g = self.g
        ln_y = math.log(max(e_mev / g.critical_energy_mev, 3.0))
        t_hom = max(ln_y - 0.812, 0.1)
        a_hom = max(0.81 + (0.458 + 2.26 / g.z_eff) * ln_y, 0.1)
        mu_t = math.log(max(t_hom - 0.55 * self.fs_inv - 0.69 * self.one_m_ehat, 0.1))
        mu_a = math.log(max(a_hom - 0.476 * self.fs_inv, 1.1))
        sig_t = min(0.5, 1.0 / max(-2.5 + 1.25 * ln_y, 1e-9))
        sig_a = min(0.5, 1.0 / max(-0.82 + 0.79 * ln_y, 1e-9))
        rho = min(max(0.784 - 0.023 * ln_y, -1.0), 1.0)
        z1, z2 = rng.standard_normal(2)
        c1, c2 = math.sqrt((1 + rho) / 2), math.sqrt((1 - rho) / 2)
        t_max = max(0.5, math.exp(mu_t + sig_t * (c1 * z1 + c2 * z2)))
        alpha = max(1.1, math.exp(mu_a + sig_a * (c1 * z1 - c2 * z2)))
        return alpha, (alpha - 1.0) / t_max

    # ------------------------------------------------------------------ lateral
    def radii_mm(self, e_gev: float, tau: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Radial distance (mm) of spots at relative depths tau = t / T."""
        z, om, fs = self.g.z_eff, self.one_m_ehat, self.fs_inv
        ln_e = math.log(e_gev)
        e_tau = np.exp(-tau)
        r_core = 0.0251 + 0.00319 * ln_e + (0.1162 - 0.000381 * z) * tau - 0.0203 * om + 0.0397 * fs * e_tau
        k4 = 0.3585 + 0.0412 * ln_e
        r_tail = (0.659 - 0.00309 * z) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
        r_tail += -0.14 * om - 0.495 * fs * e_tau
        v = (0.401 + 0.00187 * z - tau) / (1.313 - 0.0686 * ln_e)
        p = (2.632 - 0.00094 * z) * np.exp(v - np.exp(v))
        p += om * (0.348 - 0.642 * fs * np.exp(-((tau - 1.0) ** 2)))
        p = np.clip(p, 0.0, 1.0)
        core = rng.random(len(tau)) < p
        radius = np.where(core, np.maximum(r_core, 0.005), np.maximum(r_tail, 0.02))
        u = np.minimum(rng.random(len(tau)), 1.0 - 1e-9)
        return self.g.moliere_radius_mm * radius * np.sqrt(u / (1.0 - u))

    # ------------------------------------------------------------------ one shower
    def points(self, e_mev: float, n: int, rng: np.random.Generator):
        """Depth-layer and (x, y) of n points of one shower; leaked points get layer -1."""
        alpha, beta = self.longitudinal(e_mev, rng)
        t = rng.gamma(alpha, 1.0 / beta, size=n)
        tau = t * beta / (alpha - 1.0)
        if self.g.particle == "photon":
            t = t + rng.exponential(PHOTON_CONVERSION_X0)
        idx = np.searchsorted(self.fronts, t, side="right") - 1
        inside = (idx >= 0) & (t < self.backs[np.clip(idx, 0, None)])
        layer = np.where(inside, self.layers[np.clip(idx, 0, None)], -1)
        r = self.radii_mm(e_mev / 1000.0, tau, rng)
        phi = rng.uniform(-math.pi, math.pi, size=n)
        return layer, r * np.cos(phi), r * np.sin(phi)

    def shower(self, e_mev: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Flat voxel ids (sorted, unique) and values of one shower."""
        if self.g.readout == "digital":
            return self._digital(e_mev, rng)
        return self._analog(e_mev, rng)

    def _analog(self, e_mev: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = self.g
        e_gev = e_mev / 1000.0
        n = int(min(MAX_SPOTS, max(20, round(93.0 * self.ln_z * e_gev**0.876))))
        layer, x, y = self.points(e_mev, n, rng)
        e_scale = e_mev if g.calibrated else e_mev * g.sampling_fraction
        shape = e_gev / (g.stochastic_term**2 * n) if g.stochastic_term > 0 else 0.0
        if shape > 0:
            energy = rng.gamma(shape, e_scale / (n * shape), size=n)
        else:
            energy = np.full(n, e_scale / n)
        if g.constant_term > 0:
            energy *= max(0.0, 1.0 + g.constant_term * rng.standard_normal())
        return self._bin(layer, x, y, energy, g.threshold_mev)

    def _digital(self, e_mev: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = self.g
        n = int(min(MAX_CROSSINGS, rng.poisson(g.crossings_per_gev * e_mev / 1000.0)))
        layer, x, y = self.points(e_mev, n, rng)
        extra = rng.poisson(g.cluster_extra_pixels, size=n)
        src = np.repeat(np.arange(n), extra)
        dx, dy = rng.normal(0.0, g.cluster_sigma_mm, size=(2, len(src)))
        layer = np.concatenate([layer, layer[src]])
        x = np.concatenate([x, x[src] + dx])
        y = np.concatenate([y, y[src] + dy])
        flat, _ = self._bin(layer, x, y, np.ones(len(x)), 0.0)
        return flat, np.ones(len(flat), dtype=np.float32)

    def _bin(self, layer, x, y, energy, threshold):
        keep = layer >= 0
        layer, x, y, energy = layer[keep], x[keep], y[keep], energy[keep]
        cell = self.g.cell_index(layer, x, y)
        ok = cell >= 0
        flat = self.g.layer_offsets[layer[ok]] + cell[ok]
        if self.g.n_cells <= DENSE_BINNING_CELLS:
            dense = np.bincount(flat, weights=energy[ok], minlength=self.g.n_cells)
            ids = np.flatnonzero(dense)
            value = dense[ids]
        else:  # millions of pixels: sort the hits instead of touching every channel
            ids, inverse = np.unique(flat, return_inverse=True)
            value = np.bincount(inverse, weights=energy[ok], minlength=len(ids))
        above = value >= max(threshold, 1e-30)
        return ids[above], value[above].astype(np.float32)
