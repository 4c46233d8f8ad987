"""What the layer-energy law models (`model.layer_target`). With 'total_shares' the deposited
fraction E_dep / E_inc is one variable of the law, so its spread per incident energy (the
resolution) is learned directly; with 'layers' it comes out of a sum of large anticorrelated layer
fluctuations and is too wide (measured on simulated showers: docs/results.md)."""

import math

import pytest
import torch
from calo_law import fit_law_alone

from uhg.config.calo_layers import CaloLayersConfig
from uhg.models.calo_layers import CaloLayersModel
from uhg.models.common import ConditionNorm

NORM = ConditionNorm.from_ranges({"incident_energy": (1e3, 1e5)}, ["incident_energy"])
N_LAYERS = 5


def _showers(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Toy showers of this test: a deposited fraction with a 1/sqrt(E) spread, shared between five
    layers with a depth that fluctuates by far more than the total does. Returns (layer energies
    (n, 5), E_inc (n,), the deposited fraction's relative spread at each E_inc (n,))."""
    e_inc = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e3), math.log(1e5), generator=gen))
    spread = 3.0 / torch.sqrt(e_inc)
    total = 0.9 * (1.0 + spread * torch.randn(n, generator=gen, dtype=torch.float64))
    depth = 1.0 + 0.3 * torch.log(e_inc / 1e3) + 0.6 * torch.randn(n, generator=gen, dtype=torch.float64)
    logits = -0.5 * (torch.arange(N_LAYERS, dtype=torch.float64) - depth[:, None]) ** 2
    share = torch.softmax(logits, -1)
    return (share * (total * e_inc)[:, None]).float(), e_inc, spread


def _trained_law(target: str, e_layer: torch.Tensor, e_inc: torch.Tensor, steps: int) -> CaloLayersModel:
    torch.manual_seed(0)
    model = CaloLayersModel(torch.arange(N_LAYERS), 1, CaloLayersConfig(layer_target=target, law_hidden=64,
                                                                        law_components=4, latent_dim=2, hidden_dim=8))
    model.set_standardisation(e_layer, e_inc.float())
    mean, std, _, _ = model.law_standardisation()
    t = (model.law_target(e_layer, e_inc.float()) - mean) / std
    return fit_law_alone(model, t, NORM({"incident_energy": e_inc}), steps, 3e-3)


def _resolution(model: CaloLayersModel, energy: float, n: int = 4000) -> float:
    e_inc = torch.full((n,), energy, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    u, eps = torch.rand(n, model.n_law, generator=gen), torch.randn(n, model.n_law, generator=gen)
    _, e_layer = model.sample_layers(e_inc.float(), NORM({"incident_energy": e_inc}), u, eps)
    response = e_layer.sum(-1).double() / e_inc
    return float(response.std() / response.mean())


@pytest.mark.slow
def test_total_shares_learns_the_resolution_that_the_layer_sum_misses(one_torch_thread):
    gen = torch.Generator().manual_seed(0)
    e_layer, e_inc, _ = _showers(8000, gen)
    truth = 3.0 / math.sqrt(3e4)  # the toy's relative spread at 30 GeV
    errors = {}
    for target in ("layers", "total_shares"):
        model = _trained_law(target, e_layer, e_inc, steps=600)
        errors[target] = abs(_resolution(model, 3e4) / truth - 1.0)
    assert errors["total_shares"] < 0.35, errors
    assert errors["layers"] > 2 * errors["total_shares"], errors


def test_total_shares_keeps_the_sampled_deposit_and_empty_layers(one_torch_thread):
    gen = torch.Generator().manual_seed(3)
    e_layer, e_inc, _ = _showers(512, gen)
    e_layer[:100, -1] = 0.0  # showers with an empty last layer
    model = CaloLayersModel(torch.arange(N_LAYERS), 1, CaloLayersConfig(layer_target="total_shares", law_hidden=16,
                                                                        latent_dim=2, hidden_dim=8))
    model.set_standardisation(e_layer, e_inc.float())
    t = model.law_target(e_layer, e_inc.float())
    assert t.shape == (512, N_LAYERS + 1)
    torch.testing.assert_close(t[:, 0].exp(), e_layer.sum(-1) / e_inc.float() + model.cfg.layer_floor)
    n = 64
    e = torch.full((n,), 2e4)
    u, eps = torch.rand(n, N_LAYERS + 1), torch.randn(n, N_LAYERS + 1)
    y, sampled = model.sample_layers(e, NORM({"incident_energy": e.double()}), u, eps)
    mean, std, lo, hi = model.law_standardisation()
    raw = model.law.sample(NORM({"incident_energy": e.double()}), u, eps, lo, hi) * std + mean
    # the layer energies sum to the sampled deposit, and y is their normalised log fraction
    torch.testing.assert_close(sampled.sum(-1), (raw[:, 0].exp() - model.cfg.layer_floor) * e, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(y, model.normalise(model.log_layer(sampled, e)))
    assert bool((sampled >= 0).all())
