"""Store round trips and bad input: real Zarr stores in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from uhg.data import HitBatch, create_store, missing_parts, open_store, write_part
from uhg.data.hits import CaloEvent, PixelEvent
from uhg.errors import ConditionError, GeometryError, StoreError
from uhg.geometry import get_geometry
from uhg.seeding import event_rng

LUMI = {"luminosity": {"min": 1e33, "max": 1e35, "unit": "cm^-2 s^-1"}}
ENERGY = {"incident_energy": {"min": 1e3, "max": 1e6, "unit": "MeV"}}


def pixel_events(geometry: str, start: int, stop: int, seed: int = 1, max_hits: int = 60) -> HitBatch:
    """Random unique hits per event (unsorted on purpose: the store sorts them)."""
    g = get_geometry(geometry)
    events = []
    for e in range(start, stop):
        rng = event_rng(seed, e, "pxd")
        ch = rng.permutation(np.unique(rng.integers(0, g.n_channels, rng.integers(0, max_hits))))
        s, rest = np.divmod(ch, g.rows * g.cols)
        r, c = np.divmod(rest, g.cols)
        events.append(PixelEvent(s, r, c, rng.integers(7, 256, len(ch)), {"luminosity": 1e34 * (1 + e % 7)}))
    return HitBatch.from_events("pixel", events)


def calo_events(geometry: str, start: int, stop: int, seed: int = 2) -> HitBatch:
    g = get_geometry(geometry)
    events = []
    for e in range(start, stop):
        rng = event_rng(seed, e, "calo")
        vox = np.unique(rng.integers(0, g.n_cells, rng.integers(0, 300)))
        layer = np.searchsorted(g.layer_offsets, vox, side="right") - 1
        events.append(CaloEvent(layer, vox - g.layer_offsets[layer], rng.exponential(5.0, len(vox)).astype(np.float32),
                                {"incident_energy": float(rng.uniform(1e3, 1e6))}))
    return HitBatch.from_events("calo", events)


def write_all(path: Path, kind: str, geometry: str, batch: HitBatch, part_size: int, conditions: dict) -> None:
    create_store(path, kind, geometry, len(batch), part_size, conditions, attributes={"source": "test"}, seed=1)
    for p in missing_parts(path):
        write_part(path, p, batch.slice(p * part_size, min((p + 1) * part_size, len(batch))))


def assert_same(a: HitBatch, b: HitBatch) -> None:
    assert a.kind == b.kind
    assert np.array_equal(a.offsets, b.offsets)
    for k in a.columns:
        assert a.columns[k].dtype == b.columns[k].dtype, k
        assert np.array_equal(a.columns[k], b.columns[k]), k
    assert a.conditions.keys() == b.conditions.keys()
    for k in a.conditions:
        assert np.array_equal(a.conditions[k], b.conditions[k]), k


def test_pixel_round_trip(tmp_path):
    batch = pixel_events("pxd-tiny", 0, 23)
    write_all(tmp_path / "s", "pixel", "pxd-tiny", batch, 10, LUMI)
    store = open_store(tmp_path / "s")
    assert len(store) == 23 and store.kind == "pixel" and store.geometry.name == "pxd-tiny"
    assert store.attrs["schema"] == "uhg-store/1" and store.attrs["attributes"] == {"source": "test"}
    assert store.attrs["provenance"]["seed"] == 1
    ref = batch.sorted()
    assert_same(store.read(), ref)
    assert_same(store.read(7, 18), ref.slice(7, 18))
    assert_same(HitBatch.from_events("pixel", list(store)), ref)
    ev = store[12]
    want = ref.event(12)
    assert np.array_equal(ev.row, want.row) and ev.conditions == want.conditions
    dense = store.dense(12)
    assert dense.shape == (40, 16, 48) and dense.dtype == np.uint8
    assert dense.sum() == int(want.value.astype(np.int64).sum()) and np.count_nonzero(dense) == len(want)
    sp = store.sparse(12)
    assert sp.shape == (40, 16, 48) and np.array_equal(sp.to_dense().numpy(), dense.astype(np.float32))
    assert np.array_equal(store.conditions["luminosity"], ref.conditions["luminosity"])
    assert_same(store.take([20, 3, 3, 11]), ref.take([20, 3, 3, 11]))
    assert len(store.torch(0, 5)) == 5


def test_calo_round_trip(tmp_path):
    batch = calo_events("ds1-photons", 0, 17)  # has empty layers: offsets repeat
    write_all(tmp_path / "c", "calo", "ds1-photons", batch, 8, ENERGY)
    store = open_store(tmp_path / "c", geometry="ds1-photons")
    assert_same(store.read(), batch.sorted())
    dense = store.dense(5)
    g = store.geometry
    ev = batch.event(5)
    want = np.zeros(g.n_cells, np.float32)
    want[g.layer_offsets[ev.layer] + ev.cell] = ev.value
    assert dense.dtype == np.float32 and np.array_equal(dense, want)
    assert np.array_equal(store.sparse(5).to_dense().numpy(), want)


def test_empty_events_and_store(tmp_path):
    create_store(tmp_path / "e", "pixel", "pxd-tiny", 3, 2, LUMI)
    empty = HitBatch.empty("pixel", ["luminosity"])
    two = HitBatch(empty.kind, empty.columns, np.zeros(3, np.int64), {"luminosity": [1e34, 1e34]})
    write_part(tmp_path / "e", 0, two)
    write_part(tmp_path / "e", 1, two.slice(0, 1))
    store = open_store(tmp_path / "e")
    assert len(store) == 3 and store.read().n_hits == 0 and len(store[2]) == 0
    create_store(tmp_path / "z", "calo", "ds2", 0, 5)
    assert len(open_store(tmp_path / "z")) == 0


def test_resume_and_plan_mismatch(tmp_path):
    path = tmp_path / "s"
    create_store(path, "pixel", "pxd-tiny", 30, 10, LUMI, attributes={"a": 1}, seed=4)
    write_part(path, 1, pixel_events("pxd-tiny", 10, 20))
    # the same plan resumes: nothing is lost
    create_store(path, "pixel", "pxd-tiny", 30, 10, LUMI, attributes={"a": 1}, seed=4)
    assert missing_parts(path) == [0, 2]
    with pytest.raises(StoreError, match="different plan.*n_events"):
        create_store(path, "pixel", "pxd-tiny", 40, 10, LUMI, attributes={"a": 1}, seed=4)
    with pytest.raises(StoreError, match="seed"):
        create_store(path, "pixel", "pxd-tiny", 30, 10, LUMI, attributes={"a": 1}, seed=5)
    with pytest.raises(StoreError, match="already written"):
        write_part(path, 1, pixel_events("pxd-tiny", 10, 20))
    with pytest.raises(StoreError, match=r"incomplete: 2 of 3 parts missing \(parts 0, 2\)"):
        open_store(path)
    partial = open_store(path, allow_incomplete=True)
    assert len(partial) == 10 and list(partial.event_ids) == list(range(10, 20))
    create_store(path, "pixel", "pxd-tiny", 40, 10, LUMI, overwrite=True)
    assert missing_parts(path) == [0, 1, 2, 3]


def test_bad_plans(tmp_path):
    with pytest.raises(StoreError, match="n_events must be a non-negative"):
        create_store(tmp_path / "a", "pixel", "pxd-tiny", -5, 10)
    with pytest.raises(StoreError, match="part_size must be a positive"):
        create_store(tmp_path / "a", "pixel", "pxd-tiny", 5, 0)
    with pytest.raises(GeometryError, match="unknown geometry 'pxd-huge'"):
        create_store(tmp_path / "a", "pixel", "pxd-huge", 5, 1)
    with pytest.raises(GeometryError, match="calo geometry, not pixel"):
        create_store(tmp_path / "a", "pixel", "ds2", 5, 1)
    with pytest.raises(ConditionError, match="'luminosity' needs numeric"):
        create_store(tmp_path / "a", "pixel", "pxd-tiny", 5, 1, {"luminosity": {"min": 1}})
    assert not (tmp_path / "a").exists()


def test_bad_parts(tmp_path):
    path = tmp_path / "s"
    create_store(path, "pixel", "pxd-tiny", 20, 10, LUMI)
    batch = pixel_events("pxd-tiny", 0, 10)
    high = HitBatch(batch.kind, batch.columns, batch.offsets, {"luminosity": np.full(10, 3e35)})
    with pytest.raises(ConditionError, match=r"'luminosity' of event 0 is 3e\+35 cm\^-2 s\^-1, outside"):
        write_part(path, 0, high)
    with pytest.raises(ConditionError, match="differ from the declared"):
        write_part(path, 0, HitBatch(batch.kind, batch.columns, batch.offsets, {}))
    with pytest.raises(StoreError, match="got 9 events, expected 10"):
        write_part(path, 0, batch.slice(0, 9))
    with pytest.raises(StoreError, match="part index 2 outside 0..1"):
        write_part(path, 2, batch)
    cols = dict(batch.columns, row=np.full(batch.n_hits, 16))
    with pytest.raises(GeometryError, match="column 'row' has value 16, geometry 'pxd-tiny' allows 0..15"):
        write_part(path, 0, HitBatch("pixel", cols, batch.offsets, batch.conditions))
    dup = HitBatch.from_events("pixel", [PixelEvent([1, 1], [2, 2], [3, 3], [9, 9], {"luminosity": 1e34})] * 10)
    with pytest.raises(StoreError, match="event 0 has two hits in channel"):
        write_part(path, 0, dup)
    assert missing_parts(path) == [0, 1]
    assert not (path / ".partial").exists()  # failed writes leave nothing behind


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nothing")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="not a Zarr store"):
        open_store(tmp_path / "dir")
    import zarr

    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(StoreError, match="not a uhg store"):
        open_store(tmp_path / "plain")
    path = tmp_path / "s"
    write_all(path, "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 4), 4, LUMI)
    with pytest.raises(GeometryError, match="holds geometry 'pxd-tiny', not 'pxd-mini'"):
        open_store(path, geometry="pxd-mini")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema"] = "uhg-store/0"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema 'uhg-store/0'; this uhg reads 'uhg-store/1'"):
        open_store(path)
    meta["attributes"]["schema"] = "uhg-store/1"
    meta["attributes"]["geometry_spec"]["rows"] = 17
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(GeometryError, match="another version of geometry 'pxd-tiny' .rows: store 17, now 16"):
        open_store(path)


def test_corrupt_and_missing_chunks(tmp_path):
    path = tmp_path / "s"
    write_all(path, "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 20), 10, LUMI)
    chunk = path / "parts" / "p000001" / "value" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    store = open_store(path)
    store[3]  # part 0 is intact
    with pytest.raises(StoreError, match=r"part 1, array 'value': chunk c/0 is corrupt"):
        store[13]
    os.remove(path / "parts" / "p000000" / "conditions" / "luminosity" / "c" / "0")
    with pytest.raises(StoreError, match=r"part 0, array 'conditions/luminosity': chunk c/0 is missing"):
        open_store(path).read(0, 2)
    shutil.rmtree(path / "parts" / "p000000" / "channel")
    with pytest.raises(StoreError, match=r"part 0, array 'channel' is missing"):
        open_store(path)[0]


def test_compression_is_compact(tmp_path):
    """Clustered hits at realistic occupancy compress to well under the raw 6 bytes per hit."""
    g = get_geometry("pxd")
    rng = np.random.default_rng(0)
    events = []
    for _ in range(4):
        n = int(0.003 * g.n_channels / 3)
        start = rng.integers(0, g.n_channels - 4, n)
        ch = np.unique((start[:, None] + np.arange(3)).ravel())
        s, rest = np.divmod(ch, g.rows * g.cols)
        r, c = np.divmod(rest, g.cols)
        val = np.clip(7 + rng.exponential(25, len(ch)), 0, 255)
        events.append(PixelEvent(s, r, c, val, {"luminosity": 1e34}))
    batch = HitBatch.from_events("pixel", events)
    write_all(tmp_path / "s", "pixel", "pxd", batch, 4, LUMI)
    disk = sum(f.stat().st_size for f in (tmp_path / "s" / "parts").rglob("*") if f.is_file())
    assert disk / batch.n_hits < 3.0


@pytest.mark.parametrize("hits_per_event", [3, 500])  # below and above SLICE_GATHER_HITS
def test_gather_events_copies_each_event_in_the_asked_order(hits_per_event: int) -> None:
    """Both ways of gathering (one position array for small events, one slice copy per event for
    large ones) give every asked event's hits, in the asked order, repeats and empty events included."""
    from uhg.data.hits import SLICE_GATHER_HITS, ChannelBatch, gather_events

    rng = np.random.default_rng(hits_per_event)
    counts = rng.integers(0, 2 * hits_per_event, 20)
    counts[[4, 11]] = 0
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    channel = rng.integers(0, 2**32, offsets[-1], dtype=np.uint64).astype(np.uint32)
    value = rng.integers(0, 256, offsets[-1]).astype(np.uint8)
    idx = np.array([7, 4, 19, 7, 0, 11, 3])
    got, got_offsets = gather_events({"channel": channel, "value": value}, offsets, idx)
    assert (got_offsets[-1] >= SLICE_GATHER_HITS * len(idx)) == (hits_per_event > SLICE_GATHER_HITS)
    assert got_offsets.tolist() == [0, *np.cumsum(counts[idx]).tolist()]
    for j, e in enumerate(idx):
        sl = slice(got_offsets[j], got_offsets[j + 1])
        assert np.array_equal(got["channel"][sl], channel[offsets[e]:offsets[e + 1]])
        assert np.array_equal(got["value"][sl], value[offsets[e]:offsets[e + 1]])
    assert got["channel"].dtype == np.uint32 and got["value"].dtype == np.uint8
    batch = ChannelBatch("pixel", channel, {"value": value}, offsets, {"luminosity": np.arange(20.0)})
    taken = batch.take(idx)
    assert np.array_equal(taken.channel, got["channel"]) and taken.conditions["luminosity"].tolist() == idx.tolist()
    empty, empty_offsets = gather_events({"value": value}, offsets, np.zeros(0, np.int64))
    assert len(empty["value"]) == 0 and empty_offsets.tolist() == [0]
