"""Cluster tokens of the hit transformer (`model.token: cluster`): shape vocabulary, exact
clusters -> tokens -> hits round trip, deterministic sampling, and a short training that moves
the generated cluster-size spectrum toward the data."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from uhg.config.schema import TrainConfig
from uhg.config.transformer import TransformerConfig
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.eval.features_pxd import pixel_clusters
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.transformer import HitTransformer
from uhg.models.transformer_clusters import (
    ShapeCensus,
    ShapeVocab,
    charge_classes,
    decode_clusters,
    encode_clusters,
    shape_key_base,
)
from uhg.models.transformer_sampling import generate_tokens, sample_events
from uhg.models.transformer_tokens import layout_for_geometry
from uhg.seeding import event_seed
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import PlainEngine
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_events() -> HitBatch:
    return simulate_pxd_background(get_geometry("pxd-mini"), 24, 3, luminosity=4e35, luminosity_max=8e35)


def _layout(name: str = "pxd-mini"):
    return layout_for_geometry(get_geometry(name))


def _round_trip(batch: HitBatch, layout, vocab: ShapeVocab) -> HitBatch:
    tok = encode_clusters(TorchHits.from_batch(batch), layout, vocab, 16)
    return decode_clusters(tok.rows[:, 1:], tok.cols[:, 1:], tok.values[:, 1:], tok.lengths, layout, len(batch),
                           batch.conditions, torch.as_tensor(vocab.offsets), torch.as_tensor(vocab.sizes))


def _assert_same_hits(a: HitBatch, b: HitBatch) -> None:
    np.testing.assert_array_equal(a.offsets, b.offsets)
    for k in ("sensor", "row", "col", "value"):
        np.testing.assert_array_equal(a.columns[k], b.columns[k])


@pytest.mark.parametrize("n_shapes,max_pixels", [(512, 16), (8, 3)], ids=["rich-vocabulary", "tiny-vocabulary"])
def test_clusters_to_tokens_to_hits_is_exact(mini_events, n_shapes, max_pixels):
    """Any event comes back pixel for pixel and code for code; with a tiny vocabulary most
    clusters are split into several tokens, and still nothing is lost."""
    layout = _layout()
    census = ShapeCensus(layout)
    census.add(mini_events.slice(0, 12))
    vocab = census.vocabulary(n_shapes, max_pixels)
    held_out = mini_events.slice(12, 24).sorted()
    _assert_same_hits(_round_trip(held_out, layout, vocab), held_out)
    cover = census.coverage(vocab)
    assert 1.0 < cover["pixels_per_token"] and 0.0 < cover["shape_vocab_coverage"] <= 1.0
    if n_shapes == 8:
        assert cover["shape_vocab_coverage"] < 0.9  # splitting was exercised


def test_vocabulary_is_the_most_frequent_patterns_single_pixel_first():
    n_cols = 10
    single, pair, column, ell = (10,), (10, 11), (10, 31), (10, 11, 31)  # codes dr * 21 + dc + 10
    vocab = ShapeVocab.fit(Counter({pair: 50, column: 20, ell: 5, single: 1, (10, 11, 12, 13): 9}), 4, 3, n_cols)
    assert vocab.keys[:4] == [single, pair, column, ell] and list(vocab.sizes) == [1, 2, 2, 3]
    np.testing.assert_array_equal(vocab.offsets[3, :3], [[0, 0], [0, 1], [1, 0]])
    # a 4-pixel row is not a shape: split greedily into the largest shapes that fit
    assert vocab.split((10, 11, 12, 13)) == [([0, 1], 1), ([2, 3], 1)]
    assert vocab.tokens_of((10, 11, 12, 13)) == 2 and vocab.tokens_of(ell) == 1


def test_round_trip_of_large_clusters_and_sensor_edges():
    """A 40-pixel blob (beyond any shape) and clusters on the sensor's last row and columns."""
    g = get_geometry("pxd-mini")
    layout = _layout()
    rows, cols = np.meshgrid(np.arange(10, 15), np.arange(20, 28), indexing="ij")
    blob = np.stack([rows.ravel(), cols.ravel()], 1)
    edge = np.array([[g.rows - 1, 0], [g.rows - 1, 1], [g.rows - 2, g.cols - 1], [g.rows - 1, g.cols - 1]])
    pix = np.concatenate([blob, edge])
    batch = HitBatch("pixel", {"sensor": np.full(len(pix), 7), "row": pix[:, 0], "col": pix[:, 1],
                               "value": np.arange(len(pix)) % 200 + 7}, np.array([0, len(pix)]),
                     {"luminosity": np.array([5e35])}).sorted()
    census = ShapeCensus(layout)
    census.add(batch)
    vocab = census.vocabulary(6, 4)
    _assert_same_hits(_round_trip(batch, layout, vocab), batch)
    assert int(census.token_counts(vocab).sum()) > 3  # the blob took several tokens


