"""Features of calorimeter showers (the CaloChallenge 2022 high-level features), on sparse hits.

Per event: incident energy E_inc (MeV, condition `incident_energy`), deposited energy
E_dep = sum of cell values, response E_dep / E_inc, energy per layer, lateral shower centre
(energy-weighted mean of x and y, mm) and width (energy-weighted std of x and y, mm) per layer,
longitudinal centre (energy-weighted mean depth, X0) and width (std of depth, X0), number of hits,
sparsity per layer (fraction of the layer's cells that hold energy); per hit: the cell-energy
spectrum (MeV). Classifier inputs: `vectors["low_level"]` is the CaloChallenge `cls-low` input
(log10 E_inc, voxel energies / E_inc), `vectors["high_level"]` the `cls-high` input (a superset). Digital calorimeters (cell value 1 = fired pixel) use hit counts in place of
energies: the response is then hits per GeV of incident energy, and the profile
`lateral_density_per_layer` gives the mean hits per mm2 in rings about the beam axis per layer.

Per-layer lateral centres and widths are histogrammed over the events whose layer holds
energy. Recommended sample sizes: >= 1000 showers per sample spread over the energy range (the
response vs energy profile uses up to 8 energy bins of >= 10 showers each); the classifier test
on voxels wants >= 2000.
"""

from __future__ import annotations

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import ConditionError
from uhg.eval.features import Binned, FeatureSet, Observable, Profile

MAX_VOXELS_FOR_CLASSIFIER = 8000
"""Above this many voxels the low-level classifier input is coarsened to radial rings per layer."""
N_RINGS = 16


def cell_xy(geometry, layer: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_mm, y_mm) of the centre of each hit's cell."""
    layer = np.asarray(layer, dtype=np.int64)
    cell = np.asarray(cell, dtype=np.int64)
    if geometry.layout == "cartesian":
        row, col = np.divmod(cell, geometry.nx)
        return ((col + 0.5 - geometry.nx / 2) * geometry.pitch_x_mm,
                (row + 0.5 - geometry.ny / 2) * geometry.pitch_y_mm)
    xs, ys = _flat_centres(geometry)
    flat = geometry.layer_offsets[layer] + cell
    return xs[flat], ys[flat]


def _flat_centres(geometry) -> tuple[np.ndarray, np.ndarray]:
    centres = [geometry.cell_centers(lay) if geometry.cells_per_layer[lay] else (np.zeros(0), np.zeros(0))
               for lay in range(geometry.n_layers)]
    return np.concatenate([c[0] for c in centres]), np.concatenate([c[1] for c in centres])


def energy_unit(geometry) -> str:
    return "hits" if getattr(geometry, "readout", "analog") == "digital" else "MeV"


