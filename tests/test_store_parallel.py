"""Parallel part writers and crash safety, with real processes."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from uhg.data import create_store, fill_store, missing_parts, open_store
from uhg.errors import GeometryError, StoreError

sys.path.insert(0, str(Path(__file__).parent))
from test_store import LUMI, assert_same, pixel_events  # noqa: E402


def make_part(geometry: str, start: int, stop: int):
    """Module-level so spawned workers can unpickle it."""
    return pixel_events(geometry, start, stop, max_hits=400)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_spawn_workers_match_one_process(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    make = functools.partial(make_part, "pxd-tiny")
    for path in (serial, parallel):
        create_store(path, "pixel", "pxd-tiny", 50, 8, LUMI, seed=1)
    assert fill_store(serial, make, workers=1, progress=False) == 50
    assert fill_store(parallel, make, workers=2, progress=False, start_method="spawn") == 50
    assert missing_parts(parallel) == []
    assert_same(open_store(parallel).read(), open_store(serial).read())
    assert tree_bytes(serial / "parts") == tree_bytes(parallel / "parts")
    assert fill_store(parallel, make, workers=2, progress=False) == 0  # nothing left to do


def test_a_writer_whose_partial_folder_vanishes_under_it_still_commits(tmp_path, monkeypatch):
    """Two writers of one store: B removes the empty `.partial` right after A's mkdir found it
    there, so A's mkdir(exist_ok=True) sees no directory and raises FileExistsError (seen as a
    failed `uhg sim pxd --workers 2`). A tries again and commits its part."""
    path = tmp_path / "s"
    create_store(path, "pixel", "pxd-tiny", 8, 8, LUMI, seed=1)
    real_mkdir, raced = os.mkdir, []

    def mkdir(target, *args, **kwargs):
        if Path(target).name == ".partial" and not raced:
            raced.append(target)  # B made it, A's mkdir failed on it, then B removed it
            raise FileExistsError(17, "File exists", str(target))
        return real_mkdir(target, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert fill_store(path, functools.partial(make_part, "pxd-tiny"), workers=1, progress=False) == 8
    assert raced and missing_parts(path) == []


def test_worker_error_reaches_the_parent(tmp_path):
    path = tmp_path / "s"
    create_store(path, "pixel", "pxd-mini", 20, 10, LUMI)
    bad = functools.partial(make_part, "pxd")  # full-size rows do not fit pxd-mini
    with pytest.raises(GeometryError, match="geometry 'pxd-mini' allows"):
        fill_store(path, bad, workers=2, progress=False, start_method="spawn")
    with pytest.raises(StoreError, match="start_method"):
        fill_store(path, bad, start_method="fork")


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import uhg.data.writer as store
    from test_store import pixel_events
    write_array = store._write_array
    def slow_write(group, name, *args, **kw):
        write_array(group, name, *args, **kw)
        if name == "value" and "p000001" in str(group.store):
            print("writing", flush=True)
            time.sleep(60)  # killed here, with part 1 half written
    store._write_array = slow_write
    for part in (0, 1, 2):
        store.write_part({path!r}, part, pixel_events("pxd-tiny", part * 10, min(part * 10 + 10, 25), max_hits=400))
""")


def test_killed_writer_leaves_no_visible_part_and_rerun_completes(tmp_path):
    path, ref = tmp_path / "s", tmp_path / "ref"
    make = functools.partial(make_part, "pxd-tiny")
    for p in (path, ref):
        create_store(p, "pixel", "pxd-tiny", 25, 10, LUMI, seed=1)
    fill_store(ref, make, progress=False)

    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any((path / ".partial").iterdir())  # the half-written part exists, but only there
    assert missing_parts(path) == [1, 2]
    with pytest.raises(StoreError, match=r"incomplete: 2 of 3 parts missing \(parts 1-2\)"):
        open_store(path)
    assert len(open_store(path, allow_incomplete=True)) == 10

    create_store(path, "pixel", "pxd-tiny", 25, 10, LUMI, seed=1)  # resume: clears the dead writer's debris
    assert not (path / ".partial").exists()
    t0 = time.perf_counter()
    assert fill_store(path, make, progress=False) == 15
    assert time.perf_counter() - t0 < 30
    assert tree_bytes(path / "parts") == tree_bytes(ref / "parts")
    assert_same(open_store(path).read(), open_store(ref).read())


CONCURRENT_FILL = textwrap.dedent("""
    import functools, sys
    sys.path.insert(0, {tests!r})
    from test_store_parallel import make_part
    from uhg.data import fill_store
    fill_store({path!r}, functools.partial(make_part, "pxd-tiny"), progress=False)
""")


def test_two_fill_runs_on_one_store_agree(tmp_path):
    """Two independent `fill_store` runs on the same store (say, a job started twice) both
    finish: parts the other run committed first count as done."""
    path, ref = tmp_path / "s", tmp_path / "ref"
    make = functools.partial(make_part, "pxd-tiny")
    for p in (path, ref):
        create_store(p, "pixel", "pxd-tiny", 60, 5, LUMI, seed=1)
    fill_store(ref, make, progress=False)
    other = subprocess.Popen([sys.executable, "-c", CONCURRENT_FILL.format(tests=str(Path(__file__).parent),
                                                                          path=str(path))])
    fill_store(path, make, progress=False)
    assert other.wait(timeout=120) == 0
    assert missing_parts(path) == []
    assert tree_bytes(path / "parts") == tree_bytes(ref / "parts")
