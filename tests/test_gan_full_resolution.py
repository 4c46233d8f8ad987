"""The PXD GAN at full resolution (250 x 768): the shipped config carries the cluster laws that
measured best on pxd-mini, and the data-driven start scales to the ~11 k clusters and ~34 k pixels
of each full-resolution event (its shape census and charge ranks gave the same values as before,
without the record sort and the cache-missing search that took minutes on 950 events)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.config import load_config
from uhg.config.gan import GanConfig
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.train import gan_family
from uhg.train.gan_family import (
    GanFamily,
    cluster_shape_keys,
    even_thinning,
    mid_ranks,
    overlap_events,
    unique_rows,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

ROOT = Path(__file__).resolve().parents[1]
LAWS = ("cluster_shapes", "count_law", "cluster_charge_profile", "charge_noise", "fit_from_data")


def test_the_full_resolution_config_has_the_cluster_laws_and_range_of_the_mini_one() -> None:
    full, mini = load_config(ROOT / "configs/pxd_gan.yaml"), load_config(ROOT / "configs/pxd_gan_mini.yaml")
    assert full.geometry == "pxd"
    for key in LAWS:
        assert getattr(full.model, key) == getattr(mini.model, key), key
    assert full.model.count_law is not None and full.model.cluster_shapes > 0
    # generation in bf16 at full resolution (the 0.2 CPU s target), the mini config's events unchanged
    assert (full.model.sample_precision, mini.model.sample_precision) == ("bf16", "fp32")
    # the range of the mini configs and of the zero-shot protocol, whose top is the calibration point
    sim_full, sim_mini = full.data.simulate, mini.data.simulate
    assert (sim_full.luminosity_min, sim_full.luminosity_max) == (sim_mini.luminosity_min, sim_mini.luminosity_max)
    assert sim_full.luminosity_max == pytest.approx(8e35)


def _as_numpy_unique(keys: np.ndarray) -> tuple[np.ndarray, ...]:
    table, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    return table, inverse.ravel(), counts


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_unique_rows_is_numpy_unique_along_rows(n: int) -> None:
    rng = np.random.default_rng(n)
    keys = rng.integers(0, 3, (n, 3)).astype(np.uint64)
    keys[:, 2] <<= np.uint64(62)  # high bits: an order by signed or float values would differ
    got, want = unique_rows(keys), _as_numpy_unique(keys)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got[0].dtype == np.uint64


def test_unique_rows_on_the_cluster_shapes_of_simulated_events() -> None:
    geo = get_geometry("pxd-tiny")
    batch = simulate_pxd_background(geo, 6, seed=3, luminosity=8e35)
    keys, _, _ = cluster_shape_keys(batch, geo)
    assert len(keys) > 50
    table, inverse, counts = unique_rows(keys)
    assert counts.sum() == len(keys) and len(np.unique(table, axis=0)) == len(table)
    np.testing.assert_array_equal(table[inverse], keys)
    for a, b in zip((table, inverse, counts), _as_numpy_unique(keys), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mid_ranks_are_the_mid_ranks_in_the_sorted_sample() -> None:
    rng = np.random.default_rng(1)
    sample = np.log1p(rng.integers(0, 256, 20_000).astype(np.float64)) / np.log1p(255.0)  # ties, as ADC codes
    values = np.r_[sample[:3000], -1.0, 2.0, 0.5]  # below, above and between the sample's values
    ranked = np.sort(sample)
    want = (np.searchsorted(ranked, values, "left") + np.searchsorted(ranked, values, "right")) / (2.0 * len(ranked))
    np.testing.assert_array_equal(mid_ranks(values, sample), want)
    assert mid_ranks(np.array([-1.0]), sample)[0] == 0.0 and mid_ranks(np.array([2.0]), sample)[0] == 1.0


def test_the_charge_quantile_thinning_stays_inside_a_full_resolution_census() -> None:
    n = 31_430_280  # the charges of the 950 events of a full-resolution fit (above 2^24)
    idx = even_thinning(n, 1_000_000)
    assert idx.dtype == torch.long and len(idx) == 1_000_000
    assert int(idx[0]) == 0 and int(idx[-1]) == n - 1
    assert bool((idx[1:] > idx[:-1]).all())


def test_the_overlap_correction_draws_a_pixel_budget_of_events() -> None:
    mini, full = (get_geometry(name) for name in ("pxd-mini", "pxd"))
    per_event = {g.name: g.n_sensors * g.rows * g.cols for g in (mini, full)}
    assert len(overlap_events(1000, per_event["pxd-mini"])) == 256  # as before on pxd-mini
    # 256 full-resolution events: gates, uniforms and head over 24 GB in one draw (by their sizes), ~150 CPU s a round
    assert len(overlap_events(1000, per_event["pxd"])) == 16
    assert len(overlap_events(10, per_event["pxd"])) == 10


@pytest.mark.slow
def test_the_overlap_correction_in_chunks_is_the_correction_in_one_draw(monkeypatch) -> None:
    torch.manual_seed(0)
    geo = get_geometry("pxd-tiny")
    data = simulate_pxd_background(geo, 60, seed=1, luminosity=2e35, luminosity_max=8e35)
    norm = ConditionNorm.from_ranges({"luminosity": (2e35, 8e35)}, ["luminosity"])
    cfg = GanConfig(conditions=["luminosity"], embed_dim=16, attention_layers=1, z_dim=4, sensor_noise_dim=4,
                    decoder_channels=[8, 8], discriminator_channels=[8, 8], cluster_shapes=64, count_law="quadratic",
                    charge_noise=True, fit_from_data=True)
    fits = []
    for chunk_pixels in (10**9, geo.n_sensors * geo.rows * geo.cols):  # every event at once; one by one
        monkeypatch.setattr(gan_family, "OVERLAP_CHUNK_PIXELS", chunk_pixels)
        torch.manual_seed(0)
        fam = GanFamily(geo, cfg, norm)
        mods = fam.build_modules()
        out = fam.initialise_from_data(mods, [data])
        fits.append((out["fit_overlap_correction"], mods["generator"].counts.bias.detach().clone()))
    assert fits[0][0] != 1.0
    assert fits[0][0] == pytest.approx(fits[1][0], rel=1e-9)
    torch.testing.assert_close(fits[0][1], fits[1][1], rtol=1e-9, atol=1e-12)
