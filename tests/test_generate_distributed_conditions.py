"""`uhg generate --conditions FILE`: per-event conditions through the part-wise writer (in this
process; the Ray path runs the same job, see test_generate_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from overlay_stores import export_untrained_gan, part_files

from uhg.cli import main
from uhg.data.store import open_store
from uhg.models.generator import Generator


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_untrained_gan(tmp_path_factory.mktemp("model") / "export", "pxd-tiny", seed=4, embed_dim=32,
                                z_dim=16, sensor_noise_dim=4, attention_layers=1, decoder_channels=[16, 8])


def test_per_event_conditions_file(export, tmp_path) -> None:
    luminosity = np.geomspace(1e34, 3e34, 6)
    np.savez(tmp_path / "conditions.npz", luminosity=luminosity)
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(export), "--events", "6", "--out", str(out), "--seed", "2",
                 "--conditions", str(tmp_path / "conditions.npz"), "--part-size", "3", "--batch-size", "3"]) == 0
    store = open_store(out)
    np.testing.assert_array_equal(store.conditions["luminosity"], luminosity)
    expected = Generator.load(export).generate({"luminosity": luminosity[3:]}, seed=2, first_event=3, batch_size=3)
    got = store.read(3, 6)
    for column in ("sensor", "row", "col", "value"):
        np.testing.assert_array_equal(got.columns[column], expected.columns[column])
    assert store.attrs["attributes"]["generated"]["model"] == str(export)
    # Rerunning the same command finds nothing to do and keeps the store.
    before = part_files(out)
    assert main(["generate", "--model", str(export), "--events", "6", "--out", str(out), "--seed", "2",
                 "--conditions", str(tmp_path / "conditions.npz"), "--part-size", "3", "--batch-size", "3"]) == 0
    assert part_files(out) == before


def test_bad_conditions_files(export, tmp_path, capsys) -> None:
    def error_of(conditions: dict) -> str:
        path = tmp_path / "conditions.json"
        path.write_text(json.dumps(conditions))
        assert main(["generate", "--model", str(export), "--events", "4", "--out", str(tmp_path / "gen"),
                     "--conditions", str(path)]) == 2
        return capsys.readouterr().err

    assert "'luminosity' has shape (3,); expected a scalar or (4,)" in error_of({"luminosity": [1e34, 2e34, 3e34]})
    assert "needs conditions ['luminosity']; missing ['luminosity']" in error_of({"her_current": 1.0})
