"""The gradient-norm metric every family's train_step logs (uhg.train.engine.grad_norm_metric)."""

from __future__ import annotations

import math

import torch
from torch import nn

from uhg.train.engine import PlainEngine, grad_norm_metric


def test_grad_norm_metric_reads_the_last_step_and_drops_what_it_cannot_report() -> None:
    torch.manual_seed(0)
    module = nn.Linear(3, 1)
    engine = PlainEngine(module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert grad_norm_metric(engine) == {}  # no step yet
    loss = module(torch.randn(4, 3)).pow(2).sum()
    loss.backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))
    engine.step()
    (value,) = grad_norm_metric(engine, "grad_norm_generator").values()
    assert math.isclose(value, expected, rel_tol=1e-5) and value > 0
    assert list(grad_norm_metric(engine)) == ["grad_norm"]
    engine._grad_norm = float("nan")  # a step that overflowed
    assert grad_norm_metric(engine) == {}
    assert grad_norm_metric(object()) == {}  # an engine without the method