def calo_features(batch: HitBatch, geometry) -> FeatureSet:
    """All calorimeter features of `batch` (see the module docstring for units)."""
    if batch.kind != "calo":
        raise ValueError(f"calo_features needs calorimeter hits, got {batch.kind!r}")
    if "incident_energy" not in batch.conditions:
        raise ConditionError("calorimeter evaluation needs the per-event condition 'incident_energy' (MeV); "
                             f"the events carry {sorted(batch.conditions) or 'no conditions'}")
    digital = energy_unit(geometry) == "hits"
    unit = energy_unit(geometry)
    n_ev, n_lay = len(batch), geometry.n_layers
    active = list(geometry.active_layers)
    ev = batch.event_index()
    layer = batch.columns["layer"].astype(np.int64)
    e = batch.columns["value"].astype(np.float64)
    e_inc = batch.conditions["incident_energy"]
    x, y = cell_xy(geometry, layer, batch.columns["cell"])
    depth_mid = np.array([0.5 * (a + b) for a, b in geometry.layer_depth_x0])

    def per_event_layer(weights):
        return np.bincount(ev * n_lay + layer, weights=weights, minlength=n_ev * n_lay).reshape(n_ev, n_lay)

    e_layer = per_event_layer(e)
    hits_layer = per_event_layer(None)
    e_dep = e_layer.sum(axis=1)
    scale = 1e3 if digital else 1.0  # digital: hits per GeV
    response = e_dep / e_inc * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = per_event_layer(e * x) / e_layer
        cy = per_event_layer(e * y) / e_layer
        wx = np.sqrt(np.clip(per_event_layer(e * x * x) / e_layer - cx**2, 0, None))
        wy = np.sqrt(np.clip(per_event_layer(e * y * y) / e_layer - cy**2, 0, None))
        depth = (e_layer @ depth_mid) / e_dep
        depth_width = np.sqrt(np.clip((e_layer @ depth_mid**2) / e_dep - depth**2, 0, None))
    cells = np.maximum(np.asarray(geometry.cells_per_layer, dtype=np.float64), 1)
    sparsity = hits_layer / cells

    fs = FeatureSet("calo", n_ev, dict(batch.conditions))
    per_event = np.arange(n_ev, dtype=np.int32)
    has = e_dep > 0
    resp_label = "N_hits / E_inc [1/GeV]" if digital else "E_dep / E_inc"
    fs.add(Observable("response", resp_label, response, per_event))
    fs.add(Observable("energy_deposited", f"E_dep [{unit}]", e_dep, per_event, "log"))
    fs.add(Observable("hits_per_event", "hits per shower", batch.hits_per_event.astype(np.float64), per_event, "log"))
    if not digital:
        fs.add(Observable("cell_energy", "cell energy [MeV]", e.astype(np.float32), ev.astype(np.int32), "log"))
    fs.add(Observable("shower_depth", "longitudinal centre (energy-weighted depth) [X0]", depth[has], per_event[has]))
    fs.add(Observable("shower_depth_width", "longitudinal width [X0]", depth_width[has], per_event[has]))
    for lay in active:
        in_layer = e_layer[:, lay] > 0
        sel = per_event[in_layer]
        fs.add(Observable(f"energy_layer{lay}", f"energy in layer {lay} [{unit}]", e_layer[:, lay], per_event,
                          "linear" if digital else "log"))
        fs.add(Observable(f"sparsity_layer{lay}", f"fraction of cells hit, layer {lay}", sparsity[:, lay], per_event))
        for name, arr, what in (("centre_x", cx, "centre x"), ("centre_y", cy, "centre y"),
                                ("width_x", wx, "width x"), ("width_y", wy, "width y")):
            fs.add(Observable(f"{name}_layer{lay}", f"shower {what}, layer {lay} [mm]", arr[in_layer, lay], sel))

    layer_names = [str(lay) for lay in active]
    fs.add(Profile("energy_per_layer", f"mean energy [{unit}]", e_layer[:, active], layer_names, "layer"))
    fs.add(Profile("sparsity_per_layer", "mean fraction of cells hit", sparsity[:, active], layer_names, "layer"))
    fs.add(Profile("width_per_layer", "mean lateral width sqrt((wx^2+wy^2)/2) [mm]",
                   np.nan_to_num(np.sqrt(0.5 * (wx**2 + wy**2)))[:, active], layer_names, "layer"))
    if digital:
        density, names = _lateral_hit_density(geometry, ev, layer, np.hypot(x, y), n_ev, active)
        fs.add(Profile("lateral_density_per_layer", "mean hits per mm2 in rings about the beam axis",
                       density, names, "layer, ring [mm]"))
    fs.add(Binned("response_vs_energy", "E_inc [MeV]", resp_label, e_inc, response))

    # cls-high input: what the CaloChallenge evaluation's high-level classifier sees (log10 E_inc,
    # log10 layer energies, centres and widths in x (eta) and y (phi) per layer, log10 E_tot,
    # sparsity, radial centre and width per layer), plus uhg's response, hits and longitudinal
    # centre and width; centres and widths in mm / 100 as there
    with np.errstate(invalid="ignore", divide="ignore"):
        rr = np.hypot(x, y)
        cr = per_event_layer(e * rr) / e_layer
        wr = np.sqrt(np.clip(per_event_layer(e * rr * rr) / e_layer - cr**2, 0, None))

    def mm(a):
        return np.nan_to_num(a[:, active]) / 100.0

    fs.vectors["high_level"] = np.column_stack([
        np.log10(e_inc), np.log10(e_layer[:, active] + 1e-8), mm(cx), mm(cy), mm(wx), mm(wy), np.log10(e_dep + 1e-8),
        sparsity[:, active], mm(cr), mm(wr),
        response, np.log1p(batch.hits_per_event), np.nan_to_num(depth), np.nan_to_num(depth_width),
    ]).astype(np.float32)
    fs.vectors["low_level"] = _voxel_vectors(batch, geometry, ev, e, e_inc, x, y)
    return fs