def _cluster_model(**kw) -> HitTransformer:
    torch.manual_seed(1)
    cfg = TransformerConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "latent_dim": 4, "conditions": ["luminosity"],
                               "token": "cluster", "cluster_shapes": 32, "cluster_max_pixels": 6, **kw})
    layout = _layout("pxd-tiny")
    model = HitTransformer(cfg, layout).eval()
    census = ShapeCensus(layout)
    data = simulate_pxd_background(get_geometry("pxd-tiny"), 8, 5, luminosity=8e35)
    census.add(data)
    model.set_shapes(census.vocabulary(32, 6))
    if cfg.cluster_code_bank:
        model.fit_code_bank([model.tokenize(data)])
    with torch.no_grad():
        model.row_head.bias[-1] -= 1.0  # longer sequences than an untrained model's 1/17 END chance gives
    return model


def _seeds(seed: int, first: int, n: int) -> list[int]:
    return [event_seed(seed, first + i, "generate") for i in range(n)]


GRID_COND = torch.linspace(-1, 2, 5)[:, None]  # the sampling tests' five events: normalised conditions


def _grid_events(model: HitTransformer, batch_events: int = 5, **kw):
    """The sampling tests' five events (GRID_COND, luminosity 2e35 to 1e36, seeds (3, 0, i), at most
    24 hits per sequence), sampled in passes of `batch_events`."""
    n = len(GRID_COND)
    return sample_events(model, GRID_COND, _seeds(3, 0, n), {"luminosity": np.geomspace(2e35, 1e36, n)},
                         batch_events=batch_events, max_hits=24, **kw)


@pytest.mark.parametrize("pixels", [{}, {"cluster_pixel_context": True}, {"cluster_charge_redraws": 8},
                                    {"cluster_exclusive": True}, {"cluster_exclusive": True, "cluster_merge_redraws": 8},
                                    {"cluster_code_bank": 4000, "cluster_code_bank_per_sensor": True}],
                         ids=["independent-pixels", "pixel-context", "charge-redraws", "exclusive-pixels", "merge-redraws",
                              "code-bank"])
def test_cluster_sampling_is_deterministic_for_any_batch_split_and_cache(pixels):
    model = _cluster_model(**pixels)
    whole = _grid_events(model, top_q=0.95)
    assert whole.n_hits > 100
    for batch_events in (1, 2):
        _assert_same_hits(_grid_events(model, batch_events, top_q=0.95), whole)
    cached = generate_tokens(model, GRID_COND[:2], _seeds(3, 0, 2), max_hits=12)
    full = generate_tokens(model, GRID_COND[:2], _seeds(3, 0, 2), max_hits=12, use_cache=False)
    for k in ("rows", "cols", "values", "lengths"):
        assert torch.equal(getattr(cached, k), getattr(full, k))
    # hits are sorted, unique, on the grid, above threshold; shapes are vocabulary shapes
    again = whole.sorted()
    for k in whole.columns:
        np.testing.assert_array_equal(whole.columns[k], again.columns[k])
    g = get_geometry("pxd-tiny")
    assert whole.columns["row"].max() < g.rows and whole.columns["col"].max() < g.cols
    assert whole.columns["value"].min() >= g.adc_threshold and whole.columns["value"].max() <= g.adc_max


