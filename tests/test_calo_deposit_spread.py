"""The spread of the deposited fraction as a fitted function of log E_inc (`model.deposit_spread`):
fitted on showers of a lower energy range, it must predict the spread at higher energies. The
showers come from the reference simulator, not from the fitted law: its constants are nowhere in
the law, and its spread also carries leakage and sampling effects the law's forms do not name
(`power_floor`, a fitted power of E falling to a fitted floor, is the nearest of them to a
sampling term with a constant term; docs/calorimeter.md, "Zero-shot in energy")."""

import math

import numpy as np
import pytest
import torch
from calo_law import fit_law_alone
from pydantic import ValidationError

from uhg.config.calo_layers import CaloLayersConfig
from uhg.geometry import get_geometry
from uhg.models.calo_deposit import DepositLaw
from uhg.models.calo_layers import CaloLayersModel
from uhg.models.common import ConditionNorm
from uhg.sim.calo import simulate_calo_showers

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

FIT_RANGE = (1e3, 2e4)
"""MeV: the showers the law is fitted on (1-20 GeV)."""
TEST_RANGE = (4e4, 1e5)
"""MeV: where its spread is checked (2x-5x the top of the fitted range)."""


def _layers(batch, geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy per active layer (B, L) MeV, E_inc (B,) MeV) of simulated showers."""
    active = list(geometry.active_layers)
    ev = batch.event_index()
    col = np.searchsorted(active, batch.columns["layer"].astype(np.int64))
    e_layer = np.zeros((len(batch), len(active)))
    np.add.at(e_layer, (ev, col), batch.columns["value"].astype(np.float64))
    return torch.as_tensor(e_layer, dtype=torch.float32), torch.as_tensor(batch.conditions["incident_energy"])


@pytest.fixture(scope="module")
def showers():
    geometry = get_geometry("ds1-photons")
    low = simulate_calo_showers(geometry, 3000, seed=31, energy_min=FIT_RANGE[0], energy_max=FIT_RANGE[1])
    high = simulate_calo_showers(geometry, 1500, seed=32, energy_min=TEST_RANGE[0], energy_max=TEST_RANGE[1])
    return _layers(low, geometry), _layers(high, geometry)


def _spread(e_layer: torch.Tensor, e_inc: torch.Tensor) -> float:
    """Standard deviation of log(E_dep / E_inc)."""
    return float(torch.log(e_layer.double().sum(-1) / e_inc.double()).std())


@pytest.mark.slow
def test_fitted_spread_predicts_higher_energies(showers):
    (e_low, inc_low), (e_high, inc_high) = showers
    law = DepositLaw("power_floor")
    law.fit(inc_low, torch.log(e_low.double().sum(-1) / inc_low))
    _, scale = law.location_scale(inc_high)
    predicted, observed = float(scale.pow(2).mean().sqrt()), _spread(e_high, inc_high)
    assert abs(predicted / observed - 1.0) < 0.10
    # the fit learned how the spread falls: holding the spread of the top of the fitted range
    # (the naive extrapolation) is far further off
    top = inc_low > FIT_RANGE[1] / 1.5
    assert abs(_spread(e_low[top], inc_low[top]) / observed - 1.0) > 2 * abs(predicted / observed - 1.0)


@pytest.mark.slow
def test_model_samples_the_spread_beyond_its_range(showers):
    """The whole law (deposit standardised by the fitted location and scale, its first variable
    blind to the condition beyond the range) trained alone on the low-energy showers, sampled at
    the high-energy showers' energies."""
    (e_low, inc_low), (e_high, inc_high) = showers
    norm = ConditionNorm.from_ranges({"incident_energy": FIT_RANGE}, ["incident_energy"])
    torch.manual_seed(0)
    model = CaloLayersModel(torch.arange(e_low.shape[1]), 1, CaloLayersConfig(
        layer_target="total_shares", empty_layers="bernoulli", law_condition_skip=True, deposit_spread="power_floor",
        law_hidden=64, law_components=4, latent_dim=2, hidden_dim=8))
    model.set_standardisation(e_low, inc_low.float())
    fit_law_alone(model, model.law_input(e_low, inc_low.float()), norm({"incident_energy": inc_low}), 600, 1e-3)
    gen = torch.Generator().manual_seed(3)
    u, eps = torch.rand(len(inc_high), model.n_law, generator=gen), torch.randn(len(inc_high), model.n_law, generator=gen)
    _, sampled = model.sample_layers(inc_high.float(), norm({"incident_energy": inc_high}), u, eps)
    response = sampled.double().sum(-1) / inc_high
    observed = e_high.double().sum(-1) / inc_high
    assert abs(float(response.std() / response.mean()) / float(observed.std() / observed.mean()) - 1.0) < 0.15
    assert abs(float(response.mean() / observed.mean()) - 1.0) < 0.02


def test_deposit_spread_needs_the_deposit_first():
    with pytest.raises(ValidationError, match="total_shares"):
        CaloLayersConfig(layer_target="layers", deposit_spread="power_floor")


def test_fit_refuses_too_few_showers():
    with pytest.raises(ValueError, match="too few"):
        DepositLaw("log_quadratic").fit(torch.tensor([1e3, 2e3, 3e3]), torch.tensor([-0.1, -0.05, math.log(0.97)]))
