"""Pixel clusters <-> cluster tokens for the hit transformer (`model.token: cluster`).

A cluster token is one connected group of fired pixels of a sensor (8-connectivity, the
clusters of `uhg.sparse.clusters`), written as

    anchor row (or END)  ->  anchor col  ->  shape  ->  charge class  ->  ADC code of each pixel

- anchor: the cluster's first pixel in grid order (lowest row, then lowest column). Anchors of
  disjoint clusters are distinct, so tokens keep the strictly increasing grid order of pixel
  tokens and the same masks apply to them.
- shape: an entry of a vocabulary of pixel patterns (offsets from the anchor) built from the
  clusters of the training store: the `n_shapes` most frequent patterns of at most
  `max_pixels` pixels, the single pixel always first (id 0). Nothing about cluster shapes is
  assumed: the vocabulary is what the data contain.
- A cluster whose pattern is not in the vocabulary (rare, or larger than `max_pixels`) is
  split greedily into vocabulary shapes: from its first remaining pixel, the largest shape
  that lies entirely inside the remaining pixels (the single pixel always does). Its pieces
  touch, so evaluation re-clusters them into the original cluster, and tokens -> pixels is
  exact for every event.
- charge class: bin of log(cluster charge) (ADC summed over the token's pixels), between the
  threshold and max_pixels x the largest code; the per-pixel codes are drawn given it, so the
  pixels of one cluster share its charge fluctuation.

A pattern is keyed by the codes `dr * (2 n_cols + 1) + dc + n_cols` of its pixels'
offsets (dr, dc) from the anchor, in grid order; codes of offsets add, which the greedy split
uses.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from uhg.data.hits import HitBatch
from uhg.errors import GeometryError
from uhg.models.transformer_tokens import TokenBatch, TokenLayout
from uhg.sparse.clusters import connected_pixels
from uhg.sparse.torch_hits import TorchHits

Key = tuple[int, ...]


def shape_key_base(n_cols: int) -> int:
    """Radix of a shape key: a pixel offset (dr, dc) is dr x this + dc + n_cols, unique for |dc| < n_cols."""
    return 2 * n_cols + 1


class ShapeVocab:
    """The cluster shapes a model knows: offsets (K, P, 2) int64 (dr, dc) from the anchor, in
    grid order, padded with zeros; sizes (K,) pixels per shape (0 = unused entry)."""

    def __init__(self, offsets: np.ndarray, sizes: np.ndarray, n_cols: int):
        self.offsets, self.sizes, self.n_cols = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), n_cols
        base = shape_key_base(n_cols)
        self.keys: list[Key] = [tuple(int(dr * base + dc + n_cols) for dr, dc in self.offsets[k, :n])
                                for k, n in enumerate(self.sizes)]
        self.index = {key: k for k, key in enumerate(self.keys) if self.sizes[k] > 0}
        # greedy split: largest shapes first, offset codes relative to the anchor (code - n_cols)
        self._by_size = sorted(((k, [c - n_cols for c in key]) for k, key in enumerate(self.keys) if self.sizes[k]),
                               key=lambda e: (-len(e[1]), e[0]))
        self._split_cache: dict[Key, list[tuple[list[int], int]]] = {}

    @property
    def max_pixels(self) -> int:
        return self.offsets.shape[1]

    @classmethod
    def fit(cls, counts: Counter, n_shapes: int, max_pixels: int, n_cols: int) -> ShapeVocab:
        """The `n_shapes` most frequent patterns of at most `max_pixels` pixels among `counts`
        ({key: clusters}); the single pixel is always entry 0. Ties go to the smaller key."""
        single: Key = (n_cols,)
        ranked = sorted((k for k in counts if len(k) <= max_pixels and k != single), key=lambda k: (-counts[k], k))
        chosen = [single, *ranked[:n_shapes - 1]]
        offsets = np.zeros((n_shapes, max_pixels, 2), np.int64)
        sizes = np.zeros(n_shapes, np.int64)
        base = shape_key_base(n_cols)
        for i, key in enumerate(chosen):
            codes = np.asarray(key, np.int64)
            offsets[i, :len(key), 0] = codes // base
            offsets[i, :len(key), 1] = codes % base - n_cols
            sizes[i] = len(key)
        return cls(offsets, sizes, n_cols)

    def split(self, key: Key) -> list[tuple[list[int], int]]:
        """Pieces of a cluster with pattern `key`: [(positions of its pixels in grid order,
        shape id)], pieces in grid order of their anchors."""
        k = self.index.get(key)
        if k is not None:
            return [(list(range(len(key))), k)]
        cached = self._split_cache.get(key)
        if cached is not None:
            return cached
        position = {code: i for i, code in enumerate(key)}
        left = sorted(key)
        taken: set[int] = set()
        pieces = []
        for anchor in left:
            if anchor in taken:
                continue
            for shape, rel in self._by_size:
                codes = [anchor + r for r in rel]
                if all(c in position and c not in taken for c in codes):
                    taken.update(codes)
                    pieces.append(([position[c] for c in codes], shape))
                    break
            else:  # unreachable while the single pixel is in the vocabulary
                raise GeometryError("cluster shape vocabulary lacks the single pixel")
        self._split_cache[key] = pieces
        return pieces

    def tokens_of(self, key: Key) -> int:
        """Tokens a cluster with pattern `key` takes."""
        return 1 if key in self.index else len(self.split(key))


def cluster_keys(image: np.ndarray, row: np.ndarray, col: np.ndarray, rows: int,
                 cols: int) -> tuple[np.ndarray, np.ndarray, list[Key]]:
    """Clusters of fired pixels: (order, starts, keys). `order` sorts the pixels by (cluster,
    row, col); cluster i holds order[starts[i]:starts[i+1]]; keys[i] its pattern."""
    labels, n = connected_pixels(image, row, col, rows, cols)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    row, col = np.asarray(row, np.int64), np.asarray(col, np.int64)
    order = np.lexsort((col, row, labels))
    lab, r, c = labels[order], row[order], col[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    size = np.diff(np.r_[starts, len(lab)])
    code = (r - np.repeat(r[starts], size)) * shape_key_base(cols) + (c - np.repeat(c[starts], size)) + cols
    return order, starts, [tuple(k.tolist()) for k in np.split(code, starts[1:])]


def _pixel_arrays(batch: HitBatch | TorchHits, layout: TokenLayout) -> tuple[np.ndarray, ...]:
    """(image, row, col, adc) numpy int64 arrays of a batch; image = event x n_units + sensor."""
    if isinstance(batch, TorchHits):
        ev = batch.event_index().cpu().numpy()
        col_of = {k: v.cpu().numpy() for k, v in batch.columns.items()}
    else:
        ev, col_of = batch.event_index(), batch.columns
    sensor, row, col = (np.asarray(col_of[k], np.int64) for k in ("sensor", "row", "col"))
    if len(row) and (row.max() >= layout.n_rows or col.max() >= layout.n_cols or sensor.max() >= layout.n_units):
        raise GeometryError(f"hits outside the pixel grid of {layout.n_units} sensors x {layout.n_rows} x {layout.n_cols}")
    adc = np.rint(np.asarray(col_of["value"], np.float64)).astype(np.int64)
    return ev * layout.n_units + sensor, row, col, adc


class ShapeCensus:
    """Cluster patterns of training events, gathered batch by batch (memory: one int per
    cluster), from which the vocabulary and the tokens per (event, sensor) follow."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.key_id: dict[Key, int] = {}
        self.seqs: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.n_sequences = 0

    def add(self, batch: HitBatch) -> None:
        L = self.layout
        image, row, col, _ = _pixel_arrays(batch, L)
        order, starts, keys = cluster_keys(image, row, col, L.n_rows, L.n_cols)
        self.ids.append(np.array([self.key_id.setdefault(k, len(self.key_id)) for k in keys], np.int64))
        self.seqs.append(self.n_sequences + image[order[starts]] if len(starts) else np.zeros(0, np.int64))
        self.n_sequences += len(batch) * L.n_units

    def counts(self) -> Counter:
        n = np.bincount(np.concatenate(self.ids), minlength=len(self.key_id)) if self.ids else np.zeros(0, np.int64)
        return Counter({k: int(n[i]) for k, i in self.key_id.items()})

    def vocabulary(self, n_shapes: int, max_pixels: int) -> ShapeVocab:
        return ShapeVocab.fit(self.counts(), n_shapes, max_pixels, self.layout.n_cols)

    def token_counts(self, vocab: ShapeVocab) -> torch.Tensor:
        """(events, n_units) tokens per sequence with `vocab`."""
        per_key = np.array([vocab.tokens_of(k) for k in self.key_id], np.float64)
        ids, seqs = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (self.ids, self.seqs))
        n = np.bincount(seqs, weights=per_key[ids], minlength=self.n_sequences)
        return torch.as_tensor(np.rint(n).astype(np.int64)).view(-1, self.layout.n_units)

    def coverage(self, vocab: ShapeVocab) -> dict[str, float]:
        """Share of clusters whose pattern is a vocabulary shape, and pixels per token."""
        counts = self.counts()
        clusters = sum(counts.values())
        pixels = sum(len(k) * n for k, n in counts.items())
        tokens = sum(vocab.tokens_of(k) * n for k, n in counts.items())
        known = sum(n for k, n in counts.items() if k in vocab.index)
        return {"shape_vocab_coverage": known / max(clusters, 1), "pixels_per_token": pixels / max(tokens, 1)}


