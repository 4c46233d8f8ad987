"""Rotary embedding of the hit transformer on the digital pixel calorimeter (model.rotary_grid): the
attention score between two pixels depends on their layer, pixel-row and pixel-column offsets, not
on the offset of their flat cell indices (row x columns + column)."""

from __future__ import annotations

import pytest
import torch

from uhg.config.transformer import TransformerConfig
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.transformer import Rotary2D
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (1000.0, 16000.0)
NORM = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])
# the shipped epical-mini network's head width (d_model 64 / 4 heads = 16)
BASE = dict(d_model=64, n_layers=1, n_heads=4, latent_dim=0, conditions=["incident_energy"], multiplicity="count",
            count_bootstrap=0, max_hits=8192, layer_counts=True, layer_split=True, count_law="unit_quadratic",
            cell_field=True)


def _rotary(geometry: str = "epical-mini", **kw) -> tuple[Rotary2D, int]:
    if geometry == "epical":  # 1 M cells a layer: the factorised head, its field on tiles
        kw = {"pixel_head": "factorised", "field_tile": 32, **kw}
    family = build_family(get_geometry(geometry), TransformerConfig(**BASE, **kw), NORM)
    model = family.build_modules()["model"]
    return model.blocks[0].rotary, get_geometry(geometry).nx


def _score(rot: Rotary2D, q: torch.Tensor, k: torch.Tensor, nx: int, a: tuple[int, int, int],
           b: tuple[int, int, int]) -> float:
    """Attention score of a query at (layer, pixel row, pixel column) a and a key at b: the model's
    positions are (layer, flat cell) = (layer, row * nx + column)."""
    rows = torch.tensor([[a[0], b[0]]])
    cols = torch.tensor([[a[1] * nx + a[2], b[1] * nx + b[2]]])
    qr = rot(q.expand(1, 1, 2, -1), rows, cols)[0, 0, 0]
    kr = rot(k.expand(1, 1, 2, -1), rows, cols)[0, 0, 1]
    return float(qr @ kr)


@pytest.mark.parametrize("geometry", ["epical-mini", "epical"])
def test_scores_depend_on_the_layer_row_and_column_offsets_only(geometry):
    """Pairs of pixels with the same (layer, row, column) offset score the same wherever they are;
    the last pixel of a row and the first of the next (flat offset 1, column offset -(nx - 1)) do
    not score as two horizontal neighbours do (flat offset 1 too), nor does an upper neighbour (flat
    offset nx) as a pixel nx columns along would in a flat index."""
    rot, nx = _rotary(geometry, rotary_grid=True)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    for dl, dy, dx in [(0, 0, 1), (0, 1, 0), (1, -2, 3), (2, 5, -7)]:
        scores = [_score(rot, q, k, nx, (l, y, x), (l + dl, y + dy, x + dx))
                  for l, y, x in [(0, 10, 10), (7, 30, 12), (3, 40, 50)]]
        assert max(scores) - min(scores) < 1e-4, (dl, dy, dx, scores)
    right = _score(rot, q, k, nx, (2, 10, 20), (2, 10, 21))
    wrap = _score(rot, q, k, nx, (2, 10, nx - 1), (2, 11, 0))
    assert abs(right - wrap) > 1e-2
    up = _score(rot, q, k, nx, (2, 10, 20), (2, 11, 20))
    assert abs(up - right) > 1e-2


def test_the_flat_rotation_is_kept_without_the_key():
    """Without rotary_grid the column rotation is by the flat cell (exports written before the key):
    the end of a row and the start of the next score as two horizontal neighbours."""
    rot, nx = _rotary()
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    right = _score(rot, q, k, nx, (2, 10, 20), (2, 10, 21))
    wrap = _score(rot, q, k, nx, (2, 10, nx - 1), (2, 11, 0))
    assert abs(right - wrap) < 1e-4


def test_rotary_grid_settings_are_checked():
    with pytest.raises(ValueError, match="rotary: true"):
        TransformerConfig(**BASE, rotary=False, rotary_grid=True)
    with pytest.raises(ValueError, match="at least 6"):
        TransformerConfig(**{**BASE, "d_model": 16}, rotary_grid=True)
    with pytest.raises(ConfigError, match="no pixel grid"):
        cfg = {**BASE, "cell_field": False}
        build_family(get_geometry("ds2"), TransformerConfig(**cfg, rotary_grid=True), NORM)
