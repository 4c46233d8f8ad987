"""Torch loader over real stores: content, sharding, determinism, resume, spawn workers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.data import open_store
from uhg.data.loader import HitDataset, make_loader
from uhg.errors import ConfigError, GeometryError
from uhg.geometry import get_geometry
from uhg.sparse.torch_hits import CompactHits, TorchHits

sys.path.insert(0, str(Path(__file__).parent))
from test_store import ENERGY, LUMI, calo_events, pixel_events, write_all  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_all(root / "a", "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 47), 10, LUMI)
    write_all(root / "b", "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 23, seed=9), 8, LUMI)
    write_all(root / "c", "calo", "ds2", calo_events("ds2", 0, 12), 5, ENERGY)
    return root


def as_key(batch: CompactHits) -> tuple:
    """A comparable fingerprint of a loader batch."""
    hits = batch.widen(get_geometry("pxd-tiny"))
    return (tuple(hits.offsets.tolist()), tuple(hits.columns["value"].tolist()),
            tuple(hits.columns["row"].tolist()), tuple(hits.conditions["luminosity"].tolist()))


def test_batches_hold_the_planned_events(stores):
    ds = HitDataset([stores / "a", stores / "b"], 6, seed=3)
    reference = [open_store(stores / "a").read(), open_store(stores / "b").read()]
    batches = list(make_loader([stores / "a", stores / "b"], 6, seed=3))
    plan = ds.plan(0)
    assert len(batches) == len(plan) == 12  # ceil(70 / 6)
    for ids, batch in zip(plan, batches, strict=True):
        assert batch.channel.dtype == torch.int32 and batch.columns["value"].dtype == torch.uint8
        hits = batch.widen(get_geometry("pxd-tiny"))
        want = [reference[0].take([i]) if i < 47 else reference[1].take([i - 47]) for i in ids]
        assert hits.offsets.tolist() == [0, *np.cumsum([w.n_hits for w in want]).tolist()]
        for name in ("sensor", "row", "col", "value"):
            assert hits.columns[name].tolist() == np.concatenate([w.columns[name] for w in want]).tolist()
        assert hits.conditions["luminosity"].tolist() == [w.conditions["luminosity"][0] for w in want]


def test_sharding_is_disjoint_and_covering(stores):
    for drop_last in (False, True):
        plans = [np.concatenate(HitDataset(stores / "a", 4, seed=1, rank=r, world_size=3, drop_last=drop_last).plan(2))
                 for r in range(3)]
        together = np.concatenate(plans)
        assert len(np.unique(together)) == len(together)
        if drop_last:
            assert {len(p) for p in plans} == {12}  # 47 // 3 = 15 events -> 3 full batches per rank
        else:
            assert sorted(together.tolist()) == list(range(47))
    with pytest.raises(ConfigError, match="rank 3 is not in 0..world_size-1"):
        HitDataset(stores / "a", 4, rank=3, world_size=3)


def test_split_and_shuffle_are_deterministic(stores):
    def events(**kw):
        return np.concatenate(HitDataset(stores / "a", 5, **kw).plan(0))

    train, val = events(split="train", val_fraction=0.3), events(split="val", val_fraction=0.3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(47)) and not set(train) & set(val)
    assert 5 <= len(val) <= 25
    assert sorted(events(split="val", val_fraction=0.3, seed=8)) == sorted(val)  # the seed only reorders
    assert np.array_equal(events(seed=4), events(seed=4))
    assert not np.array_equal(events(seed=4), events(seed=5))
    ds = HitDataset(stores / "a", 5, seed=4)
    assert not np.array_equal(np.concatenate(ds.plan(0)), np.concatenate(ds.plan(1)))
    assert np.array_equal(np.concatenate(HitDataset(stores / "a", 5, shuffle=False).plan(0)), np.arange(47))


def test_part_wise_reading_reads_blocks(stores):
    ds = HitDataset(stores / "a", 5, seed=2, in_memory=False)
    order = np.concatenate(ds.plan(0))
    assert sorted(order.tolist()) == list(range(47))
    parts = order // 10
    assert np.count_nonzero(np.diff(parts)) == 4  # each of the 5 parts is visited in one block
    mem = [as_key(h) for h in make_loader(stores / "a", 5, seed=2, shuffle=False)]
    disk = [as_key(h) for h in make_loader(stores / "a", 5, seed=2, shuffle=False, in_memory=False)]
    assert mem == disk


def test_resume_continues_exactly(stores):
    full = make_loader(stores / "a", 4, seed=7)
    uninterrupted = [as_key(h) for _ in range(2) for h in full]  # two epochs
    first = make_loader(stores / "a", 4, seed=7)
    seen = []
    for h in first:
        seen.append(as_key(h))
        if len(seen) == 9:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 9
    resumed = make_loader(stores / "a", 4, seed=7)
    resumed.load_state_dict(state)
    seen += [as_key(h) for h in resumed]
    assert resumed.state_dict()["epoch"] == 1
    seen += [as_key(h) for h in resumed]
    assert seen == uninterrupted
    with pytest.raises(ConfigError, match="seed=7"):
        make_loader(stores / "a", 4, seed=8).load_state_dict(state)


@pytest.mark.slow  # spawned workers import torch: 25 s on the shared 2-core machine
def test_spawn_workers_keep_the_order(stores):
    single = [as_key(h) for h in make_loader([stores / "a", stores / "b"], 7, seed=5)]
    loader = make_loader([stores / "a", stores / "b"], 7, seed=5, num_workers=2, start_method="spawn")
    loader.load_state_dict({**loader.state_dict(), "position": 3})  # workers also start mid-epoch
    assert [as_key(h) for h in loader] == single[3:]
    assert loader.state_dict()["epoch"] == 1


def test_densify_and_calo(stores):
    hits, dense = next(iter(make_loader(stores / "a", 3, densify=True, shuffle=False, compact=False)))
    assert dense.shape == (3, 40, 16, 48) and dense.sum() == hits.columns["value"].sum()
    assert torch.equal(dense, hits.pixel_dense(40, 16, 48))
    hits, dense = next(iter(make_loader(stores / "c", 4, densify=True, shuffle=False)))
    assert dense.shape == (4, 6480) and isinstance(hits, CompactHits)
    want = open_store(stores / "c").dense(2)
    assert torch.equal(dense[2], torch.from_numpy(want))
    with pytest.raises(GeometryError, match="cannot be mixed"):
        HitDataset([stores / "a", stores / "c"], 4)


@pytest.mark.parametrize("name", ["a", "c"])
def test_compact_batches_widen_to_the_store_columns(stores, name):
    """Widened compact batches equal TorchHits of the store's own columns, for pixels and calorimeters."""
    store = open_store(stores / name)
    want = TorchHits.from_batch(store.read(0, 4))
    compact = next(iter(make_loader(stores / name, 4, shuffle=False, in_memory=False)))
    wide = next(iter(make_loader(stores / name, 4, shuffle=False, compact=False)))
    assert compact.columns["value"].dtype == (torch.uint8 if name == "a" else torch.float32)
    for hits in (compact.widen(store.geometry), wide):
        assert hits.offsets.tolist() == want.offsets.tolist()
        assert set(hits.columns) == set(want.columns)
        for k, v in want.columns.items():
            assert hits.columns[k].dtype == v.dtype and torch.equal(hits.columns[k], v), k


