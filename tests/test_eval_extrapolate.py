"""Zero-shot protocol: config checks, baselines, and a full run with a sanity-check generator."""

import json
from pathlib import Path

import numpy as np
import pytest

from uhg.cli import main
from uhg.config import load_config
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.eval.baselines import overlay_baseline, scale_baseline, thin
from uhg.eval.extrapolate import ExtrapolationConfig, load_protocol, run_protocol
from uhg.eval.features_pxd import pixel_clusters
from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import SHIPPED_SCENARIOS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

PXD = get_geometry("pxd-tiny")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ReferenceSimulatorAtWrongLuminosity:
    """Sanity-check stand-in for a trained model: the reference simulator itself, run at
    `factor` times the requested luminosity. A protocol that cannot see this is broken."""

    condition_names = ["luminosity"]

    def __init__(self, factor: float):
        self.factor = factor

    def generate(self, conditions, seed, first_event=0, batch_size=16):
        lum = np.asarray(conditions["luminosity"])
        batch = simulate_pxd_background(PXD, len(lum), seed, first_event=first_event,
                                        luminosity=float(lum[0]) * self.factor)
        return HitBatch("pixel", batch.columns, batch.offsets, {"luminosity": lum.copy()})


def test_shipped_protocols_are_valid():
    pxd = load_protocol(CONFIGS / "extrapolate_pxd_luminosity.yaml")
    assert pxd.condition == "luminosity" and pxd.test_points()[-1] == pytest.approx(3 * pxd.training_range[1])
    calo = load_protocol(CONFIGS / "extrapolate_calo_energy.yaml")
    assert calo.condition == "incident_energy" and calo.test_points()[-1] == pytest.approx(10 * calo.training_range[1])
    layers = load_protocol(CONFIGS / "extrapolate_calo_layers_energy.yaml")
    assert layers.training_range == pytest.approx((1e3, 1e5)) and layers.test_points()[-1] == pytest.approx(1e6)
    scenarios = load_protocol(CONFIGS / "extrapolate_pxd_scenarios.yaml")
    assert scenarios.machine == list(SHIPPED_SCENARIOS) and scenarios.baseline == "overlay"
    assert scenarios.test_points() == pytest.approx([1.2e36, 1.6e36, 2.4e36])
    assert scenarios.training_range == pytest.approx((2e35, 8e35))
    # the in-range check sits at the top of the shipped mini configs' training range, with enough
    # events that the per-sensor occupancy floor is below the 3 % target (docs/results.md)
    inrange = load_protocol(CONFIGS / "extrapolate_pxd_mini_inrange.yaml")
    for run in ("pxd_transformer_mini", "pxd_gan_mini"):
        sim = load_config(CONFIGS / f"{run}.yaml").data.simulate
        assert inrange.training_range == pytest.approx((sim.luminosity_min, sim.luminosity_max))
        assert sim.seed in inrange.training_seeds
    assert inrange.test_points() == pytest.approx([inrange.training_range[1]]) and inrange.n_events >= 4000
    # the reference and baseline seeds of every shipped protocol are not the training seeds
    for protocol in (pxd, calo, layers, scenarios, inrange):
        assert protocol.training_seeds and not set(protocol.simulator_seeds().values()) & set(protocol.training_seeds)


