"""The calorimeter layer-energy law trained alone on its targets, as in a full training (Adam,
batches of 256, a fixed batch order): for the toy tests of the law's treatment of the layers."""

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
