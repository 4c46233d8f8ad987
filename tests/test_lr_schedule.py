"""The learning-rate schedule (train.lr_schedule, train.warmup_steps): the rate each step applies
follows a linear warm-up and half a cosine, in plain engines and in DeepSpeed engines of the
training loop; a resumed run continues the checkpoint's schedule; a checkpoint of another
schedule is refused; the default stays constant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from uhg.config import load_config
from uhg.config.schema import TrainConfig
from uhg.errors import TrainingError
from uhg.train.engine import PlainEngine, build_lr_scheduler, current_lr
from uhg.train.hooks import LocalHooks, TrainHooks
from uhg.train.loop import train

from test_train_loop import CONFIG, losses

LR = 1.0e-3

pytestmark = pytest.mark.usefixtures("world_of_one")  # the training-loop tests below


def expected(step: int, steps: int, warmup: int) -> float:
    """The rate step `step` (1-based) applies: warm-up from LR / warmup, then half a cosine to 0."""
    if step <= warmup:
        f = 1.0 / warmup
        return LR * (f + (1 - f) * (step - 1) / warmup)
    return LR * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))


def plain_rates(train_cfg: TrainConfig, steps: int) -> list[float]:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(module.parameters(), lr=train_cfg.lr)
    engine = PlainEngine(module, optimizer, lr_scheduler=build_lr_scheduler(optimizer, train_cfg))
    rates = []
    for _ in range(steps):
        rates.append(current_lr(engine))
        module(torch.randn(4, 3)).pow(2).sum().backward()
        engine.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 3])
def test_plain_engine_follows_warmup_and_cosine(warmup: int) -> None:
    cfg = TrainConfig(steps=10, batch_size=1, lr=LR, lr_schedule="cosine", warmup_steps=warmup)
    np.testing.assert_allclose(plain_rates(cfg, 10), [expected(s, 10, warmup) for s in range(1, 11)], rtol=1e-9)


def test_constant_is_the_default_and_warmup_alone_ramps_then_holds() -> None:
    cfg = TrainConfig(steps=6, batch_size=1, lr=LR)
    assert cfg.lr_schedule == "constant" and cfg.warmup_steps == 0
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=LR)
    assert build_lr_scheduler(optimizer, cfg) is None  # the default run steps exactly as without schedules
    ramp = TrainConfig(steps=6, batch_size=1, lr=LR, warmup_steps=2)
    np.testing.assert_allclose(plain_rates(ramp, 6), [LR / 2, 0.75 * LR, LR, LR, LR, LR], rtol=1e-9)


def test_cosine_needs_steps_after_the_warmup() -> None:
    with pytest.raises(ValidationError, match="leaves no step of the cosine schedule"):
        TrainConfig(steps=4, batch_size=1, lr_schedule="cosine", warmup_steps=4)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("schedule")
    path = root / "tiny.yaml"
    path.write_text(CONFIG.format(store=root / "tiny.zarr"))
    return path


def rates(history: list[dict]) -> list[float]:
    return [h["lr"] for h in history]


def test_training_follows_the_schedule_and_a_resume_continues_it(config_file: Path, tmp_path: Path) -> None:
    sched = ["train.lr_schedule=cosine", "train.warmup_steps=2"]  # steps 4, lr 1e-3 in CONFIG
    full = train(load_config(config_file, [f"output_dir={tmp_path / 'full'}", *sched]), hooks=TrainHooks())
    np.testing.assert_allclose(rates(full.history), [expected(s, 4, 2) for s in range(1, 5)], rtol=1e-6)
    constant = train(load_config(config_file, [f"output_dir={tmp_path / 'const'}", "train.checkpoint_every=0"]),
                     hooks=TrainHooks())
    assert rates(constant.history) == [LR] * 4
    assert not np.allclose(losses(full.history, [2, 3, 4]), losses(constant.history, [2, 3, 4]))

    # stopped at step 2 by the run's own checkpoint, then resumed: the rates and losses of
    # steps 3 and 4 are those of the uninterrupted run (the engines restored the scheduler)
    half = tmp_path / "half"
    with pytest.raises(_Stopped):
        train(load_config(config_file, [f"output_dir={half}", *sched]), hooks=_StopAfter(2))
    resumed = train(load_config(config_file, [f"output_dir={half}", *sched]),
                    hooks=LocalHooks(half, resume=half / "checkpoints" / "step_000002"))
    assert [int(h["step"]) for h in resumed.history] == [3, 4]
    np.testing.assert_allclose(rates(resumed.history), rates(full.history)[2:], rtol=1e-9)
    np.testing.assert_allclose(losses(resumed.history, [3, 4]), losses(full.history, [3, 4]), rtol=1e-5, atol=1e-6)

    # another schedule (or length) than the checkpoint's is refused, not silently continued
    for other in (["train.lr_schedule=constant"], [*sched, "train.steps=6"]):
        with pytest.raises(TrainingError, match="written with the learning-rate schedule"):
            train(load_config(config_file, [f"output_dir={half}", *other]),
                  hooks=LocalHooks(half, resume=half / "checkpoints" / "step_000002"))


class _StopAfter(TrainHooks):
    """Stops the run (as a crash would) once the checkpoint of step `n` is written."""

    def __init__(self, n: int):
        self.n = n

    def on_checkpoint(self, ckpt_dir, step, metrics) -> None:
        if step == self.n:
            raise _Stopped


class _Stopped(Exception):
    pass
