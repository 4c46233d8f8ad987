"""Features of pixel-detector (PXD) events, computed on sparse hits.

Everything is vectorised over all hits of a batch; nothing densifies whole events. Cost and
memory grow with the number of hits (about 30 bytes per hit while clustering), not with the
7.68 M channels of the full PXD.

Units: occupancy in percent (fired pixels / pixels), charge in ADC units (ADU), positions in
mm, phi in rad. Sensor order is the geometry's canonical order.

Recommended sample sizes: >= 500 events per sample for per-sensor occupancies and spectra
(the reference-vs-reference floor of the separation power on the charge spectrum falls
roughly as 1/n_hits); >= 1000 events for the 40 x 40 sensor correlation matrix and the
classifier test.
"""

from __future__ import annotations

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import GeometryError
from uhg.eval.features import Correlation, FeatureSet, Observable, Profile
from uhg.geometry.pxd import SENSOR_LENGTH_MM, SENSOR_WIDTH_MM, PixelGeometry
from uhg.sparse.clusters import connected_pixels

N_PHI_BINS = 24
N_Z_BINS = 16


def pixel_clusters(batch: HitBatch, geometry: PixelGeometry) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of fired pixels within each sensor of each event.

    Returns (labels, n_clusters): labels (n_hits,) int64 in 0..n_clusters-1, one per hit
    (`uhg.sparse.clusters.connected_pixels`, O(n_hits log n_hits) whatever the sensor size).
    """
    image = batch.event_index() * geometry.n_sensors + batch.columns["sensor"].astype(np.int64)
    return connected_pixels(image, batch.columns["row"], batch.columns["col"], geometry.rows, geometry.cols)


def per_image(batch: HitBatch, geometry: PixelGeometry, weights: str | None = None) -> np.ndarray:
    """(events, sensors) float64: each sensor image's hits, or the sum of column `weights` over them."""
    n, units = len(batch), geometry.n_sensors
    image = batch.event_index() * units + batch.columns["sensor"].astype(np.int64)
    w = None if weights is None else batch.columns[weights].astype(np.float64)
    return np.bincount(image, w, minlength=n * units).reshape(n, units).astype(np.float64)


def clusters_per_image(batch: HitBatch, geometry: PixelGeometry) -> np.ndarray:
    """(events, sensors) float64: each sensor image's clusters (`pixel_clusters`)."""
    n, units = len(batch), geometry.n_sensors
    labels, n_clusters = pixel_clusters(batch, geometry)
    cluster_image = np.zeros(n_clusters, np.int64)
    cluster_image[labels] = batch.event_index() * units + batch.columns["sensor"].astype(np.int64)
    return np.bincount(cluster_image, minlength=n * units).reshape(n, units).astype(np.float64)


