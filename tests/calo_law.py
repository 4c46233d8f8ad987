"""Helpers of the calorimeter layer-model tests: the layer-energy law trained alone on its
targets, as in a full training (Adam, batches of 256, a fixed batch order), for the toy tests of
the law's treatment of the layers; a small ds1 family and a fresh model put through its
after-training fits, for the tests of those fits."""

from __future__ import annotations

import torch

from uhg.models.calo_layers import CaloLayersModel


def fit_law_alone(model: CaloLayersModel, target: torch.Tensor, cond: torch.Tensor, steps: int,
                  lr: float) -> CaloLayersModel:
    """`model` with its law trained `steps` steps on (target, cond), in eval mode."""
    opt = torch.optim.Adam(model.law.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(target), (256,), generator=gen)
        loss = -model.law.log_prob(target[idx], cond[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def small_ds1_family(**model):
    """A small `calo_layers` family on ds1-photons (1-100 GeV), the layer law as shipped; `model`
    overrides its config (share noise gaussian unless given)."""
    from uhg.config.calo_layers import CaloLayersConfig
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.train.calo_layers_family import CaloLayersFamily

    cfg = CaloLayersConfig(**{"layer_target": "total_shares", "empty_layers": "bernoulli", "law_hidden": 32,
                              "latent_dim": 4, "hidden_dim": 32, "share_noise": "gaussian", **model})
    norm = ConditionNorm.from_ranges({"incident_energy": (1e3, 1e5)}, cfg.conditions)
    return CaloLayersFamily(get_geometry("ds1-photons"), cfg, norm)


def finalise_fresh(family, showers, part: str) -> tuple[dict, bool, bool, bool, dict]:
    """A freshly initialised model of `family` (torch seed 0) put through its after-training fits
    on `showers`: (the fits' metrics, whether the parameters of `part` (a state-dict prefix such as
    "law.") moved, whether every other one stayed, whether torch's global random state stayed,
    the state of `part` after the fits)."""
    torch.manual_seed(0)
    model = family.build_modules()["model"]
    family.initialise_from_data({"model": model}, [showers])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    fitted = family.finalise_from_data(model, [showers])
    rng_kept = torch.equal(rng_before, torch.random.get_rng_state())
    after = model.state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part))
    rest_kept = all(torch.equal(before[k], after[k]) for k in after if not k.startswith(part))
    return fitted, moved, rest_kept, rng_kept, {k: v.clone() for k, v in after.items() if k.startswith(part)}