LATERAL_RING_EDGES_MM = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Rings about the beam axis of the lateral hit-density profile of digital calorimeters: the
core (~1 mm, a few pixels of EPICAL's) to the Moliere radius (11 mm) and beyond."""


def _lateral_hit_density(geometry, ev, layer, r_mm, n_ev, active) -> tuple[np.ndarray, list[str]]:
    """(n_events, layers x rings) hits per mm2 of sensor in each ring of every active layer; a
    ring's area is that of the pixels whose centres lie in it (the outer rings leave the sensor)."""
    edges = np.asarray(LATERAL_RING_EDGES_MM)
    n_rings = len(edges) - 1
    keep = r_mm < edges[-1]
    ring = np.searchsorted(edges, r_mm[keep], side="right") - 1
    n_lay = geometry.n_layers
    counts = np.bincount((ev[keep] * n_lay + layer[keep]) * n_rings + ring,
                         minlength=n_ev * n_lay * n_rings).reshape(n_ev, n_lay, n_rings)
    columns, names = [], []
    # digital readouts are cartesian: every layer has the same pixel grid, so its ring areas once
    cx, cy = geometry.cell_centers(active[0])
    pixel_rings = np.searchsorted(edges, np.hypot(cx, cy), side="right") - 1
    area = np.bincount(pixel_rings[pixel_rings < n_rings], minlength=n_rings) * (geometry.pitch_x_mm * geometry.pitch_y_mm)
    for lay in active:
        with np.errstate(invalid="ignore", divide="ignore"):
            columns.append(np.where(area > 0, counts[:, lay, :] / area, 0.0))
        names += [f"{lay}:{edges[k]:g}-{edges[k + 1]:g}" for k in range(n_rings)]
    return np.concatenate(columns, axis=1), names


def high_level_names(geometry) -> list[str]:
    """Names of the columns of `vectors["high_level"]`, in order (per-layer columns end in the
    layer id): lets a study train the classifier on groups of features."""
    active = list(geometry.active_layers)

    def per_layer(name):
        return [f"{name}_layer{lay}" for lay in active]

    return ["log_incident_energy", *per_layer("log_energy"), *per_layer("centre_x"), *per_layer("centre_y"),
            *per_layer("width_x"), *per_layer("width_y"), "log_energy_deposited", *per_layer("sparsity"),
            *per_layer("centre_r"), *per_layer("width_r"), "response", "log_hits", "shower_depth",
            "shower_depth_width"]


def _voxel_vectors(batch, geometry, ev, e, e_inc, x, y) -> np.ndarray:
    """(n_events, d): log10 E_inc followed by voxel energies / E_inc (CaloChallenge classifier
    input), or, for geometries above MAX_VOXELS_FOR_CLASSIFIER voxels, energies / E_inc summed in
    N_RINGS radial rings per layer."""
    n_ev = len(batch)
    layer = batch.columns["layer"].astype(np.int64)
    if geometry.n_cells <= MAX_VOXELS_FOR_CLASSIFIER:
        flat = geometry.layer_offsets[layer] + batch.columns["cell"].astype(np.int64)
        n_feat = geometry.n_cells
    else:
        r = np.hypot(x, y)
        r_max = _max_radius(geometry)
        ring = np.minimum((r / r_max * N_RINGS).astype(np.int64), N_RINGS - 1)
        flat = layer * N_RINGS + ring
        n_feat = geometry.n_layers * N_RINGS
    vox = np.zeros((n_ev, n_feat), np.float32)
    np.add.at(vox, (ev, flat), e / e_inc[ev])
    return np.hstack([np.log10(e_inc)[:, None].astype(np.float32), vox])


def _max_radius(geometry) -> float:
    if geometry.layout == "cartesian":
        return float(np.hypot(geometry.nx * geometry.pitch_x_mm, geometry.ny * geometry.pitch_y_mm) / 2)
    return float(max(max(edges) for edges in geometry.r_edges_mm if len(edges)))
