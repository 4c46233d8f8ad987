"""The small epical-mini hit transformer that the cell tests (cell_field, cell_neighbours,
cell_profile) build: its training energy range and condition norm, the layer laws every one of
them uses, and simulated showers in that range."""

from __future__ import annotations

import torch

from uhg.config.transformer import TransformerConfig
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sim.calo import simulate_calo_showers
from uhg.train.family import build_family

TRAIN = (1000.0, 16000.0)
NORM = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])
GEOMETRY = get_geometry("epical-mini")
LAYER_LAWS = dict(d_model=32, n_layers=1, n_heads=2, latent_dim=0, conditions=["incident_energy"],
                  multiplicity="count", count_bootstrap=0, max_hits=8192, layer_counts=True, layer_split=True,
                  count_law="unit_quadratic")


def epical_model(**kw):
    """(family, model) of LAYER_LAWS with the keys `kw`, weights drawn after torch.manual_seed(0)."""
    family = build_family(GEOMETRY, TransformerConfig(**{**LAYER_LAWS, **kw}), NORM)
    torch.manual_seed(0)
    return family, family.build_modules()["model"]


def epical_showers(n: int, seed: int):
    """n simulated epical-mini showers in the TRAIN energy range."""
    return simulate_calo_showers(GEOMETRY, n, seed=seed, energy_min=TRAIN[0], energy_max=TRAIN[1])