def test_pixel_codes_are_conditioned_on_the_charge_of_earlier_pixels():
    """cluster_pixel_context: the training NLL of a token's pixel codes is the sum over its
    slots of the cross-entropy of `pixel_logits` given the ADC of the pixels before the slot
    (what generation feeds it, slot by slot), and that charge changes the logits."""
    import torch.nn.functional as F

    model = _cluster_model(cluster_pixel_context=True)
    off, size = model.shape_table()
    k = int(torch.nonzero(size >= 3)[0])
    n = int(size[k])
    thr = model.layout.adc_threshold
    codes = torch.tensor([[5, 40, 2] + [0] * (model.config.cluster_max_pixels - 3)])[:, :model.config.cluster_max_pixels]
    codes[0, n:] = 0
    target = torch.cat([torch.tensor([[k, 3]]), codes], 1)
    torch.manual_seed(0)
    h = torch.randn(1, model.config.d_model)
    row, col = torch.tensor([2]), torch.tensor([3])
    with torch.no_grad():
        nll = model.cluster_value_nll(h, row, col, target)["pixels"]
        so_far = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), codes[0, :n - 1] + thr]), 0)
        slots = torch.arange(n)
        rep = torch.zeros(n, dtype=torch.long)
        logits = model.pixel_logits(h[rep], row[rep], col[rep], torch.full((n,), k), torch.full((n,), 3), slots, so_far)
        manual = F.cross_entropy(logits, codes[0, :n], reduction="sum")
        blind = model.pixel_logits(h[rep], row[rep], col[rep], torch.full((n,), k), torch.full((n,), 3), slots,
                                   torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(nll, manual)
    assert not torch.allclose(logits[1:], blind[1:])
    torch.testing.assert_close(logits[0], blind[0])
    assert "so_far_in.weight" not in _cluster_model().state_dict()  # off: exports keep their keys


def test_count_law_counts_cluster_tokens():
    model = _cluster_model(multiplicity="count")
    g = generate_tokens(model, torch.zeros(2, 1), _seeds(0, 0, 2), max_hits=64)
    assert torch.equal(g.lengths, g.targets.clamp(max=64))


def test_cluster_tokens_need_a_pixel_geometry_and_old_configs_are_pixel():
    norm = ConditionNorm.from_ranges({"incident_energy": (1000.0, 8000.0)}, ["incident_energy"])
    with pytest.raises(ConfigError, match="model.token: cluster"):
        build_family(get_geometry("ds1-photons"), TransformerConfig(conditions=["incident_energy"], token="cluster"), norm)
    old = TransformerConfig(**{k: v for k, v in TransformerConfig().model_dump().items() if not k.startswith(("token", "cluster"))})
    assert old.token == "pixel"
    with pytest.raises(ValueError, match="token"):
        TransformerConfig(token="voxel")
    with pytest.raises(ValueError, match="cluster_exclusive .* needs token: cluster"):
        TransformerConfig(cluster_exclusive=True)  # pixel tokens: it would silently do nothing


def _size_spectrum(batch: HitBatch, geometry) -> np.ndarray:
    labels, _ = pixel_clusters(batch, geometry)
    sizes = np.bincount(labels)
    return np.bincount(np.minimum(sizes, 20), minlength=21) / max(len(sizes), 1)


def _separation_power(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) > 0
    return float(0.5 * np.sum((p[m] - q[m]) ** 2 / (p[m] + q[m])))


@pytest.mark.slow
def test_short_training_moves_cluster_sizes_toward_the_data():
    """40 steps on pxd-mini: the generated cluster-size spectrum's separation power from the
    training events falls by more than 5x (measured: 0.21 -> 0.005 at d_model 32)."""
    g = get_geometry("pxd-mini")
    data = simulate_pxd_background(g, 64, 3, luminosity=4e35, luminosity_max=8e35)
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=2, latent_dim=0, conditions=["luminosity"], token="cluster",
                            multiplicity="count", cluster_shapes=128, max_hits=512)
    family = build_family(g, cfg, ConditionNorm.from_ranges({"luminosity": (4e35, 8e35)}, ["luminosity"]))
    torch.manual_seed(0)
    modules = family.build_modules()
    fitted = family.initialise_from_data(modules, [data])
    assert fitted["shape_vocab_coverage"] > 0.9 and fitted["pixels_per_token"] > 2.0
    engines = {k: PlainEngine(m, family.build_optimizer(k, m, TrainConfig(steps=40, batch_size=8, lr=3e-3)), 1.0)
               for k, m in modules.items()}
    real = _size_spectrum(data, g)

    def sp() -> float:
        fake = family.sample(modules["model"], {"luminosity": torch.full((8,), 6e35)}, _seeds(0, 0, 8))
        return _separation_power(_size_spectrum(fake, g), real)

    before = sp()
    for step in range(40):
        lo = step * 8 % 64
        family.train_step(engines, TorchHits.from_batch(data.slice(lo, lo + 8)), step)
    after = sp()
    assert after < before / 5, (before, after)


