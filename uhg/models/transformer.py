"""Autoregressive hit transformer: hits as tokens, an END token decides multiplicity.

One causal sequence per (event, unit) (PXD sensor; calorimeter shower). Each token is a hit,
factorised as p(row) p(col | row) p(value | row, col), with END as an extra row class; the
grid order is enforced by masking (see uhg.models.transformer_tokens), so samples are sorted,
unique hits and can be longer than any training sequence.

Conditioning, all through one per-sequence context vector c (S, d):
    c = MLP(condition features) + unit id embedding + Linear(unit geometry features) + Linear(z)
c is the start token's input and FiLM-modulates every pre-norm block (shift/scale of each
LayerNorm, zero-initialised as in DiT's adaLN), so conditions act at every depth.

Intra-event correlations: all sensors of an event share an event latent z (latent_dim). In
training z comes from a small encoder over per-sensor summaries of the real event (hit count,
row profile, mean value) with a KL term to N(0, 1) (a conditional VAE over events); in
generation z ~ N(0, 1). Sensors are then sampled in parallel, so generation costs as many
sequential steps as the longest sensor, not the sum over sensors.

Positions: learned row/col embeddings of each hit plus optional 2-D rotary embedding of
(row, col) in attention. No sequence-index position is used: the index of a hit grows with
multiplicity, which is exactly what must extrapolate beyond the training range.

With `token: cluster` (PXD) a token is a whole pixel cluster: anchor row/col, then its shape
from a vocabulary learned from the training clusters, its charge class and the ADC code of
each of its pixels (uhg.models.transformer_clusters); the vocabulary lives in the buffers
`shape_offsets`/`shape_size`, so exports carry it.

With `multiplicity: count` the END token no longer decides multiplicity: a count law
(uhg.models.laws.CountLaw) gives the hits of each sequence, the context carries
that count and every token input the number of hits still to place, and END is forced right
after the last one (masked before). With `response_model` a response law gives each shower's
E_dep / E_inc, to which the sampled cell energies are scaled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uhg.config.transformer import TransformerConfig
from uhg.models.cluster_bank import bank_offsets, fit_cluster_bank
from uhg.models.latent_prior import LatentPrior, fit_latent_prior
from uhg.models.laws import CountLaw, LayerShareLaw, ResponseLaw, count_feature, fit_law
from uhg.models.transformer_clusters import ShapeVocab, encode_clusters
from uhg.models.transformer_factorised import FactorisedPixelHead, first_draw_hazard, layer_fire_rate, tile_centres
from uhg.models.transformer_tokens import TokenBatch, TokenLayout, encode_hits
from uhg.sparse.torch_hits import TorchHits

PROFILE_BINS = 16  # row-profile bins of the latent encoder's per-unit summary
# latent_aux: standardised shift of a sequence's summary per unit of the latent. A pxd-mini sensor
# shares about 1 % of the variance of its mean cluster size with the other sensors of its event
# (sd ~0.1 of its own spread; docs/results.md), so a unit-normal latent spans that shared part.
LATENT_AUX_READOUT = 0.1
BUCKET_SLACK = 1.3  # padded tokens per real token allowed in a length bucket
BUCKET_MIN_ROWS = 32  # smaller buckets than this are merged (tiny matmuls cost more than padding)


def length_buckets(lengths: torch.Tensor, slack: float = BUCKET_SLACK,
                   min_rows: int = BUCKET_MIN_ROWS) -> list[torch.Tensor]:
    """Sequence indices grouped by length: a group is closed when padding it to the next,
    longer sequence would cost more than `slack` x its real tokens and it already has
    `min_rows` sequences. lengths: (S,) hits per sequence; returns index tensors covering
    0..S-1 exactly once, shortest sequences first."""
    order = torch.argsort(lengths, stable=True)
    n = (lengths[order] + 1).tolist()  # tokens of each sequence, ascending
    groups, start, real = [], 0, 0
    for i, tokens in enumerate(n):
        if i - start >= min_rows and (i - start + 1) * tokens > slack * (real + tokens):
            groups.append(order[start:i])
            start, real = i, 0
        real += tokens
    groups.append(order[start:])
    return [g for g in groups if len(g)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., T, n) by the angles whose cos/sin are (..., T, n / 2)."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Rotary2D(nn.Module):
    """Rotates the first half of each head by the row and the second half by the column, so
    attention scores depend on the relative grid offset between hits (clusters are local).

    With `grid_nx` (model.rotary_grid: calorimeter layers of one pixel grid) the column is a flat
    cell `y * grid_nx + x` of its layer and the head is rotated by the layer, the pixel row y and
    the pixel column x, so scores depend on the layer, row and column offsets. A flat offset does
    not: an upper neighbour is grid_nx away and the last pixel of a row 1 away from the first of
    the next. The layer takes a quarter of the head's rotation pairs, y and x the rest."""

    def __init__(self, head_dim: int, base: float = 1000.0, grid_nx: int | None = None):
        super().__init__()
        pairs = head_dim // 2
        if grid_nx is None:
            self.pairs = (head_dim // 4, head_dim // 4)
        else:
            side = (pairs - pairs // 4) // 2
            self.pairs = (pairs - 2 * side, side, side)
            if min(self.pairs) < 1:
                raise ValueError(f"rotary over (layer, pixel row, pixel column) needs 3 rotation pairs per head; "
                                 f"head width {head_dim} has {pairs}")
        self.grid_nx = grid_nx
        for i, n in enumerate(self.pairs):
            self.register_buffer(f"inv_freq{i}", base ** (-torch.arange(n, dtype=torch.float32) / n),
                                 persistent=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                memo: dict | None = None) -> torch.Tensor:
        """x (S, H, T, dh); rows, cols (S, T). memo: a dict shared by the calls of one forward
        pass over the same positions (every block, queries and keys), which then compute the
        cos/sin tables once."""
        tables = None if memo is None else memo.get(x.dtype)
        if tables is None:
            tables = []
            axes = (rows, cols) if self.grid_nx is None else (rows, cols // self.grid_nx, cols % self.grid_nx)
            for i, pos in enumerate(axes):
                ang = pos[:, None].unsqueeze(-1).to(x.dtype) * getattr(self, f"inv_freq{i}").to(x.dtype)
                tables += [ang.cos(), ang.sin()]
            if memo is not None:
                memo[x.dtype] = tables
        parts = x.split([2 * n for n in self.pairs], -1)
        return torch.cat([_rotate(p, *tables[2 * i:2 * i + 2]) for i, p in enumerate(parts)], -1)


@dataclass
class KVCache:
    """Keys/values of one block for incremental decoding: (S, H, capacity, dh), `length` tokens
    appended so far.

    With `window` W > 0 the cache holds W + 1 entries: slot 0 keeps the start token (every
    token attends to it) and slots 1..W are a ring of the W most recent tokens, so memory and
    the keys read per step stay bounded however long the sequence grows. Attention does not
    depend on the order of its keys (positions are already rotated into them), so the ring
    needs no reordering."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    window: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.window:
            if n != 1:
                raise ValueError("a windowed cache takes one token per step")
            if self.k.shape[2] < self.window + 1:
                self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], self.window + 1 - self.k.shape[2],
                                                              self.k.shape[3])], 2)
                self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], self.window + 1 - self.v.shape[2],
                                                              self.v.shape[3])], 2)
            at = 0 if self.length == 0 else 1 + (self.length - 1) % self.window
            self.k[:, :, at:at + 1], self.v[:, :, at:at + 1] = k, v
            self.length += 1
            used = min(self.length, self.window + 1)
            return self.k[:, :, :used], self.v[:, :, :used]
        if self.length + n > self.k.shape[2]:  # grow geometrically: O(T) copies in total
            grow = max(self.k.shape[2], n)
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], grow, self.k.shape[3])], 2)
            self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], grow, self.v.shape[3])], 2)
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (sequences still running)."""
        self.k, self.v = self.k[index], self.v[index]


def window_mask(T: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool attention mask of teacher forcing: token i sees token j <= i if j is the
    start token (j = 0) or one of the `window` most recent tokens (i - j < window)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None]
    return (j <= i) & ((j == 0) | (i - j < window))


class Block(nn.Module):
    """Pre-norm transformer block; LayerNorm shift/scale come from the sequence context (FiLM)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, rotary: Rotary2D | None, window: int = 0):
        super().__init__()
        self.n_heads, self.rotary, self.window = n_heads, rotary, window
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * d, d))
        self.film = nn.Linear(d, 4 * d)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                cache: KVCache | None = None, film: torch.Tensor | None = None,
                rotary_memo: dict | None = None) -> torch.Tensor:
        """x (S, T, d); ctx (S, d); rows/cols (S, T) positions of the input tokens. With a cache,
        x holds only the new tokens and attends to everything cached before them. film: (S, 4d)
        `self.film(ctx)` if already computed (generation computes it once per sequence);
        rotary_memo: see `Rotary2D.forward`."""
        S, T, d = x.shape
        shift1, scale1, shift2, scale2 = (self.film(ctx) if film is None else film).unsqueeze(1).chunk(4, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(S, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, rows, cols, rotary_memo), self.rotary(k, rows, cols, rotary_memo)
        if cache is None and self.window and T > self.window + 1:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, self.window, x.device))
        elif cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if T != 1:
                raise ValueError("cached decoding takes one token per step")
            k, v = cache.append(k, v)
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(S, T, d))
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class LatentEncoder(nn.Module):
    """q(z | event): per-unit summaries -> MLP -> mean over units -> (mu, logvar)."""

    def __init__(self, d: int, n_cond: int, latent_dim: int):
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(PROFILE_BINS + 2 + d, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.out = nn.Linear(d + n_cond, 2 * latent_dim)

    def forward(self, summary: torch.Tensor, unit_ctx: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary (B, U, PROFILE_BINS + 2); unit_ctx (B, U, d); cond (B, C)."""
        pooled = self.unit(torch.cat([summary, unit_ctx], -1)).mean(1)
        mu, logvar = self.out(torch.cat([pooled, cond], -1)).chunk(2, -1)
        return mu, logvar.clamp(-10, 10)


class GridEmbedding(nn.Module):
    """Embedding of a flat cell `row * nx + col` of an (ny, nx) pixel grid as the sum of a row and a
    column embedding (pixel_head=factorised: ny + nx vectors instead of ny x nx)."""

    def __init__(self, ny: int, nx: int, d: int):
        super().__init__()
        self.nx = nx
        self.rows, self.cols = nn.Embedding(ny, d), nn.Embedding(nx, d)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return self.rows(cells // self.nx) + self.cols(cells % self.nx)


class HitTransformer(FactorisedPixelHead):
    """The model. Conditions enter as (B, C) features normalised by
    `uhg.models.common.ConditionNorm` (C = len(config.conditions)); `forward` is the training
    loss so a DeepSpeed engine can wrap the module."""

    def __init__(self, config: TransformerConfig, layout: TokenLayout, cell_xy: np.ndarray | None = None,
                 grid: tuple[int, int] | None = None):
        """cell_xy: (n_cols, 2) centre of every cell of a layer in units of the pixel pitch, about the
        layer centre (needed with config.cell_field and the flat pixel head; all layers share the grid).
        grid: (ny, nx) pixel rows and columns of a layer (needed with pixel_head=factorised or
        config.rotary_grid)."""
        super().__init__()
        self.factorised = config.pixel_head == "factorised"
        if self.factorised and (grid is None or grid[0] * grid[1] != layout.n_cols):
            raise ValueError(f"pixel_head=factorised needs the (rows, columns) of the {layout.n_cols}-cell layer grid, "
                             f"got {grid}")
        self.config, self.layout = config, layout
        d, L = config.d_model, layout
        n_cond = len(config.conditions)
        self.register_buffer("unit_features", torch.as_tensor(L.unit_features, dtype=torch.float32))
        self.register_buffer("row_width", torch.as_tensor(L.row_width, dtype=torch.long), persistent=False)
        # flat position of (row, 0) for every row and END (which never takes a position: 0)
        start = torch.cumsum(torch.as_tensor((0, *L.row_width[:-1]), dtype=torch.long), 0)
        self.register_buffer("row_start", torch.cat([start, start.new_zeros(1)]), persistent=False)
        self.cond_mlp = nn.Sequential(nn.Linear(max(n_cond, 1), d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.unit_emb = nn.Embedding(L.n_units, d)
        self.unit_geom = nn.Linear(L.unit_features.shape[1], d)
        self.latent_dim = config.latent_dim
        if config.latent_dim:
            self.latent_proj = nn.Linear(config.latent_dim, d)
            self.encoder = LatentEncoder(d, n_cond, config.latent_dim)
        self.start = nn.Parameter(torch.zeros(d))
        self.row_in = nn.Embedding(L.n_rows, d)
        self.col_in = GridEmbedding(*grid, d) if self.factorised else nn.Embedding(L.n_cols, d)
        self.clusters = config.token == "cluster"
        if self.clusters:
            if L.kind != "pixel":
                raise ValueError("token=cluster needs a pixel geometry")
            K, P, Q = config.cluster_shapes, config.cluster_max_pixels, config.cluster_charge_bins
            # The shape table is filled from the training clusters (`set_shapes`); until then only
            # the single pixel exists. Float buffers, as the EMA averages floating-point state.
            size = torch.zeros(K)
            size[0] = 1
            self.register_buffer("shape_offsets", torch.zeros(K, P, 2))
            self.register_buffer("shape_size", size)
            self.shape_in, self.charge_in = nn.Embedding(K, d), nn.Embedding(Q, d)
            self.shape_out, self.charge_out = nn.Embedding(K, d), nn.Embedding(Q, d)
            self.offset_out = nn.Embedding(P * (2 * P - 1), d)  # (dr, dc) of a pixel in its shape
            self.pixel_context = config.cluster_pixel_context
            if self.pixel_context:  # charge of the token's earlier pixels -> the next pixel's code
                self.so_far_in = nn.Linear(2, d)
            self.shape_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, K))
            self.charge_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, Q))
            # cluster_code_bank: the codes of training tokens keyed by (shape, charge class), as
            # `fit_cluster_bank` lays them out (float: the EMA averages floating-point state; exact below 2^24)
            if config.cluster_code_bank:
                self.register_buffer("code_bank", torch.zeros(config.cluster_code_bank))
                self.register_buffer("code_bank_count", torch.zeros(K * Q))
                self.register_buffer("code_bank_start", torch.zeros(K * Q))
                if config.cluster_code_bank_per_sensor:
                    self.register_buffer("code_bank_unit_count", torch.zeros(L.n_units, K * Q))
                    self.register_buffer("code_bank_unit_first", torch.zeros(L.n_units, K * Q))
            self._vocab: tuple[bytes, ShapeVocab] | None = None
        else:
            self.val_in = nn.Embedding(L.n_values, d)
        if config.rotary_grid and grid is None:
            raise ValueError("rotary_grid rotates by the pixel row and column of a layer: it needs the layer grid")
        rotary = (Rotary2D(d // config.n_heads, grid_nx=grid[1] if config.rotary_grid else None)
                  if config.rotary else None)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.mlp_ratio, rotary, config.attention_window)
                                    for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_film = nn.Linear(d, 2 * d)
        nn.init.zeros_(self.final_film.weight)
        nn.init.zeros_(self.final_film.bias)
        self.row_head = nn.Linear(d, L.n_rows + 1)
        self.row_out = nn.Embedding(L.n_rows + 1, d)
        # factorised: col_head is the pixel-row head (x_head, created last, the column head given the row)
        self.col_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"),
                                      nn.Linear(d, grid[0] if self.factorised else L.n_cols))
        self.col_out = GridEmbedding(*grid, d) if self.factorised else nn.Embedding(L.n_cols, d)
        self.val_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, L.n_values))
        values_in = [self.shape_in, self.charge_in] if self.clusters else [self.val_in]
        values_out = [self.shape_out, self.charge_out, self.offset_out] if self.clusters else []
        for emb in (self.row_in, self.col_in, *values_in, self.row_out, self.col_out, self.unit_emb, *values_out):
            for w in ((emb.rows.weight, emb.cols.weight) if isinstance(emb, GridEmbedding) else (emb.weight,)):
                nn.init.normal_(w, std=0.02)
        self.counts, self.shares = None, None
        self.layered = config.multiplicity == "count" and config.layer_counts
        if self.layered:
            if L.kind != "calo":
                raise ValueError("layer_counts draws the hits of each calorimeter layer; this is a pixel geometry")
            # one law unit per layer, or (layer_split) one for the shower's total and a share law
            # for its split; the layer of every hit follows from the drawn counts
            if config.layer_split:
                self.counts = CountLaw(1, n_cond, sum(L.row_width), config.count_law, config.count_terms,
                                       config.count_bootstrap, dispersion=config.count_dispersion)
                self.shares = LayerShareLaw(L.n_rows, n_cond)
            else:
                self.counts = CountLaw(L.n_rows, n_cond, list(L.row_width), config.count_law, config.count_terms,
                                       config.count_bootstrap, config.count_factors, config.count_dispersion)
            self.layer_count_in = nn.Linear(L.n_rows, d)
            self.layer_in = nn.Embedding(L.n_rows + 1, d)
            self.layer_remain_in = nn.Linear(1, d)
            nn.init.normal_(self.layer_in.weight, std=0.02)
        elif config.multiplicity == "count":
            self.counts = CountLaw(L.n_units, n_cond, L.positions_per_unit, config.count_law, config.count_terms,
                                   config.count_bootstrap, config.count_factors, config.count_dispersion)
        if config.multiplicity == "count":
            self.count_in, self.remain_in = nn.Linear(1, d), nn.Linear(1, d)
            if config.pace_prior:
                self.pace_weight = nn.Parameter(torch.ones(1))  # 1-d: DeepSpeed cannot broadcast 0-d parameters
            if config.event_counts:  # zero at the start: the model begins as it would without the key
                self.event_count_in = nn.Linear(L.n_units, d)
                nn.init.zeros_(self.event_count_in.weight)
                nn.init.zeros_(self.event_count_in.bias)
        self.response = ResponseLaw(n_cond) if config.response_model else None
        self.cell_field = config.cell_field
        if self.cell_field and self.factorised:  # the field on tiles (see _tile_field)
            ny, nx = grid
            T = config.field_tile
            if ny % T or nx % T:
                raise ValueError(f"field_tile ({T}) must divide the {ny} x {nx} pixel grid")
            self.register_buffer("cell_basis", cell_basis(tile_centres(grid, T)), persistent=False)
            self.field_head = nn.Linear(d, self.cell_basis.shape[1])
            nn.init.zeros_(self.field_head.weight)  # zero field: the uniform pacing of pace_prior
            nn.init.zeros_(self.field_head.bias)
            self.cell_in = nn.Linear(self.cell_basis.shape[1], d)
        elif self.cell_field:  # created last: the other modules initialise as without it
            if cell_xy is None or np.shape(cell_xy) != (L.n_cols, 2):
                raise ValueError(f"cell_field needs the (x, y) of the {L.n_cols} cells of a layer, got "
                                 f"{None if cell_xy is None else np.shape(cell_xy)}")
            self.register_buffer("cell_basis", cell_basis(np.asarray(cell_xy)), persistent=False)
            self.field_head = nn.Linear(d, self.cell_basis.shape[1])
            nn.init.zeros_(self.field_head.weight)  # zero field: the uniform pacing of pace_prior
            nn.init.zeros_(self.field_head.bias)
            self.cell_in = nn.Linear(self.cell_basis.shape[1], d)
        if config.cell_neighbours:  # after every other module: they initialise as without it
            if grid is None or grid[0] * grid[1] != L.n_cols:
                raise ValueError(f"cell_neighbours needs the (rows, columns) of the {L.n_cols}-cell layer grid, "
                                 f"got {grid}")
            self.neighbour_grid = grid
            self.neighbour_head = nn.Linear(d, len(CAUSAL_NEIGHBOURS))
            nn.init.zeros_(self.neighbour_head.weight)  # zero weights: the model without the key
            nn.init.zeros_(self.neighbour_head.bias)
        if config.cell_profile:  # per layer, the coefficients of its fired-cell profile on cell_basis
            if not self.cell_field:
                raise ValueError("cell_profile needs cell_field")
            # zero: the uniform profile until fit_cell_profile fills it from the training showers before
            # training; a buffer, so the export carries it
            self.register_buffer("cell_profile", torch.zeros(L.n_rows, self.cell_basis.shape[1]))
        if self.factorised:  # the column head given the pixel row
            self.grid = grid
            self.y_out = nn.Embedding(grid[0], d)
            nn.init.normal_(self.y_out.weight, std=0.02)
            self.x_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, grid[1]))
        if config.latent_aux and config.latent_dim:  # last: the other modules initialise as without it
            # mean and log-sigma of each summary (mean value class; with clusters also mean shape size)
            # from the context without the latent; the latent's first dimensions shift the
            # standardised summaries through a fixed readout (LATENT_AUX_READOUT): a learned readout
            # of z starts at the saddle where neither it nor the encoder gets a gradient while z
            # carries nothing (as the decoder's latent_proj does), and a learned scale shrinks to 0
            # while z is still noise (measured: 0.1 -> 0.011 in 2400 steps, the posteriors all alike)
            k = 2 if self.clusters else 1
            self.latent_aux_head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, 2 * k))
        if config.latent_prior == "mixture" and config.latent_dim:  # last, as latent_aux_head
            # p(z | conditions), fitted after training (`fit_latent_prior`), frozen until then
            self.prior = LatentPrior(config.latent_dim, max(n_cond, 1), config.prior_hidden, config.prior_components)
            self.prior.requires_grad_(False)

        if config.sensor_groups > 1:  # last, and zero: the other modules initialise, and the model starts, as without it
            G, U = config.sensor_groups, L.n_units
            most = int(unit_groups(U, U).max()) + 1  # the ladder mapping makes no more distinct groups
            if G > most:
                raise ValueError(f"sensor_groups ({G}) must not exceed {most} for the {U} units of the geometry "
                                 "(a unit's group is its ladder pair plus its sensor along z; more would stay empty)")
            self.register_buffer("unit_group", unit_groups(U, G), persistent=False)
            self.group_in = nn.Linear(GROUP_FEATURES, d)
            nn.init.zeros_(self.group_in.weight)
            nn.init.zeros_(self.group_in.bias)
        if config.event_summary:  # after the groups, and zero: the model starts as without it
            self.summary_in = nn.Linear(SUMMARY_FEATURES, d)
            nn.init.zeros_(self.summary_in.weight)
            nn.init.zeros_(self.summary_in.bias)
            # fitted to training events before training (`fit_event_summary`), buffers so the export
            # carries them: the features' centre and spread (the map's input is standardised: an
            # event's mean log size varies by ~1 %, which a map from zero at the training learning
            # rate would take tens of thousands of steps to scale up), the trend's coefficients on
            # [1, conditions, log tokens per unit] and the fitted events' residuals around it
            self.register_buffer("summary_centre", torch.zeros(SUMMARY_FEATURES))
            self.register_buffer("summary_scale", torch.ones(SUMMARY_FEATURES))
            self.register_buffer("summary_trend", torch.zeros(n_cond + 2, SUMMARY_FEATURES))
            self.register_buffer("summary_bank", torch.zeros(config.fit_events, SUMMARY_FEATURES))
            self.register_buffer("summary_bank_size", torch.zeros(1))

    def law_parameters(self) -> list[nn.Parameter]:
        """Parameters of the count and response laws (a few per unit; trained without weight decay)."""
        return [p for m in (self.counts, self.shares, self.response) if m is not None for p in m.parameters()]

    # ---- tokens ---------------------------------------------------------------------------
    def tokenize(self, hits: TorchHits) -> TokenBatch:
        """Teacher-forcing token sequences of a batch (pixel or cluster tokens)."""
        if self.clusters:
            return encode_clusters(hits, self.layout, self.shape_vocab(), self.config.cluster_charge_bins)
        return encode_hits(hits, self.layout)

    def shape_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """token=cluster: (offsets (K, P, 2), sizes (K,)) long, the shape vocabulary."""
        return self.shape_offsets.round().long(), self.shape_size.round().long()

    def shape_vocab(self) -> ShapeVocab:
        """The shape table as a `ShapeVocab` (rebuilt when the buffers change)."""
        off, size = (t.cpu().numpy() for t in self.shape_table())
        stamp = off.tobytes() + size.tobytes()
        if self._vocab is None or self._vocab[0] != stamp:
            self._vocab = (stamp, ShapeVocab(off, size, self.layout.n_cols))
        return self._vocab[1]

    @torch.no_grad()
    def set_shapes(self, vocab: ShapeVocab) -> None:
        """Install a shape vocabulary (same K and P as the config)."""
        if vocab.offsets.shape != tuple(self.shape_offsets.shape):
            raise ValueError(f"shape vocabulary {vocab.offsets.shape} does not fit the model's {tuple(self.shape_offsets.shape)}")
        self.shape_offsets.copy_(torch.as_tensor(vocab.offsets, dtype=self.shape_offsets.dtype))
        self.shape_size.copy_(torch.as_tensor(vocab.sizes, dtype=self.shape_size.dtype))

    @torch.no_grad()
    def fit_code_bank(self, batches: Iterable[TokenBatch]) -> dict[str, float]:
        """cluster_code_bank: fill the bank from the cluster tokens of training events (`tokenize`
        with the fitted shapes, batch by batch): each token's codes keyed by (shape, charge class),
        as `fit_cluster_bank` keeps them (every m-th token of a key, by unit with the per-sensor bank)."""
        K, Q = self.config.cluster_shapes, self.config.cluster_charge_bins
        parts, units = [], []
        for tokens in batches:
            real = tokens.hit_mask().cpu()
            parts.append(tokens.values.cpu()[real].numpy())  # (N, 2 + P), sequences in (event, unit) order
            units.append(tokens.unit.cpu()[:, None].expand_as(real)[real].numpy())
        vals, unit = np.concatenate(parts), np.concatenate(units)
        size = self.shape_size.round().long().cpu().numpy()[vals[:, 0]]
        tok, bit = np.nonzero(np.arange(vals.shape[1] - 2)[None] < size[:, None])
        key = vals[:, 0] * Q + vals[:, 1]
        per_unit = self.config.cluster_code_bank_per_sensor
        fit = fit_cluster_bank(key[tok], tok, bit, vals[tok, 2 + bit], unit, K * Q, self.code_bank.numel(),
                               self.layout.n_units if per_unit else None)
        bank = torch.zeros_like(self.code_bank)
        bank[: len(fit.values)] = torch.as_tensor(fit.values, dtype=bank.dtype)
        self.code_bank.copy_(bank)
        self.code_bank_count.copy_(torch.as_tensor(fit.count, dtype=self.code_bank_count.dtype))
        self.code_bank_start.copy_(torch.as_tensor(fit.start, dtype=self.code_bank_start.dtype))
        if per_unit:
            self.code_bank_unit_count.copy_(torch.as_tensor(fit.unit_count, dtype=self.code_bank_unit_count.dtype))
            self.code_bank_unit_first.copy_(torch.as_tensor(fit.unit_first, dtype=self.code_bank_unit_first.dtype))
        return {"code_bank_tokens": float(fit.count.sum()), "code_bank_keys": float((fit.count > 0).sum())}

    def bank_codes(self, codes: torch.Tensor, shape: torch.Tensor, charge: torch.Tensor, unit: torch.Tensor,
                   u: torch.Tensor) -> torch.Tensor:
        """cluster_code_bank: (N, P) codes of N tokens of `shape`, charge class `charge` and `unit`
        (N,) long: those of the bank's training token that each one's uniform `u` (N,) picks, where the
        bank holds its (shape, class); the given `codes` elsewhere."""
        key = shape * self.config.cluster_charge_bins + charge
        have = self.code_bank_count[key] > 0
        size = self.shape_size.round().long()[shape]
        per_unit = ((unit, self.code_bank_unit_count, self.code_bank_unit_first)
                    if self.config.cluster_code_bank_per_sensor else ())
        base = bank_offsets(key, u, size, self.code_bank_count, self.code_bank_start, *per_unit)
        slot = torch.arange(codes.shape[1], device=codes.device)
        at = (base[:, None] + slot[None]).clamp(max=self.code_bank.numel() - 1)
        banked = self.code_bank[at].round().long() * (slot[None] < size[:, None])
        return torch.where(have[:, None], banked, codes)

    def count_context(self, counts: torch.Tensor) -> torch.Tensor:
        """(S, d) context term of sequences with `counts` (S,) hits."""
        return self.count_in(count_feature(counts, self.layout.positions_per_unit))

    def event_count_context(self, counts: torch.Tensor) -> torch.Tensor:
        """(B * U, d) context term of every sequence of events whose units have `counts` (B, U)
        tokens: the same vector for all units of an event (its whole count pattern)."""
        feature = count_feature(counts, self.layout.positions_per_unit).squeeze(-1)
        return self.event_count_in(feature).repeat_interleave(self.layout.n_units, 0)

    def token_sums(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(S, 3) per sequence: tokens, summed shape size in pixels (cluster tokens; 1 per pixel token)
        and summed value (charge) class of its `valid` (S, T) tokens with `values` (S, T[, 2 + P])."""
        w = valid.float()
        if self.clusters:
            size = self.shape_size[values[..., 0]].float()
            v = values[..., 1].float() / self.config.cluster_charge_bins
        else:
            size, v = torch.ones_like(w), values.float() / self.layout.n_values
        return torch.stack([w.sum(1), (size * w).sum(1), (v * w).sum(1)], 1)

    @staticmethod
    def mean_features(n: torch.Tensor, size: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(..., 2) log mean shape size and mean value class of tokens whose `token_sums` are n, size,
        v (...); 0 where there are none."""
        has = n > 0
        return torch.stack([torch.where(has, torch.log(size / n.clamp_min(1)), 0.0),
                            torch.where(has, v / n.clamp_min(1), 0.0)], -1)

    def summary_context(self, features: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """(N, d) event_summary context of N sequences whose summaries have `mean_features` (N, 2),
        standardised with the training events' centre and spread (0 where `has` (N,) is false: no
        tokens to summarise)."""
        f = (features - self.summary_centre) / self.summary_scale
        return self.summary_in(torch.where(has[:, None], f, 0.0))

    def summary_design(self, cond: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(B, C + 2) float64 regressors of the event summary's trend: 1, the normalised conditions
        cond (B, C) and log(1 + tokens per unit) of the events' counts (B, U)."""
        busy = torch.log1p(counts.double().mean(1, keepdim=True))
        return torch.cat([torch.ones_like(busy), cond.double(), busy], 1)

    @torch.no_grad()
    def fit_event_summary(self, sums: torch.Tensor, cond: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """Fill the event_summary buffers from training events: `token_sums` of all their tokens
        (B, 3), conditions (B, C) and counts (B, U). Least squares (minimum norm: the conditions of
        one machine scenario follow each other) of the mean features on `summary_design`; the bank
        keeps the events' residuals around it."""
        B = len(sums)
        if B > len(self.summary_bank):
            raise ValueError(f"{B} events do not fit the summary bank of {len(self.summary_bank)} (fit_events)")
        f = self.mean_features(*sums.double().unbind(-1))
        x = self.summary_design(cond, counts)
        trend = torch.linalg.lstsq(x, f, driver="gelsd").solution
        residual = f - x @ trend
        self.summary_centre.copy_(f.mean(0))
        self.summary_scale.copy_(f.std(0).clamp_min(1e-6))
        self.summary_trend.copy_(trend)
        self.summary_bank.zero_()
        self.summary_bank[:B] = residual.to(self.summary_bank.dtype)
        self.summary_bank_size.fill_(B)
        share = 1 - residual.var(0) / f.var(0).clamp_min(1e-12)
        return {"event_summary_events": float(B), "event_summary_trend_r2_size": float(share[0]),
                "event_summary_trend_r2_value": float(share[1])}

    def draw_event_summary(self, cond: torch.Tensor, counts: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(B, 2) `mean_features` of the events' drawn summaries: the fitted trend at cond (B, C) and
        counts (B, U) plus the residual of bank event floor(u * bank size) for uniforms u (B,)."""
        n = int(self.summary_bank_size.round())
        if n < 1:
            raise ValueError("event_summary: the summary bank is empty (fit_event_summary fills it from training events)")
        pick = (u * n).long().clamp_(0, n - 1)
        return (self.summary_design(cond, counts) @ self.summary_trend.double() + self.summary_bank[pick].double()).float()

    def group_context(self, sums: torch.Tensor) -> torch.Tensor:
        """(B * U, d) sensor_groups context of every sequence of B events whose units' tokens have
        `token_sums` sums (B, U, 3): the summary of the units of the groups before the unit's own
        (mean shape size, mean value class, log(1 + tokens per unit), fraction of the units covered;
        0 for the first group). Only earlier groups enter, so generation can run the groups in turn."""
        B, U = sums.shape[:2]
        G = self.config.sensor_groups
        per_group = sums.new_zeros(B, G, 3).index_add_(1, self.unit_group, sums)
        units = torch.bincount(self.unit_group, minlength=G).to(sums.dtype)
        before = torch.cumsum(per_group, 1) - per_group  # (B, G, 3): sums of the earlier groups
        covered = (torch.cumsum(units, 0) - units)[None].expand(B, G)
        n = before[..., 0]
        feature = torch.cat([self.mean_features(*before.unbind(-1)),
                             torch.stack([torch.log1p(n / covered.clamp_min(1)), covered / U], -1)], -1)
        return self.group_in(feature[:, self.unit_group]).reshape(B * U, -1)

    def layer_count_context(self, layer_counts: torch.Tensor) -> torch.Tensor:
        """(S, d) context term of showers with `layer_counts` (S, n_rows) hits per layer (layer_counts)."""
        return self.layer_count_in(count_feature(layer_counts, max(self.layout.row_width)).squeeze(-1))

    def layer_plan(self, cum: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """layer_counts: (layer of hit t, hits of that layer still to place with hit t) for
        showers whose cumulative hits per layer are `cum` (S, n_rows) and hit indices t (S, T);
        the layer is n_rows (END) where t is past the last hit."""
        row = torch.searchsorted(cum, t.contiguous(), right=True)
        rem = cum.gather(1, row.clamp(max=self.layout.n_rows - 1)) - t
        return row, torch.where(row == self.layout.n_rows, 0, rem)

    def layer_input(self, row: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
        """(..., d) token-input term of the target's layer `row` and its hits still to place `rem`."""
        return self.layer_in(row) + self.layer_remain_in(count_feature(rem, max(self.layout.row_width)))

    def hits_per_row(self, tokens: TokenBatch) -> torch.Tensor:
        """(S, n_rows) hits of every row (calorimeter layer) of each sequence."""
        hit = tokens.hit_mask().long()
        return torch.zeros(len(tokens.lengths), self.layout.n_rows, dtype=torch.long,
                           device=hit.device).scatter_add_(1, tokens.rows, hit)

    def remaining_input(self, remaining: torch.Tensor) -> torch.Tensor:
        """(..., d) token-input term for `remaining` (...) hits still to place."""
        return self.remain_in(count_feature(remaining, self.layout.positions_per_unit))

    # ---- conditioning -------------------------------------------------------------------
    def unit_context(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, U, d) context of every unit of every event, without the latent. cond (B, C)."""
        c = self.cond_mlp(cond if cond.shape[1] else cond.new_zeros(len(cond), 1))
        # Modules are called (not their weights read) so ZeRO-3 gathers their parameters.
        ids = torch.arange(self.layout.n_units, device=cond.device)
        units = self.unit_emb(ids) + self.unit_geom(self.unit_features)
        return c[:, None, :] + units[None]

    def sequence_context(self, unit_ctx: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """(B*U, d) per-sequence context, sequences in (event, unit) order."""
        if self.latent_dim:
            unit_ctx = unit_ctx + self.latent_proj(z)[:, None, :]
        return unit_ctx.reshape(-1, unit_ctx.shape[-1])

    def summaries(self, tokens: TokenBatch, n_events: int) -> torch.Tensor:
        """(B, U, PROFILE_BINS + 2) per-unit summary of real events: log(1 + hits per row bin),
        log(1 + hits), mean value class / n_values."""
        L = self.layout
        hit = tokens.hit_mask()
        bins = (tokens.rows * PROFILE_BINS // L.n_rows).clamp_(max=PROFILE_BINS - 1)
        prof = torch.zeros(len(tokens.lengths), PROFILE_BINS, device=hit.device).scatter_add_(1, bins, hit.float())
        n = tokens.lengths.float()
        if self.clusters:  # the charge class stands for the value
            v = tokens.values[..., 1].float() / self.config.cluster_charge_bins
        else:
            v = tokens.values.float() / L.n_values
        mean_val = (v * hit).sum(1) / n.clamp_min(1)
        s = torch.cat([torch.log1p(prof), torch.log1p(n)[:, None], mean_val[:, None]], 1)
        return s.view(n_events, L.n_units, -1)

    def latent_aux_nll(self, tokens: TokenBatch, ctx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Summed Gaussian NLL of every non-empty sequence's summary (mean value class / classes;
        with cluster tokens also the mean shape size in pixels) under `latent_aux_head` of its
        context ctx (S, d; counts included), shifted in units of its spread by the first
        dimensions of its event's latent z (B, latent_dim) (`latent_aux`)."""
        hit = tokens.hit_mask().float()
        n = tokens.lengths.float().clamp_min(1)
        if self.clusters:
            v = tokens.values[..., 1].float() / self.config.cluster_charge_bins
            size = self.shape_size[tokens.values[..., 0]].float()
            target = torch.stack([(v * hit).sum(1) / n, (size * hit).sum(1) / n], 1)
        else:
            target = ((tokens.values.float() / self.layout.n_values * hit).sum(1) / n)[:, None]
        k = target.shape[1]
        z_seq = z[:, :k].repeat_interleave(self.layout.n_units, 0)
        mean, log_sigma = self.latent_aux_head(ctx).chunk(2, -1)
        log_sigma = log_sigma.clamp(-7.0, 3.0)
        nll = 0.5 * ((target - mean) / log_sigma.exp() - LATENT_AUX_READOUT * z_seq).square() + log_sigma
        return (nll.sum(1) * (tokens.lengths > 0)).sum()

    def prior_context(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, max(C, 1)) context of the 'mixture' latent prior: the normalised conditions."""
        return cond if cond.shape[1] else cond.new_zeros(len(cond), 1)

    @torch.no_grad()
    def fit_latent_prior(self, tokens: TokenBatch, cond: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Fit `prior` (`latent_prior: mixture`) to draws of the encoder's q(z | event) of training
        events (tokens of B events, cond (B, C)): `uhg.models.latent_prior.fit_latent_prior`."""
        if not hasattr(self, "prior"):
            raise ValueError("fit_latent_prior needs a model built with latent_prior: mixture")
        B = len(cond)
        mu, logvar = self.encoder(self.summaries(tokens, B), self.unit_context(cond), cond)
        return fit_latent_prior(self.prior, mu, logvar, self.prior_context(cond), self.config.prior_steps, seed)

    # ---- network ------------------------------------------------------------------------
    def embed(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, first: bool,
              ctx: torch.Tensor) -> torch.Tensor:
        """Input embeddings (S, T, d) of tokens; if `first`, position 0 is the start token.
        values: (S, T) value classes, or (S, T, 2 + P) cluster values (shape, charge class, ...)."""
        x = self.row_in(rows) + self.col_in(cols)
        if self.clusters:
            x = x + self.shape_in(values[..., 0]) + self.charge_in(values[..., 1])
        else:
            x = x + self.val_in(values)
        if self.cell_field:
            x = x + self.cell_in(self.cell_basis[self.basis_unit(cols)])
        if first:
            x = torch.cat([(self.start + ctx)[:, None], x[:, 1:]], 1)
        return x

    def hidden(self, x: torch.Tensor, ctx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               caches: list[KVCache] | None = None, films: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states (S, T, d). films: `context_films(ctx)` if already computed."""
        films = films if films is not None else self.context_films(ctx)
        memo: dict = {}
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, rows, cols, None if caches is None else caches[i], films[i], memo)
        shift, scale = films[-1].unsqueeze(1).chunk(2, -1)
        return self.norm(x) * (1 + scale) + shift

    def context_films(self, ctx: torch.Tensor) -> list[torch.Tensor]:
        """FiLM shifts/scales of every block and the final norm for sequence contexts (S, d): they
        depend on the sequence only, so generation computes them once, not at every step."""
        return [*(block.film(ctx) for block in self.blocks), self.final_film(ctx)]

    def _last_position(self, remaining: torch.Tensor) -> torch.Tensor:
        """(..., 1) last flat grid position the next hit may take so that `remaining` - 1 more
        hits still fit after it."""
        return (self.layout.positions_per_unit - remaining).unsqueeze(-1)

    def _pace_rate(self, prev_row: torch.Tensor, prev_col: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pace_prior: (next free flat position, rate lambda) of each sequence: the `remaining`
        tokens spread evenly over the positions left give each position the chance
        rho = remaining / positions left, and a geometric gap log-probability -lambda x distance
        with lambda = -log(1 - rho). It follows the count wherever the count goes."""
        free = torch.where(prev_row >= 0, self.row_start[prev_row.clamp_min(0)] + prev_col + 1, 0)
        left = (self.layout.positions_per_unit - free).clamp_min(1)
        rho = (remaining.float() / left).clamp(1e-6, 0.999)
        return free, -torch.log1p(-rho)

    def _order_log_gap(self, prev_row: torch.Tensor, prev_col: torch.Tensor, remaining: torch.Tensor,
                       gap: torch.Tensor, survival: bool) -> torch.Tensor:
        """pace_law=negative_hypergeometric: with the `remaining` tokens at distinct positions, uniformly
        among the `left` ones after the previous token, the log-probability that the first of them is at
        `gap` (survival: at `gap` or later, log C(left - gap, r) / C(left, r)); up to a constant per sequence
        for the gap itself (log C(left - gap - 1, r - 1)). gap: (..., K) against remaining (...). 0 where
        the remaining tokens cannot fit after `gap` (the callers mask those classes), so that no infinity
        reaches the learned weight's gradient. In float64: lgamma of a few thousand differs by ~1e-3 in float32."""
        free = torch.where(prev_row >= 0, self.row_start[prev_row.clamp_min(0)] + prev_col + 1, 0)
        left = (self.layout.positions_per_unit - free).clamp_min(1).double().unsqueeze(-1)
        r = torch.minimum(remaining.double().unsqueeze(-1).clamp_min(0), left)
        k = left - gap.double().clamp_min(0)  # positions from the gap on
        if survival:
            ok = k >= r
            k = torch.where(ok, k, r)
            out = torch.lgamma(k + 1) - torch.lgamma(k - r + 1) - torch.lgamma(left + 1) + torch.lgamma(left - r + 1)
        else:
            ok = (k >= r) & (r >= 1)
            k, r = torch.where(ok, k, r.clamp_min(1)), r.clamp_min(1)
            out = torch.lgamma(k) - torch.lgamma(k - r + 1)
        return torch.where(ok, out, 0.0).float()

    def _row_pace(self, prev_row: torch.Tensor, prev_col: torch.Tensor, remaining: torch.Tensor,
                  first_free: torch.Tensor, n_free: torch.Tensor) -> torch.Tensor:
        """pace_prior's log-probability (..., n_rows + 1) that the next token is in each row, whose free
        positions start at flat `first_free` and number `n_free`."""
        free, lam = (x.unsqueeze(-1) for x in self._pace_rate(prev_row, prev_col, remaining))
        gap = (first_free - free).clamp_min(0)
        if self.config.pace_law == "geometric":
            # P(next token in row r) = exp(-lam x gap to r's first free position) x (1 - exp(-lam x free positions of r))
            return -lam * gap + torch.log(-torch.expm1(-lam * n_free))
        # P(row r) = P(first token at r's first free position or later) - P(at the next row's or later)
        first = self._order_log_gap(prev_row, prev_col, remaining, gap, True)
        after = self._order_log_gap(prev_row, prev_col, remaining, gap + n_free, True)
        fits = (gap + n_free) <= (self.layout.positions_per_unit - free - remaining.unsqueeze(-1))
        return first + torch.log(-torch.expm1(torch.where(fits, after - first, float("-inf")).clamp_max(-1e-12)))

    def row_logits(self, h: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                   remaining: torch.Tensor | None = None) -> torch.Tensor:
        """(..., n_rows + 1) row logits, -inf where the row cannot follow (prev_row, prev_col);
        prev_row = -1 before the first hit. Without `remaining` END (last class) is always
        allowed. With `remaining` (..., hits still to place, count law): END is the only class
        where it is 0, and where it is positive END is masked and so is every row that would
        leave too few grid positions for the hits after this one."""
        r = torch.arange(self.layout.n_rows + 1, device=h.device)
        width = torch.cat([self.row_width, self.row_width.new_ones(1)])
        pr, pc = prev_row.unsqueeze(-1), prev_col.unsqueeze(-1)
        ok = (r > pr) | ((r == pr) & (pc < width[r] - 1))
        is_end = r == self.layout.n_rows
        ok = ok & (width[r] > 0) & ~is_end
        if remaining is None:
            ok = ok | is_end
        else:
            first_free = self.row_start[r] + torch.where(r == pr, pc + 1, 0)
            ok = ok & (first_free <= self._last_position(remaining))
            done = (remaining <= 0).unsqueeze(-1)
            ok = (ok & ~done) | (is_end & (done | ~ok.any(-1, keepdim=True)))
            if self.config.pace_prior:
                n_free = (width[r] - torch.where(r == pr, pc + 1, 0)).clamp_min(1)
                pace = self._row_pace(prev_row, prev_col, remaining, first_free, n_free)
                logits = self.row_head(h) + self.pace_weight * torch.where(is_end, 0.0, pace)
                return logits.masked_fill(~ok, float("-inf"))
        return self.row_head(h).masked_fill(~ok, float("-inf"))

    def col_logits(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                   remaining: torch.Tensor | None = None, row_remaining: torch.Tensor | None = None,
                   fired: torch.Tensor | None = None) -> torch.Tensor:
        """(..., n_cols) column logits given the chosen row; invalid columns are -inf (with
        `remaining`, also those leaving too few positions for the hits after this one; with
        `row_remaining`, the hits of this row still to place with this one (layer_counts), those
        leaving too few positions in the row, and pace_prior paces them over the row). For END
        (row = n_rows) every column is left open; that value is never used. fired: (..., n_cols)
        bool, the cells of the row already fired (needed with cell_neighbours)."""
        if row_remaining is not None:
            if self.factorised:
                raise ValueError("pixel_head=factorised has no categorical over a layer's cells: use cell_log_prob, "
                                 "or pixel_row_logits then pixel_col_logits")
            return self._row_col_logits(h, row, prev_row, prev_col, row_remaining, fired)
        c = torch.arange(self.layout.n_cols, device=h.device)
        width = torch.cat([self.row_width, self.row_width.new_full((1,), self.layout.n_cols)])
        r = row.unsqueeze(-1)
        ok = (c < width[row].unsqueeze(-1)) & ((r > prev_row.unsqueeze(-1)) | (c > prev_col.unsqueeze(-1)))
        if remaining is not None:
            ok = ok & (self.row_start[row].unsqueeze(-1) + c <= self._last_position(remaining))
        ok = ok | (r == self.layout.n_rows)
        logits = self.col_head(h + self.row_out(row))
        if remaining is not None and self.config.pace_prior:
            free, lam = self._pace_rate(prev_row, prev_col, remaining)
            if self.config.pace_law == "geometric":
                first = torch.where(row == prev_row, prev_col + 1, 0).unsqueeze(-1)
                logits = logits - self.pace_weight * lam.unsqueeze(-1) * (c - first).clamp_min(0)
            else:
                gap = self.row_start[row].unsqueeze(-1) + c - free.unsqueeze(-1)
                logits = logits + self.pace_weight * self._order_log_gap(prev_row, prev_col, remaining, gap, False)
        return logits.masked_fill(~ok, float("-inf"))

    def _row_col_logits(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                        row_remaining: torch.Tensor, fired: torch.Tensor | None = None) -> torch.Tensor:
        """col_logits of layer_counts: the row is fixed by the counts, so the columns are paced
        and masked within it."""
        c = torch.arange(self.layout.n_cols, device=h.device)
        width = torch.cat([self.row_width, self.row_width.new_full((1,), self.layout.n_cols)])[row]
        first = torch.where(row == prev_row, prev_col + 1, 0)
        last = width - row_remaining.clamp_min(1)  # the rest of the row's hits must fit after this one
        ok = (c >= first.unsqueeze(-1)) & (c <= last.unsqueeze(-1))
        ok = ok | (row == self.layout.n_rows).unsqueeze(-1)
        hr = h + self.row_out(row)
        logits = self.col_head(hr)
        if self.cell_field:
            logits = logits + self._field_logits(hr, row, first, width, row_remaining)
            if self.config.cell_neighbours:
                if fired is None:
                    raise ValueError("cell_neighbours: the cells of the layer fired so far (fired) are needed")
                logits = logits + self._neighbour_logits(hr, fired)
        elif self.config.pace_prior:
            lam = -torch.log1p(-layer_fire_rate(row_remaining, first, width))
            logits = logits - self.pace_weight * lam.unsqueeze(-1) * (c - first.unsqueeze(-1)).clamp_min(0)
        return logits.masked_fill(~ok, float("-inf"))

    def _field_logits(self, hr: torch.Tensor, row: torch.Tensor, first: torch.Tensor, width: torch.Tensor,
                      row_remaining: torch.Tensor) -> torch.Tensor:
        """cell_field: log-probability that cell c is the next fired one when every cell from `first`
        on fires on its own with probability sigmoid(l_c): log s(l_c) + sum_{first <= j < c} log s(-l_j).
        l_c = logit(remaining / cells left) + field_head(hr) . basis(c): with a zero field this is
        pace_prior's geometric gap (up to a constant per token); the field moves the pixels towards
        where the network places them (the radial profile of the layer at this energy and stage).
        With cell_profile the first term is logit(h_c) of `_profile_hazard` instead."""
        # in float32 under any autocast: in bf16 the clamp's 0.999 is 1.0 (logit +inf, NaN sums) and an
        # exclusive cumsum over a layer's cells loses the small terms
        hr = hr.float()
        field = self.field_head(hr).float() @ self.cell_basis.float().T
        if self.config.cell_profile:
            ell = torch.logit(self._profile_hazard(row, row_remaining)) + field
        else:
            ell = torch.logit(layer_fire_rate(row_remaining, first, width)).unsqueeze(-1) + field
        c = torch.arange(ell.shape[-1], device=hr.device)
        off = F.logsigmoid(-ell).masked_fill(c < first.unsqueeze(-1), 0.0)
        return F.logsigmoid(ell) + torch.cumsum(off, -1) - off

    def basis_unit(self, cells: torch.Tensor) -> torch.Tensor:
        """The row of cell_basis of flat cells: the cell itself, or its field tile (pixel_head=factorised)."""
        return self._tile(cells) if self.factorised else cells

    def profile_log_q(self) -> torch.Tensor:
        """cell_profile: (layers, basis units) log of each layer's fitted profile over its cells (its tiles
        with pixel_head=factorised), float32."""
        return torch.log_softmax(self.cell_profile.float() @ self.cell_basis.float().T, -1)

    def _profile_hazard(self, row: torch.Tensor, row_remaining: torch.Tensor) -> torch.Tensor:
        """cell_profile: (..., n_cols) chance h_c that cell c is the next pixel of its layer given that no
        cell between the previous pixel and c is, if the layer's `row_remaining` pixels still to place
        were independent draws from its fitted profile q: the smallest of N draws is c with chance
        S_c^N - S_{c+1}^N (S_c = sum_{j >= c} q_j), so h_c = 1 - (S_{c+1} / S_c)^N, clamped to
        [1e-6, 0.999]. Placed one after another with a zero field, a layer's pixels are then the sorted
        draws of N cells from q: the order of placement moves none of them up or down the rows (an even
        pacing of the pixels left over the cells left does, whenever the field is short of its fit)."""
        log_q = self.profile_log_q()  # (layers, cells)
        log_tail = torch.logcumsumexp(log_q.flip(-1), -1).flip(-1)  # log S_c
        step = torch.cat([log_tail[:, 1:], log_tail.new_full((len(log_tail), 1), float("-inf"))], 1) - log_tail
        r = row.clamp_max(len(log_q) - 1)  # END (row n_rows) takes no cell: any finite value serves
        n = row_remaining.float().clamp_min(1).unsqueeze(-1)
        return first_draw_hazard(step[r], n).clamp(1e-6, 0.999)

    def _neighbour_logits(self, hr: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        """cell_neighbours: sum over the causal neighbours k of weight_k(hr) x [neighbour k of the cell
        fired]; one neighbour at a time, so the memory stays that of the logits."""
        ny, nx = self.neighbour_grid
        weight = self.neighbour_head(hr).float()
        # padded once by the farthest neighbour on each side: the cell (y, x) looks at (y - dy, x - dx),
        # which sits at (y - dy + top, x - dx + left) of the padded grid; cells off the layer never fired
        top, left, right = max(dy for dy, _ in CAUSAL_NEIGHBOURS), max(dx for _, dx in CAUSAL_NEIGHBOURS), \
            max(-dx for _, dx in CAUSAL_NEIGHBOURS)
        grid = F.pad(fired.view(-1, ny, nx).float(), (left, right, top, 0))
        out = hr.new_zeros((len(grid), ny, nx), dtype=torch.float32)
        for k, (dy, dx) in enumerate(CAUSAL_NEIGHBOURS):
            out += weight[:, k, None, None] * grid[:, top - dy:top - dy + ny, left - dx:left - dx + nx]
        return out.view(fired.shape)

    def value_logits(self, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return self.val_head(h + self.row_out(row) + self.col_out(col))

    def shape_logits(self, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of the cluster shape at anchor (row, col); shapes that would leave the
        sensor and unused entries are -inf (all open for END, whose shape is never used)."""
        off, size = self.shape_table()
        valid = torch.arange(off.shape[1], device=h.device)[None] < size[:, None]
        dr, dc = off[..., 0], off[..., 1]
        max_dr = torch.where(valid, dr, 0).amax(1)
        min_dc, max_dc = torch.where(valid, dc, 0).amin(1), torch.where(valid, dc, 0).amax(1)
        r, c = row.unsqueeze(-1), col.unsqueeze(-1)
        ok = (size > 0) & (r + max_dr < self.layout.n_rows) & (c + min_dc >= 0) & (c + max_dc < self.layout.n_cols)
        ok = ok | (r == self.layout.n_rows)
        return self.shape_head(h + self.row_out(row) + self.col_out(col)).masked_fill(~ok, float("-inf"))

    def charge_logits(self, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """(N, cluster_charge_bins) logits of the cluster-charge class given the shape."""
        return self.charge_head(h + self.row_out(row) + self.col_out(col) + self.shape_out(shape))

    def pixel_logits(self, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor, shape: torch.Tensor,
                     charge: torch.Tensor, slot: torch.Tensor, so_far: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n_values) logits of the ADC code of pixel `slot` of a cluster token (one row per
        pixel: h, row, col, shape, charge of its token, repeated). so_far: (N,) ADC summed over
        the token's pixels before `slot` (used with cluster_pixel_context)."""
        off = self.shape_table()[0][shape, slot]  # (N, 2)
        P = self.config.cluster_max_pixels
        where = off[:, 0] * (2 * P - 1) + off[:, 1] + (P - 1)
        base = h + self.row_out(row) + self.col_out(col) + self.shape_out(shape) + self.charge_out(charge)
        base = base + self.offset_out(where)
        if self.pixel_context:
            if so_far is None:
                raise ValueError("cluster_pixel_context: the charge of the earlier pixels (so_far) is needed")
            top = math.log(P * (self.layout.adc_threshold + self.layout.n_values))
            feature = torch.stack([torch.log1p(so_far.to(h.dtype)) / top, (slot == 0).to(h.dtype)], -1)
            base = base + self.so_far_in(feature)
        return self.val_head(base)

    def cluster_value_nll(self, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                          target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summed NLL of the shape, charge class and pixel codes of cluster tokens. target:
        (N, 2 + P) as `encode_clusters` makes it."""
        shape, charge, codes = target[:, 0], target[:, 1], target[:, 2:]
        nll_shape = F.cross_entropy(self.shape_logits(h, row, col), shape, reduction="sum")
        nll_charge = F.cross_entropy(self.charge_logits(h, row, col, shape), charge, reduction="sum")
        size = self.shape_table()[1][shape]
        valid = torch.arange(codes.shape[1], device=h.device)[None] < size[:, None]
        tok, slot = valid.nonzero(as_tuple=True)
        so_far = None
        if self.pixel_context:  # ADC of the pixels before each slot (exclusive running sum)
            adc = (codes + self.layout.adc_threshold) * valid
            so_far = (torch.cumsum(adc, 1) - adc)[tok, slot]
        logits = self.pixel_logits(h[tok], row[tok], col[tok], shape[tok], charge[tok], slot, so_far)
        nll_pixels = F.cross_entropy(logits, codes[tok, slot], reduction="sum")
        return {"shape": nll_shape, "charge": nll_charge, "pixels": nll_pixels}

    # ---- training -----------------------------------------------------------------------
    def loss(self, tokens: TokenBatch, cond: torch.Tensor, sample_latent: bool = True,
             bucket_slack: float = BUCKET_SLACK, log_response: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced negative ELBO per token.

        tokens: from `encode_hits`; cond: (B, C) normalised condition features; log_response:
        (B,) log(E_dep / E_inc) of the showers (needed with response_model).
        Returns `loss` (the objective: summed NLL of all targets + kl_weight * KL, divided by
        the number of real targets), `nll_row`, `nll_col`, `nll_value` (per hit, nats), `nll`
        (per event, nats; with a count law it includes `nll_count`), `kl` (per event, nats) and,
        with the laws, `nll_count` and `nll_response` (per event). With cluster tokens "hit" means
        token: `nll_value` is shape + charge class + pixel codes, also given as `nll_shape`,
        `nll_charge`, `nll_pixels` (per token). Padding never enters any of them.
        """
        B, L = len(cond), self.layout
        unit_ctx = self.unit_context(cond)
        z, kl = None, cond.new_zeros(())
        if self.latent_dim:
            mu, logvar = self.encoder(self.summaries(tokens, B), unit_ctx, cond)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample_latent else mu
            kl_dim = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)
            kl = kl_dim.sum() / B
            kl_penalised = (kl_dim.mean(0) - self.config.free_bits).clamp_min(0).sum()
        ctx = self.sequence_context(unit_ctx, z)
        counting = self.counts is not None
        if counting:
            ctx = ctx + self.count_context(tokens.lengths)
            if self.config.event_counts:
                ctx = ctx + self.event_count_context(tokens.lengths.view(B, L.n_units))
        if self.config.sensor_groups > 1 or self.config.event_summary:
            sums = self.token_sums(tokens.values, tokens.hit_mask()).view(B, L.n_units, 3)
            if self.config.sensor_groups > 1:  # teacher forcing: the true tokens of the earlier groups
                ctx = ctx + self.group_context(sums)
            if self.config.event_summary:  # leave one out: the event's other units' tokens
                others = (sums.sum(1, keepdim=True) - sums).view(-1, 3)
                ctx = ctx + self.summary_context(self.mean_features(*others.unbind(-1)), others[:, 0] > 0)
        if self.layered:
            per_row = self.hits_per_row(tokens)
            ctx = ctx + self.layer_count_context(per_row)
            cum_all = torch.cumsum(per_row, 1)
        aux = self.latent_aux_nll(tokens, ctx, z) if hasattr(self, "latent_aux_head") else None
        # Run the blocks per length bucket (sequences of similar length padded together) and
        # keep only real targets: padding costs at most ~bucket_slack x the real tokens.
        parts = []
        for idx in length_buckets(tokens.lengths, bucket_slack):
            n = tokens.lengths[idx]
            T = int(n.max()) + 1
            rows, cols, vals = tokens.rows[idx, :T], tokens.cols[idx, :T], tokens.values[idx, :T]
            S = len(idx)
            # Input t is hit t-1 (t=0: start); its grid position is the "previous" one of target t.
            prev_r = torch.cat([rows.new_full((S, 1), -1), rows[:, 1:]], 1)
            prev_c = torch.cat([cols.new_full((S, 1), -1), cols[:, 1:]], 1)
            x = self.embed(rows, cols, vals, True, ctx[idx])
            t = torch.arange(T, device=rows.device)[None]
            if counting:
                x = x + self.remaining_input(n[:, None] - t)
            row_rem = None
            if self.layered:
                plan_row, row_rem = self.layer_plan(cum_all[idx], t.expand(S, T))
                x = x + self.layer_input(plan_row, row_rem)
            h = self.hidden(x, ctx[idx], prev_r, prev_c)
            # With a count law END is not a prediction (it follows the last hit by construction).
            real = t < n[:, None] if counting else t <= n[:, None]
            # Target t is hit t (stored at input slot t+1), END at t = length.
            t_row = torch.where(t == n[:, None], L.n_rows, torch.cat([rows[:, 1:], rows.new_zeros(S, 1)], 1))
            t_col = torch.cat([cols[:, 1:], cols.new_zeros(S, 1)], 1)
            t_val = torch.cat([vals[:, 1:], vals.new_zeros(S, 1, *vals.shape[2:])], 1)
            remaining = (n[:, None] - t).expand(S, T)  # hits still to place at target t (this one included)
            row_rem = remaining if row_rem is None else row_rem
            seq = idx[:, None].expand(S, T)
            parts.append([x[real] for x in (h, prev_r, prev_c, t_row, t_col, t_val, remaining, row_rem, seq)])
        h, pr, pc, t_row, t_col, t_val, rem, row_rem, seq = (torch.cat(x) for x in zip(*parts, strict=True))
        rem = rem if counting else None
        if self.layered:  # the layer of every hit follows from the counts: no row prediction
            nll_row = h.new_zeros(())
        else:
            nll_row = F.cross_entropy(self.row_logits(h, pr, pc, rem), t_row, reduction="sum")
        hit = t_row != L.n_rows
        h, pr, pc, hr, hc = h[hit], pr[hit], pc[hit], t_row[hit], t_col[hit]
        if self.factorised:
            nll_col = -self.cell_log_prob(h, hr, pr, pc, row_rem[hit], hc).sum()
        else:
            fired = layer_fired(seq[hit], hr, hc, L.n_cols) if self.config.cell_neighbours else None
            nll_col = F.cross_entropy(self.col_logits(h, hr, pr, pc, None if rem is None else rem[hit],
                                                      row_rem[hit] if self.layered else None, fired),
                                      hc, reduction="sum")
        cluster_nll = {}
        if self.clusters:
            cluster_nll = self.cluster_value_nll(h, hr, hc, t_val[hit])
            nll_val = sum(cluster_nll.values())
        else:
            nll_val = F.cross_entropy(self.value_logits(h, hr, hc), t_val[hit], reduction="sum")
        nll = nll_row + nll_col + nll_val
        laws = {}
        if counting:
            observed = per_row if self.layered else tokens.lengths.view(B, L.n_units)
            if self.shares is not None:  # layer_split: the total, then its split
                laws["nll_share"] = -self.shares.log_prob(per_row, cond).sum()
                nll = nll + laws["nll_share"]
                observed = per_row.sum(1, keepdim=True)
            laws["nll_count"] = -self.counts.log_prob(observed, cond).sum()
            nll = nll + laws["nll_count"]
        if self.response is not None:
            if log_response is None:
                raise ValueError("response_model needs the showers' log(E_dep / E_inc)")
            laws["nll_response"] = -self.response.log_prob(log_response, cond).sum()
        n_tok, n_hit = max(len(t_row), 1), max(int(hit.sum()), 1)
        objective = nll + laws.get("nll_response", 0.0)
        objective = objective + (self.config.kl_weight * kl_penalised * B if self.latent_dim else 0.0)
        if aux is not None:
            objective = objective + self.config.latent_aux * aux
            laws["latent_aux"] = aux
        return {**{k: v.detach() / B for k, v in laws.items()},
            **{f"nll_{k}": v.detach() / n_hit for k, v in cluster_nll.items()},
            "loss": objective / n_tok,
            "nll": nll.detach() / B,
            "nll_row": nll_row.detach() / n_hit,
            "nll_col": nll_col.detach() / n_hit,
            "nll_value": nll_val.detach() / n_hit,
            "kl": kl.detach(),
        }

    def forward(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                cond: torch.Tensor, sample_latent: bool = True,
                log_response: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`loss` of a TokenBatch given as plain tensors (what an engine forwards)."""
        S = len(lengths)
        seq = torch.arange(S, device=lengths.device)
        tokens = TokenBatch(rows, cols, values, lengths, seq // self.layout.n_units, seq % self.layout.n_units)
        return self.loss(tokens, cond, sample_latent, log_response=log_response)

    # ---- cost ---------------------------------------------------------------------------
    def flops_per_token(self, context: float, training: bool = True, pixels_per_token: float = 1.0) -> float:
        """Model FLOPs per token (matmuls only, 2 per multiply-add): weight matmuls of blocks
        and heads plus attention scores and weighted sum over `context` attended keys
        (causal training over length T attends (T+1)/2 on average). Training = 3 x forward
        (backward costs twice the forward). Per-sequence terms (FiLM, context) are excluded.
        pixels_per_token: mean pixels of a cluster token (token=cluster)."""
        c, L = self.config, self.layout
        d = c.d_model
        block = 4 * d * d + 2 * c.mlp_ratio * d * d  # qkv + proj + mlp
        cells = 2 * d * d + d * sum(self.grid) if self.factorised else d * d + d * L.n_cols
        heads = d * (L.n_rows + 1) + cells + (d * d + d * L.n_values)
        if self.clusters:  # shape and charge heads; the value head runs once per pixel of the token
            heads += (d * d + d * c.cluster_shapes) + (d * d + d * c.cluster_charge_bins)
            heads += (pixels_per_token - 1) * (d * d + d * L.n_values)
        forward = 2 * (c.n_layers * block + heads) + 4 * c.n_layers * d * context
        return float(3 * forward if training else forward)


GROUP_FEATURES = 4  # sensor_groups: features of the summary of an event's earlier groups
SUMMARY_FEATURES = 2  # event_summary: log mean shape size and mean value class of an event's tokens


def unit_groups(n_units: int, n_groups: int) -> torch.Tensor:
    """(n_units,) long group of every unit (sensor_groups): unit u = 2 l + n (PXD: ladder pair l,
    sensor n = 0, 1 along z) is in group (l + n) mod n_groups, so the two sensors of a ladder fall
    into neighbouring groups and every group holds sensors of both ends (and, on the PXD, both layers)."""
    u = torch.arange(n_units)
    return (u // 2 + u % 2) % n_groups


FIELD_RADII = 12  # radial basis functions of cell_field
# cell_neighbours: (rows up, columns left) of the cells decided before a cell in (row, column) order
CAUSAL_NEIGHBOURS = ((0, 1), (0, 2), (1, 1), (1, 0), (1, -1), (2, 0))


def layer_fired(seq: torch.Tensor, row: torch.Tensor, col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(N, n_cols) bool: for each of N hit tokens, in sequence order within each sequence, the cells
    of its row (layer) fired by the earlier hits of its sequence: what generation has placed in
    the layer before drawing this hit (cell_neighbours)."""
    N = len(seq)
    fired = torch.zeros(N, n_cols, dtype=torch.bool, device=seq.device)
    if not N:
        return fired
    pos = torch.arange(N, device=seq.device)
    new_run = torch.ones(N, dtype=torch.bool, device=seq.device)
    new_run[1:] = (seq[1:] != seq[:-1]) | (row[1:] != row[:-1])
    start = torch.cummax(torch.where(new_run, pos, 0), 0).values
    before = pos - start  # earlier hits of the same sequence and row
    target = torch.repeat_interleave(pos, before)
    offset = torch.cumsum(before, 0) - before
    source = start[target] + (torch.arange(len(target), device=seq.device) - offset[target])
    fired[target, col[source]] = True
    return fired


def cell_basis(cell_xy: np.ndarray) -> torch.Tensor:
    """(n_cells, FIELD_RADII + 2) float32 cell_field basis: Gaussian bumps in log(1 + r) evenly
    spaced from the layer centre to its corner (r: distance in pixel pitches, so the core's
    single pixels and the sparse halo get comparable resolution), then x / r_max, y / r_max."""
    xy = np.asarray(cell_xy, dtype=np.float64)
    s = np.log1p(np.hypot(xy[:, 0], xy[:, 1]))
    centres = np.linspace(0.0, s.max(), FIELD_RADII)
    width = centres[1] - centres[0]
    bumps = np.exp(-0.5 * ((s[:, None] - centres[None]) / width) ** 2)
    r_max = max(float(np.hypot(xy[:, 0], xy[:, 1]).max()), 1e-9)
    return torch.as_tensor(np.concatenate([bumps, xy / r_max], 1), dtype=torch.float32)


def fit_cell_profile(counts: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, float]:
    """cell_profile: per layer, the coefficients a (layers, basis functions) of the profile log q_c =
    a . basis(c) - log sum_j exp(a . basis(j)) that maximise the multinomial likelihood of the layer's
    fired cells `counts` (layers, cells), summed over training showers; and the mean negative
    log-likelihood per pixel. A smooth profile on the field's basis, not the cells' own counts: a
    sparse layer's few thousand pixels over its 4096 cells would otherwise pace by their noise. A
    layer without pixels keeps a = 0 (the uniform profile)."""
    n = counts.double()
    total = n.sum().clamp_min(1.0)
    profile = nn.Module()
    profile.a = nn.Parameter(torch.zeros(n.shape[0], basis.shape[1], dtype=torch.float64))
    b = basis.double()

    def nll(m: nn.Module) -> torch.Tensor:
        log_q = torch.log_softmax(m.a @ b.T, -1)
        # the bumps sum to nearly a constant over the cells, which the softmax ignores: a tiny ridge fixes it
        return -(n * log_q).sum() / total + 1e-6 * (m.a ** 2).sum()

    loss = fit_law(profile, nll, max_iter=500)
    return profile.a.detach().float(), loss


def padded_tokens(lengths: torch.Tensor, slack: float = BUCKET_SLACK) -> int:
    """Token positions the blocks process for sequences of `lengths` hits (length buckets)."""
    return sum(len(g) * (int(lengths[g].max()) + 1) for g in length_buckets(lengths, slack))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_attended(lengths: torch.Tensor, window: int = 0) -> float:
    """Mean number of keys a token attends to in causal teacher forcing over sequences of
    `lengths` hits (each has lengths + 1 tokens); with `window` > 0 token i attends to
    min(i + 1, window + 1) keys (the start token and the `window` most recent)."""
    n = lengths.double() + 1
    if not len(n):
        return 0.0
    if not window:
        return float((n * (n + 1) / 2).sum() / n.sum())
    m = n.clamp(max=window + 1)  # tokens before the window is full: 1..m keys
    return float((m * (m + 1) / 2 + (n - m) * (window + 1)).sum() / n.sum())


__all__ = ["Block", "GridEmbedding", "HitTransformer", "KVCache", "Rotary2D", "cell_basis", "count_parameters",
           "fit_cell_profile", "length_buckets", "mean_attended",
           "padded_tokens", "unit_groups", "window_mask"]
