"""`uhg eval` end to end on small real stores: files, numbers, bad input, MLflow."""

import json
import re
import shutil

import pytest

from uhg.cli import main
from uhg.data.hits import HitBatch
from uhg.data.writer import create_store, write_part
from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers
from uhg.sim.pxd_background import simulate_pxd_background

PXD = get_geometry("pxd-tiny")
CALO = get_geometry("ds1-photons")


def write_store(path, batch: HitBatch, geometry, part_size=100):
    conds = {k: {"min": float(v.min()) if len(v) else 0.0, "max": float(v.max()) if len(v) else 0.0, "unit": ""}
             for k, v in batch.conditions.items()}
    create_store(path, batch.kind, geometry, len(batch), part_size, conditions=conds)
    for p, start in enumerate(range(0, len(batch), part_size)):
        write_part(path, p, batch.slice(start, min(start + part_size, len(batch))))
    return str(path)


@pytest.fixture(scope="module")
def pxd_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("pxd")
    return {
        "ref": write_store(d / "ref.zarr", simulate_pxd_background(PXD, 240, 1, luminosity=4e35), PXD),
        "ref2": write_store(d / "ref2.zarr", simulate_pxd_background(PXD, 120, 2, luminosity=4e35), PXD),
        # generated stand-in: the reference simulator at 1.5x the luminosity
        "gen": write_store(d / "gen.zarr", simulate_pxd_background(PXD, 120, 3, luminosity=6e35), PXD),
        "few": write_store(d / "few.zarr", simulate_pxd_background(PXD, 6, 4, luminosity=4e35), PXD),
    }


@pytest.fixture(scope="module")
def calo_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("calo")
    return write_store(d / "ref.zarr", simulate_calo_showers(CALO, 60, 1, energy_min=1e3, energy_max=1e4), CALO)


def test_uhg_eval_writes_tables_plots_and_report(pxd_stores, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--reference", pxd_stores["ref"], "--reference2", pxd_stores["ref2"],
               "--generated", pxd_stores["gen"], "--out", str(out), "--repeats", "3", "--classifier-repeats", "1",
               "--training-range", "luminosity=1e35:4e35"])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    doc = json.loads((out / "metrics.json").read_text())
    rows = {(r["feature"], r["metric"]): r for r in doc["metrics"]}
    # 1.5x luminosity: occupancy clearly above the reference, far outside the floor
    occ = rows[("occupancy_per_sensor", "rel_diff_of_mean")]
    assert occ["value"] > 0.3 and abs(occ["floor"]) < 0.1 and occ["floor_std"] > 0
    sp = rows[("occupancy_per_image", "separation_power")]
    assert sp["value"] > 3 * sp["floor"]
    assert rows[("charge", "separation_power")]["floor"] < 0.05
    for key in [("classifier_low_level", "roc_auc"), ("sensor_occupancy_correlation", "mean_abs_diff"),
                ("cluster_size", "ks"), ("occupancy_vs_z_layer2", "mean_abs_rel_error")]:
        assert key in rows
    assert [h["feature"] for h in doc["headline"]][:2] == ["occupancy_per_sensor", "occupancy_per_sensor"]
    assert any("training range" in w for w in doc["warnings"])
    md = (out / "metrics.md").read_text()
    assert "| charge | separation_power |" in md and "floor" in md
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"dist_charge.png", "dist_cluster_size.png", "profile_occupancy_per_sensor.png",
            "corr_sensor_occupancy_correlation.png", "profile_occupancy_vs_phi_layer1.png"} <= set(pngs)
    assert set(re.findall(r'src="([^"]+\.png)"', html)) == set(pngs)
    assert all((out / p).stat().st_size > 5000 for p in pngs)


