"""What a model family provides to the training loop, and the registry of trainable families.

The training half of a family (GAN, transformer, ...) extends its model half
(`uhg.models.family.ModelFamily`: modules and sampling) with its optimisers, one training step
and cheap validation metrics. It never imports deepspeed, ray or mlflow: engines are duck-typed
(`Engine`), so the same family code runs under plain torch in tests, under DeepSpeed in
`uhg.train.engine`, and inside Ray Train workers.

Families are built with `get_family(name)(geometry, model_config, condition_norm)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from uhg.config.schema import TrainConfig
from uhg.models import family as model_family
from uhg.models.common import ConditionNorm
from uhg.sparse.torch_hits import TorchHits


@runtime_checkable
class Engine(Protocol):
    """A trainable module as the loop hands it to `train_step` (a DeepSpeed engine, or
    `uhg.train.engine.PlainEngine` in single-device tests).

    `engine(*args)` runs the wrapped module's forward; `backward(loss)` accumulates gradients;
    `step()` applies the optimiser (with clipping) and zeroes gradients; `module` is the bare
    `nn.Module`."""

    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...


@runtime_checkable
class ModelFamily(model_family.ModelFamily, Protocol):
    """A model family with its training half (what the training loop drives)."""

    def build_optimizer(self, name: str, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        """A torch optimiser for module `name` (DeepSpeed wraps it; no fused/JIT ops)."""

    def train_step(self, engines: Mapping[str, Engine], batch: TorchHits, step: int) -> dict[str, float]:
        """One optimisation step on `batch` (this rank's events, already on the device).
        Returns scalar metrics: losses (keys starting with `loss`) and any grad norms.
        Non-finite losses are detected by the loop from the returned values; a family must
        not call `engine.step()` after a non-finite loss (see `uhg.train.family.check_finite`)."""

    def validation_metrics(self, modules: Mapping[str, nn.Module], batch: TorchHits) -> dict[str, float]:
        """Cheap physics metrics of generated vs real events of `batch`'s conditions
        (occupancy, hits per event, energy response), computed with the modules given
        (the loop passes the EMA generator)."""


class NonFiniteLoss(Exception):
    """Raised inside a train step when a loss is NaN/Inf, before any optimiser update."""

    def __init__(self, name: str, value: float):
        super().__init__(f"{name} = {value}")
        self.name, self.value = name, value


def evenly_spread(n_train: int, at_most: int) -> np.ndarray:
    """Positions of at most `at_most` of `n_train` training events, evenly spread over them (a
    family's `fit_sample`): the store's order follows the simulation seeds, not the conditions,
    so an even spread keeps every part of the training range."""
    return np.unique(np.linspace(0, n_train - 1, min(n_train, at_most)).round().astype(np.int64))


def check_finite(name: str, loss: torch.Tensor) -> None:
    """Raise NonFiniteLoss if `loss` is NaN/Inf (call before backward/step).

    Under data parallelism every rank must take the same decision, so the flag is all-reduced
    when a process group exists."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(name, float(loss.detach().float().cpu()))


FamilyFactory = model_family.FamilyFactory

# The same names as `uhg.models.family`; each target subclasses the model family of its name.
_REGISTRY = model_family.FamilyRegistry({
    "gan": "uhg.train.gan_family:GanFamily",
    "transformer": "uhg.train.transformer_family:TransformerFamily",
    "calo_layers": "uhg.train.calo_layers_family:CaloLayersFamily",
})


def get_family(name: str) -> FamilyFactory:
    """The factory `(geometry, model_config, condition_norm) -> ModelFamily` called `name`."""
    return _REGISTRY.get(name)


def build_family(geometry: Any, model_config: Any, condition_norm: ConditionNorm) -> ModelFamily:
    """Shortcut: the family named by `model_config.family`, bound to geometry and conditions."""
    return _REGISTRY.build(geometry, model_config, condition_norm)
