"""Training data: one data path and one split rule (training, validation and the end-of-run
evaluation take their events from uhg.data.loader.HitDataset, and hold out the events its "val"
split holds out), and a store with a corrupt Zarr chunk (one byte flipped in a chunk file on
disk): `data.on_corrupt: stop` names store, part, array and chunk; `skip` leaves the part out
of training and validation, for datasets held in memory and read part by part alike, and every
rank leaves out the same part. (End to end with `uhg train --local` and MLflow:
tests/test_resilience_training.py.)"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from uhg.config import config_from_dict
from uhg.config.schema import RunConfig, SimulateConfig
from uhg.data import loader, open_store
from uhg.data.loader import HitDataset
from uhg.errors import ConfigError, StoreError
from uhg.train.data import TrainingData, simulate_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

PART_SIZE = 12


def make_config(store: Path, on_corrupt: str, output_dir: Path | None = None, validation_fraction: float = 0.25,
                **sections: dict) -> RunConfig:
    return config_from_dict({
        "name": "tiny-data", "geometry": "pxd-tiny", "output_dir": str(output_dir) if output_dir else None,
        "data": {"store": str(store), "validation_fraction": validation_fraction, "on_corrupt": on_corrupt},
        "model": {"family": "gan", "z_dim": 8, "embed_dim": 16, "attention_layers": 1, "attention_heads": 2},
        "train": {"steps": 4, "batch_size": 2}, **sections,
    })


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "intact.zarr"
    simulate_store(path, "pxd-tiny", SimulateConfig(n_events=3 * PART_SIZE, part_size=PART_SIZE,
                                                    luminosity_min=1.0e34, luminosity_max=4.0e34), progress=False)
    return path


def corrupt_copy(intact: Path, target: Path, parts: tuple[int, ...] = (1,)) -> Path:
    """A copy of `intact` with one byte flipped in chunk c/0 of array 'value' of each of `parts`."""
    shutil.copytree(intact, target)
    for part in parts:
        chunk = target / "parts" / f"p{part:06d}" / "value" / "c" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    return target


@pytest.fixture(params=["in memory", "per part"])
def held(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the loader serves events: whole stores read at open, or parts read when used."""
    if request.param == "per part":
        monkeypatch.setattr(loader, "IN_MEMORY_MAX_HITS", 0)
    return request.param


def loader_validation_events(store: Path, fraction: float = 0.25) -> np.ndarray:
    """Planned event numbers of the loader's own "val" split of `store` (an independent reader)."""
    ds = HitDataset(store, 1, split="val", val_fraction=fraction, shuffle=False)
    return ds.stores[0].event_ids[ds.events]


