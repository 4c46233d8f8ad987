"""Exactly `counts` cluster seeds per image, placed where the gate puts them (Gumbel top-k).

Image r (one sensor of one event) gets the counts[r] pixels with the largest keys
log sigmoid(gate) + Gumbel(u), u its uniform map: a draw without replacement with odds
sigmoid(gate). Computing every key of a full PXD event (7.68 M pixels: two logarithms, a log
sigmoid and a top-k over 192 000 pixels per sensor) was a quarter of the event's sampling cost,
for ~600 seeds per sensor. The keys are therefore computed at candidates only: the pixels whose
uniform is in the top fraction f of their image. A pixel outside them has u < u_min = 1 - f, so
its key is below ls_max + G(u_min) (ls_max: the largest log sigmoid(gate) of the image, G the
Gumbel transform, increasing in u); when the counts[r]-th largest candidate key lies above that
bound and above the next candidate key, the candidates' top counts[r] are the image's, exactly.
Otherwise f grows, and past MAX_FRACTION the image's keys are all computed, as before. The
selected pixels are those of the dense computation, bit for bit.

The search reads the uniforms above u_min only, so on the CPU they need not be drawn at all pixels
(7.68 M random numbers per full PXD event, a quarter of its sampling cost): `SparseUniforms` draws
those pixels directly, as the Bernoulli process of the pixels above the threshold with uniform
values above it, and the rest only where an image needs all its keys. The seeds have the law of
the dense draw, exactly; their values are another draw of it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

CANDIDATES = 4.0  # first candidate fraction: this many times the image's seed fraction (measured: a
# trained full-resolution gate needs 0.9-1.1 times it)
GROWTH = 8.0  # candidate fraction factor after a failed check
MAX_FRACTION = 0.25  # beyond this, compute every key of the image
PAD = 64  # keys are computed on arrays padded to a multiple of this: torch's vectorised kernels then
# take every element (an odd tail goes through the scalar code path, which may round differently)
BOUND_MARGIN = 1e-4  # relative slack on the bound: keys are float32, the bound float64


def gumbel_keys(gate: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """log sigmoid(gate) + Gumbel noise from `uniforms` in (0, 1), elementwise (same shapes)."""
    gumbel = -torch.log(-torch.log(uniforms.clamp(1e-12, 1 - 1e-7)))
    return nn.functional.logsigmoid(gate) + gumbel


class DenseUniforms:
    """The uniforms of R images of P pixels, all drawn beforehand: an (R, P) tensor."""

    def __init__(self, uniforms: torch.Tensor):
        self.u, self.shape, self.device = uniforms, tuple(uniforms.shape), uniforms.device
        self._host: np.ndarray | None = None

    def at_least(self, rows: np.ndarray, u_min: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The pixels of images `rows` (ascending) whose uniform is >= u_min (float32, one per row),
        row-major: (their row's position in `rows`, pixel, uniform)."""
        if self._host is None:
            self._host = self.u.cpu().numpy()
        threshold = np.full(self.shape[0], np.inf, np.float32)  # all rows compared: no copy of the uniforms
        threshold[rows] = u_min
        hit = np.flatnonzero(self._host >= threshold[:, None])
        row, pix = np.searchsorted(rows, hit // self.shape[1]), hit % self.shape[1]
        return row, pix, self.u[torch.from_numpy(rows[row]).to(self.device), torch.from_numpy(pix).to(self.device)]

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), P): every uniform of images `rows`."""
        return self.u if len(rows) == self.shape[0] else self.u[torch.from_numpy(rows).to(self.device)]


class SparseUniforms:
    """The uniforms of R images of P pixels drawn only where `counted_seed_index` reads them. Image r
    belongs to event r // images_per_event and draws from that event's generator (so an event's
    draw does not depend on its batch). The pixels with u >= 1 - f are a Bernoulli(f) process,
    drawn by geometric gaps, with values uniform in [1 - f, 1); raising f to f' adds the pixels of
    a Bernoulli((f' - f) / (1 - f)) process on the rest, values in [1 - f', 1 - f); an image read
    whole gets values uniform in [0, 1 - f) at the remaining pixels. In law, the dense map."""

    def __init__(self, generators: list[torch.Generator], images_per_event: int, n_pixels: int,
                 device: torch.device | str = "cpu"):
        self.gens, self.per_event = generators, images_per_event
        self.shape, self.device = (len(generators) * images_per_event, n_pixels), torch.device(device)
        self.frac = np.zeros(self.shape[0])  # pixels with u >= 1 - frac[r] are drawn (in pix/val)
        self.pix = [np.zeros(0, np.int64)] * self.shape[0]  # ascending
        self.val = [np.zeros(0, np.float32)] * self.shape[0]

    def at_least(self, rows: np.ndarray, u_min: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """As `DenseUniforms.at_least`."""
        f = 1.0 - u_min.astype(np.float64)  # exact: 1 - f is u_min again
        more = f > self.frac[rows]
        for event in np.unique(rows[more] // self.per_event):
            sel = more & (rows // self.per_event == event)
            self._extend(self.gens[event], rows[sel], f[sel])
        row = np.repeat(np.arange(len(rows)), [len(self.pix[r]) for r in rows])
        pix = np.concatenate([self.pix[r] for r in rows])
        val = np.concatenate([self.val[r] for r in rows])
        keep = val >= u_min[row]  # all of them unless an image was drawn further before
        return row[keep], pix[keep], torch.from_numpy(val[keep]).to(self.device)

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """As `DenseUniforms.images`; an image read whole is drawn whole (and kept)."""
        event = rows // self.per_event
        for e in np.unique(event[self.frac[rows] < 1.0]):
            todo = [r for r in rows[event == e] if self.frac[r] < 1.0]
            w = torch.rand(len(todo), self.shape[1], dtype=torch.float64, generator=self.gens[e]).numpy()
            for r, wr in zip(todo, w, strict=True):
                below = np.float32(1.0 - self.frac[r])  # the drawn pixels are those at or above it
                full = np.minimum((float(below) * wr).astype(np.float32), np.nextafter(below, np.float32(0)))
                full[self.pix[r]] = self.val[r]
                self.pix[r], self.val[r], self.frac[r] = np.arange(self.shape[1]), full, 1.0
        return torch.from_numpy(np.stack([self.val[r] for r in rows])).to(self.device)

    def _extend(self, gen: torch.Generator, rows: np.ndarray, f: np.ndarray) -> None:
        """Draw the pixels of images `rows` (one event's) with u in [1 - f, 1 - frac)."""
        old = self.frac[rows]
        rest = self.shape[1] - np.array([len(self.pix[r]) for r in rows])  # pixels not drawn yet
        q = (f - old) / (1.0 - old)
        mean = rest * q
        start = np.zeros(len(rows))  # next free position on each row's rest
        new: list[list[np.ndarray]] = [[] for _ in rows]
        todo = np.arange(len(rows))
        while len(todo):  # rarely more than once: six standard deviations of gaps more than expected
            n = (mean[todo] + 6.0 * np.sqrt(mean[todo]) + 16.0).astype(np.int64)
            v = torch.rand(int(n.sum()), dtype=torch.float64, generator=gen).numpy()
            gaps = np.floor(np.log1p(-v) / np.repeat(np.log1p(-q[todo]), n)) + 1.0  # geometric, >= 1
            ends = np.cumsum(n)
            steps = np.cumsum(gaps)
            steps -= np.repeat(np.concatenate([[0.0], steps[ends[:-1] - 1]]), n)
            pos = np.repeat(start[todo], n) + steps - 1.0
            last = pos[ends - 1]
            for i, p in zip(todo, np.split(pos, ends[:-1]), strict=True):
                new[i].append(p[p < rest[i]].astype(np.int64))
            start[todo] = last + 1.0
            todo = todo[last < rest[todo]]
        for i, r in enumerate(rows):
            j = np.concatenate(new[i])  # positions among the pixels not drawn yet, ascending
            have = self.pix[r]
            pix = j + np.searchsorted(have - np.arange(len(have)), j, side="right")
            w = torch.rand(len(pix), dtype=torch.float64, generator=gen).numpy()
            val = np.maximum(((1.0 - f[i]) + (f[i] - old[i]) * w).astype(np.float32), np.float32(1.0 - f[i]))
            order = np.argsort(np.concatenate([have, pix]), kind="stable")
            self.pix[r] = np.concatenate([have, pix])[order]
            self.val[r] = np.concatenate([self.val[r], val])[order]
            self.frac[r] = f[i]


def counted_seed_index(counts: torch.Tensor, uniforms: torch.Tensor | SparseUniforms,
                       gate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gate_max: torch.Tensor,
                       gate_map: Callable[[], torch.Tensor], rank_all: bool | None = None) -> torch.Tensor:
    """(n_seeds,) long: flat indices into the (R, P) images of `uniforms` (R images of P pixels: an
    (R, P) tensor or `SparseUniforms`) of the counts[r] seeds of each image r, ascending (the order
    of `nonzero` on the seed mask). `gate_at(rows, pixels)` gives the gate logits at those pixels,
    `gate_max` (R,) an upper bound of each image's gate, `gate_map()` the (R, P) gates. With
    `rank_all` (default: off the CPU, where ranking every key on the device beats finding
    candidates on the host) all keys are ranked from `gate_map()`."""
    u = uniforms if isinstance(uniforms, SparseUniforms) else DenseUniforms(uniforms)
    n_img, n_pix = u.shape
    counts = counts.reshape(-1).long().clamp(0, n_pix)
    k_max = int(counts.max()) if n_img else 0
    if k_max == 0:
        return torch.zeros(0, dtype=torch.long, device=u.device)
    if u.device.type != "cpu" if rank_all is None else rank_all:
        top = gumbel_keys(gate_map(), u.images(np.arange(n_img))).topk(k_max, dim=1, sorted=True).indices
        keep = torch.arange(k_max, device=u.device)[None] < counts.to(u.device)[:, None]
        image = torch.arange(n_img, device=u.device)[:, None].expand_as(top)
        return torch.sort(image[keep] * n_pix + top[keep]).values
    counts = counts.cpu()
    ls_max = nn.functional.logsigmoid(gate_max.detach().double().cpu())
    todo = np.flatnonzero(counts.numpy() > 0)
    frac = np.minimum(1.0, (CANDIDATES * counts.numpy() + 1.0) / n_pix)
    found = []
    while len(todo):
        exact = todo[frac[todo] > MAX_FRACTION]
        if len(exact):
            found.append(_exact_top(exact, counts, u, gate_at, k_max, n_pix))
        todo = todo[frac[todo] <= MAX_FRACTION]
        if not len(todo):
            break
        u_min = (1.0 - frac[todo]).astype(np.float32)
        row, pix, values = u.at_least(todo, u_min)  # the candidates, row-major; row: position in `todo`
        rows = torch.from_numpy(todo[row]).to(u.device)
        pixels = torch.from_numpy(pix).to(u.device)
        keys = _padded_keys(gate_at(rows, pixels), values).cpu()
        # the candidates of each image as a row of a padded matrix, -inf beyond them
        n_cand = np.bincount(row, minlength=len(todo))
        start = np.concatenate([[0], np.cumsum(n_cand)[:-1]])
        k = counts[torch.from_numpy(todo)]
        width = int(max(n_cand.max(), int(k.max()) + 1))
        table = torch.full((len(todo), width), -torch.inf, dtype=keys.dtype)
        table[torch.from_numpy(row), torch.from_numpy(np.arange(len(row)) - start[row])] = keys
        top_val, top_pos = table.topk(int(k.max()) + 1, dim=1, sorted=True)
        kth = top_val.gather(1, (k - 1)[:, None])[:, 0].double()
        nxt = top_val.gather(1, k[:, None])[:, 0].double()
        gumbel_min = -torch.log(-torch.log(torch.from_numpy(u_min).double()))
        bound = ls_max[torch.from_numpy(todo)] + gumbel_min
        bound = bound + BOUND_MARGIN * (1.0 + bound.abs())
        ok = ((kth > bound) & (kth > nxt)).numpy()
        for i in np.flatnonzero(ok):
            found.append(todo[i] * n_pix + pix[start[i] + top_pos[i, : int(k[i])].numpy()])
        frac[todo[~ok]] = np.minimum(1.0, frac[todo[~ok]] * GROWTH)
        todo = todo[~ok]
    return torch.from_numpy(np.sort(np.concatenate(found))).to(u.device)


def _padded_keys(gate: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """`gumbel_keys` of 1-D arrays, computed padded to a multiple of PAD (see PAD)."""
    n = len(gate)
    pad = -n % PAD
    if pad:
        gate = torch.cat([gate, gate.new_zeros(pad)])
        uniforms = torch.cat([uniforms, uniforms.new_full((pad,), 0.5)])
    return gumbel_keys(gate, uniforms)[:n]


def _exact_top(rows: np.ndarray, counts: torch.Tensor, u: DenseUniforms | SparseUniforms,
               gate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k_max: int, n_pix: int) -> np.ndarray:
    """Flat indices of the seeds of images `rows` from all their keys (the top `k_max` of each row,
    sorted, its first counts[r]: the dense draw)."""
    r = torch.from_numpy(rows).to(u.device)
    pix = torch.arange(n_pix, device=u.device)
    gate = gate_at(r.repeat_interleave(n_pix), pix.repeat(len(rows))).view(len(rows), n_pix)
    top = gumbel_keys(gate, u.images(rows)).topk(min(k_max, n_pix), dim=-1, sorted=True).indices.cpu().numpy()
    k = counts[r.cpu()].numpy()
    return np.concatenate([rows[i] * n_pix + top[i, : k[i]] for i in range(len(rows))])


def place_counted_seeds(gate: torch.Tensor, counts: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, U, H, W) bool: exactly counts[b, u] seeds in image (b, u), positions drawn without
    replacement with odds sigmoid(gate) (Gumbel top-k: the `counts` largest log sigmoid(gate) +
    Gumbel(uniforms), uniforms (B, U, H, W) in (0, 1)). Each image's draw is its own, so it does
    not depend on the batch."""
    b, u, h, w = gate.shape
    flat = gate.detach().reshape(b * u, h * w)
    index = counted_seed_index(counts, uniforms.reshape(b * u, h * w), lambda r, p: flat[r, p], flat.amax(dim=1),
                               lambda: flat)
    out = torch.zeros(b * u * h * w, dtype=torch.bool, device=gate.device)
    out[index] = True
    return out.view(b, u, h, w)
