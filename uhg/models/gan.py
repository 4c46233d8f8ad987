"""Sensor-conditioned GAN (IEA-GAN style) for pixel detectors and calorimeters.

An event is `n_units` same-shape images (PXD sensors or calorimeter layers, see
`uhg.models.gan_layout`). The generator turns event noise, per-unit noise, a unit embedding
(learned id + geometry features) and the event conditions (FiLM) into one token per unit,
couples the tokens of an event by self-attention (the relational module), and decodes every
token into an image with a conv decoder. Each pixel gets two outputs: a hit gate (logit of
"this pixel fires") and an encoded charge/energy. Sparsity is learnable because the gate is a
hard 0/1 decision in the forward pass (relaxed logistic noise, straight-through gradient), so
the discriminator sees exactly-zero pixels like in real data.

The discriminator scores every unit image (conv encoder with spectral norm, projection on the
unit + condition embedding) and the whole event (self-attention over the unit features).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from uhg.config.gan import GanConfig
from uhg.models.common import ConditionEmbedding, FiLM, SensorEmbedding
from uhg.models.gan_layout import UnitLayout

INITIAL_OCCUPANCY = 0.01  # gate bias at start: ~1% of pixels fire, the order of PXD occupancy


def _base_grid(height: int, width: int, n_up: int) -> tuple[int, int]:
    f = 2**n_up
    return max(1, math.ceil(height / f)), max(1, math.ceil(width / f))


class UpBlock(nn.Module):
    """x2 nearest upsampling, 3x3 conv, FiLM from the unit token, LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, token_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = FiLM(token_dim, c_out)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.act(self.film(self.conv(x), token))


class Generator(nn.Module):
    """(z (B, z_dim), unit noise (B, U, sensor_noise_dim), conditions (B, C)) ->
    gate logits and encoded values, both (B, U, H, W)."""

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
        self.head = nn.Conv2d(ch[-1], 2 * self.shuffle**2, 3, padding=1)
        with torch.no_grad():  # channels are (gate, code) x s^2 sub-pixels, gate first
            self.head.bias[: self.shuffle**2] = math.log(INITIAL_OCCUPANCY / (1 - INITIAL_OCCUPANCY))
            self.head.bias[self.shuffle**2:] = 0.0

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

    def forward(self, z: torch.Tensor, unit_noise: torch.Tensor | None, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, u = z.shape[0], self.layout.n_units
        tok = self.tokens(z, unit_noise, cond).reshape(b * u, -1)
        x = self.to_grid(tok).view(b * u, -1, self.h0, self.w0)
        for block in self.blocks:
            x = block(x, tok)
        out = self.head(x)
        if self.shuffle > 1:
            out = nn.functional.pixel_shuffle(out, self.shuffle)
        out = out[:, :, : self.layout.height, : self.layout.width]
        gate = out[:, 0].reshape(b, u, self.layout.height, self.layout.width)
        lo = self.layout.min_code
        code = lo + (1 - lo) * torch.sigmoid(out[:, 1]).reshape(b, u, self.layout.height, self.layout.width)
        return gate, code


def gate_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard logistic noise: a pixel with gate logit g fires when g + noise > 0, i.e. with
    probability sigmoid(g)."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def relaxed_images(gate: torch.Tensor, code: torch.Tensor, noise: torch.Tensor, temperature: float,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time images: hard 0/1 gate forward, gradient of the relaxed sigmoid gate backward.
    Returns (images (B, U, H, W) in [0, 1], that straight-through 0/1 hit mask (B, U, H, W))."""
    soft = torch.sigmoid((gate + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    mask = (hard + soft - soft.detach()) * valid
    return mask * code, mask


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
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
        # An occupancy channel alongside the values: hit/no-hit is the main information. The
        # first block already strides by 2: full-resolution convolutions dominate the cost.
        self.blocks = nn.ModuleList(DownBlock(a, b) for a, b in zip([2, *ch[:-1]], ch, strict=True))
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
