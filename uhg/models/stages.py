"""CPU and wall time of named stages of generation, summed while a benchmark records them.

    with recording() as totals:
        gen.generate(...)
    totals  # {"decoder": {"cpu_s": ..., "wall_s": ..., "calls": ...}, ...}

Outside `recording` a `stage` costs one global lookup. CPU time is the process's
(`time.process_time`): on a shared machine it is closer than wall time to what a dedicated core
would take (with one torch thread). Device work is not waited for: on a GPU the figures say
where the host spends its time, not the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

_totals: dict[str, dict[str, float]] | None = None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the time spent in the block to stage `name` while `recording`."""
    if _totals is None:
        yield
        return
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield
    finally:
        t = _totals.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0, "calls": 0})
        t["cpu_s"] += time.process_time() - cpu
        t["wall_s"] += time.perf_counter() - wall
        t["calls"] += 1


@contextlib.contextmanager
def recording() -> Iterator[dict[str, dict[str, float]]]:
    """Record the stages run inside the block into the dict it yields (not nested: one at a time)."""
    global _totals
    if _totals is not None:
        raise RuntimeError("stage recording is already on")
    _totals = {}
    try:
        yield _totals
    finally:
        _totals = None