def hit_positions(batch: HitBatch, geometry: PixelGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(phi_rad, z_mm) of each hit: the pixel centre on its planar sensor, phi in [-pi, pi)."""
    sensor = batch.columns["sensor"].astype(np.int64)
    phi_s, z_s, r_s, pitch_u, pitch_z = _sensor_tables(geometry)
    u = (batch.columns["row"] + 0.5 - geometry.rows / 2) * pitch_u[sensor]
    z = z_s[sensor] + (batch.columns["col"] + 0.5 - geometry.cols / 2) * pitch_z[sensor]
    phi = _wrap(phi_s[sensor] + np.arctan2(u, r_s[sensor]))
    return phi, z


def pxd_features(batch: HitBatch, geometry: PixelGeometry) -> FeatureSet:
    """All PXD features of `batch` (see the module docstring for units)."""
    if batch.kind != "pixel":
        raise ValueError(f"pxd_features needs pixel hits, got {batch.kind!r}")
    n_ev, n_s = len(batch), geometry.n_sensors
    for col, size in (("sensor", n_s), ("row", geometry.rows), ("col", geometry.cols)):
        if batch.n_hits and int(batch.columns[col].max()) >= size:
            raise GeometryError(f"pixel hits have {col} {int(batch.columns[col].max())}, geometry {geometry.name!r} "
                                f"allows 0..{size - 1}")
    ev = batch.event_index()
    sensor = batch.columns["sensor"].astype(np.int64)
    charge = batch.columns["value"].astype(np.float32)
    image = ev * n_s + sensor
    layer_of = np.array([s.layer for s in geometry.sensors])

    hits_per_image = np.bincount(image, minlength=n_ev * n_s).reshape(n_ev, n_s)
    occ = 100.0 * hits_per_image / geometry.pixels_per_sensor
    charge_per_image = np.bincount(image, weights=charge, minlength=n_ev * n_s).reshape(n_ev, n_s)
    hits_per_event = hits_per_image.sum(axis=1)
    layer_pixels = np.array([np.sum(layer_of == lay) * geometry.pixels_per_sensor for lay in (1, 2)])
    occ_layer = 100.0 * np.stack([hits_per_image[:, layer_of == lay].sum(axis=1) for lay in (1, 2)],
                                 axis=1) / layer_pixels

    labels, n_cl = pixel_clusters(batch, geometry)
    cl_size = np.bincount(labels, minlength=n_cl).astype(np.float32)
    cl_charge = np.bincount(labels, weights=charge, minlength=n_cl).astype(np.float32)
    cl_event = np.zeros(n_cl, np.int64)
    cl_event[labels] = ev
    cl_image = np.zeros(n_cl, np.int64)
    cl_image[labels] = image
    clusters_per_image = np.bincount(cl_image, minlength=n_ev * n_s).reshape(n_ev, n_s)
    clusters_per_event = clusters_per_image.sum(axis=1)

    fs = FeatureSet("pixel", n_ev, dict(batch.conditions))
    i32 = np.int32
    per_event = np.arange(n_ev, dtype=i32)
    fs.add(Observable("hits_per_event", "fired pixels per event", hits_per_event.astype(np.float64),
                      per_event, "log"))
    fs.add(Observable("occupancy_per_image", "occupancy per sensor image [%]", occ.ravel(),
                      np.repeat(per_event, n_s)))
    fs.add(Observable("charge", "charge of fired pixels [ADU]", charge, ev.astype(i32), "integer"))
    fs.add(Observable("cluster_size", "cluster size [pixels]", cl_size, cl_event.astype(i32), "integer"))
    fs.add(Observable("cluster_charge", "cluster charge [ADU]", cl_charge, cl_event.astype(i32), "log"))
    fs.add(Observable("clusters_per_event", "clusters per event", clusters_per_event.astype(np.float64),
                      per_event, "log"))

    names = [s.name for s in geometry.sensors]
    fs.add(Profile("occupancy_per_sensor", "occupancy [%]", occ, names, "sensor (layer.ladder.number)"))
    fs.add(Profile("occupancy_per_layer", "occupancy [%]", occ_layer, ["layer 1", "layer 2"], "layer"))
    for prof in _position_profiles(batch, geometry, ev):
        fs.add(prof)
    fs.add(Correlation("sensor_occupancy_correlation", "correlation of sensor occupancies", occ, names))

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_charge = np.where(hits_per_image > 0, charge_per_image / np.maximum(hits_per_image, 1), 0.0)
        event_charge = np.bincount(ev, weights=charge, minlength=n_ev)
        event_charge_sq = np.bincount(ev, weights=charge.astype(np.float64) ** 2, minlength=n_ev)
        n = np.maximum(hits_per_event, 1)
        mean_q = event_charge / n
        std_q = np.sqrt(np.clip(event_charge_sq / n - mean_q**2, 0, None))
        mean_size = hits_per_event / np.maximum(clusters_per_event, 1)
    fs.vectors["high_level"] = np.column_stack([
        np.log1p(hits_per_event), occ_layer, mean_q, std_q, np.log1p(clusters_per_event), mean_size,
        event_charge / np.maximum(clusters_per_event, 1),
    ]).astype(np.float32)
    fs.vectors["low_level"] = np.hstack([occ, mean_charge, clusters_per_image]).astype(np.float32)
    return fs


def _sensor_tables(geometry: PixelGeometry):
    phi = np.array([s.phi_rad for s in geometry.sensors])
    z = np.array([s.z_mm for s in geometry.sensors])
    r = np.array([s.radius_mm for s in geometry.sensors])
    pitch_u = np.full(len(phi), SENSOR_WIDTH_MM / geometry.rows)
    pitch_z = np.array([SENSOR_LENGTH_MM[s.layer] / geometry.cols for s in geometry.sensors])
    return phi, z, r, pitch_u, pitch_z


def _wrap(phi: np.ndarray) -> np.ndarray:
    return (np.asarray(phi) + np.pi) % (2 * np.pi) - np.pi


def _position_profiles(batch: HitBatch, geometry: PixelGeometry, ev: np.ndarray) -> list[Profile]:
    """Occupancy vs phi and vs z per layer: hits per bin / pixels per bin, per event."""
    n_ev = len(batch)
    phi_s, z_s, r_s, pitch_u, pitch_z = _sensor_tables(geometry)
    layer_of = np.array([s.layer for s in geometry.sensors])
    sensor = batch.columns["sensor"].astype(np.int64)
    phi, z = hit_positions(batch, geometry)
    rows = np.arange(geometry.rows) + 0.5 - geometry.rows / 2
    cols = np.arange(geometry.cols) + 0.5 - geometry.cols / 2
    phi_edges = np.linspace(-np.pi, np.pi, N_PHI_BINS + 1)
    out = []
    for lay in (1, 2):
        idx = np.nonzero(layer_of == lay)[0]
        # pixel centres of every sensor of the layer -> pixels per bin (the denominator)
        pix_phi = _wrap(phi_s[idx, None] + np.arctan2(rows[None, :] * pitch_u[idx, None], r_s[idx, None]))
        pix_z = z_s[idx, None] + cols[None, :] * pitch_z[idx, None]
        z_edges = np.linspace(pix_z.min() - 1e-6, pix_z.max() + 1e-6, N_Z_BINS + 1)
        for name, coord, pixels_per_bin, edges, unit in (
            ("phi", phi, np.histogram(pix_phi.ravel(), phi_edges)[0] * geometry.cols, phi_edges, "rad"),
            ("z", z, np.histogram(pix_z.ravel(), z_edges)[0] * geometry.rows, z_edges, "mm"),
        ):
            on_layer = layer_of[sensor] == lay
            b = np.clip(np.searchsorted(edges, coord[on_layer], side="right") - 1, 0, len(edges) - 2)
            counts = np.bincount(ev[on_layer] * (len(edges) - 1) + b,
                                 minlength=n_ev * (len(edges) - 1)).reshape(n_ev, len(edges) - 1)
            keep = pixels_per_bin > 0
            centres = 0.5 * (edges[1:] + edges[:-1])[keep]
            out.append(Profile(f"occupancy_vs_{name}_layer{lay}", "occupancy [%]",
                               100.0 * counts[:, keep] / pixels_per_bin[keep],
                               [f"{c:.3g}" for c in centres], f"{name} [{unit}] (layer {lay})"))
    return out
