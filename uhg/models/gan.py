"""Sensor-conditioned GAN (IEA-GAN style) for pixel detectors and calorimeters.

An event is `n_units` same-shape images (PXD sensors or calorimeter layers, see
`uhg.models.gan_layout`). The generator turns event noise, per-unit noise, a unit embedding
(learned id + geometry features) and the event conditions (FiLM) into one token per unit,
couples the tokens of an event by self-attention (the relational module), and decodes every
token into an image with a conv decoder. Each pixel gets two outputs: a hit gate (logit of
"this pixel fires") and an encoded charge/energy; with cluster growth (pixel detectors) each
sensor token also gives 8 spread logits, the odds that a seed fires each neighbour. Sparsity is learnable because the
gates are hard 0/1 decisions in the forward pass (relaxed logistic noise, straight-through
gradient), so the discriminator sees exactly-zero pixels like in real data.

The discriminator scores every unit image (conv encoder with spectral norm, projection on the
unit + condition embedding) and the whole event (self-attention over the unit features). Its
hit channel is the generator's straight-through mask, so where hits are gets a gradient too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from uhg.config.gan import GanConfig
from uhg.models.cluster_bank import bank_offsets
from uhg.models.common import ConditionEmbedding, FiLM, SensorEmbedding
from uhg.models.gan_layout import UnitLayout
from uhg.models.gan_seeds import place_counted_seeds
from uhg.models.laws import CountLaw

INITIAL_OCCUPANCY = 0.01  # gate bias at start: ~1% of pixels fire, the order of PXD occupancy
CHARGE_QUANTILES = 1025  # knots of the charge quantile table (every 1/1024 in percentile: with 65 the linear
# top interval up to the largest charge widened the spectrum, event charge std 22.8 ADU against 19.4)
INITIAL_SPREAD = 0.1  # probability that a seed fires each neighbour, at start (without a data fit)
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # (row, col) steps
# Window of a cluster shape, from its anchor (its first pixel in row-major order): rows 0..7 below
# it, columns -8..8 (a shape never has pixels above its anchor). 99.9% of pxd-mini background
# clusters fit; the rest are left out of the fitted shape table.
SHAPE_ROWS = 8
SHAPE_HALF_COLS = 8
NO_SHAPE = -1.0e4  # log-prior of an unused table entry (finite: state dicts stay comparable)


def _base_grid(height: int, width: int, n_up: int) -> tuple[int, int]:
    f = 2**n_up
    return max(1, math.ceil(height / f)), max(1, math.ceil(width / f))


class UpBlock(nn.Module):
    """x2 nearest upsampling, 3x3 conv, FiLM from the unit token, LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, token_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = FiLM(token_dim, c_out)
        self.act = nn.LeakyReLU(0.2, inplace=True)  # on FiLM's fresh output: one full-size map less

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.conv.weight.dtype and not torch.is_grad_enabled():  # sampling in bf16
            y = _conv_as(self.conv, upsample2(x))
        else:
            y = self.conv(upsample2(x))
        if torch.is_grad_enabled():
            return self.act(self.film(y, token))
        # Sampling: FiLM on the convolution's fresh output in place (the same products and sums,
        # bit for bit, without two more full-size maps: ~5 ms of a full PXD event).
        return self.act(self.film.modulate_(y, token))


