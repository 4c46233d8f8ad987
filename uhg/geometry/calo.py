"""Calorimeter geometries: CaloChallenge 2022 binnings and an EPICAL-2-like digital pixel calorimeter.

One interface, two layouts:

- cylindrical (`ds1-photons`, `ds1-pions`, `ds2`, `ds3`): per layer, bins in radius r (mm, from the
  shower axis) and in the angle alpha, read from the CaloChallenge binning XML files shipped in
  `uhg/geometry/data/`. Alpha convention (as the CaloChallenge `XMLHandler`): `n_alpha` equal bins
  over [-pi, pi), alpha = atan2(y, x); bin centres at -pi + (j + 1/2) 2 pi / n_alpha, so a layer
  with one alpha bin has its centre at alpha = 0 (x = r, y = 0). Within a layer the cell index is
  `alpha_bin * n_r + r_bin` (radial fastest), and the flat voxel index is
  `layer_offsets[layer] + cell`: exactly the CaloChallenge HDF5 order (layer, alpha, radial).
  Layers whose `r_edges` is "0" have no voxels (DS1 keeps the ATLAS layer ids 0-23).
- cartesian (`epical`, `epical-mini`): per layer a grid of `ny` rows x `nx` columns of pixels
  centred on the beam axis; cell = `row * nx + col` with row along y, col along x.

Longitudinal and material description for the shower simulator (uhg.sim.calo):
`layer_depth_x0[layer] = (front, back)` is the depth range, in radiation lengths X0 of the
effective medium measured from the calorimeter face, whose energy is read out in that layer;
depth outside every range is dead material or leakage. The effective medium is described by its
radiation length, Moliere radius, critical energy and effective Z (mixture rules of Grindhammer
and Peters, hep-ex/0001020), the sampling-cell thickness in X0 (F_S^-1), e/mip (`ehat`), the
electron sampling fraction and the resolution terms. Sources and derivations are in
docs/calorimeter.md; the numbers are also stated next to each variant below.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources

import numpy as np

from uhg.errors import GeometryError

ES_MEV = 21.2  # scale energy of multiple scattering (Moliere radius = X0 * Es / Ec)


@dataclass(frozen=True)
class CaloGeometry:
    """A calorimeter readout: `n_layers` layers, each with `cells_per_layer[l]` cells.

    Lengths in mm, energies in MeV, depths in X0 of the effective medium.
    """

    name: str
    particle: str
    """Particle the geometry's reference data describe: "electron", "photon" or "pion"."""
    layout: str
    """"cylindrical" (r, alpha bins) or "cartesian" (pixel grid)."""
    readout: str
    """"analog": cell value is deposited energy in MeV; "digital": a fired pixel has value 1."""
    # cylindrical layout
    r_edges_mm: tuple[tuple[float, ...], ...] = field(repr=False)
    n_alpha: tuple[int, ...] = field(repr=False)
    # cartesian layout
    nx: int = 0
    ny: int = 0
    pitch_x_mm: float = 0.0
    pitch_y_mm: float = 0.0
    # longitudinal structure and effective medium
    layer_depth_x0: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    x0_mm: float = 3.5
    moliere_radius_mm: float = 9.3
    critical_energy_mev: float = 8.0
    z_eff: float = 74.0
    sampling_layer_x0: float = 0.4
    """Thickness of one absorber + active sampling cell in X0 (F_S^-1 of GFlash)."""
    ehat: float = 1.0
    """e/mip ratio of the sampling structure, 1 / (1 + 0.007 (Z_passive - Z_active))."""
    sampling_fraction: float = 1.0
    """Fraction of an electron shower's energy deposited in the active layers."""
    calibrated: bool = True
    """True: stored energies are active energies divided by the sampling fraction (EM scale)."""
    stochastic_term: float = 0.1
    """a in sigma/E = a / sqrt(E / GeV) (+) b, from sampling fluctuations."""
    constant_term: float = 0.0
    """b in sigma/E: per-shower response spread (calibration / geometric non-uniformity)."""
    threshold_mev: float = 0.0
    """Cells below this stored energy are zero (15.15 keV in CaloChallenge DS2/DS3)."""
    crossings_per_gev: float = 0.0
    """Digital readout: mean charged-particle crossings of all sensor planes per GeV."""
    cluster_extra_pixels: float = 0.0
    """Digital readout: mean extra pixel candidates per crossing (charge sharing)."""
    cluster_sigma_mm: float = 0.0
    """Digital readout: spread of the pixel candidates around the crossing point."""
    source: str = field(default="", repr=False)
    kind: str = "calo"

    # ------------------------------------------------------------------ sizes and indexing
    @property
    def n_layers(self) -> int:
        return len(self.layer_depth_x0)

    @cached_property
    def cells_per_layer(self) -> tuple[int, ...]:
        if self.layout == "cartesian":
            return (self.nx * self.ny,) * self.n_layers
        return tuple(self.n_alpha[i] * (len(self.r_edges_mm[i]) - 1) for i in range(self.n_layers))

    @property
    def n_cells(self) -> int:
        """Total number of voxels / pixels (channels)."""
        return int(sum(self.cells_per_layer))

    @property
    def n_channels(self) -> int:
        return self.n_cells

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """(n_layers + 1,) int64: flat voxel index = layer_offsets[layer] + cell."""
        return np.concatenate([[0], np.cumsum(self.cells_per_layer)]).astype(np.int64)

    @cached_property
    def active_layers(self) -> tuple[int, ...]:
        """Layers that have at least one cell."""
        return tuple(i for i, n in enumerate(self.cells_per_layer) if n > 0)

    def layer_shape(self, layer: int) -> tuple[int, int]:
        """Dense image shape of a layer: (n_alpha, n_r) or (ny, nx); cell = row * shape[1] + col."""
        self._check_layer(layer)
        if self.layout == "cartesian":
            return self.ny, self.nx
        return self.n_alpha[layer], len(self.r_edges_mm[layer]) - 1

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise GeometryError(f"layer {layer} outside geometry {self.name!r} (0..{self.n_layers - 1})")

    def cell_centers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(x_mm, y_mm) arrays of shape (cells_per_layer[layer],) in cell order.

        Cylindrical layers use the bin centre in r and alpha (x = r cos alpha, y = r sin alpha), as
        the CaloChallenge XMLHandler does.
        """
        self._check_layer(layer)
        if self.layout == "cartesian":
            xs = (np.arange(self.nx) + 0.5 - self.nx / 2) * self.pitch_x_mm
            ys = (np.arange(self.ny) + 0.5 - self.ny / 2) * self.pitch_y_mm
            y, x = np.meshgrid(ys, xs, indexing="ij")
            return x.ravel(), y.ravel()
        edges = np.asarray(self.r_edges_mm[layer])
        n_a = self.n_alpha[layer]
        r_mid = 0.5 * (edges[1:] + edges[:-1])
        a_mid = -math.pi + (np.arange(n_a) + 0.5) * (2 * math.pi / n_a)
        a, r = np.meshgrid(a_mid, r_mid, indexing="ij")  # alpha major, radial fastest
        return (r * np.cos(a)).ravel(), (r * np.sin(a)).ravel()

    def cell_index(self, layer: int | np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        """Cell of each point (x_mm, y_mm) in `layer` (a scalar or an array like x_mm); -1 outside.

        Returns an int64 array of the broadcast shape of the inputs.
        """
        x, y, layer_arr = np.broadcast_arrays(np.asarray(x_mm, dtype=np.float64), np.asarray(y_mm, dtype=np.float64),
                                              np.asarray(layer, dtype=np.int64))
        shape = x.shape
        return self._cell_index_flat(layer_arr.ravel(), x.ravel(), y.ravel()).reshape(shape)

    def _cell_index_flat(self, layer_arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.full(x.shape, -1, dtype=np.int64)
        if self.layout == "cartesian":
            col = np.floor(x / self.pitch_x_mm + self.nx / 2).astype(np.int64)
            row = np.floor(y / self.pitch_y_mm + self.ny / 2).astype(np.int64)
            ok = (col >= 0) & (col < self.nx) & (row >= 0) & (row < self.ny)
            ok &= (layer_arr >= 0) & (layer_arr < self.n_layers)
            out[ok] = row[ok] * self.nx + col[ok]
            return out
        r = np.hypot(x, y)
        alpha = np.arctan2(y, x)
        group = self._binning_group[np.clip(layer_arr, 0, self.n_layers - 1)]
        group[(layer_arr < 0) | (layer_arr >= self.n_layers)] = -1
        for g, (edges, n_a) in enumerate(self._binnings):
            sel = group == g
            if not sel.any():
                continue
            n_r = len(edges) - 1
            r_bin = np.searchsorted(edges, r[sel], side="right") - 1
            a_bin = np.floor((alpha[sel] + math.pi) * (n_a / (2 * math.pi))).astype(np.int64) % n_a
            out[sel] = np.where((r_bin >= 0) & (r_bin < n_r), a_bin * n_r + r_bin, -1)
        return out

    @cached_property
    def _binnings(self) -> list[tuple[np.ndarray, int]]:
        """Distinct (r_edges, n_alpha) binnings of the layers with cells (DS2/DS3 have one)."""
        seen: list[tuple[tuple[float, ...], int]] = []
        for i in self.active_layers:
            key = (self.r_edges_mm[i], self.n_alpha[i])
            if key not in seen:
                seen.append(key)
        return [(np.asarray(e), n) for e, n in seen]

    @cached_property
    def _binning_group(self) -> np.ndarray:
        """(n_layers,) int64: index into _binnings per layer, -1 for layers without cells."""
        keys = [(tuple(e), n) for e, n in self._binnings]
        return np.array([keys.index((self.r_edges_mm[i], self.n_alpha[i])) if self.cells_per_layer[i] else -1
                         for i in range(self.n_layers)], dtype=np.int64)

    # ------------------------------------------------------------------ description
    def to_dict(self) -> dict:
        """JSON-able description stored in Zarr attributes."""
        d = {
            "name": self.name,
            "kind": self.kind,
            "layout": self.layout,
            "particle": self.particle,
            "readout": self.readout,
            "n_layers": self.n_layers,
            "cells_per_layer": list(self.cells_per_layer),
            "n_cells": self.n_cells,
            "n_channels": self.n_cells,
            "units": {"value": "MeV" if self.readout == "analog" else "hit (1 = fired pixel)",
                      "length": "mm", "depth": "X0"},
            "layer_depth_x0": [list(d) for d in self.layer_depth_x0],
            "x0_mm": self.x0_mm,
            "moliere_radius_mm": self.moliere_radius_mm,
            "critical_energy_mev": self.critical_energy_mev,
            "sampling_fraction": self.sampling_fraction,
            "threshold_mev": self.threshold_mev,
        }
        if self.layout == "cylindrical":
            d["r_edges_mm"] = [list(e) for e in self.r_edges_mm]
            d["n_alpha"] = list(self.n_alpha)
            d["alpha_range"] = [-math.pi, math.pi]
        else:
            d.update(nx=self.nx, ny=self.ny, pitch_x_mm=self.pitch_x_mm, pitch_y_mm=self.pitch_y_mm)
        return d


# ---------------------------------------------------------------------- effective media
def mixture(layers: list[tuple[float, float, float, float, float]]) -> dict[str, float]:
    """Effective X0 (mm), Moliere radius (mm), critical energy (MeV) and Z of a layered medium.

    `layers`: (thickness_mm, density g/cm3, X0_mm, Ec_MeV, Z) per material of one sampling cell.
    Rules of Grindhammer & Peters (GFlash): 1/X0 = sum f_i / X0_i and 1/R_M = sum f_i Ec_i / (X0_i Es)
    with f_i the thickness fractions; Z_eff weighted by mass; Ec = X0 * sum f_i Ec_i / X0_i.
    """
    total = sum(t for t, *_ in layers)
    mass = sum(t * rho for t, rho, *_ in layers)
    inv_x0 = sum(t / total / x0 for t, _, x0, _, _ in layers)
    ec_over_x0 = sum(t / total * ec / x0 for t, _, x0, ec, _ in layers)
    x0 = 1.0 / inv_x0
    return {
        "x0_mm": x0,
        "moliere_radius_mm": ES_MEV / ec_over_x0,
        "critical_energy_mev": x0 * ec_over_x0,
        "z_eff": sum(t * rho * z for t, rho, _, _, z in layers) / mass,
        "cell_x0": total / x0,
    }


# PDG values: (density g/cm3, X0 mm, Ec(e-) MeV, Z, dE/dx_min MeV/mm)
TUNGSTEN = (19.3, 3.504, 7.97, 74, 2.210)
SILICON = (2.329, 93.70, 40.19, 14, 0.3876)


def _ehat(z_passive: float, z_active: float) -> float:
    return 1.0 / (1.0 + 0.007 * (z_passive - z_active))


def _mip_fraction(t_active: float, dedx_active: float, t_passive: float, dedx_passive: float) -> float:
    return t_active * dedx_active / (t_active * dedx_active + t_passive * dedx_passive)


# ---------------------------------------------------------------------- CaloChallenge XML
def read_binning(filename: str) -> tuple[str, tuple[tuple[float, ...], ...], tuple[int, ...]]:
    """(particle name, r_edges per layer, n_alpha per layer) from a CaloChallenge binning XML."""
    text = resources.files("uhg.geometry").joinpath("data", filename).read_text()
    root = ET.fromstring(text)
    bins = root.findall("Bin")
    if len(bins) != 1:
        raise GeometryError(f"{filename}: expected one <Bin> element, found {len(bins)}")
    layers = sorted(bins[0].findall("Layer"), key=lambda e: int(e.attrib["id"]))
    if [int(e.attrib["id"]) for e in layers] != list(range(len(layers))):
        raise GeometryError(f"{filename}: layer ids must be 0..{len(layers) - 1}")
    r_edges = tuple(tuple(float(v) for v in e.attrib["r_edges"].split(",")) for e in layers)
    n_alpha = tuple(int(e.attrib["n_bin_alpha"]) for e in layers)
    return bins[0].attrib.get("name", ""), r_edges, n_alpha


def _ds23(name: str, filename: str) -> CaloGeometry:
    # Geant4 Par04 set-up used for CaloChallenge DS2/DS3: 90 sampling cells of 1.4 mm W + 0.3 mm Si;
    # the readout merges two cells per layer (3.4 mm, ~0.8 X0 of W), 45 layers; radial bins of
    # 0.5 (DS2) / 0.25 (DS3) Moliere radii of tungsten (9.327 mm).
    t_w, t_si = 1.4, 0.3
    med = mixture([(t_w, *TUNGSTEN[:4]), (t_si, *SILICON[:4])])
    layer_x0 = 2 * med["cell_x0"]
    particle, r_edges, n_alpha = read_binning(filename)
    f_mip = _mip_fraction(t_si, SILICON[4], t_w, TUNGSTEN[4])
    ehat = _ehat(74, 14)
    return CaloGeometry(
        name=name, particle=particle, layout="cylindrical", readout="analog",
        r_edges_mm=r_edges, n_alpha=n_alpha,
        layer_depth_x0=tuple((i * layer_x0, (i + 1) * layer_x0) for i in range(len(r_edges))),
        x0_mm=med["x0_mm"], moliere_radius_mm=med["moliere_radius_mm"],
        critical_energy_mev=med["critical_energy_mev"], z_eff=med["z_eff"],
        sampling_layer_x0=med["cell_x0"], ehat=ehat, sampling_fraction=f_mip * ehat,
        calibrated=True,
        # Wigmans: a = 2.7% sqrt(d_abs / mm / f_mip) = 17%; CALICE Si-W (1.4 mm W) measured 16.6%.
        stochastic_term=0.027 * math.sqrt(t_w / f_mip), constant_term=0.0,
        threshold_mev=15.15e-3,
        source=f"CaloChallenge 2022 {filename}; Geant4 Par04 (90 x [1.4 mm W + 0.3 mm Si])",
    )


# ATLAS-like DS1 (eta ~ 0.2-0.25): readout-layer depth ranges in X0 along the particle direction.
# Presampler (0), EMB1 strips (1), EMB2 middle (2), EMB3 back (3), TileBar0-2 (12-14); the other
# ATLAS layer ids have no voxels at this eta. ~1.8 X0 of dead material (inner detector, solenoid,
# cryostat) in front, 0.4 X0 between presampler and strips, ~2.5 X0 cryostat before the Tile.
_DS1_DEPTHS = {0: (1.8, 2.1), 1: (2.5, 7.0), 2: (7.0, 23.4), 3: (23.4, 25.5),
               12: (28.0, 42.0), 13: (42.0, 80.0), 14: (80.0, 97.0)}


def _ds1(name: str, filename: str) -> CaloGeometry:
    particle, r_edges, n_alpha = read_binning(filename)
    depths = []
    last = 0.0
    for i in range(len(r_edges)):
        front, back = _DS1_DEPTHS.get(i, (last, last))  # layers without voxels: zero depth
        depths.append((front, back))
        last = max(last, back)
    # Accordion Pb/LAr sampling cell at |eta| < 0.8: 1.53 mm Pb + 0.4 mm steel + 4.2 mm LAr +
    # 0.3 mm electrode; effective X0 ~ 19 mm, R_M ~ 38 mm (mixture rules, rounded).
    return CaloGeometry(
        name=name, particle={"photon": "photon", "pion": "pion"}.get(particle, particle),
        layout="cylindrical", readout="analog", r_edges_mm=r_edges, n_alpha=n_alpha,
        layer_depth_x0=tuple(depths), x0_mm=19.0, moliere_radius_mm=38.0,
        critical_energy_mev=ES_MEV * 19.0 / 38.0, z_eff=61.0, sampling_layer_x0=0.34,
        ehat=_ehat(82, 18), sampling_fraction=0.18, calibrated=True,
        stochastic_term=0.10, constant_term=0.007,  # ATLAS EM barrel design resolution
        threshold_mev=0.0,
        source=f"CaloChallenge 2022 {filename}; ATLAS LAr EM barrel + Tile, approximate depths",
    )


def _epical(name: str, nx: int, ny: int) -> CaloGeometry:
    # EPICAL-2: 24 layers of 3 mm W absorber followed by two ALPIDE MAPS (1024 x 512 pixels of
    # 29.24 x 26.88 um each) side by side: 1024 x 1024 pixels, 29.94 mm x 27.53 mm per layer,
    # ~0.87 X0 per layer (W + sensor, glue, flex), R_M ~ 11 mm (EPICAL-2 publication).
    width_x, width_y = 1024 * 29.24e-3, 1024 * 26.88e-3
    layer_x0 = 0.87
    ehat = _ehat(74, 14)
    ec = TUNGSTEN[2]
    return CaloGeometry(
        name=name, particle="electron", layout="cartesian", readout="digital",
        r_edges_mm=(), n_alpha=(), nx=nx, ny=ny, pitch_x_mm=width_x / nx, pitch_y_mm=width_y / ny,
        layer_depth_x0=tuple((i * layer_x0, (i + 1) * layer_x0) for i in range(24)),
        x0_mm=3.8 / layer_x0, moliere_radius_mm=11.0,  # ~3.8 mm layer pitch
        critical_energy_mev=ec, z_eff=73.8, sampling_layer_x0=layer_x0, ehat=ehat,
        sampling_fraction=1.0, calibrated=False,
        stochastic_term=0.0, constant_term=0.0, threshold_mev=0.0,
        # total track length E/Ec (X0) crossing planes every 0.87 X0, ~60% of it by particles that
        # reach the next sensor: 0.6 * 1000 / (7.97 * 0.87) ~ 87 crossings per GeV.
        crossings_per_gev=0.6 * 1000.0 / (ec * layer_x0),
        # ALPIDE clusters of ~3-5 pixels: extra candidates spread by charge diffusion.
        cluster_extra_pixels=3.0, cluster_sigma_mm=0.025,
        source="EPICAL-2 (24 x [3 mm W + 2 ALPIDE]) scaled to 1024 x 1024 pixels per layer",
    )


_FACTORIES = {
    "ds1-photons": lambda: _ds1("ds1-photons", "binning_dataset_1_photons.xml"),
    "ds1-pions": lambda: _ds1("ds1-pions", "binning_dataset_1_pions.xml"),
    "ds2": lambda: _ds23("ds2", "binning_dataset_2.xml"),
    "ds3": lambda: _ds23("ds3", "binning_dataset_3.xml"),
    "epical": lambda: _epical("epical", 1024, 1024),  # 24 x 1024 x 1024 = 25.2 M channels
    "epical-mini": lambda: _epical("epical-mini", 64, 64),  # same size, 98 304 channels
}

CALO_VARIANTS: tuple[str, ...] = tuple(_FACTORIES)


@cache
def calo_geometry(name: str) -> CaloGeometry:
    """The calorimeter called `name` (one of CALO_VARIANTS)."""
    if name not in _FACTORIES:
        raise GeometryError(f"unknown calorimeter geometry {name!r}; known: {', '.join(CALO_VARIANTS)}")
    return _FACTORIES[name]()
