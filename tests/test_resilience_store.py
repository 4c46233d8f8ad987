"""A store write onto a full disk (a size-limited tmpfs, mounted by the test): a clear
StoreError, every committed part intact and readable, no partial part visible; after space is
freed, the rerun writes only the missing parts and the store equals an uninterrupted one.

(SIGKILLed writers are covered by tests/test_store_parallel.py and tests/test_overlay_cli.py.)
"""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

import pytest
from test_store import LUMI, assert_same
from test_store_parallel import make_part, tree_bytes

from uhg.data import create_store, fill_store, missing_parts, open_store, write_part
from uhg.errors import StoreError


def test_full_disk_during_a_store_write(tmp_path: Path, small_disk) -> None:
    disk = small_disk("160k")
    make = functools.partial(make_part, "pxd-tiny")
    ref, path = tmp_path / "ref", disk / "s"
    for p in (ref, path):
        create_store(p, "pixel", "pxd-tiny", 120, 10, LUMI, seed=1)
    fill_store(ref, make, progress=False)

    written = []
    with pytest.raises(StoreError) as caught:
        for part in missing_parts(path):
            write_part(path, part, make(part * 10, (part + 1) * 10))
            written.append(part)
    message = str(caught.value)
    assert f"store {path}, part {len(written)}" in message and "No space left on device" in message
    assert written, "the disk should hold at least one part"
    assert not any(path.glob(".partial/*")), "the half-written part must be removed"
    assert missing_parts(path) == list(range(len(written), 12))
    kept = open_store(path, allow_incomplete=True)
    assert_same(kept.read(0, len(kept)), open_store(ref).read(0, len(kept)))

    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
    t0 = time.perf_counter()
    assert fill_store(path, make, progress=False) == 120 - 10 * len(written)
    print(f"\n[resilience] full disk after {len(written)} of 12 parts; rerun after freeing space "
          f"took {time.perf_counter() - t0:.1f} s")
    assert tree_bytes(path / "parts") == tree_bytes(ref / "parts")
