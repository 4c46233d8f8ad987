"""Cell field of the hit transformer on the digital pixel calorimeter (model.cell_field): the next
fired cell of a layer is the first of independent per-cell draws whose probabilities the network
sets through a radial basis of the cell position, in place of the uniform pacing of pace_prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from epical_small import LAYER_LAWS, NORM, epical_model, epical_run_config, epical_sample, epical_showers

from uhg.config.loading import config_from_dict
from uhg.config.transformer import TransformerConfig
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.transformer import FIELD_RADII
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_zero_field_is_the_uniform_pacing_of_pace_prior():
    """With the field's weights at their initial zero the distribution of the next cell is pace_prior's
    (geometric gaps at the rate of the layer's pixels still to place), for first and later hits."""
    _, field = epical_model(cell_field=True)
    _, paced = epical_model(pace_prior=True)
    paced.load_state_dict(field.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 32, generator=gen)
    row, prev_row = torch.tensor([0, 3, 5, 5, 10]), torch.tensor([-1, 2, 5, 5, 9])
    prev_col, left = torch.tensor([-1, 100, 30, 2000, 4000]), torch.tensor([50, 3, 100, 20, 7])
    with torch.no_grad():
        a = torch.log_softmax(field.col_logits(h, row, prev_row, prev_col, None, left), -1)
        b = torch.log_softmax(paced.col_logits(h, row, prev_row, prev_col, None, left), -1)
    assert torch.equal(a.isinf(), b.isinf())
    ok = ~a.isinf()
    assert float((a[ok] - b[ok]).abs().max()) < 1e-4


def _mean_radius(batch) -> float:
    g = get_geometry("epical-mini")
    row, col = np.divmod(batch.columns["cell"].astype(np.int64), g.nx)
    return float(np.hypot(col + 0.5 - g.nx / 2, row + 0.5 - g.ny / 2).mean())


def test_a_central_field_gathers_the_pixels_of_every_layer_about_the_axis():
    """Generation places a layer's pixels where the field is high: weights favouring the innermost
    radial bumps bring the sampled pixels' mean distance to the axis well below the uniform pacing's,
    with the pixels per layer unchanged (the count laws draw them)."""
    family, model = epical_model(cell_field=True)
    family.initialise_from_data({"model": model}, [epical_showers(200, seed=4)])
    model.eval()
    uniform = epical_sample(model, 4000.0, 4, seed=3)
    with torch.no_grad():
        model.field_head.bias[:FIELD_RADII] = torch.linspace(4.0, -4.0, FIELD_RADII)
    central = epical_sample(model, 4000.0, 4, seed=3)
    np.testing.assert_array_equal(central.hits_per_event, uniform.hits_per_event)
    assert _mean_radius(central) < 0.6 * _mean_radius(uniform), (_mean_radius(central), _mean_radius(uniform))


def test_cell_field_settings_are_checked():
    raw = epical_run_config(cell_field=True)
    with pytest.raises(ConfigError, match="cell_field.*layer_counts"):
        config_from_dict(raw)
    raw["model"] |= {"layer_counts": True, "pace_prior": True}
    with pytest.raises(ConfigError, match="cell_field.*pace_prior"):
        config_from_dict(raw)
    cfg = TransformerConfig(**LAYER_LAWS, cell_field=True)
    with pytest.raises(ConfigError, match="cell_field.*ds2"):
        build_family(get_geometry("ds2"), cfg, NORM).build_modules()


@pytest.mark.parametrize("profile", [False, True])
def test_field_is_finite_in_bf16_when_a_layer_is_nearly_full(profile):
    """Under bf16 autocast (the GPU precision) the field is computed in float32: a layer whose remaining
    pixels nearly fill its remaining cells (rate near 1, where bf16 rounds the clamp to 1.0 and the
    logit to +inf) still gives finite next-cell log-probabilities, those of float32; also when the
    field starts from a layer profile (cell_profile, here a steep one)."""
    _, model = epical_model(cell_field=True, **({"cell_profile": True} if profile else {}))
    if profile:
        with torch.no_grad():
            model.cell_profile[:, 0] = 8.0  # the first bump: the layer's centre
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    row, first, width = torch.tensor([0, 5, 23]), torch.tensor([0, 10, 4000]), torch.tensor([4096, 4096, 4096])
    remaining = torch.tensor([4095, 4086, 95])
    with torch.no_grad():
        ref = model._field_logits(h, row, first, width, remaining)
        low = model._field_logits(h.bfloat16(), row, first, width, remaining)
    ok = torch.arange(4096)[None] >= first[:, None]
    assert torch.isfinite(low[ok]).all() and torch.isfinite(ref[ok]).all()
    assert float((low[ok] - ref[ok]).abs().max()) < 0.05
