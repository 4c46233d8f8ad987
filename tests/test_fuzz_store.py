"""Property-based tests: a store with random damage (metadata JSON edits, random bytes in
zarr.json files and chunks, truncated chunks) is either read with exactly the content that was
written or refused with a StoreError/GeometryError naming the store; never another exception,
a hang, or different data. Every chunk ends in a CRC-32 (uhg.data.store codecs), so any change
of a chunk's bytes must be an error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uhg.data import HitBatch, create_store, missing_parts, open_store, write_part
from uhg.data.hits import PixelEvent
from uhg.errors import StoreError, UhgError

FUZZ = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
LUMI = {"luminosity": {"min": 1e33, "max": 1e35, "unit": "cm^-2 s^-1"}}
N_EVENTS, PART = 8, 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "store.zarr"
    rng = np.random.default_rng(5)
    events = []
    for e in range(N_EVENTS):
        n = int(rng.integers(1, 30))
        ch = rng.choice(40 * 16 * 48, n, replace=False)
        s, rest = np.divmod(ch, 16 * 48)
        r, c = np.divmod(rest, 48)
        events.append(PixelEvent(s, r, c, rng.integers(7, 256, n), {"luminosity": 1e34 * (1 + e)}))
    batch = HitBatch.from_events("pixel", events)
    create_store(path, "pixel", "pxd-tiny", N_EVENTS, PART, LUMI, attributes={"source": "fuzz"}, seed=1)
    for p in missing_parts(path):
        write_part(path, p, batch.slice(p * PART, (p + 1) * PART))
    return path


def _files(root: Path, suffix: str) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.name == suffix if suffix else p.parent.name == "c"))


def _content(path: Path) -> dict[str, np.ndarray]:
    """What a training loader sees: every event's hits and conditions, read whole and one by one."""
    store = open_store(path)
    batch = store.read(0, len(store))
    content = {"offsets": batch.offsets, **{f"column/{k}": v for k, v in batch.columns.items()},
               **{f"condition/{k}": v for k, v in batch.conditions.items()}}
    for i in range(len(store)):
        for f in dataclasses.fields(event := store[i]):
            content[f"event{i}/{f.name}"] = np.asarray(getattr(event, f.name), dtype=object)
    return content


def _read_everything(path: Path, pristine: Path, must_fail: bool = False) -> None:
    """Either a StoreError/GeometryError naming the store, or exactly the pristine content."""
    try:
        got = _content(path)
    except UhgError as err:
        assert str(path) in str(err) or "store" in str(err), f"error does not name the store: {err}"
        return
    assert not must_fail, "changed chunk bytes were read without an error"
    want = _content(pristine)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} differs from what was written")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _edit(doc: Any, path: list[int], value: Any) -> Any:
    """Replace the node reached by following `path` (indices into keys/items) with `value`."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[path[0] % len(keys)]
    doc[k] = _edit(doc[k], path[1:], value)
    return doc


@FUZZ
@given(which=st.integers(0, 1000), path=st.lists(st.integers(0, 50), max_size=4), value=json_values)
def test_edited_metadata_json_gives_store_error(pristine: Path, tmp_path: Path, which: int, path: list[int],
                                                value: Any) -> None:
    store = tmp_path / "s.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(pristine, store)
    target = _files(store, "zarr.json")[which % len(_files(store, "zarr.json"))]
    target.write_text(json.dumps(_edit(json.loads(target.read_text()), path, value)))
    _read_everything(store, pristine)


@FUZZ
@given(which=st.integers(0, 1000), kind=st.sampled_from(["zarr.json", ""]), offset=st.integers(0, 10_000),
       junk=st.binary(min_size=1, max_size=16), truncate=st.booleans())
def test_random_bytes_in_metadata_or_chunks_give_store_error(pristine: Path, tmp_path: Path, which: int, kind: str,
                                                            offset: int, junk: bytes, truncate: bool) -> None:
    store = tmp_path / "s.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(pristine, store)
    files = _files(store, kind)
    target = files[which % len(files)]
    data = bytearray(target.read_bytes())
    at = offset % max(len(data), 1)
    if truncate:
        data = data[:at]
    else:
        data[at:at + len(junk)] = junk
    changed = bytes(data) != target.read_bytes()
    target.write_bytes(bytes(data))
    _read_everything(store, pristine, must_fail=changed and kind == "")


def test_damage_is_reported_not_silently_read(pristine: Path, tmp_path: Path) -> None:
    """The fuzzing above accepts 'read fine' as an outcome; a truncated chunk must not be one."""
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    chunk = store / "parts" / "p000001" / "channel" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(StoreError, match=r"part 1, array 'channel': chunk c/0 is corrupt"):
        open_store(store).read(0, N_EVENTS)
