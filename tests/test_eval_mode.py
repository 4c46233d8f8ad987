"""uhg.models.modes.eval_mode: sampling and validation inside a training run leave the module in
the mode they found it in, also when they fail (dropout must come back on for the next step)."""

from __future__ import annotations

import pytest
from torch import nn

from uhg.models.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored_after_the_block_and_after_an_error(training: bool) -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(module):
        assert not module.training and not module[1].training
    assert module.training is training and module[1].training is training
    with pytest.raises(RuntimeError), eval_mode(module):
        raise RuntimeError("sampling failed")
    assert module.training is training and module[1].training is training
