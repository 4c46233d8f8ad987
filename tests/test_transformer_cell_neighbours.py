"""Fired neighbours of a cell on the digital pixel calorimeter (model.cell_neighbours): the next cell's
logit also weighs which of its causal neighbours (left, above) the layer has already fired, in teacher
forcing as in generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from epical_small import (GEOMETRY, LAYER_LAWS, NORM, epical_model, epical_run_config, epical_sample,
                          epical_showers)

from uhg.config.loading import config_from_dict
from uhg.config.transformer import TransformerConfig
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.transformer import CAUSAL_NEIGHBOURS, layer_fired
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(cell_field=True)  # on top of epical_small.LAYER_LAWS


def _model(**kw):
    return epical_model(**{**BASE, **kw})


def test_layer_fired_holds_the_earlier_hits_of_the_same_sequence_and_layer():
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    row = torch.tensor([0, 0, 1, 1, 0, 0, 3, 3, 3])
    col = torch.tensor([5, 9, 2, 7, 5, 6, 0, 1, 4])
    fired = layer_fired(seq, row, col, 10)
    expected = torch.zeros(9, 10, dtype=torch.bool)
    for i in range(9):
        for j in range(i):
            if seq[j] == seq[i] and row[j] == row[i]:
                expected[i, col[j]] = True
    assert torch.equal(fired, expected)


def test_each_weight_lands_on_the_cell_whose_neighbour_fired_and_never_wraps():
    """One fired pixel at (y, x) raises, by the weight of neighbour (dy, dx), exactly the cell
    (y + dy, x + dx); a pixel on the right edge raises nothing on the next row's left edge."""
    _, model = _model(cell_neighbours=True)
    ny, nx = GEOMETRY.ny, GEOMETRY.nx
    weights = torch.arange(1.0, len(CAUSAL_NEIGHBOURS) + 1)
    with torch.no_grad():
        model.neighbour_head.bias.copy_(weights)
    hr = torch.zeros(2, 32)
    fired = torch.zeros(2, ny * nx, dtype=torch.bool)
    fired[0, 10 * nx + 20] = True
    fired[1, 10 * nx + nx - 1] = True  # right edge
    with torch.no_grad():
        bias = model._neighbour_logits(hr, fired).view(2, ny, nx)
    expected = torch.zeros(ny, nx)
    for w, (dy, dx) in zip(weights, CAUSAL_NEIGHBOURS, strict=True):
        expected[10 + dy, 20 + dx] = w
    assert torch.equal(bias[0], expected)
    edge = torch.zeros(ny, nx)
    for w, (dy, dx) in zip(weights, CAUSAL_NEIGHBOURS, strict=True):
        if 0 <= nx - 1 + dx < nx:
            edge[10 + dy, nx - 1 + dx] = w
    assert torch.equal(bias[1], edge)


def test_the_key_at_its_initial_zero_weights_is_the_model_without_it():
    """Same weights, same showers: the teacher-forced loss with the key at initialisation equals the
    loss without it (the other modules initialise as without it, its weights start at zero)."""
    family, plain = _model()
    _, with_key = _model(cell_neighbours=True)
    showers = epical_showers(6, seed=3)
    family.initialise_from_data({"model": plain}, [showers])
    missing, unexpected = with_key.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"neighbour_head.weight", "neighbour_head.bias"} and not unexpected
    hits = TorchHits.from_batch(showers)
    cond = NORM(hits.conditions)
    with torch.no_grad():
        a = plain.loss(plain.tokenize(hits), cond, sample_latent=False)
        b = with_key.loss(with_key.tokenize(hits), cond, sample_latent=False)
    assert torch.allclose(a["nll_col"], b["nll_col"], rtol=1e-6), (a["nll_col"], b["nll_col"])


def _adjacent_fraction(batch) -> float:
    """Fraction of fired pixels whose left neighbour in the same layer also fired."""
    cells = batch.columns["cell"].astype(np.int64)
    key = np.repeat(np.arange(len(batch)), batch.hits_per_event) * 10**7 + cells
    fired = set(key.tolist())
    left = [(k - 1) in fired for k in key.tolist() if (k % 10**7) % GEOMETRY.nx > 0]
    return float(np.mean(left))


def test_a_weight_on_the_left_neighbour_makes_generated_pixels_touch():
    """Generation sees the layer's fired cells as teacher forcing does: a large weight on the left
    neighbour makes far more generated pixels sit right of another, with the same pixels per layer."""
    family, model = _model(cell_neighbours=True)
    family.initialise_from_data({"model": model}, [epical_showers(200, seed=4)])
    model.eval()
    plain = epical_sample(model, 4000.0, 4, seed=3)
    again = epical_sample(model, 4000.0, 4, seed=3)
    np.testing.assert_array_equal(again.columns["cell"], plain.columns["cell"])  # deterministic per seed
    with torch.no_grad():
        model.neighbour_head.bias[CAUSAL_NEIGHBOURS.index((0, 1))] = 6.0
    touching = epical_sample(model, 4000.0, 4, seed=3)
    np.testing.assert_array_equal(touching.hits_per_event, plain.hits_per_event)
    assert _adjacent_fraction(touching) > 2 * _adjacent_fraction(plain) + 0.1, \
        (_adjacent_fraction(touching), _adjacent_fraction(plain))


def test_cell_neighbours_settings_are_checked():
    raw = epical_run_config(layer_counts=True, cell_neighbours=True)
    with pytest.raises(ConfigError, match="cell_neighbours.*cell_field: true"):
        config_from_dict(raw)
    raw["model"] |= {"cell_field": True, "pixel_head": "factorised"}
    with pytest.raises(ConfigError, match="cell_neighbours.*pixel_head: flat"):
        config_from_dict(raw)
    cfg = TransformerConfig(**LAYER_LAWS, **BASE, cell_neighbours=True)
    with pytest.raises(ConfigError, match="cell_neighbours.*ds2"):
        build_family(get_geometry("ds2"), cfg, NORM).build_modules()
