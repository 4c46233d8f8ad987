"""The after-training fit of the layer-energy law (`model.law_fit_steps`): the law alone trained
further on the fit showers with a decaying learning rate, the voxel stage untouched."""

import numpy as np
import torch

from uhg.config.calo_layers import CaloLayersConfig
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sim.calo import simulate_calo_showers
from uhg.train.calo_layers_family import CaloLayersFamily


def _family(**model) -> CaloLayersFamily:
    cfg = CaloLayersConfig(layer_target="total_shares", empty_layers="bernoulli", law_hidden=32, latent_dim=4,
                           hidden_dim=32, share_noise="gaussian", **model)
    norm = ConditionNorm.from_ranges({"incident_energy": (1e3, 1e5)}, cfg.conditions)
    return CaloLayersFamily(get_geometry("ds1-photons"), cfg, norm)


def test_fit_events_sets_the_fit_sample():
    assert len(_family().fit_sample(20000)) == 4096
    assert len(_family(fit_events=1000).fit_sample(20000)) == 1000
    assert np.array_equal(_family(fit_events=50000).fit_sample(300), np.arange(300))


def test_law_fit_trains_the_law_alone_after_training(one_torch_thread):
    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 400, seed=21, energy_min=1e3, energy_max=1e5)
    results = []
    for steps in (0, 150, 150):
        family = _family(law_fit_steps=steps)
        torch.manual_seed(0)
        model = family.build_modules()["model"]
        family.initialise_from_data({"model": model}, [showers])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fitted = family.finalise_from_data(model, [showers])
        after = model.state_dict()
        law_moved = any(not torch.equal(before[k], after[k]) for k in after if k.startswith("law."))
        rest_kept = all(torch.equal(before[k], after[k]) for k in after if not k.startswith("law."))
        results.append((fitted, law_moved, rest_kept, {k: v.clone() for k, v in after.items() if k.startswith("law.")}))
    (off, off_moved, _, _), (on, on_moved, on_kept, law1), (_, _, _, law2) = results
    assert off == {} and not off_moved
    assert on_moved and on_kept
    assert on["law_fit_nll_after"] < on["law_fit_nll_before"] - 1.0, on
    assert all(torch.equal(law1[k], law2[k]) for k in law1)  # seeded: the same fit twice
