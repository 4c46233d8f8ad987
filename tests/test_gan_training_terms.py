"""What the GAN's training terms optimise: the physics term's optimum is the mean occupancy,
the discriminator's hit channel passes a gradient to the generator, and the exported EMA
forgets its initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from uhg.config.gan import GanConfig
from uhg.data.hits import HitBatch
from uhg.geometry import get_geometry
from uhg.models.common import EMA, ConditionNorm
from uhg.models.gan import Discriminator, gate_noise, relaxed_images
from uhg.models.gan_layout import encode_hits
from uhg.sparse.torch_hits import TorchHits
from uhg.train.gan_family import GanFamily

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(embed_dim=32, attention_layers=1, z_dim=8, sensor_noise_dim=4, decoder_channels=[16, 8, 4],
             discriminator_channels=[8, 16])


def pxd_family(**kw) -> GanFamily:
    cfg = GanConfig(conditions=["luminosity"], **{**SMALL, **kw})
    return GanFamily(get_geometry("pxd-tiny"), cfg, ConditionNorm.from_ranges({"luminosity": (1e34, 4e34)},
                                                                                ["luminosity"]))


def events_with_occupancy(geo, fractions: list[float], seed: int = 0) -> HitBatch:
    """One event per entry: every sensor has that fraction of its pixels fired (charge 20 ADU)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {"sensor": [], "row": [], "col": [], "value": []}
    counts = []
    per_sensor = geo.rows * geo.cols
    for f in fractions:
        n = int(round(f * per_sensor))
        for s in range(geo.n_sensors):
            flat = np.sort(rng.choice(per_sensor, n, replace=False))
            cols["sensor"].append(np.full(n, s, np.int64))
            cols["row"].append(flat // geo.cols)
            cols["col"].append(flat % geo.cols)
            cols["value"].append(np.full(n, 20, np.uint8))
        counts.append(n * geo.n_sensors)
    columns = {k: np.concatenate(v) for k, v in cols.items()}
    return HitBatch("pixel", columns, np.concatenate([[0], np.cumsum(counts)]),
                    {"luminosity": np.full(len(fractions), 2e34)})


def test_physics_term_is_minimal_at_the_mean_occupancy_not_the_geometric_mean() -> None:
    """Two events at the same conditions with 1% and 9% occupancy: a generator whose every pixel
    fires with probability p is best at p = 5% (their mean). The geometric mean (3%) is what a
    squared log ratio of unpaired events rewards: biased low."""
    fam = pxd_family(physics_weight=1.0)
    geo = fam.geometry
    real = encode_hits(fam.layout, TorchHits.from_batch(events_with_occupancy(geo, [0.01, 0.09])))
    valid = fam.valid(torch.device("cpu"))
    probabilities = np.linspace(0.01, 0.10, 91)
    losses = []
    for p in probabilities:
        gate = torch.full_like(real, float(np.log(p / (1 - p))))
        code = torch.full_like(real, 0.5)
        _, mask, _ = relaxed_images(gate, code, gate_noise(tuple(real.shape)), fam.cfg.gate_temperature, valid)
        losses.append(float(fam._physics_loss(gate, mask, code, real)))
    best = probabilities[int(np.argmin(losses))]
    assert best == pytest.approx(0.05, abs=0.0025)


def test_physics_term_pins_the_charge_scale_with_stochastic_charge() -> None:
    """With stochastic charge the physics term also matches the mean and spread of the hits'
    encoded charge: minimal at the real charges, and a generated charge above them is pushed
    down (without it, 240 adversarial steps on pxd-mini drifted the mean charge from 22 to 56 ADU)."""
    torch.manual_seed(0)
    fam = pxd_family(physics_weight=1.0, charge_noise=True)
    geo = fam.geometry
    real = encode_hits(fam.layout, TorchHits.from_batch(events_with_occupancy(geo, [0.05, 0.05])))
    valid = fam.valid(torch.device("cpu"))
    gate = torch.full_like(real, float(np.log(0.05 / 0.95)))
    level = float(real[real > 0][0])
    losses = {}
    for shift in (-0.1, 0.0, 0.1):
        code = torch.full_like(real, level + shift, requires_grad=True)
        _, mask, _ = relaxed_images(gate, code, gate_noise(tuple(real.shape)), fam.cfg.gate_temperature, valid)
        loss = fam._physics_loss(gate, mask, code, real)
        loss.backward()
        losses[shift] = (float(loss), float(code.grad.sum()))
    assert losses[0.0][0] < losses[0.1][0] and losses[0.0][0] < losses[-0.1][0]
    assert losses[0.1][1] > 0 > losses[-0.1][1]


def test_a_gradient_reaches_the_gates_through_the_discriminators_hit_channel() -> None:
    """With the discriminator's charge channel switched off it sees only where hits are; the
    generator's hit gates must still get a gradient (a hard `x > 0` gives them none)."""
    torch.manual_seed(0)
    fam = pxd_family()
    d = Discriminator(fam.layout, fam.cfg, 1)
    with torch.no_grad():  # input channel 0 is the charge, channel 1 the hit mask
        d.blocks[0].conv.parametrizations.weight.original[:, 0] = 0.0
    shape = (2, fam.layout.n_units, fam.layout.height, fam.layout.width)
    gate = torch.zeros(shape, requires_grad=True)
    code = torch.full(shape, 0.5)
    images, mask, _ = relaxed_images(gate, code, gate_noise(shape), fam.cfg.gate_temperature, fam.valid(torch.device("cpu")))
    per_unit, event = d(images, torch.zeros(2, 1), hits=mask)
    (per_unit.sum() + event.sum()).backward()
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0


def test_ema_forgets_its_initialisation_during_warm_up() -> None:
    """decay 0.99 over 100 updates would keep 0.99^100 = 37% of the initial weights; with the
    warm-up min(d, (1 + n) / (10 + n)) the initialisation is gone and the average follows the
    recent weights."""
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, 0.99)
    with torch.no_grad():
        module.weight.fill_(1.0)
    for _ in range(100):
        ema.update(module)
    assert float(ema.shadow["weight"]) > 0.999
    assert ema.updates == 100
    # late in training the configured decay is reached and used as is
    before = float(ema.shadow["weight"])
    ema.updates = 10_000
    with torch.no_grad():
        module.weight.fill_(2.0)
    ema.update(module)
    assert float(ema.shadow["weight"]) == pytest.approx(0.99 * before + 0.01 * 2.0, rel=1e-6)


