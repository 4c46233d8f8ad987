"""The sensor-conditioned GAN: output shapes and sparsity for pixel and calorimeter geometries,
hit encoding round trip, and that training moves the generator toward the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from uhg.config.gan import GanConfig
from uhg.config.schema import TrainConfig
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.gan import HeadMaps, gate_noise, relaxed_images, upsample2
from uhg.models.gan_layout import encode_hits, unit_layout
from uhg.sim.calo import simulate_calo_showers
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import PlainEngine
from uhg.train.gan_family import GanFamily

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: one thread beats two on a busy 2-core machine

SMALL = dict(embed_dim=32, attention_layers=1, z_dim=8, sensor_noise_dim=4, decoder_channels=[16, 8, 4],
             discriminator_channels=[8, 16])


def family(geometry: str, **kw) -> GanFamily:
    cond = "incident_energy" if get_geometry(geometry).kind == "calo" else "luminosity"
    rng = (1e3, 1e5) if cond == "incident_energy" else (1e34, 4e34)
    cfg = GanConfig(conditions=[cond], **{**SMALL, **kw})
    return GanFamily(get_geometry(geometry), cfg, ConditionNorm.from_ranges({cond: rng}, [cond]))


@pytest.mark.parametrize("geometry", ["pxd-tiny", "pxd-mini", "ds2", "ds1-photons", "epical-mini"])
def test_generated_events_are_sparse_hits_of_the_geometry(geometry: str) -> None:
    torch.manual_seed(0)
    fam = family(geometry)
    g = fam.build_modules()["generator"]
    geo = get_geometry(geometry)
    cond = {fam.condition_norm.names[0]: torch.tensor([2e34, 3e34, 1e34]) if geo.kind == "pixel"
            else torch.tensor([2e3, 5e4, 9e4])}
    hits = fam.sample(g, cond, seeds=[1, 2, 3])
    assert len(hits) == 3 and hits.kind == geo.kind
    n = hits.hits_per_event
    assert (n > 0).all()
    if geo.kind == "pixel":
        gate, code, spread = g(torch.zeros(3, 8), torch.zeros(3, 40, 4), torch.zeros(3, 1))
        assert spread is None  # no cluster growth in this configuration
        assert gate.shape == code.shape == (3, 40, geo.rows, geo.cols)
        occupancy = n / geo.n_channels
        assert (occupancy < 0.05).all()  # sparse: most pixels are zero
        v = hits.columns["value"]
        assert v.min() >= geo.adc_threshold and v.max() <= 255
        assert hits.columns["row"].max() < geo.rows and hits.columns["col"].max() < geo.cols
        assert hits.columns["sensor"].max() < 40
    else:
        assert (n < 0.1 * geo.n_cells).all()
        layer, cell = hits.columns["layer"], hits.columns["cell"]
        assert np.all(cell < np.asarray(geo.cells_per_layer)[layer])
        if geo.readout == "digital":
            assert np.all(hits.columns["value"] == 1)
        else:
            assert hits.columns["value"].min() >= geo.threshold_mev
    # unique, sorted hits within each event (the store's invariant)
    again = hits.sorted()
    for k in hits.columns:
        assert np.array_equal(again.columns[k], hits.columns[k])


@pytest.mark.parametrize(("geometry", "kw"), [("pxd-tiny", dict(pixel_shuffle=2, charge_noise=True)),
                                                ("pxd-tiny", dict(pixel_shuffle=1)), ("ds2", {})])
def test_sampling_path_gives_the_values_of_the_forward_pass(geometry: str, kw: dict) -> None:
    """`sample_maps` + `gate_map` (gates, channels-last decoder) + `code_at` (values at the hits only):
    the gates of `forward` bit for bit, and its encoded values at any pixel."""
    fam = family(geometry, **kw)
    torch.manual_seed(3)
    g = fam.build_modules()["generator"].eval()
    with torch.no_grad():
        for p in g.parameters():  # away from the zero-initialised FiLM and cluster layers
            p.add_(0.1 * torch.randn_like(p))
    b, u, h, w = 2, fam.layout.n_units, fam.layout.height, fam.layout.width
    z, un, cond = torch.randn(b, 8), torch.randn(b, u, 4), torch.tensor([[-0.5], [0.7]])
    pn = torch.randn(b, u, 1, h, w) if g.pixel_noise_channels else None
    with torch.no_grad():
        gate, code, _ = g(z, un, cond, pn)
        head, offset, _ = g.sample_maps(z, un, cond)
        fast_gate = g.gate_map(head, offset)
        at = (torch.rand(b, u, h, w) < 0.2).nonzero(as_tuple=True)
        fast_code = g.code_at(head, at, pn[at[0], at[1], 0, at[2], at[3]] if pn is not None else None)
    assert torch.equal(fast_gate, gate)
    if fam.layout.kind == "pixel":
        assert torch.equal(fast_code, code[at])
    else:  # rows of 9 values: the dense sigmoid evaluates the last of each row by its scalar path
        torch.testing.assert_close(fast_code, code[at], rtol=1e-6, atol=0.0)


def test_the_charge_noise_is_drawn_at_the_hits_after_the_other_draws() -> None:
    """The pixel noise of `sample` is each event's next standard normals after `draw`, one per hit in
    row-major order (no noise map): its law is the map's read at the hits, and an event's values do
    not depend on its batch."""
    from uhg.models.gan_layout import decode_hits, hit_index

    fam = family("pxd-tiny", pixel_shuffle=2, charge_noise=True)
    torch.manual_seed(5)
    g = fam.build_modules()["generator"].eval()
    cond, seeds = {"luminosity": torch.tensor([1e34, 3e34, 2e34])}, [11, 12, 13]
    hits = fam.sample(g, cond, seeds)
    d = fam.draw(g, cond, seeds)
    index = hit_index(fam.layout, d.mask)
    n_hits = np.bincount(index[0], minlength=len(seeds))
    assert n_hits.min() > 0
    pn = torch.cat([torch.randn(int(n), generator=gen) for gen, n in zip(d.generators, n_hits, strict=True)])
    with torch.no_grad():
        code = g.code_at(d.head, tuple(torch.from_numpy(i) for i in index), pn)
    again = decode_hits(fam.layout, index, code.numpy(), len(seeds), d.conditions)
    for k in hits.columns:
        assert np.array_equal(hits.columns[k], again.columns[k])
    alone = fam.sample(g, {"luminosity": cond["luminosity"][1:2]}, seeds[1:2])
    assert np.array_equal(hits.slice(1, 2).columns["value"], alone.columns["value"])


def test_sampling_decoder_gives_the_training_decoder_values_bit_for_bit() -> None:
    """Without autograd the blocks modulate in place and upsample by strided copies: the decoder's
    output is that of the autograd path, bit for bit (the events of a seed do not change)."""
    fam = family("pxd-tiny", pixel_shuffle=2, charge_noise=True)
    torch.manual_seed(4)
    g = fam.build_modules()["generator"].eval()
    with torch.no_grad():
        for p in g.parameters():  # FiLM away from its zero start
            p.add_(0.1 * torch.randn_like(p))
    tok = torch.randn(3 * fam.layout.n_units, g.cfg.embed_dim)
    with torch.enable_grad():
        trained = g._decode(tok.requires_grad_())
    with torch.no_grad():
        sampled = g._decode(tok.detach())
    assert trained.requires_grad and not sampled.requires_grad
    assert torch.equal(sampled, trained.detach())
    for x in (torch.randn(2, 5, 3, 7), torch.randn(2, 5, 3, 7).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert torch.equal(upsample2(x), nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert torch.equal(upsample2(x.requires_grad_()).detach(), upsample2(x.detach()))


def test_film_in_place_gives_forward_values_in_any_layout_and_rounds_bf16_factors() -> None:
    """`FiLM.modulate_`: fp32 maps, contiguous or channels-last, get `forward`'s values bit for bit;
    a bf16 map is modulated in bf16 by 1 + gamma and beta rounded to bf16, the same values as
    those products and sums out of place."""
    from uhg.models.common import FiLM

    torch.manual_seed(2)
    film = FiLM(6, 5)
    with torch.no_grad():
        film.proj.weight.normal_()
        film.proj.bias.normal_()
        cond = torch.randn(3, 6)
        x = torch.randn(3, 5, 4, 7)
        expected = film(x, cond)
        for layout in (torch.contiguous_format, torch.channels_last):
            y = x.clone(memory_format=layout)
            assert film.modulate_(y, cond) is y and torch.equal(y, expected)
        gamma, beta = film.proj(cond).chunk(2, dim=-1)
        xb = x.to(torch.bfloat16)
        rounded = xb * (1 + gamma).to(torch.bfloat16)[:, :, None, None] + beta.to(torch.bfloat16)[:, :, None, None]
        for layout in (torch.contiguous_format, torch.channels_last):
            y = xb.clone(memory_format=layout)
            film.modulate_(y, cond)
            assert y.dtype == torch.bfloat16 and torch.equal(y, rounded)
        assert not torch.equal(rounded.float(), expected)  # the rounding is there to see


def test_bf16_sampling_decodes_in_bf16_and_reads_the_maps_in_fp32() -> None:
    """`sample_precision: bf16`: the decoder and head run in bf16 channels-last (the head maps are
    bf16), their values within bf16 rounding of the fp32 decoder's; gates, offsets and encoded
    values are read in fp32, and an event is the same in any batch."""
    kw = dict(pixel_shuffle=2, charge_noise=True)
    fam32, fam16 = family("pxd-tiny", **kw), family("pxd-tiny", sample_precision="bf16", **kw)
    assert fam32.cfg.sample_precision == "fp32"
    torch.manual_seed(3)
    g32 = fam32.build_modules()["generator"].eval()
    with torch.no_grad():
        for p in g32.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g16 = fam16.build_modules()["generator"].eval()
    g16.load_state_dict(g32.state_dict())
    b, u, h, w = 2, fam32.layout.n_units, fam32.layout.height, fam32.layout.width
    z, un, cond = torch.randn(b, 8), torch.randn(b, u, 4), torch.tensor([[-0.5], [0.7]])
    with torch.no_grad():
        head32, offset, _ = g32.sample_maps(z, un, cond)
        head16, offset16, _ = g16.sample_maps(z, un, cond)
        assert torch.equal(offset16, offset)
        for m32, m16 in zip(head32, head16, strict=True):
            assert m16.dtype == torch.bfloat16 and m16.is_contiguous(memory_format=torch.channels_last)
            err = (m16.float() - m32).abs().max()
            assert 0 < err < 0.02 * m32.abs().max()  # bf16 keeps 8 bits: rounding, not another model
        gate = g16.gate_map(head16, offset)
        assert gate.dtype == torch.float32
        assert torch.equal(gate, g32.gate_map(HeadMaps(head16.gate.float(), None), offset))
        at = (torch.rand(b, u, h, w) < 0.2).nonzero(as_tuple=True)
        image, pixel = at[0] * u + at[1], at[2] * w + at[3]
        assert torch.equal(g16.gate_at(head16, offset, image, pixel), gate[at])
        assert g16.gate_max(head16, offset).dtype == torch.float32
        pn = torch.randn(len(at[0]))
        code = g16.code_at(head16, at, pn)
        assert code.dtype == torch.float32
        assert torch.equal(code, g32.code_at(HeadMaps(head16.gate.float(), head16.charge.float()), at, pn))
    lum = torch.tensor([1e34, 2e34, 3e34, 4e34])
    whole = fam16.sample(g16, {"luminosity": lum}, seeds=[5, 6, 7, 8])
    tail = fam16.sample(g16, {"luminosity": lum[2:]}, seeds=[7, 8])
    assert whole.slice(2, 4).n_hits > 0
    for k in ("sensor", "row", "col", "value"):
        assert np.array_equal(whole.slice(2, 4).columns[k], tail.columns[k])


def test_sampling_is_per_event_deterministic() -> None:
    fam = family("pxd-tiny")
    torch.manual_seed(1)
    g = fam.build_modules()["generator"]
    lum = torch.tensor([1e34, 2e34, 3e34, 4e34])
    whole = fam.sample(g, {"luminosity": lum}, seeds=[5, 6, 7, 8])
    tail = fam.sample(g, {"luminosity": lum[2:]}, seeds=[7, 8])
    assert np.array_equal(whole.slice(2, 4).columns["value"], tail.columns["value"])
    assert np.array_equal(whole.slice(2, 4).columns["row"], tail.columns["row"])


def test_encoding_of_real_hits() -> None:
    geo = get_geometry("pxd-tiny")
    batch = simulate_pxd_background(geo, 2, seed=3, luminosity=2e34)
    img = encode_hits(unit_layout(geo), TorchHits.from_batch(batch))
    assert img.shape == (2, 40, 16, 48)
    assert int((img > 0).sum()) == batch.n_hits
    lo = np.log1p(7) / np.log1p(255)
    assert float(img[img > 0].min()) >= lo - 1e-6 and float(img.max()) <= 1.0
    calo = get_geometry("ds2")
    showers = simulate_calo_showers(calo, 2, seed=3, energy_min=1e3, energy_max=1e4)
    img = encode_hits(unit_layout(calo), TorchHits.from_batch(showers))
    assert img.shape == (2, 45, 16, 9) and int((img > 0).sum()) == showers.n_hits


@pytest.mark.parametrize("geometry", ["pxd-tiny", "ds2"])  # 1-2 s each on one thread (fast tier)
def test_training_moves_the_generator_toward_the_data(geometry: str) -> None:
    """With the physics term on, the occupancy (pixel) or energy-response (calo) mismatch
    between generated and real events falls during a short training."""
    torch.manual_seed(0)
    geo = get_geometry(geometry)
    fam = family(geometry, physics_weight=1.0)
    if geo.kind == "pixel":
        data = simulate_pxd_background(geo, 16, seed=1, luminosity=2e35, luminosity_max=4e35)
    else:
        data = simulate_calo_showers(geo, 16, seed=1, energy_min=1e3, energy_max=1e5)
    fam = GanFamily(geo, fam.cfg, ConditionNorm.from_ranges(
        {k: (float(v.min()), float(v.max())) for k, v in data.conditions.items()}, fam.cfg.conditions))
    mods = fam.build_modules()
    train = TrainConfig(steps=1, batch_size=2, lr=3e-3)
    engines = {k: PlainEngine(m, fam.build_optimizer(k, m, train)) for k, m in mods.items()}
    losses = []
    for step in range(20):
        i = (step * 2) % 16
        out = fam.train_step(engines, TorchHits.from_batch(data.slice(i, i + 2)), step)
        assert np.isfinite(out["loss_generator"]) and np.isfinite(out["loss_discriminator"])
        losses.append(out["loss_physics"])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_physics_term_pulls_an_empty_calorimeter_shower_back() -> None:
    """With every gate far below zero no cell fires, yet the physics term still raises every gate
    by the full log gap in hits: the count is taken in expectation over the gates, with no
    epsilon floor where its gradient would vanish (a clamped log of the sampled energy alone gave
    an empty shower zero gradient, and training collapsed to empty showers it could not leave)."""
    geo = get_geometry("ds2")
    fam = family("ds2", physics_weight=1.0)
    batch = TorchHits.from_batch(simulate_calo_showers(geo, 2, seed=1, energy_min=1e3, energy_max=1e4))
    valid = fam.valid(torch.device("cpu"))
    real = encode_hits(fam.layout, batch) * valid
    gate = torch.full_like(real, -30.0, requires_grad=True)
    code = torch.full_like(real, 0.5, requires_grad=True)
    fake, mask, _ = relaxed_images(gate, code, gate_noise(tuple(real.shape)), fam.cfg.gate_temperature, valid)
    assert not fake.any()
    loss = fam._physics_loss(gate, mask, code, real)
    d_gate = torch.autograd.grad(loss, gate)[0]
    hit_gap = math.log(float(valid.sum())) - 30.0 - torch.log((real > 0).float().sum(dim=(1, 2, 3)))
    assert torch.isfinite(loss) and loss > float((hit_gap**2).mean())  # plus the empty shower's energy gap
    cells = valid.expand_as(real) > 0
    assert (d_gate[cells] < 0).all() and (d_gate[~cells] == 0).all()  # descent raises every gate
    assert float(d_gate.sum()) == pytest.approx(2 * float(hit_gap.mean()), rel=1e-3)