def _token_charge_in_class(model: HitTransformer, g) -> tuple[float, float]:
    """(share of multi-pixel tokens whose summed ADC lies in their drawn charge class, tokens)."""
    keep = torch.arange(g.rows.shape[1])[None] < g.lengths[:, None]
    v = g.values[keep]
    size = model.shape_table()[1][v[:, 0]]
    filled = torch.arange(v.shape[1] - 2)[None] < size[:, None]
    adc = ((v[:, 2:] + model.layout.adc_threshold) * filled).sum(1)
    cls = charge_classes(adc, model.layout, model.config.cluster_max_pixels, model.config.cluster_charge_bins)
    multi = size > 1
    return float((cls == v[:, 1])[multi].double().mean()), int(multi.sum())


def test_charge_redraws_put_the_pixel_codes_into_the_drawn_charge_class():
    """Independently drawn pixel codes of an untrained model rarely sum into the charge class
    drawn for their token; with redraws many more do, and everything but the codes stays as
    without them."""
    cond = torch.linspace(-1, 1, 4)[:, None]
    plain = generate_tokens(_cluster_model(), cond, _seeds(4, 0, 4), max_hits=24)
    redrawn = generate_tokens(_cluster_model(cluster_charge_redraws=32), cond, _seeds(4, 0, 4), max_hits=24)
    share_plain, n = _token_charge_in_class(_cluster_model(), plain)
    share_redrawn, _ = _token_charge_in_class(_cluster_model(), redrawn)
    assert n > 50
    assert share_plain < 0.1 and share_redrawn > 4 * share_plain  # untrained: uniform codes, 0.04 -> 0.26
    # same rows, columns, shapes and classes: only codes out of their class were drawn again
    for k in ("rows", "cols", "lengths"):
        assert torch.equal(getattr(plain, k), getattr(redrawn, k))
    assert torch.equal(plain.values[..., :2], redrawn.values[..., :2])


def _shared_pixels(model: HitTransformer, g) -> tuple[int, int]:
    """(pixels drawn by more than one token of their sequence, tokens) of generated sequences."""
    off, size = model.shape_table()
    shared = tokens = 0
    for s in range(len(g.lengths)):
        n = int(g.lengths[s])
        shape = g.values[s, :n, 0]
        real = torch.arange(off.shape[1])[None] < size[shape][:, None]
        r = (g.rows[s, :n, None] + off[shape, :, 0])[real]
        c = (g.cols[s, :n, None] + off[shape, :, 1])[real]
        shared += len(r) - len(torch.unique(r * 10_000 + c))
        tokens += n
    return shared, tokens


@pytest.mark.parametrize("exclusive", [False, True])
def test_exclusive_pixels_keep_every_pixel_in_one_token(exclusive):
    """A training sequence never has two tokens on one pixel; an untrained model's draws often do
    (their pixels merge into one cluster when decoded), and cluster_exclusive leaves those anchors
    and shapes out of the draw."""
    model = _cluster_model(cluster_exclusive=exclusive)
    g = generate_tokens(model, torch.linspace(-1, 1, 4)[:, None], _seeds(4, 0, 4), max_hits=24)
    shared, tokens = _shared_pixels(model, g)
    assert tokens > 200
    assert (shared == 0) == exclusive, f"{shared} pixels drawn twice among {tokens} tokens"


def _vocabulary_joins(model: HitTransformer, g) -> tuple[int, int]:
    """(tokens that join the clusters of their sequence they touch into a vocabulary shape, tokens
    touching an earlier one): replayed token by token on sets of pixels."""
    off, size = model.shape_table()
    vocab, base, n_cols = model.shape_vocab(), shape_key_base(model.layout.n_cols), model.layout.n_cols
    joins = touching = 0
    for s in range(len(g.lengths)):
        clusters: list[set] = []
        for t in range(int(g.lengths[s])):
            k = int(g.values[s, t, 0])
            pix = {(int(g.rows[s, t] + off[k, i, 0]), int(g.cols[s, t] + off[k, i, 1])) for i in range(int(size[k]))}
            pix = {(r, c) for r, c in pix if 0 <= r < model.layout.n_rows and 0 <= c < n_cols}
            halo = {(r + a, c + b) for r, c in pix for a in (-1, 0, 1) for b in (-1, 0, 1)}
            near = [j for j, q in enumerate(clusters) if q & halo]
            merged = pix.union(*(clusters[j] for j in near))
            first = min(merged)
            key = tuple((r - first[0]) * base + (c - first[1]) + n_cols for r, c in sorted(merged))
            touching += bool(near)
            joins += bool(near) and key in vocab.index
            clusters = [q for j, q in enumerate(clusters) if j not in near] + [merged]
    return joins, touching


