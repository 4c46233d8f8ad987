"""Generation processes keep freed memory: large blocks freed and allocated again, event after
event, are not faulted in afresh from the operating system (uhg.generate.memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Twelve "events", each allocating and freeing 64 + 32 MiB of tensors (over glibc's default mmap
# threshold); prints whether the setting took effect and the median page faults of the last
# eight (a median: now and then the heap is fragmented by the interpreter's own small blocks and
# one event's block comes fresh from the operating system either way).
PROBE = """
import resource, sys
import torch
from uhg.generate.memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(16 << 20)
    b = a[: 8 << 20] + 1
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del a, b
print(took, sorted(faults[-8:])[4])
"""


def _faults(mode: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    took, faults = run.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    took, kept = _faults("keep")
    _, released = _faults("release")
    pages = (96 << 20) // 4096  # 4 KiB pages of one event
    assert took == "True"
    assert released > pages // 2  # glibc's default: every event's blocks come back from the OS
    assert kept < pages // 20