def charge_classes(charge: np.ndarray | torch.Tensor, layout: TokenLayout, max_pixels: int,
                   n_bins: int) -> np.ndarray | torch.Tensor:
    """Cluster charge (ADU, summed over a token's pixels) -> class: equal bins in log charge
    from the threshold to max_pixels x the largest code. int64 array or long tensor, as given."""
    lo = math.log(max(layout.adc_threshold, 1))
    hi = math.log(max_pixels * (layout.adc_threshold + layout.n_values - 1))
    scale = n_bins / max(hi - lo, 1e-9)
    if isinstance(charge, torch.Tensor):
        return ((charge.double().clamp_min(1.0).log() - lo) * scale).floor().clamp(0, n_bins - 1).long()
    x = (np.log(np.maximum(charge, 1.0)) - lo) * scale
    return np.clip(np.floor(x), 0, n_bins - 1).astype(np.int64)


def encode_clusters(hits: TorchHits | HitBatch, layout: TokenLayout, vocab: ShapeVocab, n_charge_bins: int) -> TokenBatch:
    """Padded cluster-token sequences of a batch (one per event and sensor; any hit order).

    rows, cols: (S, T) anchors; values: (S, T, 2 + P) long = [shape, charge class, ADC class of
    pixel 0..P-1 of the shape (0 beyond its size)]; slot t = 0 is the start token."""
    L, P = layout, vocab.max_pixels
    n_events = len(hits)
    image, row, col, adc = _pixel_arrays(hits, L)
    order, starts, keys = cluster_keys(image, row, col, L.n_rows, L.n_cols)
    sizes = np.diff(np.r_[starts, len(order)])
    pieces = [vocab.split(k) for k in keys]
    n_tok = np.array([len(p) for p in pieces], np.int64)
    first_tok = np.cumsum(n_tok) - n_tok
    # each pixel (in cluster order) -> its token and its slot in the token's shape
    tok = np.repeat(first_tok, sizes)
    slot = np.arange(len(order)) - np.repeat(starts, sizes)
    shape = np.zeros(int(n_tok.sum()), np.int64)
    single = n_tok == 1
    shape[first_tok[single]] = [pieces[i][0][1] for i in np.flatnonzero(single)]
    for i in np.flatnonzero(~single):
        for j, (positions, s) in enumerate(pieces[i]):
            at = starts[i] + np.asarray(positions)
            tok[at], slot[at] = first_tok[i] + j, np.arange(len(positions))
            shape[first_tok[i] + j] = s
    hit = order  # pixel index of each cluster-ordered entry
    n = len(shape)
    vals = np.zeros((n, P), np.int64)
    vals[tok, slot] = np.clip(adc[hit] - L.adc_threshold, 0, L.n_values - 1)
    charge = np.bincount(tok, weights=adc[hit].astype(np.float64), minlength=n)
    anchor = np.zeros(n, np.int64)
    anchor[tok[slot == 0]] = hit[slot == 0]
    t_img, t_row, t_col = image[anchor], row[anchor], col[anchor]
    seq_order = np.lexsort((t_col, t_row, t_img))
    values = np.concatenate([shape[:, None], charge_classes(charge, L, P, n_charge_bins)[:, None], vals], 1)[seq_order]
    t_img, t_row, t_col = t_img[seq_order], t_row[seq_order], t_col[seq_order]
    S = n_events * L.n_units
    lengths = np.bincount(t_img, minlength=S)
    slot_of = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1  # +1: slot 0 is the start token
    T = int(lengths.max()) + 1 if S else 1
    dev = hits.device if isinstance(hits, TorchHits) else torch.device("cpu")
    rows_t, cols_t = np.zeros((S, T), np.int64), np.zeros((S, T), np.int64)
    vals_t = np.zeros((S, T, 2 + P), np.int64)
    rows_t[t_img, slot_of], cols_t[t_img, slot_of], vals_t[t_img, slot_of] = t_row, t_col, values
    seq_ids = torch.arange(S, device=dev)
    return TokenBatch(torch.as_tensor(rows_t, device=dev), torch.as_tensor(cols_t, device=dev),
                      torch.as_tensor(vals_t, device=dev), lengths=torch.as_tensor(lengths, device=dev),
                      event=seq_ids // L.n_units, unit=seq_ids % L.n_units)


def decode_clusters(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                    layout: TokenLayout, n_events: int, conditions: dict[str, np.ndarray],
                    offsets: torch.Tensor, sizes: torch.Tensor) -> HitBatch:
    """Cluster tokens -> a sorted `HitBatch`. rows, cols (S, T), values (S, T, 2 + P) as
    `encode_clusters` makes them (position t = token t), S = n_events x n_units in (event,
    unit) order; offsets (K, P, 2) and sizes (K,) the shape table. Pixels off the sensor are
    dropped; where tokens overlap, their charges add (clipped at the largest ADC code), as
    charges of overlapping clusters do in a sensor."""
    L = layout
    S = len(lengths)
    T = rows.shape[1] if rows.ndim == 2 else 0
    keep = (torch.arange(T, device=rows.device)[None, :] < lengths[:, None]).cpu().numpy()
    seq = np.broadcast_to(np.arange(S)[:, None], (S, T))[keep]
    r, c, v = rows.cpu().numpy()[keep], cols.cpu().numpy()[keep], values.cpu().numpy()[keep]
    off, size = offsets.cpu().numpy(), sizes.cpu().numpy()
    shape = v[:, 0] if len(v) else np.zeros(0, np.int64)
    P = off.shape[1]
    valid = np.arange(P)[None, :] < size[shape][:, None]
    pr = r[:, None] + off[shape, :, 0]
    pc = c[:, None] + off[shape, :, 1]
    valid &= (pr >= 0) & (pr < L.n_rows) & (pc >= 0) & (pc < L.n_cols)
    adc = v[:, 2:2 + P] + L.adc_threshold if len(v) else np.zeros((0, P), np.int64)
    pix_seq = np.broadcast_to(seq[:, None], valid.shape)[valid]
    key = (pix_seq * L.n_rows + pr[valid]) * L.n_cols + pc[valid]
    uniq, inverse = np.unique(key, return_inverse=True)
    charge = np.minimum(np.bincount(inverse, weights=adc[valid], minlength=len(uniq)),
                        L.adc_threshold + L.n_values - 1)
    pixel = uniq % (L.n_rows * L.n_cols)
    useq = uniq // (L.n_rows * L.n_cols)
    event = useq // L.n_units
    offsets_ev = np.concatenate([[0], np.cumsum(np.bincount(event, minlength=n_events))])
    columns = {"sensor": useq % L.n_units, "row": pixel // L.n_cols, "col": pixel % L.n_cols,
               "value": charge.astype(np.float32)}
    return HitBatch("pixel", columns, offsets_ev, conditions)