@pytest.mark.parametrize("redraws", [0, 16])
def test_merge_redraws_keep_tokens_from_joining_into_a_vocabulary_shape(redraws):
    """The encoder writes a cluster whose pattern is a vocabulary shape as one token, so no training
    sequence has a token that joins what it touches into one; an untrained model's draws often do,
    and cluster_merge_redraws draws those tokens again. Tokens that touch without forming a
    vocabulary shape (pieces of a split cluster) stay allowed."""
    model = _cluster_model(cluster_exclusive=True, cluster_merge_redraws=redraws)
    g = generate_tokens(model, torch.linspace(-1, 1, 4)[:, None], _seeds(4, 0, 4), max_hits=24)
    joins, touching = _vocabulary_joins(model, g)
    assert int(g.lengths.sum()) > 200
    if redraws:
        assert joins == 0 and touching > 0, f"{joins} of {touching} touching tokens join into a vocabulary shape"
    else:
        assert joins > 5, f"only {joins} of {touching} touching tokens join into a vocabulary shape"


def test_merge_redraws_need_exclusive_pixels():
    with pytest.raises(ValueError, match="cluster_merge_redraws .* cluster_exclusive"):
        TransformerConfig(token="cluster", cluster_merge_redraws=4)


def _token_codes(values: torch.Tensor, units: torch.Tensor, sizes: torch.Tensor) -> set[tuple[int, ...]]:
    """(unit, shape, class, codes of the shape's pixels) of tokens `values` (N, 2 + P)."""
    return {(int(u), *v[:2 + int(sizes[v[0]])].tolist()) for u, v in zip(units, values, strict=True)}


@pytest.mark.parametrize("per_sensor", [False, True], ids=["pooled", "per-sensor"])
def test_code_bank_gives_tokens_the_codes_of_a_training_token_of_their_shape_and_class(per_sensor):
    """cluster_code_bank: every generated token whose (shape, charge class) the training tokens have
    takes the pixel codes of one of them (per sensor: of one on its own sensor where there is one);
    the untrained model's independent per-pixel draws rarely give a multi-pixel token such codes."""
    data = simulate_pxd_background(get_geometry("pxd-tiny"), 8, 5, luminosity=8e35)
    cond = torch.linspace(-1, 1, 4)[:, None]
    plain = _cluster_model()
    banked = _cluster_model(cluster_code_bank=20_000, cluster_code_bank_per_sensor=per_sensor)
    size = banked.shape_table()[1]
    train = banked.tokenize(data)
    real = (torch.arange(train.values.shape[1])[None] >= 1) & (torch.arange(train.values.shape[1])[None] <= train.lengths[:, None])
    units = train.unit[:, None].expand_as(real)[real]
    known = _token_codes(train.values[real], units if per_sensor else torch.zeros_like(units), size)
    keys = {k[1:3] for k in known}
    keys_of_unit = {k[:3] for k in known}
    n_units = banked.layout.n_units
    share = {}
    for name, model in (("plain", plain), ("banked", banked)):
        g = generate_tokens(model, cond, _seeds(4, 0, 4), max_hits=24)
        keep = torch.arange(g.rows.shape[1])[None] < g.lengths[:, None]
        u = (torch.arange(len(g.lengths)) % n_units)[:, None].expand_as(keep)[keep]
        v = g.values[keep]
        multi = size[v[:, 0]] > 1
        have = torch.tensor([(int(a), int(b)) in keys for a, b in v[:, :2].tolist()]) & multi
        assert int(have.sum()) > 20
        key_u = u if per_sensor else torch.zeros_like(u)
        got = _token_codes(v[have], key_u[have], size)
        if name == "banked":
            own = {k for k in got if k[:3] in keys_of_unit}
            # per sensor: a token of a key its sensor has takes one of its sensor's; else one of any sensor
            assert own <= known and len(own) > 0
            pooled = {k[1:] for k in known}
            assert {k[1:] for k in got} <= pooled
        share[name] = len([k for k in got if k in known]) / max(len(got), 1)
    if not per_sensor:
        assert share["banked"] == 1.0
    assert share["plain"] < 0.5, share


