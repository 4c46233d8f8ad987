"""The one live progress line of a training run: step / total, losses, steps per second, ETA and
the last checkpoint.

Rank 0 of the loop keeps a `ProgressTracker` (through the launcher's hooks) and hands each new
state to a sink: a `ProgressLine` on the terminal for in-process runs, or a `ProgressFile` in the
run folder for Ray runs, which the driver follows (`follow_file`) and draws with its own
`ProgressLine`, the same way under `uhg train` and `ray job submit`.

On a terminal the line is redrawn in place; in a log (not a TTY) it is printed as a new line at
most every UHG_PROGRESS_INTERVAL seconds (default 30), plus the last step and phase changes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

PROGRESS_FILE = "progress.json"
INTERVAL_ENV = "UHG_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
LOSSES_SHOWN = 3
MAIN_LOSSES = ("loss", "loss_generator", "loss_discriminator")


@dataclass
class ProgressState:
    name: str
    total: int
    step: int = 0
    first_step: int = 0
    """Step this attempt started from (> 0 after a resume)."""
    losses: dict[str, float] = field(default_factory=dict)
    steps_per_s: float | None = None
    eta_s: float | None = None
    checkpoint_step: int | None = None
    phase: str = "starting"
    """starting, training, evaluating or done."""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def describe(state: ProgressState) -> str:
    """`name  step 40/100  loss_generator 0.812  3.4 steps/s  ETA 0:18  checkpoint step 40`."""
    if state.phase == "starting":
        return f"{state.name}  starting workers, data and model ({state.total} steps)"
    parts = [state.name, f"step {state.step}/{state.total}"]
    if state.first_step:  # on every line: a follower that polls may never see the first one
        parts.append(f"(resumed at step {state.first_step})")
    parts += [f"{k} {v:.4g}" for k, v in state.losses.items()]
    if state.steps_per_s is not None:
        parts.append(f"{state.steps_per_s:.3g} steps/s")
    if state.eta_s is not None and state.step < state.total:
        parts.append(f"ETA {_clock(state.eta_s)}")
    parts.append(f"checkpoint step {state.checkpoint_step}" if state.checkpoint_step is not None else "no checkpoint yet")
    if state.phase not in ("training", "starting"):
        parts.append(state.phase)
    return "  ".join(parts)


class ProgressLine:
    """Draws states on `stream`: redrawn in place on a terminal, a new line every `interval_s`
    otherwise."""

    def __init__(self, stream: TextIO | None = None, interval_s: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if interval_s is None:
            interval_s = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
        self.interval_s = interval_s
        self._last_draw = -float("inf")
        self._last_phase = ""
        self._width = 0
        self._open = False
        self._drew_last_step = False

    def show(self, state: ProgressState) -> None:
        now = time.monotonic()
        last_step = state.step >= state.total and not self._drew_last_step
        final = last_step or state.phase != self._last_phase
        if self.tty:
            if now - self._last_draw < 0.1 and not final:
                return
            text = describe(state)
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self._width, self._open = len(text), True
        else:
            if now - self._last_draw < self.interval_s and not final:
                return
            self.stream.write(describe(state) + "\n")
        self.stream.flush()
        self._last_draw, self._last_phase = now, state.phase
        self._drew_last_step = self._drew_last_step or last_step

    def close(self) -> None:
        """End the line (terminal), so that what follows starts on a new line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class ProgressFile:
    """Writes states to `<folder>/progress.json` (atomically, at most every `every_s` seconds
    unless the phase changes or the run ends), for a driver that follows it."""

    def __init__(self, folder: Path, every_s: float = 1.0):
        self.path = Path(folder) / PROGRESS_FILE
        self.every_s = every_s
        self._last = -float("inf")
        self._phase = ""

    def show(self, state: ProgressState) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and state.phase == self._phase and state.step < state.total:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, self.path)
        self._last, self._phase = now, state.phase

    def close(self) -> None:
        pass


class ProgressTracker:
    """Turns the loop's steps into progress states for a sink (rank 0 only)."""

    def __init__(self, name: str, sink: ProgressLine | ProgressFile):
        self.sink = sink
        self.state = ProgressState(name=name, total=0)
        self._t0 = time.monotonic()

    def start(self, step: int, total: int) -> None:
        self.state.first_step, self.state.step, self.state.total = step, step, total
        self.state.phase = "training"
        self._t0 = time.monotonic()
        self.sink.show(self.state)

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        s = self.state
        s.step = step
        # the main losses first (a GAN's generator and discriminator), then the family's others
        names = sorted((k for k in metrics if k.startswith("loss")),
                       key=lambda k: MAIN_LOSSES.index(k) if k in MAIN_LOSSES else len(MAIN_LOSSES))
        s.losses = {k: float(metrics[k]) for k in names[:LOSSES_SHOWN]}
        elapsed = time.monotonic() - self._t0
        done = step - s.first_step
        if done > 0 and elapsed > 0:
            s.steps_per_s = done / elapsed
            s.eta_s = (s.total - step) / s.steps_per_s
        self.sink.show(s)

    def checkpoint(self, step: int) -> None:
        self.state.checkpoint_step = step
        self.sink.show(self.state)

    def phase(self, phase: str) -> None:
        self.state.phase = phase
        self.sink.show(self.state)

    def close(self) -> None:
        self.sink.close()


def follow_file(folder: Path, line: ProgressLine, initial: ProgressState,
                poll_s: float = 0.5) -> tuple[threading.Thread, threading.Event]:
    """Draw `initial`, then the states a Ray run's rank 0 writes into `<folder>/progress.json`
    until the returned event is set (then the line is closed). A file left by an earlier
    attempt of the same run is removed first."""
    path = Path(folder) / PROGRESS_FILE
    path.unlink(missing_ok=True)
    stop = threading.Event()
    line.show(initial)

    def run() -> None:
        last_text = describe(initial)
        while True:
            stopping = stop.wait(poll_s)
            try:
                state = ProgressState(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                state = None
            if state is not None and describe(state) != last_text:
                line.show(state)
                last_text = describe(state)
            if stopping:
                line.close()
                return

    thread = threading.Thread(target=run, name="uhg-progress", daemon=True)
    thread.start()
    return thread, stop
