"""Batched, KV-cached sampling of the hit transformer with top-q (adaptive nucleus) sampling.

Determinism: every random number of event i derives only from
`uhg.seeding.event_seed(seed, first_event + i, "generate")`:
- its latent z from a torch.Generator seeded with it (drawn once per event);
- every token draw from a counter-based hash of (event seed, unit, step, draw), computed for
  all sequences at once. No generator state is shared between events, so the output does not
  depend on which events are batched together, on the batch size, or on how many sequences
  already ended.
On CPU, small matrix products (fewer than ~12 rows) use BLAS kernels that round differently;
the rows of every product are therefore padded to a multiple of 16, which makes each event's
result bit-identical for any batch split (tests/test_transformer_sampling.py checks this).

Sequences of all events and units advance in lock-step, one hit per step; finished sequences
are dropped from the active set (and their KV cache rows freed) as they end.

With a count law the hits of each sequence are drawn first (inverse CDF of its count law by
the counter uniforms of step -1: one per sequence, one per event for the shared copula factor,
keyed as unit n_units), and END comes exactly after them; with a response law each
shower's E_dep / E_inc is drawn (step -2) and its cell energies are scaled to it.

Cluster tokens draw row (0), col (1), shape (2), charge class (3) and the code of each pixel
(draw 2 keyed further by 1 + its slot in the shape), all within the one step of the token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.models.modes import eval_mode
from uhg.models.transformer import HitTransformer, KVCache
from uhg.models.transformer_clusters import (
    ShapeVocab,
    charge_classes,
    decode_clusters,
    shape_key_base,
)
from uhg.models.transformer_tokens import decode_tokens

log = logging.getLogger("uhg.models.transformer")

ROW_PAD = 16
REDRAW_STEP = 1 << 22  # cluster_merge_redraws: redraw a of step t keys its draws as step t + a x this
# (the counters hash (step x 4 + draw) mod 2^32: distinct from every first draw up to 4 M steps, 64 redraws)
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for x < 2^32 without int64 overflow (split m in 16-bit halves)."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with full avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_prefix(keys: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(N,) int64 hash of (key, unit): the part of `counter_uniform` that is the same for every
    draw of a sequence, so generation computes it once per sequence."""
    h = _mix32((keys & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((keys >> 32) & _M32))
    return _mix32(h ^ (units & _M32))


def counter_uniform(keys: torch.Tensor, units: torch.Tensor, step: int, draw: int,
                    sub: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float64 uniforms in [0, 1) that are a pure function of (key, unit, step, draw[, sub]).

    keys: (N,) int64 event seeds (63-bit); units: (N,) int64 sequence unit; step: token index;
    draw: which of the token's draws (0 row, 1 col, 2 value, 3 value spread; clusters: 2 shape,
    3 charge class); sub: optional (N,) int64 further key (a pixel's slot in a cluster token).
    """
    return prefixed_uniform(counter_prefix(keys, units), step, draw, sub)


def prefixed_uniform(prefix: torch.Tensor, step: int, draw: int, sub: torch.Tensor | None = None) -> torch.Tensor:
    """`counter_uniform` of the sequences whose `counter_prefix` is `prefix` (N,)."""
    h = _mix32(prefix ^ ((step * 4 + draw) & _M32))
    if sub is not None:
        h = _mix32(h ^ (sub & _M32))
    h2 = _mix32(h ^ 0x85EBCA6B)
    return ((h >> 5).double() * 2.0**26 + (h2 >> 6).double()) / 2.0**53  # 27 + 26 random bits


def top_q_mask(probs: torch.Tensor, q: float) -> torch.Tensor:
    """(..., V) bool: the smallest set of tokens, most probable first, whose total probability
    reaches q (ties broken by token index). The most probable token is always kept."""
    p_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(p_sorted, -1) - p_sorted
    keep_sorted = before < q
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_q_cdf(logits: torch.Tensor, temperature: float, top_q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, cdf), both (N, V) float64: softmax(logits / temperature) restricted to the top-q
    set (not renormalised) and its running sum, for `draw_from_cdf`. Computed once per set of
    logits, so redraws from the same logits cost a gather and a search."""
    logits = logits.double()
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, -1)
    if top_q < 1.0:
        probs = probs * top_q_mask(probs, top_q)
    return probs, torch.cumsum(probs, -1)


def draw_from_cdf(probs: torch.Tensor, cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(N,) long: inverse-CDF draw by uniforms `u` (N,) from the rows of `top_q_cdf`."""
    target = (u * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding at the top of the CDF (u * total rounds to total): no entry exceeds the target,
    # so fall back to the last token with mass. Only those rows can run past it (the CDF is
    # flat after that token), so only they pay for finding it.
    over = (choice == cdf.shape[-1]).nonzero().squeeze(1)
    if len(over):
        p = probs[over]
        choice[over] = p.shape[-1] - 1 - torch.argmax((p.flip(-1) > 0).to(torch.int8), -1)
    return choice


def sample_top_q(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_q: float) -> torch.Tensor:
    """(N,) long: inverse-CDF draw by uniforms `u` (N,) from softmax(logits / temperature)
    restricted to the top-q set and renormalised. Masked logits (-inf) are never drawn."""
    return draw_from_cdf(*top_q_cdf(logits, temperature, top_q), u)


def _pad_rows(n: int) -> int:
    return max(ROW_PAD, -(-n // ROW_PAD) * ROW_PAD)


def _padded(index: torch.Tensor) -> torch.Tensor:
    """`index` padded to a multiple of ROW_PAD by repeating its first entry."""
    n = _pad_rows(len(index))
    return torch.cat([index, index[:1].expand(n - len(index))])


def _allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits with the classes not `allowed` (N, K) removed, except in rows where that would leave
    none of the classes the logits allow (those rows are kept as they are)."""
    keep = allowed & torch.isfinite(logits)
    return torch.where(keep.any(-1, keepdim=True), logits.masked_fill(~keep, float("-inf")), logits)


def token_pixels(model: HitTransformer, row: torch.Tensor, col: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) flat in-sensor pixel index (row x n_cols + col) of each slot of cluster tokens at
    anchors (row, col) with `shape` (N,) or of every shape (shape None: (N, K, P)); and whether the
    slot is a real pixel of the shape inside the sensor."""
    off, size = model.shape_table()
    L = model.layout
    if shape is not None:
        off, size = off[shape], size[shape]  # (N, P, 2), (N,)
        r, c = row[:, None] + off[..., 0], col[:, None] + off[..., 1]
        real = torch.arange(off.shape[1], device=row.device)[None] < size[:, None]
    else:
        r, c = row[:, None, None] + off[None, ..., 0], col[:, None, None] + off[None, ..., 1]
        real = (torch.arange(off.shape[1], device=row.device)[None] < size[:, None])[None]
    inside = real & (r >= 0) & (r < L.n_rows) & (c >= 0) & (c < L.n_cols)
    return (r.clamp(0, L.n_rows - 1) * L.n_cols + c.clamp(0, L.n_cols - 1)), inside


def _rows_with_room(model: HitTransformer, occ: torch.Tensor, occ_rows: torch.Tensor, seq: torch.Tensor,
                    prev_row: torch.Tensor, prev_col: torch.Tensor) -> torch.Tensor:
    """(N, n_rows + 1) whether row r still has a pixel no earlier token of sequence `seq` fired at or
    after the next position (rows after the previous anchor: any; its own row: a column after the
    previous anchor's); END (the last class) always."""
    L = model.layout
    full = occ_rows[seq] >= L.n_cols  # (N, n_rows)
    own = occ.view(-1, L.n_rows, L.n_cols)[seq, prev_row.clamp_min(0)]  # (N, n_cols)
    after = torch.arange(L.n_cols, device=occ.device)[None] > prev_col[:, None]
    own_room = (~own & after).any(-1)
    r = torch.arange(L.n_rows, device=occ.device)[None]
    room = torch.where(r == prev_row[:, None], own_room[:, None], ~full)
    return torch.cat([room, torch.ones_like(room[:, :1])], 1)


def joins_vocab_shape(model: HitTransformer, vocab: ShapeVocab, occ: torch.Tensor, seq: torch.Tensor,
                      row: torch.Tensor, col: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """(N,) whether each cluster token (anchor row, col; `shape`; END rows: False) of sequence `seq`
    would join the pixels its sequence has fired (`occ`, (S, rows x cols)) that it touches (8
    neighbours) into one cluster whose pattern is a vocabulary shape. The encoder writes such a
    cluster as one token, so no training sequence holds this. Touching is tested for every row at
    once; the joined pattern only for the few rows that touch."""
    L = model.layout
    out = torch.zeros(len(row), dtype=torch.bool, device=row.device)
    idx = (row < L.n_rows).nonzero().squeeze(1)
    if not len(idx):
        return out
    flat, inside = token_pixels(model, row[idx], col[idx], shape[idx])
    r, c = flat // L.n_cols, flat % L.n_cols
    grid = occ.view(-1, L.n_rows, L.n_cols)
    s = seq[idx][:, None].expand_as(r)
    touch = torch.zeros(len(idx), dtype=torch.bool, device=row.device)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            ok = inside & (rr >= 0) & (rr < L.n_rows) & (cc >= 0) & (cc < L.n_cols)
            touch |= (grid[s, rr.clamp(0, L.n_rows - 1), cc.clamp(0, L.n_cols - 1)] & ok).any(1)
    base = shape_key_base(L.n_cols)
    for i in touch.nonzero().squeeze(1).tolist():
        fired = grid[int(seq[idx[i]])].cpu().numpy()
        pixels = {(int(a), int(b)) for a, b, k in zip(r[i].tolist(), c[i].tolist(), inside[i].tolist(), strict=True) if k}
        stack, seen = list(pixels), set(pixels)
        while stack:  # the fired pixels 8-connected to the token
            a, b = stack.pop()
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    q = (a + da, b + db)
                    if q not in seen and 0 <= q[0] < L.n_rows and 0 <= q[1] < L.n_cols and fired[q]:
                        seen.add(q)
                        stack.append(q)
        px = sorted(seen)
        key = tuple((a - px[0][0]) * base + (b - px[0][1]) + L.n_cols for a, b in px)
        out[idx[i]] = key in vocab.index
    return out


def shape_overlaps(model: HitTransformer, occupied: tuple[torch.Tensor, torch.Tensor], row: torch.Tensor,
                   col: torch.Tensor) -> torch.Tensor:
    """(N, K) whether shape k at anchor (row, col) would cover a pixel its sequence's earlier tokens
    fired; occupied: ((S, rows x cols) fired pixels of every sequence, (N,) the sequence of each row).
    Exact for the shapes `shape_logits` allows at that anchor (inside the sensor); slots beyond a
    shape's size sit on the anchor itself. The rest are out of the draw anyway, and their indices
    are only kept inside the map."""
    grid, seq = occupied
    L = model.layout
    off, _ = model.shape_table()
    shape_flat = off[..., 0] * L.n_cols + off[..., 1]  # (K, P)
    base = seq * (L.n_rows * L.n_cols) + row.clamp(max=L.n_rows - 1) * L.n_cols + col  # (N,)
    lin = (base[:, None, None] + shape_flat[None]).clamp_(0, grid.numel() - 1)
    return grid.view(-1)[lin].any(-1)


def sample_cluster_values(model: HitTransformer, h: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                          prefix: torch.Tensor, step: int, temperature: float, top_q: float,
                          occupied: tuple[torch.Tensor, torch.Tensor] | None = None,
                          unit: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2 + P) long: shape, charge class and pixel codes of the cluster tokens of one step;
    prefix: (N,) `counter_prefix` of each token's sequence; occupied: (fired pixels (S, rows x cols)
    of every sequence, (N,) each row's sequence) (cluster_exclusive: shapes covering one are not drawn);
    unit: (N,) each token's unit (cluster_code_bank: the codes of a training token of its shape, class
    and unit, picked by the value draw's uniform of sub-key 0, which no pixel draw uses).
    Pixel rows are gathered per real pixel of the drawn shapes (not all P slots) and padded to
    ROW_PAD, so each draw is the same whatever else is in the batch."""
    logits = model.shape_logits(h, row, col)
    if occupied is not None:
        logits = _allowed(logits, ~shape_overlaps(model, occupied, row, col))
    shape = sample_top_q(logits, prefixed_uniform(prefix, step, 2), temperature, top_q)
    charge = sample_top_q(model.charge_logits(h, row, col, shape), prefixed_uniform(prefix, step, 3),
                          temperature, top_q)
    P = model.config.cluster_max_pixels
    codes = torch.zeros(len(shape), P, dtype=torch.long, device=h.device)
    size = model.shape_table()[1][shape]
    tok, slot = (torch.arange(P, device=h.device)[None] < size[:, None]).nonzero(as_tuple=True)
    if len(tok) and model.pixel_context:
        # slot by slot: each pixel's code knows the ADC drawn for the token's earlier pixels
        so_far = torch.zeros(len(shape), dtype=torch.long, device=h.device)
        for j in range(int(size.max())):
            tj = (size > j).nonzero().squeeze(1)
            tp = tj[_padded(torch.arange(len(tj), device=h.device))]
            sj = torch.full_like(tp, j)
            logits = model.pixel_logits(h[tp], row[tp], col[tp], shape[tp], charge[tp], sj, so_far[tp])[:len(tj)]
            code = sample_top_q(logits, prefixed_uniform(prefix[tj], step, 2, sj[:len(tj)] + 1), temperature, top_q)
            codes[tj, j] = code
            so_far[tj] += code + model.layout.adc_threshold
    elif len(tok):
        pad = _padded(torch.arange(len(tok), device=h.device))
        tp, sp = tok[pad], slot[pad]
        logits = model.pixel_logits(h[tp], row[tp], col[tp], shape[tp], charge[tp], sp)[:len(tok)]
        probs, cdf = top_q_cdf(logits, temperature, top_q)
        codes[tok, slot] = draw_from_cdf(probs, cdf, prefixed_uniform(prefix[tok], step, 2, slot + 1))
        redraw_out_of_class(model, codes, charge, size, tok, slot, probs, cdf, prefix, step)
    if model.config.cluster_code_bank and len(shape):
        codes = model.bank_codes(codes, shape, charge, unit, prefixed_uniform(prefix, step, 2, torch.zeros_like(prefix)))
    return torch.cat([shape[:, None], charge[:, None], codes], 1)


def redraw_out_of_class(model: HitTransformer, codes: torch.Tensor, charge: torch.Tensor, size: torch.Tensor,
                        tok: torch.Tensor, slot: torch.Tensor, probs: torch.Tensor, cdf: torch.Tensor,
                        prefix: torch.Tensor, step: int) -> None:
    """cluster_charge_redraws: draw the codes (N, P) of every token whose summed ADC lies outside
    its drawn charge class again from the same pixel logits, up to that many times, in place.
    The codes of a training cluster always sum into its class, so this conditions the product of
    independent pixel laws on what the data always satisfy. tok, slot: (M,) the real pixels,
    probs, cdf (M, n_values) their `top_q_cdf`. Redraw a keys pixel slot s by 1 + s + a (P + 1),
    distinct from every first draw (1 + s), so each token's result depends on its own uniforms only."""
    redraws = model.config.cluster_charge_redraws
    if not redraws or not len(tok):
        return
    L, P = model.layout, codes.shape[1]
    filled = torch.arange(P, device=codes.device)[None] < size[:, None]
    for a in range(1, redraws + 1):
        adc = ((codes + L.adc_threshold) * filled).sum(1)
        off = charge_classes(adc, L, P, model.config.cluster_charge_bins) != charge
        sel = off[tok].nonzero().squeeze(1)
        if not len(sel):
            return
        u = prefixed_uniform(prefix[tok[sel]], step, 2, slot[sel] + 1 + a * (P + 1))
        codes[tok[sel], slot[sel]] = draw_from_cdf(probs[sel], cdf[sel], u)


@dataclass
class Generated:
    """Sampled sequences in (event, unit) order: rows/cols/values/value_u (S, T) hit tokens,
    lengths (S,) hits, n_capped sequences cut at the cap."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    value_u: torch.Tensor
    lengths: torch.Tensor
    n_capped: int
    targets: torch.Tensor | None = None
    """(S,) hits drawn by the count law (None without one)."""


@torch.no_grad()
def generate_tokens(model: HitTransformer, cond: torch.Tensor, seeds: Sequence[int], *, temperature: float = 1.0,
                    top_q: float = 1.0, max_hits: int = 4096, use_cache: bool = True,
                    latent: torch.Tensor | None = None) -> Generated:
    """Sample B events. cond: (B, C) condition features; seeds: B per-event seeds (already
    derived with event_seed). use_cache=False recomputes the whole prefix at every step (slow;
    for testing the cache). latent: (B, latent_dim) event latents to use instead of drawing them
    (e.g. the encoder's posterior of given events)."""
    L, dev, B = model.layout, cond.device, len(seeds)
    U, S = L.n_units, len(seeds) * L.n_units
    keys = torch.tensor(list(seeds), dtype=torch.int64, device=dev).repeat_interleave(U)
    units = torch.arange(U, device=dev).repeat(B)
    z = None
    if model.latent_dim and latent is not None:
        z = latent.to(dev)
    elif model.latent_dim and B:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = torch.stack([torch.randn(model.latent_dim, generator=g) for g in gens]).to(dev)
        if hasattr(model, "prior"):  # latent_prior: mixture, the unit-normal draws as its noise
            u = torch.stack([torch.rand(1, generator=g) for g in gens]).to(dev)
            z = model.prior.sample(model.prior_context(cond), u, z)
    elif model.latent_dim:
        z = torch.zeros(0, model.latent_dim, device=dev)
    ev_pad = _padded(torch.arange(B, device=dev)) if B else torch.zeros(0, dtype=torch.long, device=dev)
    ctx_all = model.sequence_context(model.unit_context(cond[ev_pad]), None if z is None else z[ev_pad])[:S]
    targets, n_capped_counts, cum_all = None, 0, None
    if model.counts is not None and S:
        event_keys = torch.tensor(list(seeds), dtype=torch.int64, device=dev)
        # one uniform per event and copula factor, keyed as units n_units, n_units + 1, ...
        u_event = torch.stack([counter_uniform(event_keys, torch.full_like(event_keys, U + j), -1, 0)
                               for j in range(model.counts.factors)], 1)
        seq_pad = _padded(torch.arange(S, device=dev))
        if model.layered:  # hits per layer (law units = layers; one sequence per shower, U = 1)
            R = L.n_rows
            if model.shares is not None:  # layer_split: the shower's total, then its split over the layers
                totals, n_capped_counts = model.counts.sample(counter_uniform(keys, units, -1, 0), u_event, cond,
                                                              max_hits)
                # 2 R uniforms per shower, keyed as its draws -3 / 0 / k: the share law's depth factor, gammas, binomials
                u_share = counter_uniform(keys.repeat_interleave(2 * R), units.repeat_interleave(2 * R), -3, 0,
                                          torch.arange(2 * R, device=dev).repeat(S)).view(S, 2 * R)
                per_row = model.shares.sample(totals, cond, u_share, torch.as_tensor(L.row_width))
            else:
                per_row, n_capped_counts = model.counts.sample(
                    counter_uniform(keys.repeat_interleave(R), torch.arange(R, device=dev).repeat(S), -1, 0),
                    u_event, cond, max_hits)
            per_row = per_row.view(S, R)
            before = torch.cumsum(per_row, 1) - per_row
            cut = per_row > (max_hits - before).clamp_min(0)
            n_capped_counts = max(n_capped_counts, int(cut.any(1).sum()))
            per_row = torch.minimum(per_row, (max_hits - before).clamp_min(0))
            cum_all, targets = torch.cumsum(per_row, 1), per_row.sum(1)
            ctx_all = ctx_all + model.layer_count_context(per_row[seq_pad])[:S]
        else:
            targets, n_capped_counts = model.counts.sample(counter_uniform(keys, units, -1, 0), u_event, cond,
                                                           max_hits)
        ctx_all = ctx_all + model.count_context(targets[seq_pad])[:S]
        if model.config.event_counts:  # rows of padded events repeat the first event's counts
            ctx_all = ctx_all + model.event_count_context(targets.view(B, U)[ev_pad])[:S]
        if model.config.event_summary:  # drawn before any token: one uniform per event, keyed as unit n_units
            u_summary = counter_uniform(event_keys, torch.full_like(event_keys, U), -4, 0)
            drawn = model.draw_event_summary(cond[ev_pad], targets.view(B, U)[ev_pad], u_summary[ev_pad])
            ctx_all = ctx_all + model.summary_context(drawn, torch.ones_like(drawn[:, 0], dtype=torch.bool))[
                :B].repeat_interleave(U, 0)

    if model.config.sensor_groups > 1 and S:
        rows, cols, values, out_u, lengths, n_capped = _sample_groups(
            model, ctx_all, keys, units, targets, cum_all, B, temperature, top_q, max_hits, use_cache)
    else:
        rows, cols, values, out_u, lengths, n_capped = _sample_sequences(
            model, ctx_all, keys, units, targets, cum_all, temperature, top_q, max_hits, use_cache)
    n_capped = max(n_capped, n_capped_counts)
    if n_capped:
        log.warning("%d of %d sequences reached the cap of model.max_hits=%d hits and were cut there; "
                    "raise model.max_hits (or generate at lower luminosity/energy) for unbiased multiplicities",
                    n_capped, S, max_hits)
    T = int(lengths.max()) if S else 0
    return Generated(rows[:, :T], cols[:, :T], values[:, :T], out_u[:, :T], lengths, n_capped, targets)


def _sample_groups(model: HitTransformer, ctx_all: torch.Tensor, keys: torch.Tensor, units: torch.Tensor,
                   targets: torch.Tensor | None, cum_all: torch.Tensor | None, B: int, temperature: float,
                   top_q: float, max_hits: int, use_cache: bool):
    """sensor_groups: `_sample_sequences` of the units of each group in turn, every sequence's context
    completed by the summary of the tokens its event's earlier groups have drawn. A sequence's draws
    are keyed by its event and unit, so they do not depend on which others share its pass."""
    U, dev = model.layout.n_units, ctx_all.device
    S = B * U
    group = model.unit_group[units]
    done = torch.zeros(S, 3, device=dev)  # token_sums of the sequences drawn so far (0 for the others)
    parts, n_capped = [], 0
    ev_pad = _padded(torch.arange(B, device=dev))  # padded rows, as every product here
    for g in range(model.config.sensor_groups):
        idx = (group == g).nonzero().squeeze(1)
        ctx = ctx_all[idx] + model.group_context(done.view(B, U, 3)[ev_pad])[:S][idx]
        rows, cols, values, out_u, lengths, capped = _sample_sequences(
            model, ctx, keys[idx], units[idx], None if targets is None else targets[idx],
            None if cum_all is None else cum_all[idx], temperature, top_q, max_hits, use_cache)
        valid = torch.arange(rows.shape[1], device=dev)[None] < lengths[:, None]
        done[idx] = model.token_sums(values, valid)
        parts.append((idx, rows, cols, values, out_u, lengths))
        n_capped += capped
    T = max(p[1].shape[1] for p in parts)
    vshape = parts[0][3].shape[2:]
    rows, cols = (torch.zeros(S, T, dtype=torch.long, device=dev) for _ in range(2))
    values = torch.zeros(S, T, *vshape, dtype=torch.long, device=dev)
    out_u = torch.zeros(S, T, dtype=torch.float64, device=dev)
    lengths = torch.zeros(S, dtype=torch.long, device=dev)
    for idx, r, c, v, u, n in parts:
        t = r.shape[1]
        rows[idx, :t], cols[idx, :t], values[idx, :t], out_u[idx, :t], lengths[idx] = r, c, v, u, n
    return rows, cols, values, out_u, lengths, n_capped


def _sample_sequences(model: HitTransformer, ctx_all: torch.Tensor, keys: torch.Tensor, units: torch.Tensor,
                      targets: torch.Tensor | None, cum_all: torch.Tensor | None, temperature: float, top_q: float,
                      max_hits: int, use_cache: bool):
    """Draw the tokens of S sequences with contexts ctx_all (S, d), counter keys `keys` and `units`
    (S,), and (count law) hits `targets` (S,) / cumulative hits per layer `cum_all` (S, n_rows).
    Returns rows, cols, values, value_u (S, T), lengths (S,) and the number of sequences cut at max_hits."""
    L, dev, S = model.layout, ctx_all.device, len(ctx_all)
    # FiLM of each sequence's context, once (padded rows, as every product here)
    films_all = [f[:S] for f in model.context_films(ctx_all[_padded(torch.arange(S, device=dev))])] if S else []

    # cluster_exclusive: the pixels each sequence's tokens have fired so far (a pixel belongs to one token)
    occ = (torch.zeros(S, L.n_rows * L.n_cols, dtype=torch.bool, device=dev)
           if model.clusters and model.config.cluster_exclusive else None)
    occ_rows = torch.zeros(S, L.n_rows, dtype=torch.long, device=dev) if occ is not None else None  # fired per row
    # cell_neighbours: the cells of its current layer each sequence has fired
    fired_all = (torch.zeros(S, L.n_cols, dtype=torch.bool, device=dev)
                 if model.config.cell_neighbours else None)
    # cluster_merge_redraws (anchor drawn row then column, not from the layer counts)
    merge_redraws = model.config.cluster_merge_redraws if occ is not None and cum_all is None else 0
    vocab = model.shape_vocab() if merge_redraws else None
    cap = 16
    vshape = (2 + model.config.cluster_max_pixels,) if model.clusters else ()  # cluster values per token
    out = {k: torch.zeros(S, cap, *(vshape if k == "values" else ()), dtype=torch.long, device=dev)
           for k in ("rows", "cols", "values")}
    out_u = torch.zeros(S, cap, dtype=torch.float64, device=dev)
    lengths = torch.zeros(S, dtype=torch.long, device=dev)
    prev_r = torch.full((S,), -1, dtype=torch.long, device=dev)
    prev_c = torch.full((S,), -1, dtype=torch.long, device=dev)
    prev_v = torch.zeros(S, *vshape, dtype=torch.long, device=dev)
    n_capped = 0
    # slots: the sequence each row of the active batch works on (padded to ROW_PAD rows by
    # repeating a sequence); live: rows whose sequence still runs and is not a repeat.
    slots = _padded(torch.arange(S, device=dev)) if S else torch.zeros(0, dtype=torch.long, device=dev)
    live = torch.arange(len(slots), device=dev) < S
    caches = None
    if use_cache and S:
        d, H = model.config.d_model, model.config.n_heads
        W = model.config.attention_window
        cap0 = W + 1 if W else 64
        caches = [KVCache(torch.zeros(len(slots), H, cap0, d // H, device=dev),
                          torch.zeros(len(slots), H, cap0, d // H, device=dev), window=W) for _ in model.blocks]
    # Per-row context, FiLM, keys and targets change only when finished rows are dropped.
    ctx = ctx_all[slots]
    films = [f[slots] for f in films_all]
    pre = counter_prefix(keys[slots], units[slots])
    tg = None if targets is None else targets[slots]
    cum = None if cum_all is None else cum_all[slots]
    spread = L.kind == "calo"  # only calorimeter energies are spread inside their bin
    for t in range(max_hits + 1):
        if not bool(live.any()):
            break
        if caches is not None:
            if t == 0:
                x = (model.start + ctx)[:, None]
            else:
                # rows whose sequence ended before its first hit still hold -1: embed them as 0
                x = model.embed(prev_r[slots, None].clamp_min(0), prev_c[slots, None].clamp_min(0),
                                prev_v[slots, None], False, ctx)
            if tg is not None:
                x = x + model.remaining_input(tg[:, None] - t)
            if cum is not None:
                x = x + model.layer_input(*model.layer_plan(cum, torch.full_like(tg[:, None], t)))
            h = model.hidden(x, ctx, prev_r[slots, None], prev_c[slots, None], caches, films)[:, 0]
        else:  # full recomputation of the prefix: start token + hits 0..t-1
            first = torch.zeros_like(slots)[:, None]
            hr = torch.cat([first, out["rows"][slots, :t]], 1)
            hc = torch.cat([first, out["cols"][slots, :t]], 1)
            hv = torch.cat([out["values"].new_zeros(len(slots), 1, *vshape), out["values"][slots, :t]], 1)
            pr = torch.cat([first - 1, hr[:, 1:]], 1)
            pc = torch.cat([first - 1, hc[:, 1:]], 1)
            x = model.embed(hr, hc, hv, True, ctx)
            if tg is not None:
                x = x + model.remaining_input(tg[:, None] - torch.arange(t + 1, device=dev)[None])
            if cum is not None:
                x = x + model.layer_input(*model.layer_plan(cum, torch.arange(t + 1, device=dev)[None].expand(len(cum), -1)))
            h = model.hidden(x, ctx, pr, pc, films=films)[:, -1]
        pr, pc = prev_r[slots], prev_c[slots]
        rem = None if tg is None else tg - t
        if cum is not None:  # layer_counts: the layer follows from the drawn counts
            row, row_rem = (v[:, 0] for v in model.layer_plan(cum, torch.full_like(tg[:, None], t)))
            if model.factorised:  # pixel row, then pixel column (draw 4: a draw no other head of a calo token uses)
                span = model.pixel_span(h, row, pr, pc, row_rem)
                y = sample_top_q(model.pixel_row_logits(h, row, pr, pc, row_rem, span), prefixed_uniform(pre, t, 1),
                                 temperature, top_q)
                x = sample_top_q(model.pixel_col_logits(h, row, pr, pc, row_rem, y, span), prefixed_uniform(pre, t, 4),
                                 temperature, top_q)
                col = y * model.grid[1] + x
            else:
                fired = None
                if fired_all is not None:  # a new layer starts with none of its cells fired
                    fired = fired_all[slots] & (row == pr)[:, None]
                col = sample_top_q(model.col_logits(h, row, pr, pc, None, row_rem, fired), prefixed_uniform(pre, t, 1),
                                   temperature, top_q)
                if fired is not None:
                    fired[torch.arange(len(col), device=dev), col] = True
                    fired_all[slots[live]] = fired[live]
        else:
            row_logits = model.row_logits(h, pr, pc, rem)
            if occ is not None:  # rows with no free pixel left after the previous anchor are left out
                row_logits = _allowed(row_logits, _rows_with_room(model, occ, occ_rows, slots, pr, pc))
            row = sample_top_q(row_logits, prefixed_uniform(pre, t, 0), temperature, top_q)
            col_logits = model.col_logits(h, row, pr, pc, rem)
            if occ is not None:  # anchors on fired pixels are left out (END rows: nothing to leave out)
                taken = occ.view(S, L.n_rows, L.n_cols)[slots, row.clamp(max=L.n_rows - 1)]
                col_logits = _allowed(col_logits, ~taken | (row == L.n_rows)[:, None])
            col = sample_top_q(col_logits, prefixed_uniform(pre, t, 1), temperature, top_q)
        if model.clusters:
            val = sample_cluster_values(model, h, row, col, pre, t, temperature, top_q,
                                        None if occ is None else (occ, slots), units[slots])
            for a in range(1, merge_redraws + 1):  # cluster_merge_redraws: the whole token again
                bad = (live & joins_vocab_shape(model, vocab, occ, slots, row, col, val[:, 0])).nonzero().squeeze(1)
                if not len(bad):
                    break
                bp, n_bad, tk = bad[_padded(torch.arange(len(bad), device=dev))], len(bad), t + a * REDRAW_STEP
                r2 = sample_top_q(row_logits[bp], prefixed_uniform(pre[bp], tk, 0), temperature, top_q)
                cl = model.col_logits(h[bp], r2, pr[bp], pc[bp], None if rem is None else rem[bp])
                taken = occ.view(S, L.n_rows, L.n_cols)[slots[bp], r2.clamp(max=L.n_rows - 1)]
                c2 = sample_top_q(_allowed(cl, ~taken | (r2 == L.n_rows)[:, None]), prefixed_uniform(pre[bp], tk, 1),
                                  temperature, top_q)
                v2 = sample_cluster_values(model, h[bp], r2, c2, pre[bp], tk, temperature, top_q, (occ, slots[bp]),
                                           units[slots[bp]])
                row[bad], col[bad], val[bad] = r2[:n_bad], c2[:n_bad], v2[:n_bad]
        else:
            val = sample_top_q(model.value_logits(h, row, col), prefixed_uniform(pre, t, 2),
                               temperature, top_q)
        li = live.nonzero().squeeze(1)
        seq, row, col, val = slots[li], row[li], col[li], val[li]
        ended = row == L.n_rows
        if t == max_hits:
            n_capped = int((~ended).sum())
            break
        if t >= cap:
            for key in out:
                out[key] = torch.cat([out[key], torch.zeros_like(out[key])], 1)
            out_u = torch.cat([out_u, torch.zeros_like(out_u)], 1)
            cap *= 2
        go, hit = ~ended, seq[~ended]
        out["rows"][hit, t], out["cols"][hit, t], out["values"][hit, t] = row[go], col[go], val[go]
        if spread:
            out_u[hit, t] = counter_uniform(keys[hit], units[hit], t, 3)
        lengths[hit] = t + 1
        prev_r[hit], prev_c[hit], prev_v[hit] = row[go], col[go], val[go]
        if occ is not None and len(hit):
            flat, inside = token_pixels(model, row[go], col[go], val[go][:, 0])
            fresh = inside & ~occ[hit[:, None].expand_as(flat), flat]
            occ[hit[:, None].expand_as(flat)[fresh], flat[fresh]] = True
            occ_rows.index_put_((hit[:, None].expand_as(flat)[fresh], flat[fresh] // L.n_cols),
                                torch.ones(int(fresh.sum()), dtype=torch.long, device=dev), accumulate=True)
        live[li[ended]] = False
        n_run = int(live.sum())
        if n_run and n_run <= 0.75 * len(slots) and _pad_rows(n_run) < len(slots):
            pos = _padded(live.nonzero().squeeze(1))  # drop finished rows, free their cache
            slots, live = slots[pos], torch.arange(len(pos), device=dev) < n_run
            ctx, films, pre = ctx[pos], [f[pos] for f in films], pre[pos]
            tg = None if tg is None else tg[pos]
            cum = None if cum is None else cum[pos]
            if caches is not None:
                for c in caches:
                    c.select(pos)
    return out["rows"], out["cols"], out["values"], out_u, lengths, n_capped


@torch.no_grad()
def scale_to_response(batch: HitBatch, model: HitTransformer, cond: torch.Tensor, seeds: Sequence[int]) -> HitBatch:
    """Scale each shower's cell energies so that their sum is E_inc x a response drawn from the
    model's response law (counter uniform of step -2 of the event's seed). Empty showers stay empty."""
    keys = torch.tensor(list(seeds), dtype=torch.int64, device=cond.device)
    u = counter_uniform(keys, torch.zeros_like(keys), -2, 0)
    response = model.response.sample(u, cond).cpu().numpy()
    e_inc = np.asarray(batch.conditions["incident_energy"], dtype=np.float64)
    values = batch.columns["value"].astype(np.float64)
    event = batch.event_index()
    sums = np.bincount(event, weights=values, minlength=len(batch))
    factor = np.where(sums > 0, response * e_inc / np.where(sums > 0, sums, 1.0), 1.0)
    batch.columns["value"] = (values * factor[event]).astype(batch.columns["value"].dtype)
    return batch


def sample_events(model: HitTransformer, cond: torch.Tensor, seeds: Sequence[int], conditions: dict[str, np.ndarray],
                  *, temperature: float = 1.0, top_q: float = 1.0, max_hits: int = 4096,
                  batch_events: int = 64) -> HitBatch:
    """B events as a sorted HitBatch: cond (B, C) normalised features on the model's device,
    seeds B per-event seeds (event_seed(seed, index, "generate")), conditions {name: (B,)
    physical values} stored with the events. Passes of `batch_events` events; the result does
    not depend on that split."""
    parts = []
    with eval_mode(model):
        for lo in range(0, len(seeds), batch_events):
            hi = min(len(seeds), lo + batch_events)
            g = generate_tokens(model, cond[lo:hi], seeds[lo:hi], temperature=temperature, top_q=top_q,
                                max_hits=max_hits)
            conds = {k: np.asarray(v, dtype=np.float64)[lo:hi] for k, v in conditions.items()}
            if model.clusters:
                part = decode_clusters(g.rows, g.cols, g.values, g.lengths, model.layout, hi - lo, conds,
                                       *model.shape_table())
            else:
                part = decode_tokens(g.rows, g.cols, g.values, g.lengths, model.layout, hi - lo, conds, g.value_u)
            if model.response is not None:
                part = scale_to_response(part, model, cond[lo:hi], seeds[lo:hi])
            parts.append(part)
    if not parts:
        return HitBatch.empty(model.layout.kind, list(conditions))
    return HitBatch.concat(parts)
