"""Running a module in evaluation mode for a moment (sampling, validation, post-training fits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block, back in the mode it was in afterwards (a training
    step may follow: dropout and the like must come back on)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