def test_training_validation_and_evaluation_hold_out_the_loaders_split(intact: Path, tmp_path: Path,
                                                                        held: str) -> None:
    """One split rule: the run's validation events (validation passes and end-of-run evaluation)
    are the loader's "val" split, no training step ever draws one of them, and the split is by
    event number (a store written again from the same plan holds out the same events)."""
    cfg = make_config(intact, "stop")
    data = TrainingData.open(cfg)
    assert data.dataset.in_memory == (held == "in memory")
    val = data.validation_ids()
    assert 0 < len(val) < data.n_events and data.n_validation == len(val) and data.n_train == data.n_events - len(val)
    np.testing.assert_array_equal(data.stores[0].event_ids[val], loader_validation_events(intact))
    assert not np.array_equal(val, np.arange(data.n_events - len(val), data.n_events))  # not "the last events"
    np.testing.assert_array_equal(data.train_ids, np.setdiff1d(np.arange(data.n_events), val))

    # training steps over three epochs draw training events only, each once per epoch (a world
    # of one draws the stream's positions in order, so its first n_train events are epoch 0)
    drawn = np.concatenate([data.dataset.step_ids(s) for s in range(1, 3 * data.n_train // cfg.train.batch_size)])
    assert not set(drawn.tolist()) & set(val.tolist())
    assert sorted(drawn[:data.n_train].tolist()) == data.train_ids.tolist()

    # the end-of-run evaluation's reference: the first evaluate.events validation events
    # (tests/test_finish_run.py checks a finished run's held-out report names them)
    reference = data.events(data.validation_ids(cfg.evaluate.events))
    want = open_store(intact).take(val[:cfg.evaluate.events])
    np.testing.assert_array_equal(reference.conditions["luminosity"], want.conditions["luminosity"])
    np.testing.assert_array_equal(reference.columns["row"], want.columns["row"])

    # the same plan written again (another time, another folder) holds out the same events
    again = tmp_path / "again.zarr"
    simulate_store(again, "pxd-tiny", SimulateConfig(n_events=3 * PART_SIZE, part_size=PART_SIZE,
                                                     luminosity_min=1.0e34, luminosity_max=4.0e34), progress=False)
    np.testing.assert_array_equal(TrainingData.open(make_config(again, "stop")).validation_ids(), val)


def test_evaluate_final_without_held_out_events_fails_before_training(intact: Path) -> None:
    cfg = make_config(intact, "stop", validation_fraction=0.001, evaluate={"final": True})
    with pytest.raises(ConfigError, match="holds out none of the 36 events, and evaluate.final needs held-out events"):
        TrainingData.open(cfg)


def test_stop_names_store_part_array_and_chunk(intact: Path, tmp_path: Path, held: str) -> None:
    store = corrupt_copy(intact, tmp_path / "corrupt.zarr")
    named = f"store {store}, part 1, array 'value': chunk c/0 is corrupt"
    if held == "in memory":  # the stores are read whole at open
        with pytest.raises(StoreError, match=named):
            TrainingData.open(make_config(store, "stop"))
        return
    data = TrainingData.open(make_config(store, "stop"))
    assert not data.dataset.in_memory and data.skipped_events == 0
    with pytest.raises(StoreError, match=named):  # when a batch first touches part 1
        data.events(np.arange(data.n_events))


def test_skip_leaves_the_unreadable_part_out(intact: Path, tmp_path: Path, held: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    store = corrupt_copy(intact, tmp_path / "corrupt.zarr")
    with caplog.at_level(logging.WARNING, logger="uhg.train.data"):
        data = TrainingData.open(make_config(store, "skip"))
    assert data.dataset.in_memory == (held == "in memory")
    assert data.skipped_events == PART_SIZE
    assert data.n_events == 24 and data.n_train + data.n_validation == 24
    # the split is by planned event number: leaving part 1 out moves no other event between splits
    kept = np.r_[0:12, 24:36]
    np.testing.assert_array_equal(data.stores[0].event_ids[data.validation_ids()],
                                  np.intersect1d(loader_validation_events(intact), kept))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"leaving out part 1 (events 12-23) of store {store}" in warnings[0]
    assert f"store {store}, part 1, array 'value': chunk c/0 is corrupt" in warnings[0]

    # every event served (training and validation) is one of parts 0 and 2, each exactly once
    reference = open_store(intact)
    served = data.events(np.arange(data.n_events))
    np.testing.assert_array_equal(served.conditions["luminosity"], reference.conditions["luminosity"][kept])
    np.testing.assert_array_equal(served.offsets, reference.take(kept).offsets)
    # one epoch of the batch order walks the training events only
    steps = np.concatenate([data.dataset.step_ids(s) for s in range(1, data.n_train // 2 + 1)])
    assert sorted(steps.tolist()) == data.train_ids[:len(steps)].tolist() == sorted(set(steps.tolist()))


def test_skip_stops_when_no_part_can_be_read(intact: Path, tmp_path: Path) -> None:
    store = corrupt_copy(intact, tmp_path / "corrupt.zarr", parts=(0, 1, 2))
    with pytest.raises(StoreError, match=f"none of the 36 events of {store} can be read"):
        TrainingData.open(make_config(store, "skip"))


def _open_on_rank(rank: int, world: int, port: int, store: str, out: str) -> None:
    """One rank of a gloo process group: opens the data with on_corrupt=skip."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = TrainingData.open(make_config(Path(store), "skip"), rank, world)
        result = {"skipped": data.skipped_events, "n_train": data.n_train,
                  "event_ids": data.stores[0].event_ids.tolist(), "validation": data.validation_ids().tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_leaves_out_the_same_parts(intact: Path, tmp_path: Path) -> None:
    """Rank 0 reads parts 0 and 2, rank 1 reads part 1: rank 0 learns of the corrupt part only
    from rank 1, and both serve the same 24 events."""
    store = corrupt_copy(intact, tmp_path / "corrupt.zarr")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_on_rank, args=(r, 2, port, str(store), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["skipped"] == PART_SIZE and results[0]["n_train"] == 24 - len(results[0]["validation"])
    assert results[0]["event_ids"] == [*range(0, 12), *range(24, 36)]


@pytest.mark.slow  # a 4-step run with MLflow: 25-74 s on the shared 2-core machine
def test_local_run_skips_the_corrupt_part_and_counts_it_in_mlflow(intact: Path, tmp_path: Path, world_of_one: None,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """What `uhg train --local --set data.on_corrupt=skip` does, in this process: the run completes
    and its MLflow run holds the number of events left out."""
    from mlflow import MlflowClient

    from uhg.train.local import run_local

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = corrupt_copy(intact, tmp_path / "corrupt.zarr")
    cfg = make_config(store, "skip", output_dir=tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="uhg.train.data"):
        result = run_local(cfg, tracking=True)
    assert result.step == 4 and result.export is not None
    named = [r for r in caplog.records if f"store {store}, part 1, array 'value': chunk c/0" in r.getMessage()]
    assert len(named) == 1

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data_skipped_events"] == PART_SIZE
    data = TrainingData.open(cfg)  # the same events the run kept and split
    assert (run.data.params["train_events"], run.data.params["validation_events"]) == (str(data.n_train),
                                                                                      str(data.n_validation))