def _conv_as(conv: nn.Conv2d, x: torch.Tensor, channels: slice = slice(None)) -> torch.Tensor:
    """`conv` (its output `channels`) on x in x's dtype: the weights cast to it (a few thousand numbers)."""
    return nn.functional.conv2d(x, conv.weight[channels].to(x.dtype), conv.bias[channels].to(x.dtype),
                                padding=conv.padding)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """x2 nearest-neighbour upsampling of (N, C, H, W). Channels-last maps by `interpolate` (whose
    channels-last kernel is fast); contiguous ones as copies: the same values in half the CPU time
    of `interpolate`, and when no gradient is needed as strided copies of x into the even columns
    of the even rows, then of those rows into the odd rows (another ~40% less than one broadcast
    copy, whose innermost dimension is a stride-0 pair)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    n, c, h, w = x.shape
    if torch.is_grad_enabled() and x.requires_grad:
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
    out = x.new_empty(n, c, h, 2, w, 2)
    out[:, :, :, 0, :, 0] = x
    out[:, :, :, 0, :, 1] = x
    out[:, :, :, 1] = out[:, :, :, 0]
    return out.view(n, c, 2 * h, 2 * w)


class Generator(nn.Module):
    """(z (B, z_dim), unit noise (B, U, sensor_noise_dim), conditions (B, C), pixel noise
    (B, U, pixel_noise_channels, H, W) standard normal or None) -> gate logits and encoded
    values, both (B, U, H, W), and the spread logits of cluster growth (B, U, 8, 1, 1) (or None).

    Clusters and stochastic charge (pixel detectors, optional):
    - cluster growth: the gate fires cluster *seeds*; each seed also fires each of its 8
      neighbours with a learned probability (8 logits per sensor of the event, from its token:
      `spread`), a noisy OR (see `grow_clusters`). Independent pixels cannot make clusters: real background is
      ~3-pixel clusters of which only a quarter are single pixels;
    - stochastic charge: the charge logit plus a standard-normal noise map is a score whose
      percentile is mapped through a table of charge quantiles (`charge_quantiles`, fitted to the
      training data before the first step), so a generator that has learned nothing yet already
      draws the data's charge spectrum, and training shifts each pixel's percentile.
    A per-unit gate offset linear in the conditions (`unit_gate`, fitted to the
    per-sensor occupancy of the training data) starts every sensor at its mean occupancy."""

    def __init__(self, layout: UnitLayout, cfg: GanConfig, n_conditions: int):
        super().__init__()
        self.layout, self.cfg = layout, cfg
        e = cfg.embed_dim
        self.units = SensorEmbedding(layout.features, e)
        self.cond = ConditionEmbedding(n_conditions, e)
        self.z_proj = nn.Linear(cfg.z_dim, e)
        self.unit_noise_proj = nn.Linear(cfg.sensor_noise_dim, e) if cfg.sensor_noise_dim else None
        self.token_film = FiLM(e, e)
        self.relational = nn.ModuleList(
            nn.TransformerEncoderLayer(e, cfg.attention_heads, 2 * e, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(cfg.attention_layers)
        )
        self.norm = nn.LayerNorm(e)
        ch = cfg.decoder_channels
        self.shuffle = cfg.pixel_shuffle
        grid_h, grid_w = math.ceil(layout.height / self.shuffle), math.ceil(layout.width / self.shuffle)
        self.h0, self.w0 = _base_grid(grid_h, grid_w, len(ch) - 1)
        self.to_grid = nn.Linear(e, ch[0] * self.h0 * self.w0)
        self.blocks = nn.ModuleList(UpBlock(a, b, e) for a, b in zip(ch[:-1], ch[1:], strict=True))
        pixel = layout.kind == "pixel"
        self.growth = cfg.cluster_growth and pixel
        self.charge_noise = cfg.charge_noise and pixel
        self.n_shapes = cfg.cluster_shapes if pixel else 0
        n_spread = len(NEIGHBOURS) if self.growth else 0
        self.head = nn.Conv2d(ch[-1], 2 * self.shuffle**2, 3, padding=1)
        with torch.no_grad():  # channels are (gate, code) x s^2 sub-pixels, gate first
            s2 = self.shuffle**2
            self.head.bias.zero_()
            self.head.bias[:s2] = _logit(INITIAL_OCCUPANCY / (1 + n_spread * INITIAL_SPREAD))
        # Per sensor, not per pixel: 8 more head channels at full resolution tripled the step time.
        self.spread = nn.Linear(e, n_spread) if self.growth else None
        if self.spread is not None:
            nn.init.zeros_(self.spread.weight)
            nn.init.constant_(self.spread.bias, _logit(INITIAL_SPREAD))
        # Cluster shapes: a table of pixel patterns (stencils in the shape window) with a
        # per-sensor log-prior, both fitted to the training data (before: the single pixel only);
        # the sensor token shifts the log-odds of each shape.
        self.shape_logits = nn.Linear(e, self.n_shapes) if self.n_shapes else None
        if self.shape_logits is not None:
            nn.init.zeros_(self.shape_logits.weight)
            nn.init.zeros_(self.shape_logits.bias)
            stencils = torch.zeros(self.n_shapes, SHAPE_ROWS, 2 * SHAPE_HALF_COLS + 1)
            stencils[0, 0, SHAPE_HALF_COLS] = 1.0
            prior = torch.full((layout.n_units, self.n_shapes), NO_SHAPE)
            prior[:, 0] = 0.0
            self.register_buffer("shape_stencils", stencils)
            self.register_buffer("shape_prior", prior)
            # The shape mix changes with the conditions (pxd-mini: mean cluster size 2.95 at 2-3e35,
            # 3.10 at 6-8e35): a tilt of the log-odds along each shape's standardised log size,
            # linear in the conditions, fitted to the data and trained.
            self.register_buffer("shape_log_size", torch.zeros(self.n_shapes))
            self.shape_tilt = nn.Parameter(torch.zeros(n_conditions))
        # Charge profile of the shapes: the data's charge is not independent of where a pixel sits in
        # its cluster (pxd-mini at 8e35: single-pixel clusters 15.8 ADU on average, pixels of 3-4
        # pixel clusters above the mean 22): per shape and stencil position, the mean and spread of
        # the normal score of the data's charge there, fitted to the training data; the charge score
        # of a pixel is then head + mean + spread x noise (head + noise without the profile).
        self.charge_profile = bool(cfg.cluster_charge_profile and self.n_shapes and self.charge_noise)
        if self.charge_profile:
            window = (self.n_shapes, SHAPE_ROWS, 2 * SHAPE_HALF_COLS + 1)
            self.register_buffer("shape_charge_mean", torch.zeros(window))
            self.register_buffer("shape_charge_sd", torch.ones(window))
        # Shared cluster charge: one particle deposits one (Landau-distributed) charge that diffuses
        # over its cluster's pixels, so their charges rise and fall together (pxd-mini training data,
        # after the profile: size x the variance of a cluster's mean residual score 1.05 for 2-pixel,
        # 1.3 for 4-pixel, 1.8 for 8-pixel clusters; 1 for independent pixels). Per shape, the
        # fitted correlation rho of the pixels' residual scores: every cluster draws one standard
        # normal score, shared by its pixels with weight sqrt(rho) (their own noise sqrt(1 - rho)),
        # so each pixel's charge spectrum is unchanged.
        self.charge_share = bool(self.charge_profile and cfg.cluster_charge_share)
        if self.charge_share:
            self.register_buffer("shape_charge_share", torch.zeros(self.n_shapes))
        # Cluster charge bank: the charges of a cluster's pixels are not a Gaussian copula of their
        # spectra (pxd-mini 2-pixel clusters: the data's total is peaked at 35-50 ADU, the charge split
        # between the pixels; the profile with a shared score drew it broad, cluster-charge separation
        # power 0.03 within that size). Per shape, the encoded pixel charges of training clusters of
        # that shape (their pixels in stencil order, `bank_size` in all); each placed cluster takes one.
        self.charge_bank = bool(self.charge_profile and cfg.cluster_charge_bank)
        if self.charge_bank:
            self.register_buffer("shape_charge_bank", torch.zeros(cfg.cluster_charge_bank))
            # float, not long: the EMA averages the floating-point state and keeps it at its fit; exact below 2^24
            self.register_buffer("shape_bank_start", torch.zeros(self.n_shapes))
            self.register_buffer("shape_bank_count", torch.zeros(self.n_shapes))
        # Per sensor (`cluster_charge_bank_per_sensor`): a shape's charge differs between the layers, and
        # the pooled bank, two thirds of it layer 1's clusters, gave pxd-mini's layer-2 pixels 2.5% too
        # little charge and layer 1's 1.8% too much. Within each shape's clusters, those of each unit lie
        # together: the first (in clusters from the shape's start) and how many.
        self.bank_per_unit = bool(self.charge_bank and cfg.cluster_charge_bank_per_sensor)
        if self.bank_per_unit:
            self.register_buffer("unit_bank_first", torch.zeros(layout.n_units, self.n_shapes))
            self.register_buffer("unit_bank_count", torch.zeros(layout.n_units, self.n_shapes))
        # Clusters per sensor from a count law fitted to the training data (NB per sensor, one-factor
        # copula for event-wide fluctuations): the gate only says where seeds go, the law how many.
        # A gate alone gives every event the same expected count (hits-per-event spread too narrow)
        # and a log-linear rate that misses beyond the training range.
        self.counts = CountLaw(layout.n_units, n_conditions, layout.height * layout.width, cfg.count_law) \
            if cfg.count_law and self.n_shapes else None
        # `merge_density_correction`: per sensor, the merged fraction of placed seeds per seed / pixel (the fitted start's)
        if self.counts is not None and cfg.merge_density_correction:
            self.register_buffer("merge_density", torch.zeros(layout.n_units))
        self.unit_gate = nn.Parameter(torch.zeros(layout.n_units, 1 + n_conditions))
        self.register_buffer("charge_quantiles", torch.linspace(layout.min_code, 1.0, CHARGE_QUANTILES))

    @property
    def pixel_noise_channels(self) -> int:
        """Standard-normal noise maps per unit image that `forward` takes (0: it takes none)."""
        return int(self.charge_noise)

    def tokens(self, z: torch.Tensor, unit_noise: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """(B, U, E) unit tokens after the relational module."""
        b = z.shape[0]
        c = self.cond(cond, b)  # (B, E)
        t = self.units().unsqueeze(0) + self.z_proj(z).unsqueeze(1)  # (B, U, E)
        if self.unit_noise_proj is not None and unit_noise is not None:
            t = t + self.unit_noise_proj(unit_noise)
        t = self.token_film(t.reshape(-1, t.shape[-1]), c.repeat_interleave(self.layout.n_units, 0)).view_as(t)
        for block in self.relational:
            t = block(t)
        return self.norm(t)

    def _decode(self, tok: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B * U, E) unit tokens -> the last block's output (B * U, C, H / s, W / s), channels-last.
        The last block and the head run at the decoder's full resolution and are most of its cost;
        channels-last halves their CPU time and gives the same values, bit for bit, as the
        contiguous layout (measured; the wider early blocks would sum in another order, for no gain).
        `dtype` bf16 (sampling, `sample_precision`): every block in bf16 and channels-last, where
        oneDNN's AMX kernels take a third to a quarter of the fp32 time per convolution."""
        x = self.to_grid(tok).view(len(tok), -1, self.h0, self.w0)
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype=dtype, memory_format=torch.channels_last)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x.contiguous(memory_format=torch.channels_last) if i == last else x, tok)
        return x.contiguous(memory_format=torch.channels_last)

    def _gate_offset(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, U) per-unit gate offset, linear in the conditions."""
        offset = self.unit_gate[:, 0].expand(cond.shape[0], -1)
        if self.unit_gate.shape[1] > 1:
            offset = offset + cond @ self.unit_gate[:, 1:].T
        return offset

    def _clusters(self, tok: torch.Tensor, cond: torch.Tensor, b: int) -> torch.Tensor | None:
        """The third output of `forward` from the (B * U, E) tokens."""
        u = self.layout.n_units
        if self.shape_logits is not None:
            tilt = (cond.to(self.shape_tilt.dtype) @ self.shape_tilt)[:, None, None] * self.shape_log_size
            return self.shape_prior + tilt + self.shape_logits(tok).view(b, u, -1)
        if self.spread is not None:
            return self.spread(tok).view(b, u, -1, 1, 1)
        return None

    def forward(self, z: torch.Tensor, unit_noise: torch.Tensor | None, cond: torch.Tensor,
                pixel_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (gate logits (B, U, H, W), encoded values (B, U, H, W), spread logits (B, U, 8, 1, 1)
        or None without cluster growth)."""
        b, u, h, w = z.shape[0], self.layout.n_units, self.layout.height, self.layout.width
        tok = self.tokens(z, unit_noise, cond).reshape(b * u, -1)
        out = self.head(self._decode(tok)).contiguous()  # the per-pixel maps below: row-contiguous, as vectorised kernels want
        if self.shuffle > 1:
            out = nn.functional.pixel_shuffle(out, self.shuffle)
        out = out[:, :, :h, :w]
        gate, score = out[:, 0], out[:, 1]
        if self.charge_profile:  # the noise enters after placement (`profile_code`)
            pass
        elif self.charge_noise:
            if pixel_noise is None or pixel_noise.shape[2] != 1:
                raise ValueError("the generator takes one pixel noise map per unit image (charge_noise)")
            score = score + pixel_noise.reshape(b * u, h, w)
        gate = gate.reshape(b, u, h, w) + self._gate_offset(cond)[:, :, None, None]
        clusters = self._clusters(tok, cond, b)
        if self.charge_profile:
            return gate, score.reshape(b, u, h, w), clusters
        return gate, self._code(score).reshape(b, u, h, w), clusters

    # -- sampling: the same values as `forward`, without its dense per-pixel work beyond the gates
    @torch.no_grad()
    def sample_maps(self, z: torch.Tensor, unit_noise: torch.Tensor | None,
                    cond: torch.Tensor) -> tuple[HeadMaps, torch.Tensor, torch.Tensor | None]:
        """-> (the head's output, the per-image gate offset (B * U,), clusters): what `gate_map`,
        `gate_at` and `code_at` read `forward`'s gates and values from, bit for bit, and `forward`'s
        clusters. Nothing is computed per pixel here: with a count law the gates are needed at a
        few candidate pixels only (`uhg.models.gan_seeds`), and the values at the hits (~1% of the
        pixels; the charge map and its pixel shuffle were a third of the sampling cost)."""
        b = z.shape[0]
        tok = self.tokens(z, unit_noise, cond).reshape(b * self.layout.n_units, -1)
        x = self._decode(tok, torch.bfloat16 if self.cfg.sample_precision == "bf16" else None)
        # The gate and the charge channels as two convolutions: each 16-channel half took a fifth
        # of the time of the 32-channel head on CPU (same values, bit for bit); the charge half is
        # not computed where the charge bank gives the charges. In bf16 the maps stay bf16: they are
        # read at a few pixels (`gate_at`, `code_at`) or reduced (`gate_max`) and widened there.
        s2 = self.shuffle**2
        gate = _conv_as(self.head, x, slice(None, s2))
        charge = None if self.charge_bank else _conv_as(self.head, x, slice(s2, None))
        return HeadMaps(gate, charge), self._gate_offset(cond).reshape(-1), self._clusters(tok, cond, b)

    def gate_map(self, head: HeadMaps, offset: torch.Tensor) -> torch.Tensor:
        """(B, U, H, W) gate logits of `forward` from `sample_maps`'s head and offset."""
        u, h, w = self.layout.n_units, self.layout.height, self.layout.width
        s, (hs, ws) = self.shuffle, head.gate.shape[2:]
        # The pixel shuffle of the gate channels, the gate offset and the crop in one pass: the
        # channels-last head holds each position's s x s sub-pixels next to each other.
        sub = head.gate.permute(0, 2, 3, 1).unflatten(-1, (s, s)).transpose(2, 3)  # (N, hs, s, ws, s)
        offset = offset.reshape(-1, 1, 1, 1, 1)
        gate = torch.add(sub, offset, out=sub.new_empty(len(sub), hs, s, ws, s,
                                                        dtype=torch.promote_types(sub.dtype, offset.dtype)))
        return gate.view(-1, u, hs * s, ws * s)[:, :, :h, :w]

    def gate_at(self, head: HeadMaps, offset: torch.Tensor, image: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """`gate_map`'s values at `pixel` (flat row * W + col) of image `image` (b * U + u), both (n,)."""
        w = self.layout.width
        return _sub_pixels(head.gate, self.shuffle, image, pixel // w, pixel % w) + offset[image]

    def gate_max(self, head: HeadMaps, offset: torch.Tensor) -> torch.Tensor:
        """(B * U,) an upper bound of each image's gate (its maximum, or above it: rows the crop cuts
        count too)."""
        gate = head.gate  # channels-last: each image is one contiguous row (a 4-D reduction was 5x slower)
        return gate.permute(0, 2, 3, 1).reshape(len(gate), -1).amax(dim=1) + offset

    def code_at(self, head: HeadMaps, index: tuple[torch.Tensor, ...],
                pixel_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded values at the pixels `index` = (event, unit, row, col) from `sample_maps`'s head
        output; `pixel_noise` (n,): the pixel noise map (charge_noise) at those pixels."""
        score = self._score_at(head, index)
        if self.charge_noise:
            if pixel_noise is None:
                raise ValueError("the generator takes one pixel noise map per unit image (charge_noise)")
            score = score + pixel_noise
        return self._code(score)

    def profile_code_at(self, head: HeadMaps, index: tuple[torch.Tensor, ...], pixel_noise: torch.Tensor | None,
                        charges: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`profile_code` at the hits `index` only, from `sample_maps`'s head output and the charge
        maps of `sample_clusters(..., at_hits=True)` (at the same hits); `pixel_noise` (n,): the noise
        at the hits (unused with the bank)."""
        if self.charge_bank:
            return charges[0]
        score = self._score_at(head, index)
        mean, sd = charges
        return self._code(score + mean.to(score.dtype) + sd.to(score.dtype) * pixel_noise)

    def _score_at(self, head: HeadMaps, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The charge score before noise at the pixels `index` = (event, unit, row, col)."""
        ev, unit, row, col = index
        score = _sub_pixels(head.charge, self.shuffle, ev * self.layout.n_units + unit, row, col)
        return score.to(torch.promote_types(score.dtype, self.head.weight.dtype))  # a bf16 head read in fp32

    def profile_code(self, score: torch.Tensor, pixel_noise: torch.Tensor,
                     charges: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """With a charge profile, forward's second output is the charge score before noise: the encoded
        charge (B, U, H, W) of the clusters that `sample_clusters` placed with `charges` (its second
        output), head + mean + spread x `pixel_noise` (B, U, 1, H, W) of the shape and position that
        covers each pixel."""
        if self.charge_bank:
            return charges[0].to(score.dtype)
        mean, sd = charges
        return self._code(score + mean.to(score.dtype) + sd.to(score.dtype) * pixel_noise[:, :, 0])

    def sample_clusters(self, seeds: torch.Tensor, clusters: torch.Tensor, uniforms: torch.Tensor,
                        at: torch.Tensor | None = None, at_hits: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The clusters grown from `seeds` (B, U, H, W) bool (`at`: `seeds.nonzero()`, if known) with
        `uniforms` (n_seeds, draws_per_seed), shapes drawn and placed once: (the hit mask of
        `place_clusters`, the charge maps (B, U, H, W) of the charge profile: with the bank (the
        encoded charges,): each cluster's from the training cluster of its shape that its second
        uniform picks; else (offset, scale) of each pixel's noise: the profile's mean and spread of
        the shape and position covering it; with a shared cluster charge the offset also holds the
        cluster's own score (from the second uniform) with weight spread x sqrt(rho), and the scale
        is spread x sqrt(1 - rho); () without a profile). With `at_hits` the charge maps are given at
        the hits only, (n_hits,) in the order of `mask.nonzero()` (what `profile_code_at` takes)."""
        at = seeds.nonzero() if at is None else at
        choice = draw_shapes(seeds, clusters.detach(), uniforms[:, 0], at=at)
        stencils = self.shape_stencils
        if not self.charge_profile:
            return place_shapes(seeds, choice, stencils, at=at, at_hits=at_hits), ()
        if self.charge_bank:
            per_unit = (at[:, 1], self.unit_bank_count, self.unit_bank_first) if self.bank_per_unit else ()
            base = bank_offsets(choice, uniforms[:, 1], self.shape_pixels[choice], self.shape_bank_count,
                                self.shape_bank_start, *per_unit)
            mask, (code,) = place_shapes(seeds, choice, stencils, per_pixel=((self.shape_charge_bank, base),), at=at,
                                         at_hits=at_hits)
            return mask, (code,)
        tables = (self.shape_charge_mean, self.shape_charge_sd)
        if not self.charge_share:
            mask, (mean, sd) = place_shapes(seeds, choice, stencils, tables, at=at, at_hits=at_hits)
            return mask, (mean, sd)
        cluster_score = torch.special.ndtri(uniforms[:, 1].double().clamp(1e-7, 1 - 1e-7)).to(self.shape_charge_sd.dtype)
        rho = self.shape_charge_share[choice].clamp(0.0, 1.0)
        mask, (mean, sd, shared, own) = place_shapes(seeds, choice, stencils, tables,
                                                     per_seed=(cluster_score * rho.sqrt(), (1 - rho).sqrt()), at=at,
                                                     at_hits=at_hits)
        return mask, (mean + sd * shared, sd * own)

    # -- clusters: the gate fires seeds; `clusters` (the third output of forward) say how they grow
    def draw_counts(self, cond: torch.Tensor, u_unit: torch.Tensor, u_event: torch.Tensor) -> torch.Tensor:
        """(B, U) long: seeds per sensor drawn from the count law by uniforms u_unit (B, U) and
        u_event (B,) (elementwise per event: a draw does not depend on the batch)."""
        b, u = u_unit.shape
        n, _ = self.counts.sample(u_unit.reshape(-1), u_event, cond.to(self.counts.positions.dtype),
                                  self.layout.height * self.layout.width)
        n = n.view(b, u)
        if self.cfg.merge_density_correction:
            n = seeds_for_clusters(n, self.merge_density, self.layout.height * self.layout.width)
        return n

    @property
    def shape_pixels(self) -> torch.Tensor:
        """(n_shapes,) pixels of each table shape (its stencil's count; the stencils are 0/1)."""
        return self.shape_stencils.flatten(1).sum(1).round().long()

    @property
    def draws_per_seed(self) -> int:
        """Uniform random numbers `place_clusters` takes per seed (the shape; with a shared cluster
        charge, also the cluster's charge score)."""
        return (1 + int(self.charge_share or self.charge_bank)) if self.n_shapes else len(NEIGHBOURS)

    def fire_probability(self, seed: torch.Tensor, clusters: torch.Tensor | None) -> torch.Tensor:
        """(B, U, H, W) probability that a pixel fires, from the seed probabilities (differentiable)."""
        if clusters is None:
            return seed
        if self.n_shapes:
            return 1 - torch.exp(-expected_shape_hits(seed, self.shape_footprint(clusters)))
        return grow_clusters(seed, torch.sigmoid(clusters))

    def shape_footprint(self, clusters: torch.Tensor) -> torch.Tensor:
        """(B, U, SHAPE_ROWS, 2 * SHAPE_HALF_COLS + 1): expected pixels a seed fires at each offset."""
        probs = torch.softmax(clusters, dim=-1)
        return (probs @ self.shape_stencils.flatten(1)).view(*clusters.shape[:2], *self.shape_stencils.shape[1:])

    def place_clusters(self, seeds: torch.Tensor, clusters: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Sampled clusters: seeds (B, U, H, W) bool, `uniforms` (n_seeds, draws_per_seed) in [0, 1),
        row i for the i-th seed of `seeds.nonzero()`. Returns the (B, U, H, W) bool hit mask."""
        if not self.n_shapes:
            at = seeds.nonzero()
            return grow_seeds(seeds, uniforms < torch.sigmoid(clusters)[at[:, 0], at[:, 1], :, 0, 0])
        return place_shapes(seeds, draw_shapes(seeds, clusters, uniforms[:, 0]), self.shape_stencils)

    def _code(self, score: torch.Tensor) -> torch.Tensor:
        """Encoded charge from the charge logit/score (see the class docstring)."""
        if not self.charge_noise:
            lo = self.layout.min_code
            return lo + (1 - lo) * torch.sigmoid(score)
        q = self.charge_quantiles
        pos = 0.5 * (1 + torch.erf(score / math.sqrt(2))) * (len(q) - 1)  # percentile -> table position
        i = pos.detach().floor().clamp(0, len(q) - 2)
        frac = pos - i
        i = i.long()
        return q[i] + frac * (q[i + 1] - q[i])


class HeadMaps(NamedTuple):
    """The head's output as `Generator.sample_maps` computes it: gate and charge channels, each
    (B * U, s^2, H / s, W / s) channels-last, sub-pixel (i, j) in channel i * s + j."""

    gate: torch.Tensor
    charge: torch.Tensor | None  # None where the charge bank gives the charges


def _sub_pixels(maps: torch.Tensor, s: int, image: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Values of (N, s^2, H / s, W / s) sub-pixel maps at pixels (row, col) of images `image`, (n,)
    each: one flat gather where the maps are channels-last (4x faster than indexing 4 dimensions)."""
    if s & (s - 1) == 0:  # a power of two (the usual shuffle): shifts and masks, ~1.5x faster than // and %
        k = s.bit_length() - 1
        channel, y, x = ((row & (s - 1)) << k) | (col & (s - 1)), row >> k, col >> k
    else:
        channel, y, x = (row % s) * s + col % s, row // s, col // s
    if not maps.is_contiguous(memory_format=torch.channels_last):
        return maps[image, channel, y, x]
    _, c, hs, ws = maps.shape
    return maps.permute(0, 2, 3, 1).reshape(-1)[((image * hs + y) * ws + x) * c + channel]


def seeds_for_clusters(clusters: torch.Tensor, density: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, U) long: the seeds s per sensor whose placed shapes leave `clusters` (B, U) clusters
    after their merges, when a fraction density_u x s / pixels of them merges into another:
    s (1 - k s / P) = n, the smaller root 2 n / (1 + sqrt(1 - 4 k n / P)) (at most 2 n, where the
    root is gone). The law counts the data's clusters, merged at the data's density; the placed
    shapes merge again the more the denser they lie, beyond the training range too."""
    n = clusters.double()
    disc = (1 - 4 * density.double() * n / pixels).clamp_min(0.0)
    return torch.round(2 * n / (1 + torch.sqrt(disc))).long()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _neighbour_kernel(device, dtype) -> torch.Tensor:
    """(1, 8, 3, 3) one-hot kernel: the cross-correlation of a (N, 8, H, W) map with it moves
    channel k by NEIGHBOURS[k] and sums the channels."""
    k = torch.zeros(1, len(NEIGHBOURS), 3, 3, device=device, dtype=dtype)
    for i, (dr, dc) in enumerate(NEIGHBOURS):
        k[0, i, 1 - dr, 1 - dc] = 1.0
    return k


def _from_neighbours(x: torch.Tensor) -> torch.Tensor:
    """x (B, U, 8, H, W), channel k at a seed pixel -> (B, U, H, W): at each pixel the sum of the
    channels k of its neighbours that point at it (one convolution, not eight shifted copies)."""
    b, u, k, h, w = x.shape
    out = nn.functional.conv2d(x.reshape(b * u, k, h, w), _neighbour_kernel(x.device, x.dtype), padding=1)
    return out.view(b, u, h, w)


def grow_clusters(seed: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Probability that a pixel fires under cluster growth: it is a seed, or a seed at a neighbour
    fires it (noisy OR, exact for independent seeds and spreads). seed (B, U, H, W) and spread
    (B, U, 8, H, W) or broadcastable (B, U, 8, 1, 1); spread[:, :, k] at the seed pixel: it fires
    its neighbour NEIGHBOURS[k]) are probabilities; differentiable."""
    reach = (seed.unsqueeze(2) * spread).clamp(max=1 - 1e-6)
    return 1 - (1 - seed) * torch.exp(_from_neighbours(torch.log1p(-reach)))


def grow_cluster_masks(seed: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """`grow_clusters` for 0/1 seed and spread masks (B, U, 8, H, W): a 0/1 mask, exactly."""
    return torch.maximum(seed, (_from_neighbours(seed.unsqueeze(2) * spread) > 0).to(seed.dtype))


def grow_seeds(seeds: torch.Tensor, fires: torch.Tensor) -> torch.Tensor:
    """Sampled cluster growth, sparse: seeds (B, U, H, W) bool; fires (n_seeds, 8) bool, row i
    for the i-th seed of `seeds.nonzero()` (row-major order), column k: it fires its neighbour
    NEIGHBOURS[k]. Returns the (B, U, H, W) bool hit mask. Draws only where seeds are, not
    8 random numbers per pixel."""
    out = seeds.clone()
    at = seeds.nonzero()
    h, w = seeds.shape[-2:]
    for k, (dr, dc) in enumerate(NEIGHBOURS):
        t = at[fires[:, k]]
        r, c = t[:, 2] + dr, t[:, 3] + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out[t[inside, 0], t[inside, 1], r[inside], c[inside]] = True
    return out


def expected_shape_hits(seed: torch.Tensor, footprint: torch.Tensor) -> torch.Tensor:
    """Expected clusters covering each pixel: seed probabilities (B, U, H, W) convolved with each
    image's own footprint (B, U, R, C), a seed at y firing y + (dr, dc - C // 2). By FFT: a
    grouped convolution (one group per image) was as fast forward but 4x slower in total, its
    backward dominated the pxd-mini training step (0.2 of 1.25 CPU s)."""
    h, w = seed.shape[-2:]
    r, c = footprint.shape[-2:]
    size = (h + r - 1, w + c - 1)  # zero-padded: a linear, not circular, convolution
    full = torch.fft.irfft2(torch.fft.rfft2(seed, s=size) * torch.fft.rfft2(footprint.to(seed.dtype), s=size), s=size)
    return full[..., :h, c // 2: c // 2 + w].clamp_min(0.0)  # FFT round-off: no negative counts


def draw_shapes(seeds: torch.Tensor, logits: torch.Tensor, uniforms: torch.Tensor,
                at: torch.Tensor | None = None) -> torch.Tensor:
    """Shape index of every seed (`seeds.nonzero()` order; `at`: that index, if known) from its
    image's shape logits (B, U, K), by inverting the image's cumulative distribution at `uniforms`
    (n_seeds,): one search over all images at once (image i's distribution shifted to [i, i + 1],
    float64 keeps rare shapes)."""
    b, u, k = logits.shape
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1).reshape(b * u, k)
    cdf = (cdf / cdf[:, -1:]).clamp(max=1.0) + torch.arange(b * u, device=cdf.device, dtype=cdf.dtype)[:, None]
    at = seeds.nonzero() if at is None else at
    image = at[:, 0] * u + at[:, 1]
    pos = torch.searchsorted(cdf.flatten(), image.double() + uniforms.double().clamp(0, 1 - 1e-12), right=True)
    return (pos - image * k).clamp(0, k - 1)


def place_shapes(seeds: torch.Tensor, choice: torch.Tensor, stencils: torch.Tensor,
                 tables: tuple[torch.Tensor, ...] = (), per_seed: tuple[torch.Tensor, ...] = (),
                 per_pixel: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (), at: torch.Tensor | None = None,
                 at_hits: bool = False):
    """(B, U, H, W) bool mask: the shape `choice[i]` (a row of the (K, R, C) 0/1 `stencils`) placed at
    the i-th seed of `seeds.nonzero()` (`at`: that index, if known), its anchor on the seed, moved
    inside the image where it would cross an edge. (Clipping instead would cut the shapes a second
    time: the table already holds the data's clusters as cut by the edges; on pxd-tiny clipped
    shapes were 7% too small.)
    With `tables` ((K, R, C) values per shape and stencil position), returns (mask, one (B, U, H, W)
    map per table: at each placed pixel the value of its shape and position, 0 elsewhere, then one
    map per `per_seed` (n_seeds,) values: at each placed pixel its seed's value, then one map per
    `per_pixel` (values (N,), base (n_seeds,)): at the j-th pixel of seed i's shape, in stencil
    order, values[base[i] + j]); where shapes overlap, the last placed gives the value. With
    `at_hits`, each map is given at the hits only, (n_hits,) in the order of `mask.nonzero()`."""
    out = torch.zeros(seeds.shape, dtype=torch.bool, device=seeds.device)
    n_maps = len(tables) + len(per_seed) + len(per_pixel)
    dtypes = [t.dtype for t in (*tables, *per_seed, *(v for v, _ in per_pixel))]
    if not len(choice):
        maps = tuple(torch.zeros((0,) if at_hits else seeds.shape, dtype=d, device=seeds.device) for d in dtypes)
        return (out, maps) if n_maps else out
    k, r, c = stencils.shape
    used = torch.unique(choice)
    sub = stencils[used] > 0  # only the drawn shapes: a table of up to thousands of entries
    remap = torch.zeros(k, dtype=torch.long, device=choice.device)
    remap[used] = torch.arange(len(used), device=choice.device)
    n_pix = sub.flatten(1).sum(1)
    p = int(n_pix.max())
    idx = torch.argsort((~sub.flatten(1)).to(torch.int8), dim=1, stable=True)[:, :p]  # pixels of each shape first
    dr, dc = idx // c, idx % c - c // 2  # (S, P)
    ok = torch.arange(p, device=idx.device)[None, :] < n_pix[:, None]  # (S, P): the shape's pixels
    big = torch.iinfo(torch.long).max // 4
    lowest = torch.where(ok, dr, -big).amax(1)
    left, right = torch.where(ok, dc, big).amin(1), torch.where(ok, dc, -big).amax(1)
    at = seeds.nonzero() if at is None else at
    s = remap[choice]
    h, w = seeds.shape[-2:]
    row0 = torch.minimum(at[:, 2], (h - 1 - lowest[s]).clamp_min(0))
    col0 = torch.maximum(torch.minimum(at[:, 3], w - 1 - right[s]), -left[s])
    # The placed pixels as one flat list, seed by seed and each shape's pixels in stencil order (the
    # row-major order of a (seeds, P) table of them, without its padding: ~3 pixels a seed, P ~13).
    n = n_pix[s]
    seed = torch.repeat_interleave(n)
    j = torch.arange(len(seed), device=seed.device) - (torch.cumsum(n, 0) - n)[seed]  # pixel of its shape
    q = s[seed] * p + j  # into the (S, P) shape tables
    rows, cols = row0[seed] + dr.flatten()[q], col0[seed] + dc.flatten()[q]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # not so for a shape larger than the image
    if not bool(inside.all()):
        seed, j, q, rows, cols = seed[inside], j[inside], q[inside], rows[inside], cols[inside]
    image = at[seed, 0] * seeds.shape[1] + at[seed, 1]
    where = (image * h + rows) * w + cols  # flat: a 1-D scatter is ~4x one over 4 indices
    out.view(-1)[where] = True
    if not n_maps:
        return out
    values = [t[used].flatten(1).gather(1, idx).flatten()[q] for t in tables]
    values += [v[seed] for v in per_seed]
    values += [v[base[seed] + j] for v, base in per_pixel]
    if at_hits:  # the last write to each hit, hits in row-major order: no dense map to fill and read
        hits, slot = torch.unique(where, sorted=True, return_inverse=True)
        last = torch.full((len(hits),), -1, dtype=torch.long, device=where.device)
        last.scatter_reduce_(0, slot, torch.arange(len(where), device=where.device), "amax")
        return out, tuple(v[last] for v in values)
    maps = tuple(torch.zeros(seeds.shape, dtype=d, device=seeds.device) for d in dtypes)
    for m, v in zip(maps, values, strict=True):
        m.view(-1)[where] = v
    return out, maps


def counted_seed_probability(gate: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, U, H, W) probability that a pixel is one of the counts[b, u] seeds of its image, to first
    order: counts x its share of the image's sigmoid(gate) (differentiable in the gate)."""
    p = torch.sigmoid(gate)
    share = p / p.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (counts.to(p.dtype)[:, :, None, None] * share).clamp(max=1.0)


def gate_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard logistic noise: a pixel with gate logit g fires when g + noise > 0, i.e. with
    probability sigmoid(g)."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def relaxed_images(gate: torch.Tensor, code: torch.Tensor, noise: torch.Tensor, temperature: float,
                   valid: torch.Tensor, clusters: torch.Tensor | None = None,
                   generator: Generator | None = None,
                   counts: torch.Tensor | None = None,
                   pixel_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-time images: hard 0/1 gates forward, gradient of the relaxed sigmoid gates backward.
    With clusters (`clusters`, the third output of `generator`'s forward), the gates fire seeds: the
    hard mask is the sampled clusters of the hard seeds (drawn from torch's RNG), the gradient that
    of `generator.fire_probability` of the relaxed seeds. With seed `counts` (B, U) (the count
    law's draws), exactly that many seeds per image (`place_counted_seeds`, torch's RNG), the
    gradient that of `counted_seed_probability`. With the generator's charge profile, `code` is its
    charge score and `pixel_noise` the noise of `Generator.profile_code`.
    Returns (images (B, U, H, W) in [0, 1], that straight-through 0/1 hit mask (B, U, H, W), the
    encoded charges (B, U, H, W))."""
    if counts is not None:
        soft = counted_seed_probability(gate, counts)
        hard = place_counted_seeds(gate, counts, torch.rand(gate.shape, device=gate.device)).to(soft.dtype)
    else:
        soft = torch.sigmoid((gate + noise) / temperature)
        hard = (soft > 0.5).to(soft.dtype)
    if clusters is not None:
        seeds = hard > 0
        uniforms = torch.rand(int(seeds.sum()), generator.draws_per_seed, device=gate.device)
        if generator.charge_profile:  # shapes drawn and placed once, for the hits and their charges
            placed, charges = generator.sample_clusters(seeds, clusters, uniforms)
            code = generator.profile_code(code, pixel_noise, charges)
        else:
            placed = generator.place_clusters(seeds, clusters.detach(), uniforms)
        hard = placed.to(soft.dtype)
        if torch.is_grad_enabled():
            soft = generator.fire_probability(soft, clusters)
    mask = (hard + soft - soft.detach()) * valid
    return mask * code, mask, code


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=bias))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Discriminator(nn.Module):
    """(images (B, U, H, W) in [0, 1], conditions (B, C), optional hit mask (B, U, H, W)) ->
    (per-unit scores (B, U), event score (B,))."""

    def __init__(self, layout: UnitLayout, cfg: GanConfig, n_conditions: int):
        super().__init__()
        self.layout = layout
        ch = cfg.discriminator_channels
        # An occupancy channel alongside the values: hit/no-hit is the main information. An
        # optional stem (3x3, stride 1) sees cluster shapes pixel by pixel; without it the first
        # block already strides by 2 (full-resolution convolutions dominate the cost).
        stem = cfg.discriminator_stem_channels
        # Pixel images are >99% empty: with conv biases every empty position adds the same
        # activation to the sum-pooled features and drowns the few hits (the scores of real and
        # generated events stayed equal through training). Without biases an empty patch gives
        # exactly zero, so the features are made of hits only.
        bias = layout.kind != "pixel"
        self.stem = nn.Sequential(spectral_norm(nn.Conv2d(2, stem, 3, padding=1, bias=bias)),
                                  nn.LeakyReLU(0.2)) if stem else None
        self.blocks = nn.ModuleList(DownBlock(a, b, bias) for a, b in zip([stem or 2, *ch[:-1]], ch, strict=True))
        f = ch[-1]
        self.units = SensorEmbedding(layout.features, f)
        self.cond = ConditionEmbedding(n_conditions, f)
        self.unit_score = spectral_norm(nn.Linear(f, 1))
        self.event_attention = nn.MultiheadAttention(f, num_heads=1, batch_first=True)
        self.event_score = spectral_norm(nn.Linear(f, 1))

    def features(self, images: torch.Tensor, hits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, U, F) per-unit features, sum-pooled (they grow with the number of hits) and scaled
        by 1/sqrt(positions) to stay O(1) for any image size. `hits` is the 0/1 hit mask; generated
        images pass their straight-through mask so the hit channel carries a gradient to the hit
        gates (a mask recomputed as `images > 0` carries none)."""
        b, u, h, w = images.shape
        if hits is None:
            hits = (images > 0).to(images.dtype)
        x = torch.stack([images, hits.to(images.dtype)], dim=2).reshape(b * u, 2, h, w)
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return (x.sum(dim=(2, 3)) / math.sqrt(x.shape[2] * x.shape[3])).view(b, u, -1)

    def forward(self, images: torch.Tensor, cond: torch.Tensor,
                hits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = images.shape[0]
        feat = self.features(images, hits)
        emb = self.units().unsqueeze(0) + self.cond(cond, b).unsqueeze(1)  # (B, U, F)
        per_unit = self.unit_score(feat).squeeze(-1) + (feat * emb).sum(-1) / math.sqrt(feat.shape[-1])
        tok = feat + emb
        att, _ = self.event_attention(tok, tok, tok, need_weights=False)
        event = self.event_score((tok + att).mean(dim=1)).squeeze(-1)
        return per_unit, event