def test_too_few_events_still_render_and_say_what_is_missing(pxd_stores, tmp_path):
    out = tmp_path / "few"
    assert main(["eval", "--reference", pxd_stores["ref"], "--generated", pxd_stores["few"], "--out", str(out),
                 "--repeats", "2"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    skipped = {s["feature"]: s["reason"] for s in doc["skipped"]}
    assert "needs >= 10 events per sample, have 6" in skipped["charge"]
    assert "classifier_high_level" in skipped and "sensor_occupancy_correlation" in skipped
    assert "Not computed" in (out / "metrics.md").read_text()
    assert (out / "report.html").exists() and (out / "dist_charge.png").exists()


def test_calorimeter_store_without_second_reference(calo_store, tmp_path):
    out = tmp_path / "calo"
    assert main(["eval", "--reference", calo_store, "--generated", calo_store, "--out", str(out),
                 "--repeats", "2", "--no-classifier"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    rows = {(r["feature"], r["metric"]): r for r in doc["metrics"]}
    assert ("response_vs_energy", "rel_diff_of_mean") in rows and ("energy_per_layer", "mean_abs_rel_error") in rows
    assert "two random halves" in doc["inputs"]["floor from"]
    assert (out / "binned_response_vs_energy.png").exists() and (out / "layers_centre_x.png").exists()
    assert "mean over" in (out / "metrics.md").read_text()  # per-layer rows summarised


def test_bad_input_gives_one_clear_message(pxd_stores, calo_store, tmp_path, capsys):
    def run(*args):
        rc = main(["eval", *args, "--out", str(tmp_path / "x")])
        return rc, capsys.readouterr().err

    rc, err = run("--reference", pxd_stores["ref"], "--generated", calo_store)
    assert rc == 2 and "calo events" in err and calo_store in err and "Traceback" not in err
    mini = write_store(tmp_path / "mini.zarr", simulate_pxd_background(get_geometry("pxd-mini"), 3, 1), get_geometry("pxd-mini"))
    rc, err = run("--reference", pxd_stores["ref"], "--generated", mini)
    assert rc == 2 and "'pxd-mini'" in err and "'pxd-tiny'" in err
    empty = tmp_path / "empty.zarr"
    create_store(empty, "pixel", PXD, 0, 10, conditions={"luminosity": {"min": 0, "max": 0, "unit": ""}})
    rc, err = run("--reference", pxd_stores["ref"], "--generated", str(empty))
    assert rc == 2 and "holds no events" in err
    old = tmp_path / "old.zarr"
    shutil.copytree(pxd_stores["few"], old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["schema"] = "uhg-store/0"
    (old / "zarr.json").write_text(json.dumps(meta))
    rc, err = run("--reference", pxd_stores["ref"], "--generated", str(old))
    assert rc == 2 and "schema" in err and "uhg-store/0" in err
    rc, err = run("--reference", pxd_stores["ref"], "--generated", str(tmp_path / "missing.zarr"))
    assert rc == 2 and "missing.zarr" in err
    rc, err = run("--reference", pxd_stores["ref"], "--generated", pxd_stores["gen"], "--training-range", "lumi=3")
    assert rc == 2 and "NAME=LOW:HIGH" in err
    rc, err = run("--reference", pxd_stores["ref"])
    assert rc == 2 and "--generated" in err


def test_the_model_training_range_is_read_from_the_export_the_store_names(pxd_stores, tmp_path):
    from uhg.models.common import ConditionNorm

    export = tmp_path / "export"
    export.mkdir()
    norm = ConditionNorm.from_ranges({"luminosity": (1e35, 2e35)}, ["luminosity"])
    (export / "generator.json").write_text(json.dumps({"condition_norm": norm.to_dict()}))
    batch = simulate_pxd_background(PXD, 12, 7, luminosity=4e35)
    conds = {"luminosity": {"min": 4e35, "max": 4e35, "unit": "cm^-2 s^-1"}}
    gen = tmp_path / "gen.zarr"
    create_store(gen, "pixel", PXD, 12, 12, conditions={**conds, "her_current": {"min": 0, "max": 9, "unit": "A"},
                                                        "ler_current": {"min": 0, "max": 9, "unit": "A"},
                                                        "beta_y_star": {"min": 0, "max": 1, "unit": "mm"}},
                 attributes={"generated": {"model": str(export)}})
    write_part(gen, 0, batch)
    out = tmp_path / "o"
    assert main(["eval", "--reference", pxd_stores["ref"], "--generated", str(gen), "--out", str(out),
                 "--repeats", "2", "--no-classifier", "--no-plots"]) == 0
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert any("100.0% of the generated events have luminosity outside the model's training range" in w
               for w in warnings), warnings


def test_metrics_and_report_go_to_an_existing_mlflow_run(calo_store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("eval-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    assert main(["eval", "--reference", calo_store, "--generated", calo_store, "--out", str(tmp_path / "o"),
                 "--repeats", "2", "--no-classifier", "--no-plots", "--mlflow-run", run_id]) == 0
    run = client.get_run(run_id)
    assert "eval/response/separation_power" in run.data.metrics
    assert "eval/response/separation_power/floor" in run.data.metrics
    names = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert "eval/report.html" in names and "eval/metrics.json" in names
    assert main(["eval", "--reference", calo_store, "--generated", calo_store, "--out", str(tmp_path / "o"),
                 "--mlflow-run", "0123456789abcdef"]) == 2
