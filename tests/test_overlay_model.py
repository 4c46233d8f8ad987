"""Overlays with generated background: a real (untrained) GAN export, loaded from a folder or
through the MLflow model registry (`models:/name@alias`), and the errors a user can make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from overlay_stores import export_untrained_gan, part_files, simulated_store

from uhg.cli import main
from uhg.data.store import open_store
from uhg.generate.distributed import model_id
from uhg.models.generator import Generator
from uhg.sparse.overlay import merge_overlay

SMALL_GAN = {"embed_dim": 32, "z_dim": 16, "sensor_noise_dim": 4, "attention_layers": 1, "decoder_channels": [16, 8]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"signal": simulated_store(root / "signal", "signal", "pxd-tiny", 8, 4, seed=1),
            "mini": simulated_store(root / "mini", "signal", "pxd-mini", 2, 2, seed=3),
            "export": export_untrained_gan(root / "export", "pxd-tiny", seed=4, **SMALL_GAN)}


def test_overlay_merges_generated_background(inputs, tmp_path) -> None:
    out = tmp_path / "overlay"
    assert main(["overlay", "--signal", str(inputs["signal"]), "--model", str(inputs["export"]),
                 "--luminosity", "2e34", "--seed", "9", "--batch-size", "4", "--out", str(out)]) == 0
    result, signal = open_store(out), open_store(inputs["signal"])
    generator = Generator.load(inputs["export"])
    # Part 1 = events 4..7: background event j is event j of the generator run with seed 9.
    background = generator.generate({"luminosity": np.full(4, 2e34)}, seed=9, first_event=4, batch_size=4)
    expected = merge_overlay(signal.read(4, 8), background, signal.geometry)
    got = result.read(4, 8)
    for column in ("sensor", "row", "col", "value", "origin"):
        np.testing.assert_array_equal(got.columns[column], expected.columns[column])
    np.testing.assert_array_equal(got.offsets, expected.offsets)
    assert np.all(got.conditions["luminosity"] == 2e34)
    assert np.count_nonzero(got.columns["origin"] == 2) > 0, "the generator produced no background hits"
    provenance = result.attrs["attributes"]["overlay"]["background"]
    assert provenance["model"] == str(inputs["export"])
    assert provenance["model_id"] == model_id(inputs["export"])
    assert provenance["conditions"] == {"luminosity": 2e34}
    assert result.attrs["provenance"]["seed"] == 9


def test_overlay_with_mlflow_registered_model(inputs, tmp_path, monkeypatch) -> None:
    from uhg.tracking.mlflow_logger import open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with open_run(experiment="overlay-test", run_name="tiny", tracking_uri=uri, system_metrics=False) as run:
        run.register_model(inputs["export"], "tiny-background", alias="prod")
    common = ["--signal", str(inputs["signal"]), "--luminosity", "2e34", "--seed", "9"]
    assert main(["overlay", *common, "--model", "models:/tiny-background@prod", "--out", str(tmp_path / "a")]) == 0
    assert main(["overlay", *common, "--model", str(inputs["export"]), "--out", str(tmp_path / "b")]) == 0
    assert part_files(tmp_path / "a") == part_files(tmp_path / "b")
    provenance = open_store(tmp_path / "a").attrs["attributes"]["overlay"]["background"]
    assert provenance["model"] == "models:/tiny-background@prod"
    assert provenance["model_id"] == model_id(inputs["export"])
    assert main(["overlay", *common, "--model", "models:/tiny-background@nope", "--out", str(tmp_path / "c")]) == 2


def test_model_errors_are_clear(inputs, tmp_path, capsys) -> None:
    def error_of(*args: str) -> str:
        assert main(["overlay", *args, "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    err = error_of("--signal", str(inputs["signal"]), "--model", str(inputs["export"]))
    assert "needs conditions ['luminosity']" in err and "missing ['luminosity']" in err
    err = error_of("--signal", str(inputs["mini"]), "--model", str(inputs["export"]), "--luminosity", "2e34")
    assert "generates geometry 'pxd-tiny'" in err and "'pxd-mini'" in err
    err = error_of("--signal", str(inputs["signal"]), "--model", str(inputs["signal"]), "--luminosity", "2e34")
    assert "not a generator export" in err