def test_code_bank_is_fitted_with_the_laws_and_needs_cluster_tokens():
    g = get_geometry("pxd-tiny")
    data = simulate_pxd_background(g, 16, 3, luminosity=4e35, luminosity_max=8e35)
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=0, conditions=["luminosity"], token="cluster",
                            multiplicity="count", cluster_shapes=32, cluster_max_pixels=6, max_hits=64,
                            cluster_code_bank=50_000)
    family = build_family(g, cfg, ConditionNorm.from_ranges({"luminosity": (4e35, 8e35)}, ["luminosity"]))
    model = family.build_modules()["model"]
    fitted = family.initialise_from_data({"model": model}, [data.slice(0, 8), data.slice(8, 16)])
    tokens = model.tokenize(data)
    assert fitted["code_bank_tokens"] == int(tokens.lengths.sum())  # the bank holds every training token here
    assert int(model.code_bank_count.sum()) == int(tokens.lengths.sum()) and model.code_bank.abs().sum() > 0
    with pytest.raises(ValueError, match="cluster_code_bank .* token: cluster"):
        TransformerConfig(cluster_code_bank=1000)
    with pytest.raises(ValueError, match="cluster_code_bank_per_sensor needs cluster_code_bank"):
        TransformerConfig(token="cluster", cluster_code_bank_per_sensor=True)


def test_charge_redraws_refuse_the_pixel_context():
    with pytest.raises(ValueError, match="cluster_charge_redraws"):
        TransformerConfig(token="cluster", cluster_pixel_context=True, cluster_charge_redraws=4)


def test_latent_aux_gives_the_encoder_a_gradient_the_collapsed_decoder_does_not():
    """latent_aux: with a decoder that ignores the event latent (latent_proj zero, as a collapsed
    latent leaves it) and the KL inside its free bits, only the auxiliary summary head tells the
    encoder anything; without the key the encoder's gradient is exactly zero. The head predicts
    the sequences' mean charge class and shape size, reported as `latent_aux`."""
    from uhg.models.transformer_clusters import encode_clusters

    batch = simulate_pxd_background(get_geometry("pxd-tiny"), 6, 11, luminosity=8e35)
    cond = torch.zeros(6, 1)
    grads = {}
    for aux in (0.0, 1.0):
        model = _cluster_model(free_bits=10.0, latent_aux=aux).train()
        assert hasattr(model, "latent_aux_head") == bool(aux)
        with torch.no_grad():
            model.latent_proj.weight.zero_()
        tokens = encode_clusters(batch, model.layout, model.shape_vocab(), model.config.cluster_charge_bins)
        out = model.loss(tokens, cond)
        assert ("latent_aux" in out) == bool(aux)
        out["loss"].backward()
        grads[aux] = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
    assert grads[0.0] == 0.0
    assert grads[1.0] > 0.0
    with pytest.raises(ValueError, match="latent_aux"):
        TransformerConfig(latent_dim=0, latent_aux=1.0)