def test_ema_exports_tensors_that_training_leaves_unchanged_exactly() -> None:
    """Fitted tables ride in the generator state as float buffers (the cluster transformer's
    shape vocabulary: pixel offsets and sizes; the count law's positions per sensor; the GAN's
    bank starts): d * x + (1 - d) * x rounds away from x, and 1200 updates left a shape of 3
    pixels at 2.9999998 and 3072 positions at 3071.9998. What training does not change is exported
    bit for bit; what it changes is averaged as before."""
    module = nn.Linear(2, 1)
    table = torch.tensor([1.0, 2.0, 3.0, 7.0, 13.0, 3072.0, 16022.0, 238633.0, 0.1, 1.3000296])
    module.register_buffer("table", table.clone())
    ema = EMA(module, 0.995)
    expected = w = float(module.weight.detach()[0, 0])
    for n in range(1200):
        with torch.no_grad():
            module.weight.add_(0.001)
        ema.update(module)
        w += 0.001
        d = min(0.995, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert torch.equal(ema.shadow["table"], table)
    assert torch.equal(ema.shadow["bias"], module.bias.detach())
    # the trained weight is still averaged (it lags the live one by ~0.12, 120 of its steps)
    assert float(ema.shadow["weight"][0, 0]) == pytest.approx(expected, abs=1e-4)
    assert float(module.weight.detach()[0, 0]) - expected > 0.1


def test_empty_sensor_images_give_zero_discriminator_features() -> None:
    """PXD images are >99% empty; the discriminator's features must come from the hits only (conv
    biases would add the same activation at every empty position and drown them)."""
    torch.manual_seed(0)
    fam = pxd_family()
    d = Discriminator(fam.layout, fam.cfg, 1)
    shape = (1, fam.layout.n_units, fam.layout.height, fam.layout.width)
    empty = torch.zeros(shape)
    assert torch.equal(d.features(empty), torch.zeros_like(d.features(empty)))
    one_hit = empty.clone()
    one_hit[0, 3, 5, 7] = 0.5
    feat = d.features(one_hit)
    assert feat[0, 3].abs().sum() > 0 and feat[0, 4].abs().sum() == 0