def test_step_stream_continues_the_epoch_plan_across_epochs(stores):
    """Training's step stream: within an epoch it is the epoch plan (drop_last), it runs on across
    epoch ends without a short batch, every rank's steps are disjoint and together cover each
    epoch, and a step's batch depends on nothing but its number."""
    world, b = 3, 4
    ranks = [HitDataset(stores / "a", b, seed=6, rank=r, world_size=world, drop_last=True) for r in range(world)]
    for r, ds in enumerate(ranks):
        plan = ds.plan(0)
        assert all(np.array_equal(ds.step_ids(k + 1), plan[k]) for k in range(len(plan))), r
    steps = 10  # 10 steps * 12 events = 120 positions: 2 full epochs of 47 and 26 of the third
    stream = np.stack([np.stack([ds.step_ids(s) for ds in ranks]) for s in range(1, steps + 1)])  # step, rank, j
    positions = stream.transpose(0, 2, 1).reshape(-1)  # global stream order: step, then j, then rank
    orders = [ranks[0]._order(e) for e in range(3)]
    assert np.array_equal(positions, np.concatenate(orders)[:steps * world * b])
    fresh = HitDataset(stores / "a", b, seed=6, rank=1, world_size=world)  # resumed in a new process
    assert np.array_equal(fresh.step_ids(7), stream[6, 1])


def test_step_reader_reads_ahead_on_threads_without_changing_batches(stores):
    from uhg.data.loader import StepReader

    ds = HitDataset([stores / "a", stores / "b"], 5, split="train", seed=2, in_memory=False)
    plain = StepReader(ds, 12)
    want = [as_key(plain.get(s)) for s in range(1, 13)]
    ahead = StepReader(HitDataset([stores / "a", stores / "b"], 5, split="train", seed=2, in_memory=False), 12, ahead=3)
    try:
        assert [as_key(ahead.get(s)) for s in range(1, 13)] == want
    finally:
        ahead.close()
    with pytest.raises(ConfigError, match="read-ahead must be >= 0"):
        StepReader(ds, 12, ahead=-1)


def test_split_is_by_event_number_and_store(stores, tmp_path):
    """The split of an event depends on its planned number and the store's seed/attributes, not
    on its position: left-out parts move no event between splits, and a store written again from
    the same plan holds out the same events."""
    whole = HitDataset(stores / "a", 1, split="val", val_fraction=0.3)
    ids = whole.stores[0].event_ids[whole.events]
    part = HitDataset(stores / "a", 1, split="val", val_fraction=0.3, exclude={0: [1, 3]})
    kept = part.stores[0].event_ids
    assert np.array_equal(kept[part.events], ids[np.isin(ids, kept)])
    write_all(tmp_path / "a2", "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 47), 10, LUMI)
    assert np.array_equal(HitDataset(tmp_path / "a2", 1, split="val", val_fraction=0.3).events, whole.events)