def test_mixture_latent_prior_is_fitted_to_the_encoders_latents_and_drawn_in_generation():
    """latent_prior: mixture: the prior is frozen (out of the optimiser), fitted after training to
    the encoder's q(z | event) of training events (the encoder shifted here so its latents sit far
    from the unit normal, as an aggregate posterior can), and generation draws the latent from it;
    with the default (standard) the latent is the unit normal's draw as before."""
    g = get_geometry("pxd-tiny")
    data = simulate_pxd_background(g, 48, 3, luminosity=4e35, luminosity_max=8e35)
    norm = ConditionNorm.from_ranges({"luminosity": (4e35, 8e35)}, ["luminosity"])
    models = {}
    for prior in ("standard", "mixture"):
        cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=3, conditions=["luminosity"],
                                token="cluster", multiplicity="count", cluster_shapes=32, cluster_max_pixels=6,
                                max_hits=64, latent_prior=prior, prior_steps=300)
        family = build_family(g, cfg, norm)
        torch.manual_seed(0)
        model = family.build_modules()["model"]
        family.initialise_from_data({"model": model}, [data])
        with torch.no_grad():
            model.encoder.out.bias[:3] += torch.tensor([3.0, -2.0, 1.5])
        opt = family.build_optimizer("model", model, TrainConfig(steps=1, batch_size=8))
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        assert not any(id(p) in in_opt for n, p in model.named_parameters() if n.startswith("prior."))
        fitted = family.finalise_from_data(model, [data.slice(0, 24), data.slice(24, 48)])
        models[prior] = (family, model, fitted)
    assert models["standard"][2] == {}
    fitted = models["mixture"][2]
    assert fitted["latent_heldout_logp_prior"] > fitted["latent_heldout_logp_unit"] + 4.0, fitted
    family, model, _ = models["mixture"]
    cond = norm({"luminosity": torch.full((64,), 6e35, dtype=torch.float64)})
    seeds = _seeds(2, 0, 64)
    drawn = []
    for m in (model, models["standard"][1]):
        latents = {}
        orig = m.sequence_context
        m.sequence_context = lambda u, z, orig=orig, latents=latents: (latents.setdefault("z", z), orig(u, z))[1]
        with torch.no_grad():
            generate_tokens(m.eval(), cond, seeds, max_hits=8)
        del m.sequence_context
        drawn.append(latents["z"][:64])
    # the mixture's draws sit where the shifted encoder puts the events, the standard's at the unit normal
    torch.testing.assert_close(drawn[0].mean(0), torch.tensor([3.0, -2.0, 1.5]), atol=0.6, rtol=0)
    expected = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    assert torch.equal(drawn[1], expected)


def test_sensor_groups_context_comes_from_the_earlier_groups_only():
    """The summary a sequence of group g sees is made of the tokens of groups < g of its own event:
    changing a later group's (or its own group's) tokens leaves it as it was."""
    model = _cluster_model(sensor_groups=4)
    with torch.no_grad():
        model.group_in.weight.normal_()
    events = simulate_pxd_background(get_geometry("pxd-tiny"), 3, 7, luminosity=8e35)
    tok = model.tokenize(TorchHits.from_batch(events))
    B, U = 3, model.layout.n_units
    sums = model.token_sums(tok.values, tok.hit_mask()).view(B, U, 3)
    assert float(sums[..., 0].sum()) > 100 and bool((sums[..., 1] >= sums[..., 0]).all())
    group = model.unit_group
    base = model.group_context(sums).view(B, U, -1)
    first = model.group_context(torch.zeros_like(sums)).view(B, U, -1)
    assert torch.equal(base[:, group == 0], first[:, group == 0])  # the first group sees nothing
    changed = sums.clone()
    changed[1, group == 2] *= torch.tensor([2.0, 3.0, 0.5])
    after = model.group_context(changed).view(B, U, -1)
    assert torch.equal(after[:, group <= 2], base[:, group <= 2])
    assert torch.equal(after[[0, 2]], base[[0, 2]])  # other events: untouched
    assert not torch.allclose(after[1, group == 3], base[1, group == 3])


def test_sensor_groups_are_balanced_and_reject_more_groups_than_units():
    from uhg.models.transformer import unit_groups

    assert torch.bincount(unit_groups(40, 4)).tolist() == [10] * 4
    assert torch.bincount(unit_groups(16, 4)).tolist() == [4] * 4  # pxd layer 1: every group holds some
    with pytest.raises(ValueError, match="sensor_groups"):
        _cluster_model(sensor_groups=41)
    # 40 units make at most 21 distinct groups (ladder pair + sensor along z): more would stay empty
    assert torch.bincount(unit_groups(40, 21)).min() > 0
    _cluster_model(sensor_groups=21)
    with pytest.raises(ValueError, match="must not exceed 21"):
        _cluster_model(sensor_groups=22)
    with pytest.raises(ValueError):
        TransformerConfig(sensor_groups=0)