def test_a_protocol_reusing_training_seeds_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("geometry: pxd-tiny\ncondition: luminosity\ntraining_range: [1.0e+35, 4.0e+35]\n"
                    "test_factors: [2]\nseed: 0\ntraining_seeds: [1]\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*reference seed 1 is a seed of the training data.*seed: 100"):
        load_protocol(path)
    # seeds the export recorded count too; an export that recorded none is refused
    cfg = ExtrapolationConfig(geometry="pxd-tiny", condition="luminosity", training_range=(2e35, 4e35),
                              test_factors=[2.0], n_events=4, repeats=2, classifier=False, out=str(tmp_path / "x"))
    generator = ReferenceSimulatorAtWrongLuminosity(1.0)
    generator.sidecar = {"training_data": {"seeds": [5, 2]}}
    with pytest.raises(ConfigError, match="reference 2 seed 2 is a seed of the training data"):
        run_protocol(cfg, generator)
    generator.sidecar = {}
    with pytest.raises(ConfigError, match="set training_seeds"):
        run_protocol(cfg, generator)
    with pytest.raises(ConfigError, match="machine: machine scenario .warp-drive.: neither a shipped scenario"):
        path.write_text(path.read_text().replace("seed: 0", "seed: 100") + "machine: warp-drive\n")
        load_protocol(path)


def test_protocol_per_machine_scenario(tmp_path, capsys):
    """Baseline-only protocol over two scenarios: each scenario's reference scales as its own
    machine does, and scenarios.md puts them side by side."""
    path = tmp_path / "p.yaml"
    path.write_text("geometry: pxd-tiny\ncondition: luminosity\ntraining_range: [2.0e+35, 8.0e+35]\n"
                    "test_factors: [3]\nmodel: null\nmachine: [luminosity-dominated, high-vacuum]\nn_events: 30\n"
                    "repeats: 2\nclassifier: false\nplots_per_condition: false\nseed: 100\n"
                    f"out: {tmp_path / 'scen'}\n")
    assert main(["eval", "extrapolate", "--config", str(path)]) == 0
    assert "| high-vacuum | 3 (outside)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "scen" / "scenarios.json").read_text())
    occ = {r["machine"]: r["occupancy"]["reference"] for r in rows}
    assert occ["high-vacuum"] > 1.5 * occ["luminosity-dominated"]  # 5.3 % vs 2.6 % at 2.4e36
    assert all(r["per-sensor MRE floor"] is not None for r in rows)
    assert (tmp_path / "scen" / "high-vacuum" / "extrapolation.json").exists()


