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

sys.path.insert(0, str(Path(__file__).parent))
from test_store import ENERGY, LUMI, calo_events, pixel_events, write_all  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_all(root / "a", "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 47), 10, LUMI)
    write_all(root / "b", "pixel", "pxd-tiny", pixel_events("pxd-tiny", 0, 23, seed=9), 8, LUMI)
    write_all(root / "c", "calo", "ds2", calo_events("ds2", 0, 12), 5, ENERGY)
    return root


def as_key(hits) -> tuple:
    """A comparable fingerprint of a TorchHits batch."""
    return (tuple(hits.offsets.tolist()), tuple(hits.columns["value"].tolist()),
            tuple(hits.columns["row"].tolist()), tuple(hits.conditions["luminosity"].tolist()))


def test_batches_hold_the_planned_events(stores):
    ds = HitDataset([stores / "a", stores / "b"], 6, seed=3)
    reference = [open_store(stores / "a").read(), open_store(stores / "b").read()]
    batches = list(make_loader([stores / "a", stores / "b"], 6, seed=3))
    plan = ds.plan(0)
    assert len(batches) == len(plan) == 12  # ceil(70 / 6)
    for ids, hits in zip(plan, batches, strict=True):
        want = [reference[0].take([i]) if i < 47 else reference[1].take([i - 47]) for i in ids]
        assert hits.offsets.tolist() == [0, *np.cumsum([w.n_hits for w in want]).tolist()]
        assert hits.columns["col"].tolist() == np.concatenate([w.columns["col"] for w in want]).tolist()
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
    hits, dense = next(iter(make_loader(stores / "a", 3, densify=True, shuffle=False)))
    assert dense.shape == (3, 40, 16, 48) and dense.sum() == hits.columns["value"].sum()
    hits, dense = next(iter(make_loader(stores / "c", 4, densify=True, shuffle=False)))
    assert dense.shape == (4, 6480)
    want = open_store(stores / "c").dense(2)
    assert torch.equal(dense[2], torch.from_numpy(want))
    with pytest.raises(GeometryError, match="cannot be mixed"):
        HitDataset([stores / "a", stores / "c"], 4)