def test_sensor_groups_sampling_is_exact_and_deterministic():
    """Grouped sampling draws each sequence with its own event's and unit's counters: with the
    summary's map at zero (its start) it gives the ungrouped model's events bit for bit; with a
    learned map the events change, and stay the same for any batch split and with or without the cache."""
    kw = {"cluster_exclusive": True, "cluster_merge_redraws": 4}
    plain = _grid_events(_cluster_model(**kw))
    model = _cluster_model(sensor_groups=4, **kw)
    _assert_same_hits(_grid_events(model), plain)
    with torch.no_grad():
        model.group_in.weight.normal_(std=2.0)
    whole = _grid_events(model)
    assert whole.n_hits > 100
    assert not (len(whole.columns["row"]) == len(plain.columns["row"])
                and all(np.array_equal(whole.columns[k], plain.columns[k]) for k in ("row", "col", "value")))
    for batch_events in (1, 2):
        _assert_same_hits(_grid_events(model, batch_events), whole)
    cached = generate_tokens(model, GRID_COND[:2], _seeds(3, 0, 2), max_hits=12)
    full = generate_tokens(model, GRID_COND[:2], _seeds(3, 0, 2), max_hits=12, use_cache=False)
    for k in ("rows", "cols", "values", "lengths"):
        assert torch.equal(getattr(cached, k), getattr(full, k))


def _summary_model(**kw) -> HitTransformer:
    """`_cluster_model` with event_summary (count law per sensor), its summary fitted to 12 simulated events."""
    model = _cluster_model(event_summary=True, multiplicity="count", count_law="power", count_bootstrap=0, **kw)
    events = simulate_pxd_background(get_geometry("pxd-tiny"), 12, 9, luminosity=8e35)
    tokens = model.tokenize(TorchHits.from_batch(events))
    sums = model.token_sums(tokens.values, tokens.hit_mask()).view(12, -1, 3)
    model.fit_event_summary(sums.sum(1), torch.linspace(-1, 1, 12)[:, None], tokens.lengths.view(12, -1))
    return model


def test_event_summary_sampling_starts_as_without_it_and_is_deterministic():
    """With the summary's map at zero (its start) the events equal those of the model without the key
    bit for bit, alone and with sensor_groups; with a learned map they change, and stay the same for
    any batch split."""
    laws = {"multiplicity": "count", "count_law": "power", "count_bootstrap": 0}
    for groups in (1, 4):
        plain = _grid_events(_cluster_model(sensor_groups=groups, **laws))
        model = _summary_model(sensor_groups=groups)
        _assert_same_hits(_grid_events(model), plain)
    with torch.no_grad():
        model.summary_in.weight.normal_(std=4.0)
    whole = _grid_events(model)
    assert whole.n_hits > 50
    assert not (len(whole.columns["value"]) == len(plain.columns["value"])
                and np.array_equal(whole.columns["value"], plain.columns["value"]))
    for batch_events in (1, 2):
        _assert_same_hits(_grid_events(model, batch_events), whole)


def test_event_summary_draws_are_the_training_events_around_their_trend():
    """The fitted trend plus the bank's residuals give back the training events' summaries; beyond the
    range the draws shift by the trend fitted to them (here 0.05 in log size per unit of condition)."""
    model = _cluster_model(event_summary=True, multiplicity="count", count_law="power", count_bootstrap=0)
    g = torch.Generator().manual_seed(0)
    B, U = 200, model.layout.n_units
    cond = torch.rand(B, 1, generator=g) * 2 - 1
    counts = torch.randint(1, 9, (B, U), generator=g)
    log_size = 1.0 + 0.05 * cond[:, 0] + 0.01 * torch.randn(B, generator=g)
    charge = 0.3 + 0.02 * torch.randn(B, generator=g)
    n = counts.sum(1).float()
    model.fit_event_summary(torch.stack([n, n * log_size.exp(), n * charge], 1), cond, counts)
    u = (torch.arange(B, dtype=torch.float64) + 0.5) / B  # every bank event once
    back = model.draw_event_summary(cond, counts, u)
    torch.testing.assert_close(back, torch.stack([log_size, charge], 1), atol=1e-5, rtol=0)
    shift = model.draw_event_summary(cond + 1, counts, u) - back
    torch.testing.assert_close(shift[:, 0], torch.full((B,), 0.05), atol=0.005, rtol=0)
    assert float(shift[:, 1].abs().max()) < 0.01
    with pytest.raises(ValueError, match="fit_events"):
        model.fit_event_summary(torch.ones(10000, 3), torch.zeros(10000, 1), torch.ones(10000, U, dtype=torch.long))