def test_bad_protocols_name_the_file_and_key(tmp_path):
    def write(text):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        return path

    base = "geometry: pxd-tiny\ncondition: luminosity\ntraining_range: [1.0e+35, 4.0e+35]\n"
    with pytest.raises(ConfigError, match=r"p\.yaml.*test_factors"):
        load_protocol(write(base))
    with pytest.raises(ConfigError, match="n_event.*unknown key"):
        load_protocol(write(base + "test_factors: [2]\nn_event: 3\n"))
    with pytest.raises(ConfigError, match="'incident_energy' does not apply to pixel"):
        load_protocol(write(base.replace("condition: luminosity", "condition: incident_energy") + "test_factors: [2]\n"))
    with pytest.raises(ConfigError, match="0 < min <= max"):
        load_protocol(write(base.replace("1.0e+35, 4.0e+35", "4.0e+35, 1.0e+35") + "test_factors: [2]\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_protocol(tmp_path / "missing.yaml")


def test_overlay_baseline_superimposes_events_and_thins_whole_clusters():
    events = {}

    def sample(n, first):
        events[first] = simulate_pxd_background(PXD, n, 5, first_event=first, luminosity=4e35)
        return events[first]

    rng = np.random.default_rng(0)
    two = overlay_baseline(sample, PXD, 2.0, 20, rng)
    a, b = events[0], events[20]
    for i in range(20):
        ea, eb, eo = a.event(i), b.event(i), two.event(i)
        union = set(zip(ea.sensor, ea.row, ea.col, strict=True)) | set(zip(eb.sensor, eb.row, eb.col, strict=True))
        assert set(zip(eo.sensor, eo.row, eo.col, strict=True)) == union
        # a pixel fired in both events carries the summed charge (saturating at 255)
        qa = dict(zip(zip(ea.sensor, ea.row, ea.col, strict=True), ea.value.astype(int), strict=True))
        qb = dict(zip(zip(eb.sensor, eb.row, eb.col, strict=True), eb.value.astype(int), strict=True))
        for key, q in zip(zip(eo.sensor, eo.row, eo.col, strict=True), eo.value.astype(int), strict=True):
            assert q == min(255, qa.get(key, 0) + qb.get(key, 0))
    assert two.n_hits <= a.n_hits + b.n_hits and two.n_hits > 1.8 * a.n_hits
    half = thin(a, PXD, 0.5, np.random.default_rng(1))
    assert 0.3 * a.n_hits < half.n_hits < 0.7 * a.n_hits
    # thinning keeps clusters whole: every kept cluster has its original size
    _, n_full = pixel_clusters(a, PXD)
    _, n_half = pixel_clusters(half, PXD)
    assert half.n_hits / a.n_hits == pytest.approx(n_half / n_full, abs=0.15)


def test_scale_baseline_multiplies_cell_energies_and_incident_energy():
    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 5, 1, energies=np.full(5, 1e4))
    scaled = scale_baseline(showers, 3.0)
    assert np.allclose(scaled.columns["value"], 3 * showers.columns["value"], rtol=1e-6)
    assert np.allclose(scaled.conditions["incident_energy"], 3e4)
    assert np.array_equal(scaled.columns["cell"], showers.columns["cell"])


def test_protocol_flags_a_generator_at_the_wrong_luminosity(tmp_path):
    cfg = ExtrapolationConfig(geometry="pxd-tiny", condition="luminosity", training_range=(2e35, 4e35),
                              test_factors=[1.0, 2.0], n_events=40, repeats=2, classifier=False,
                              plots_per_condition=False, out=str(tmp_path / "ext"), training_seeds=[7])
    result = run_protocol(cfg, ReferenceSimulatorAtWrongLuminosity(0.5))
    out = tmp_path / "ext"
    doc = json.loads((out / "extrapolation.json").read_text())
    assert [p["in_training_range"] for p in doc["points"]] == [True, False]
    assert [p["value"] for p in doc["points"]] == pytest.approx([4e35, 8e35])
    for point in doc["points"]:
        occ = point["observables"]["mean occupancy [%]"]
        # the stand-in at half the luminosity is far below the reference; the floor sample is not
        assert occ["generated"] < 0.8 * occ["reference"]
        assert occ["reference 2"] == pytest.approx(occ["reference"], rel=0.25)
        row = next(r for r in point["metrics"] if (r["feature"], r["metric"]) == ("occupancy_per_sensor", "rel_diff_of_mean"))
        assert row["generated"] < -0.2 and abs(row["floor"]) < 0.1 and row["baseline"] is not None
        assert (out / point["directory"] / "report.html").exists()
    # overlay baseline at the training maximum is the reference itself (up to statistics);
    # at 2x it doubles the occupancy of the training maximum
    p1, p2 = (p["observables"]["mean occupancy [%]"] for p in doc["points"])
    assert p1["baseline"] == pytest.approx(p1["reference"], rel=0.25)
    assert p2["baseline"] == pytest.approx(2 * p1["baseline"], rel=0.15)
    assert (out / "trend_mean_occupancy.png").exists()
    assert (out / "trend_occupancy_per_sensor_rel_diff_of_mean.png").exists()
    md = (out / "extrapolation.md").read_text()
    assert "OUTSIDE the training range" in md and "naive baseline" in md
    assert "report.html" in result.summary() or "metrics.md" in result.summary()


@pytest.mark.slow  # 21 s on the shared 2-core machine
def test_uhg_eval_extrapolate_baseline_only_calorimeter(tmp_path, capsys):
    cfg = tmp_path / "calo.yaml"
    cfg.write_text(f"""geometry: ds1-photons
model: null
condition: incident_energy
training_range: [1.0e+3, 1.0e+4]
test_factors: [3.0]
n_events: 30
repeats: 2
classifier: false
plots_per_condition: true
out: {tmp_path / 'ext'}
""")
    assert main(["eval", "extrapolate", "--config", str(cfg)]) == 0
    assert "report:" in capsys.readouterr().out
    doc = json.loads((tmp_path / "ext" / "extrapolation.json").read_text())
    assert "only the naive baseline" in doc["warnings"][0]
    point = doc["points"][0]
    resp = point["observables"]["mean response"]
    assert set(resp) == {"reference", "reference 2", "baseline"}
    assert resp["baseline"] == pytest.approx(resp["reference"], rel=0.05)
    hits = point["observables"]["mean hits per shower"]
    assert set(hits) == set(resp) and hits["reference"] > 0
    # the resolution and mean depth of each sample at the test energy (the zero-shot targets)
    for name in ("resolution", "mean shower depth"):
        values = point["observables"][name]
        assert set(values) == set(resp) and all(0 < v < 100 for v in values.values())
    assert (tmp_path / "ext" / point["directory"] / "binned_response_vs_energy.png").exists()
    assert (tmp_path / "ext" / "trend_mean_response.png").exists()


def test_a_missing_model_export_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"geometry: pxd-tiny\nmodel: {tmp_path / 'no_export'}\ncondition: luminosity\n"
                   f"training_range: [1.0e+35, 4.0e+35]\ntest_factors: [2]\nn_events: 5\nout: {tmp_path / 'o'}\n")
    assert main(["eval", "extrapolate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no_export" in err and "Traceback" not in err


@pytest.mark.slow
def test_protocol_reports_the_count_law_band(tmp_path):
    """A transformer export whose count law was fitted (with bootstrap refits) to simulated
    training events: every protocol point carries the law's predicted mean occupancy and its
    band, and the export's conditions (luminosity, currents, beta_y*) come from the reference."""
    import torch

    from uhg.config import config_from_dict
    from uhg.models.common import ConditionNorm
    from uhg.sim.pxd_machine import CONDITIONS
    from uhg.train.export import export_generator
    from uhg.train.family import build_family

    torch.manual_seed(0)
    run = config_from_dict({
        "name": "law", "geometry": "pxd-tiny", "data": {"store": str(tmp_path / "unused.zarr")},
        "train": {"steps": 1, "batch_size": 2},
        "model": {"family": "transformer", "conditions": list(CONDITIONS), "d_model": 16, "n_layers": 1,
                  "n_heads": 2, "latent_dim": 0, "max_hits": 64, "multiplicity": "count", "count_bootstrap": 3}})
    train = simulate_pxd_background(PXD, 120, seed=1, luminosity=2e35, luminosity_max=4e35)
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    family = build_family(PXD, run.model, norm)
    modules = family.build_modules()
    assert "law_count_nll" in family.initialise_from_data(modules, [train])
    export = export_generator(tmp_path / "export", family, run, modules["model"].state_dict(), step=1)
    cfg = ExtrapolationConfig(geometry="pxd-tiny", model=str(export), condition="luminosity",
                              training_range=(2e35, 4e35), test_factors=[1.0, 2.0], n_events=4, repeats=2,
                              classifier=False, plots_per_condition=False, out=str(tmp_path / "ext"),
                              training_seeds=[1], seed=100, baseline="none")
    result = run_protocol(cfg)
    for point in result.points:
        law = point.observables["law mean occupancy [%]"]
        assert law["band low"] < law["predicted"] < law["band high"]
        assert 0.2 * point.observables["mean occupancy [%]"]["reference"] < law["predicted"]
        # pixel tokens: the law counts hits, so its reference is the reference's mean occupancy
        assert law["reference"] == pytest.approx(point.observables["mean occupancy [%]"]["reference"], rel=1e-9)
    inside, outside = (p.observables["law mean occupancy [%]"] for p in result.points)
    assert outside["band high"] - outside["band low"] > inside["band high"] - inside["band low"]
