"""Random streams keyed by (seed, event index).

Every simulated or generated event draws from its own stream, so the output of a run does not
depend on how events are split into parts, processes or Ray workers: event 123 of seed 7 is
the same event whether one worker or ten produced it.
"""

from __future__ import annotations

import numpy as np

# Distinct stream families never collide even with equal (seed, index).
_STREAMS = {"pxd": 1, "signal": 2, "calo": 3, "generate": 4, "overlay": 5, "split": 6}


def event_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """Generator for event `index` of a run with `seed`, in the named `stream` family."""
    if stream not in _STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; known: {sorted(_STREAMS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS[stream], int(index)]))


def event_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit integer seed for event `index` (for torch generators)."""
    return int(event_rng(seed, index, stream).integers(0, 2**63 - 1))
