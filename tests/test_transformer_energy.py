"""Calorimeter energy tokens relative to the incident energy (model.energy_reference: incident):
round trip of the value code at energies inside and far outside a training range, learning on
a few showers, config errors naming the key, and exports without the key loading as absolute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.config.loading import config_from_dict, load_config
from uhg.config.transformer import TransformerConfig
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.transformer import HitTransformer
from uhg.models.transformer_tokens import decode_tokens, encode_hits, layout_for_geometry
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "configs" / "calo_transformer_mini.yaml"
BINS, LO, HI = 64, 1.0e-9, 1.0
RATIO = math.exp(math.log(HI / LO) / BINS)  # width of one bin as an energy ratio


def _layout():
    return layout_for_geometry(get_geometry("ds1-photons"), BINS, energy_reference="incident",
                               energy_min_fraction=LO, energy_max_fraction=HI)


@pytest.mark.parametrize("incident_mev", [1.0e3, 1.6e4, 1.6e5, 1.0e6])
def test_value_code_round_trip_relative_to_incident_energy(incident_mev):
    layout = _layout()
    frac = torch.logspace(-8.9, -0.01, 200, dtype=torch.float64)
    energy = (frac * incident_mev).float()
    e0 = torch.full_like(energy, incident_mev, dtype=torch.float64)
    cls = layout.encode_values(energy, e0)
    # the class is the bin of the fraction, whatever the incident energy
    assert torch.equal(cls, torch.floor(torch.log(frac / LO) / math.log(RATIO)).long())
    for u in (0.0, 0.5, 0.999):
        back = layout.decode_values(cls, torch.full_like(energy, u, dtype=torch.float64), e0).double()
        ratio = back / energy.double()
        assert torch.all(ratio < RATIO * (1 + 1e-6)) and torch.all(1 / ratio < RATIO * (1 + 1e-6))
    # deposits below the lowest edge land in bin 0 and decode inside it
    tiny = torch.tensor([1e-14 * incident_mev], dtype=torch.float32)
    assert int(layout.encode_values(tiny, e0[:1])) == 0
    with pytest.raises(ValueError, match="incident energy"):
        layout.encode_values(energy)


def test_showers_round_trip_through_tokens_outside_the_training_range():
    """Showers at 160 GeV (10x a 16 GeV training maximum): every hit above the lowest edge
    comes back from its token within one bin width, decoded with its own shower's energy."""
    layout = _layout()
    g = get_geometry("ds1-photons")
    showers = HitBatch.concat([simulate_calo_showers(g, 1, seed=4, energy_min=e, energy_max=e)
                               for e in (2.0e3, 1.6e5, 8.0e5)])
    hits = TorchHits.from_batch(showers)
    tok = encode_hits(hits, layout)
    back = decode_tokens(tok.rows[:, 1:], tok.cols[:, 1:], tok.values[:, 1:], tok.lengths, layout, len(showers),
                         showers.conditions)
    e0 = showers.conditions["incident_energy"][showers.event_index()]
    keep = showers.columns["value"] >= LO * e0 * RATIO
    assert keep.mean() > 0.9
    order = np.lexsort((showers.columns["cell"], showers.columns["layer"], showers.event_index()))
    ratio = back.columns["value"].astype(np.float64) / showers.columns["value"][order].astype(np.float64)
    assert np.all(ratio[keep[order]] < RATIO) and np.all(1 / ratio[keep[order]] < RATIO)
    with pytest.raises(Exception, match="incident_energy"):
        decode_tokens(tok.rows[:, 1:], tok.cols[:, 1:], tok.values[:, 1:], tok.lengths, layout, len(showers), {})


