"""Inputs for overlay and distributed-generation tests: small simulated PXD stores and an
untrained GAN export."""

from __future__ import annotations

import functools
from pathlib import Path

from uhg.data.hits import HitBatch
from uhg.data.parallel import fill_store
from uhg.data.writer import create_store
from uhg.geometry import get_geometry


def _simulated(kind: str, geometry_name: str, seed: int, start: int, stop: int) -> HitBatch:
    from uhg.sim import simulate_pxd_background, simulate_pxd_signal

    g = get_geometry(geometry_name)
    if kind == "signal":
        return simulate_pxd_signal(g, stop - start, seed, first_event=start)
    return simulate_pxd_background(g, stop - start, seed, first_event=start)  # SuperKEKB design luminosity


def simulated_store(path: Path, kind: str, geometry: str, n_events: int, part_size: int, seed: int) -> Path:
    """A complete store of PXD `signal` (IP tracks) or `background` events from the reference
    simulators (background at design luminosity, ~0.9% occupancy)."""
    sample = _simulated(kind, geometry, seed, 0, 1)
    units = {"n_tracks": "tracks", "luminosity": "cm^-2 s^-1", "her_current": "A", "ler_current": "A",
             "beta_y_star": "mm"}
    bounds = {"n_tracks": (0, 100), "luminosity": (1e33, 1e37), "her_current": (0, 10), "ler_current": (0, 10),
              "beta_y_star": (0, 10)}
    conditions = {k: {"min": bounds[k][0], "max": bounds[k][1], "unit": units[k]} for k in sample.conditions}
    create_store(path, "pixel", geometry, n_events, part_size, conditions=conditions, seed=seed)
    fill_store(path, functools.partial(_simulated, kind, geometry, seed), progress=False)
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
