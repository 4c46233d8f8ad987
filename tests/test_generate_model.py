"""Generator exports: loading reads only JSON + safetensors (nothing is unpickled), generation
is a pure function of (seed, event index) whatever the batch size or split, `uhg generate`
writes a standard store, and broken exports are refused by name."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.cli import main
from uhg.config import config_from_dict
from uhg.data.hits import HitBatch
from uhg.data.reader import open_store
from uhg.errors import CheckpointError, ConditionError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.generator import Generator
from uhg.train.export import export_generator
from uhg.train.family import build_family

MODEL = {"family": "gan", "embed_dim": 16, "attention_layers": 1, "attention_heads": 2, "z_dim": 8,
         "sensor_noise_dim": 2, "decoder_channels": [8, 4], "discriminator_channels": [4, 8]}


def make_export(path: Path, geometry: str = "pxd-tiny") -> Path:
    """An export of freshly initialised weights (what the training loop writes at its end)."""
    calo = get_geometry(geometry).kind == "calo"
    cond = "incident_energy" if calo else "luminosity"
    cfg = config_from_dict({"name": "g", "geometry": geometry, "data": {"store": "unused.zarr"},
                            "model": {**MODEL, "conditions": [cond]}, "train": {"steps": 1, "batch_size": 1}})
    norm = ConditionNorm.from_ranges({cond: (1e3, 1e5) if calo else (1e34, 4e34)}, [cond])
    family = build_family(get_geometry(geometry), cfg.model, norm)
    torch.manual_seed(0)
    g = family.build_modules()["generator"]
    # move the hit gate up so events carry a fair number of hits
    with torch.no_grad():
        g.head.bias[: g.shuffle**2] = -2.0
    return export_generator(path, family, cfg, g.state_dict(), step=1)


@pytest.fixture(scope="module")
def pxd_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "export")


def same(a: HitBatch, b: HitBatch) -> bool:
    return np.array_equal(a.offsets, b.offsets) and all(np.array_equal(a.columns[k], b.columns[k]) for k in a.columns)


def test_export_loads_without_unpickling(pxd_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(p.name for p in pxd_export.iterdir()) == ["generator.json", "generator.safetensors"]

    class NoUnpickling(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the export loader must not unpickle")

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickling)
    monkeypatch.setattr(pickle, "load", NoUnpickling)
    monkeypatch.setattr(pickle, "loads", NoUnpickling)
    gen = Generator.load(pxd_export)
    assert gen.condition_names == ["luminosity"] and gen.geometry.name == "pxd-tiny"
    assert len(gen.generate({"luminosity": np.full(2, 2e34)}, seed=1)) == 2


def test_model_overrides_set_sampling_keys_over_the_export(pxd_export: Path) -> None:
    """`Generator.load(..., model_overrides=...)`: a sampling key of the export's model (bf16 decoding)
    changes the events, not the weights; a key that does not exist is an error naming the export."""
    plain = Generator.load(pxd_export)
    bf16 = Generator.load(pxd_export, model_overrides={"sample_precision": "bf16"})
    assert plain.module.cfg.sample_precision == "fp32" and bf16.module.cfg.sample_precision == "bf16"
    for k, v in plain.module.state_dict().items():
        assert torch.equal(v, bf16.module.state_dict()[k])
    lum = np.full(3, 3e34)
    a, b = plain.generate({"luminosity": lum}, seed=2), bf16.generate({"luminosity": lum}, seed=2)
    assert a.n_hits > 0 and b.n_hits > 0 and not same(a, b)
    assert same(b, Generator.load(pxd_export, model_overrides={"sample_precision": "bf16"})
                .generate({"luminosity": lum}, seed=2))
    with pytest.raises(CheckpointError, match="generator.json"):
        Generator.load(pxd_export, model_overrides={"sample_precison": "bf16"})


def test_bf16_sampling_on_a_cpu_without_amx_warns(pxd_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(UserWarning, match="without AMX is slower than fp32"):
        Generator.load(pxd_export, model_overrides={"sample_precision": "bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Generator.load(pxd_export)


def hit_keys(b: HitBatch) -> set[tuple[int, ...]]:
    cols = [b.event_index()] + [b.columns[k] for k in sorted(b.columns)]
    return set(zip(*(c.tolist() for c in cols), strict=True))


@pytest.mark.slow  # 22 s on the shared 2-core machine
def test_same_seed_same_events_for_any_split(pxd_export: Path) -> None:
    gen = Generator.load(pxd_export)
    lum = np.geomspace(1e34, 8e34, 10)  # includes extrapolation beyond the training range
    whole = gen.generate({"luminosity": lum}, seed=3, batch_size=4)
    assert whole.n_hits > 0
    assert same(whole, gen.generate({"luminosity": lum}, seed=3, batch_size=4))
    # parts on the batch grid and off it: bit-identical for the same batch size, by construction
    for cuts in ([0, 4, 8, 10], [0, 3, 7, 10], [0, 1, 2, 9, 10]):
        parts = [gen.generate({"luminosity": lum[a:b]}, seed=3, first_event=a, batch_size=4)
                 for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert same(whole, HitBatch.concat(parts)), cuts
    # other batch sizes: the same events up to rounding at the firing threshold
    for bs in (1, 3, 16):
        other = gen.generate({"luminosity": lum}, seed=3, batch_size=bs)
        differ = len(hit_keys(whole) ^ hit_keys(other))
        assert differ <= 1e-3 * whole.n_hits, (bs, differ, whole.n_hits)
    assert not same(whole, gen.generate({"luminosity": lum}, seed=4, batch_size=4))


def test_generate_cli_writes_identical_stores(pxd_export: Path, tmp_path: Path) -> None:
    for name in ("a.zarr", "b.zarr"):
        rc = main(["generate", "--model", str(pxd_export), "--events", "6", "--out", str(tmp_path / name),
                   "--luminosity", "3e34", "--seed", "9", "--batch-size", "2"])
        assert rc == 0
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    assert len(a) == 6 and a.geometry.name == "pxd-tiny"
    assert same(a.read(0, 6), b.read(0, 6))
    assert np.allclose(a.conditions["luminosity"], 3e34)
    assert main(["generate", "--model", str(pxd_export), "--events", "2", "--out", str(tmp_path / "c.zarr")]) == 2


def test_calorimeter_generation(tmp_path: Path) -> None:
    export = make_export(tmp_path / "calo", "ds2")
    rc = main(["generate", "--model", str(export), "--events", "4", "--out", str(tmp_path / "s.zarr"),
               "--energy-min", "1000", "--energy-max", "50000", "--batch-size", "4"])
    assert rc == 0
    store = open_store(tmp_path / "s.zarr")
    e = store.conditions["incident_energy"]
    assert len(store) == 4 and e.min() >= 1000 and e.max() <= 50000 and len(set(e)) == 4


def test_broken_exports_are_named(pxd_export: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a uhg generator export"):
        Generator.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "generator.json").write_text((pxd_export / "generator.json").read_text())
    raw = (pxd_export / "generator.safetensors").read_bytes()
    (broken / "generator.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"generator.safetensors: corrupt weights"):
        Generator.load(broken)
    meta = json.loads((pxd_export / "generator.json").read_text())
    meta["model"]["embed_dim"] = 32
    (broken / "generator.json").write_text(json.dumps(meta))
    (broken / "generator.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        Generator.load(broken)
    with pytest.raises(ConditionError, match="needs condition"):
        Generator.load(pxd_export).generate({"incident_energy": np.ones(2)}, seed=0)


def test_generate_beyond_the_training_range_says_how_far(pxd_export: Path, tmp_path: Path, capsys) -> None:
    # the export was trained on 1e34 .. 4e34
    assert main(["generate", "--model", str(pxd_export), "--events", "2", "--out", str(tmp_path / "in.zarr"),
                 "--luminosity", "3e34"]) == 0
    assert "training maximum" not in capsys.readouterr().err
    assert main(["generate", "--model", str(pxd_export), "--events", "2", "--out", str(tmp_path / "out.zarr"),
                 "--luminosity", "1.2e35"]) == 0
    err = capsys.readouterr().err
    assert "luminosity 1.2e+35 is 3x the training maximum 4e+34" in err and "0.79 training widths" in err
    assert main(["generate", "--model", str(pxd_export), "--events", "2", "--out", str(tmp_path / "low.zarr"),
                 "--luminosity", "5e33"]) == 0
    assert "0.5x the training minimum 1e+34" in capsys.readouterr().err


def test_integer_buffers_survive_export_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator with an integer buffer (indices, counts) exports it at its own dtype, the
    EMA path carries it beside the averaged weights, and loading restores it; an export without
    it is refused by name instead of loading the buffer's initial value."""
    from uhg.models import gan
    from uhg.models.common import EMA
    from uhg.train.engine import PlainEngine
    from uhg.train.loop import _generator_state

    index = 2**25 + 1  # not representable in float32
    init = gan.Generator.__init__

    def with_index(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("picked", torch.zeros(3, dtype=torch.int64))

    monkeypatch.setattr(gan.Generator, "__init__", with_index)
    cfg = config_from_dict({"name": "g", "geometry": "pxd-tiny", "data": {"store": "unused.zarr"},
                            "model": {**MODEL, "conditions": ["luminosity"]}, "train": {"steps": 1, "batch_size": 1}})
    family = build_family(get_geometry("pxd-tiny"), cfg.model,
                          ConditionNorm.from_ranges({"luminosity": (1e34, 4e34)}, ["luminosity"]))
    g = family.build_modules()["generator"]
    g.picked.fill_(index)
    state = _generator_state(family, {"generator": PlainEngine(g, torch.optim.SGD(g.parameters(), lr=0.1))}, EMA(g, 0.99))
    assert state["picked"].dtype == torch.int64 and int(state["picked"][0]) == index

    export = export_generator(tmp_path / "export", family, cfg, state, step=1)
    loaded = Generator.load(export)
    assert loaded.module.picked.dtype == torch.int64 and loaded.module.picked.tolist() == [index] * 3

    from safetensors.torch import load_file, save_file

    weights = export / "generator.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if k != "picked"}, str(weights))
    with pytest.raises(CheckpointError, match="picked"):
        Generator.load(export)
    # an export of the format before integer buffers were written keeps the model's own values
    sidecar = export / "generator.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "format": "uhg-generator/1"}))
    assert Generator.load(export).module.picked.tolist() == [0, 0, 0]