def test_loss_goes_down_with_relative_energy_tokens():
    torch.manual_seed(0)
    g = get_geometry("ds1-photons")
    showers = TorchHits.from_batch(simulate_calo_showers(g, 4, seed=1, energy_min=1000.0, energy_max=16000.0))
    cfg = TransformerConfig(conditions=["incident_energy"], d_model=32, n_layers=1, n_heads=2, latent_dim=0,
                            energy_bins=BINS, energy_reference="incident")
    layout = layout_for_geometry(g, cfg.energy_bins, energy_reference="incident",
                                 energy_min_fraction=cfg.energy_range[0], energy_max_fraction=cfg.energy_range[1])
    model = HitTransformer(cfg, layout)
    tok = encode_hits(showers, layout)
    cond = ConditionNorm.from_ranges({"incident_energy": (1000.0, 16000.0)}, ["incident_energy"])(showers.conditions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, values = [], []
    for _ in range(25):
        out = model.loss(tok, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
        values.append(float(out["nll_value"]))
    assert losses[-1] < 0.8 * losses[0]
    assert values[-1] < 0.8 * values[0]


@pytest.mark.parametrize(("override", "key"), [
    ("model.energy_reference=relative", r"model\.energy_reference"),
    ("model.energy_min_fraction=0", r"model\.energy_min_fraction"),
    ("model.energy_max_fraction=-1", r"model\.energy_max_fraction"),
    ("model.energy_max_fraction=1e-12", r"energy_max_fraction \(1e-12\) must be > energy_min_fraction"),
    ("model.energy_min_mev=1e-5", r"energy_min_mev \(1e-05\) is a bin edge of energy_reference=absolute"),
    ("model.conditions=[luminosity]", r"conditions must include incident_energy"),
])
def test_bad_relative_energy_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(MINI, [override])


def test_absolute_config_refuses_fraction_keys_and_keeps_its_defaults():
    cfg = load_config(MINI, ["model.energy_reference=absolute", "model.energy_min_fraction=null",
                             "model.energy_max_fraction=null"])
    assert cfg.model.energy_range == (0.01515, 1.0e6)
    with pytest.raises(ConfigError, match=r"energy_min_fraction \(1e-09\) is a bin edge of energy_reference=incident"):
        load_config(MINI, ["model.energy_reference=absolute"])
    assert load_config(MINI).model.energy_range == (1.0e-9, 1.0)


def test_export_without_energy_reference_loads_as_absolute(tmp_path):
    """An export written before energy_reference existed (its sidecar lacks the key and the
    fraction keys) rebuilds the absolute MeV code; a new export keeps 'incident'."""
    from uhg.models.generator import Generator
    from uhg.train.export import SIDECAR, export_generator
    from uhg.train.family import build_family

    raw = {"name": "e", "geometry": "ds1-photons", "data": {"store": str(tmp_path / "x.zarr")},
           "model": {"family": "transformer", "conditions": ["incident_energy"], "d_model": 16, "n_layers": 1,
                     "n_heads": 1, "latent_dim": 0, "max_hits": 8, "energy_bins": BINS,
                     "energy_reference": "incident"},
           "train": {"steps": 1, "batch_size": 1}}
    cfg = config_from_dict(raw)
    norm = ConditionNorm.from_ranges({"incident_energy": (1000.0, 16000.0)}, ["incident_energy"])
    family = build_family(get_geometry("ds1-photons"), cfg.model, norm)
    module = family.build_modules()["model"]
    new = export_generator(tmp_path / "new", family, cfg, module.state_dict(), step=1)
    gen = Generator.load(new)
    assert gen.family.layout.energy_reference == "incident" and gen.family.cfg.energy_range == (LO, HI)
    showers = gen.generate({"incident_energy": np.array([1.6e5, 1.6e5])}, seed=3)
    e0 = showers.conditions["incident_energy"][showers.event_index()]
    assert showers.n_hits > 0
    assert np.all(showers.columns["value"] >= LO * e0 * (1 - 1e-6))
    assert np.all(showers.columns["value"] <= HI * e0 * (1 + 1e-6))

    raw["model"].pop("energy_reference")
    old_cfg = config_from_dict(raw)
    old = export_generator(tmp_path / "old", build_family(get_geometry("ds1-photons"), old_cfg.model, norm),
                           old_cfg, module.state_dict(), step=1)
    sidecar = json.loads((old / SIDECAR).read_text())
    for key in ("energy_reference", "energy_min_fraction", "energy_max_fraction"):
        sidecar["model"].pop(key)
    sidecar["model"].update(energy_min_mev=1.0e-5, energy_max_mev=1.0e5)  # the former mini-config range
    (old / SIDECAR).write_text(json.dumps(sidecar))
    gen = Generator.load(old)
    assert gen.family.cfg.energy_reference == "absolute" and gen.family.layout.energy_min_mev == 1.0e-5
    showers = gen.generate({"incident_energy": np.array([1.6e5])}, seed=3)
    assert np.all(showers.columns["value"] >= 1.0e-5 * (1 - 1e-6))
    assert np.all(showers.columns["value"] <= 1.0e5 * (1 + 1e-6))
