"""Small pixel stores for overlay and distributed-generation tests (random hits, known seeds)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from uhg.data.hits import HitBatch, PixelEvent
from uhg.data.parallel import fill_store
from uhg.data.store import create_store
from uhg.geometry import get_geometry
from uhg.seeding import event_rng

LUMINOSITY_SPEC = {"luminosity": {"min": 1e33, "max": 1e36, "unit": "cm^-2 s^-1"}}


def _random_events(geometry_name: str, seed: int, hits: int, luminosity: float | None,
                   start: int, stop: int) -> HitBatch:
    g = get_geometry(geometry_name)
    events = []
    for j in range(start, stop):
        rng = event_rng(seed, j, "signal")
        n = int(rng.integers(hits // 2, hits + 1))
        channel = np.sort(rng.choice(g.n_channels, n, replace=False))
        sensor, pixel = np.divmod(channel, g.pixels_per_sensor)
        row, col = np.divmod(pixel, g.cols)
        events.append(PixelEvent(sensor, row, col, rng.integers(g.adc_threshold, 256, n),
                                 conditions={} if luminosity is None else {"luminosity": luminosity}))
    return HitBatch.from_events("pixel", events)


def random_pixel_store(path: Path, geometry: str, n_events: int, part_size: int, seed: int, hits: int,
                       luminosity: float | None = None) -> Path:
    """A complete store of `n_events` events with up to `hits` random fired pixels each."""
    create_store(path, "pixel", geometry, n_events, part_size,
                 conditions=LUMINOSITY_SPEC if luminosity is not None else {}, seed=seed)
    fill_store(path, functools.partial(_random_events, geometry, seed, hits, luminosity), progress=False)
    return path


def part_files(store: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file of the committed parts (chunks and metadata)."""
    root = store / "parts"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def export_untrained_gan(out: Path, geometry: str, seed: int = 0, **model: object) -> Path:
    """A generator export of a freshly initialised (untrained) GAN conditioned on luminosity:
    the real export format and inference path, with random weights."""
    import torch

    from uhg.config.loading import config_from_dict
    from uhg.models.common import ConditionNorm
    from uhg.train.export import export_generator
    from uhg.train.family import build_family

    cfg = config_from_dict({"name": "untrained", "seed": seed, "geometry": geometry, "data": {"store": "none"},
                            "model": {"family": "gan", **model}, "train": {"steps": 1, "batch_size": 1}})
    norm = ConditionNorm.from_ranges({"luminosity": (1e34, 3e34)}, ["luminosity"])
    family = build_family(get_geometry(geometry), cfg.model, norm)
    torch.manual_seed(seed)
    generator = family.build_modules()[family.generator_name]
    return export_generator(out, family, cfg, generator.state_dict(), step=0)
