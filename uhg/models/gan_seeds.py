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
selected pixels, and so the events, are those of the dense computation, bit for bit.
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


def counted_seed_index(counts: torch.Tensor, uniforms: torch.Tensor,
                       gate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gate_max: torch.Tensor,
                       gate_map: Callable[[], torch.Tensor], rank_all: bool | None = None) -> torch.Tensor:
    """(n_seeds,) long: flat indices into the (R, P) images of `uniforms` (R images of P pixels) of
    the counts[r] seeds of each image r, ascending (the order of `nonzero` on the seed mask).
    `gate_at(rows, pixels)` gives the gate logits at those pixels, `gate_max` (R,) an upper bound
    of each image's gate, `gate_map()` the (R, P) gates. With `rank_all` (default: off the CPU,
    where ranking every key on the device beats finding candidates on the host) all keys are ranked
    from `gate_map()`."""
    u = uniforms
    n_img, n_pix = u.shape
    counts = counts.reshape(-1).long().clamp(0, n_pix)
    k_max = int(counts.max()) if n_img else 0
    if k_max == 0:
        return torch.zeros(0, dtype=torch.long, device=u.device)
    if u.device.type != "cpu" if rank_all is None else rank_all:
        top = gumbel_keys(gate_map(), u).topk(k_max, dim=1, sorted=True).indices
        keep = torch.arange(k_max, device=u.device)[None] < counts.to(u.device)[:, None]
        image = torch.arange(n_img, device=u.device)[:, None].expand_as(top)
        return torch.sort(image[keep] * n_pix + top[keep]).values
    counts = counts.cpu()
    u_np = u.cpu().numpy()
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
        threshold = np.full(n_img, np.inf, np.float32)  # all rows compared: no copy of the uniforms
        threshold[todo] = u_min
        hit = np.flatnonzero(u_np >= threshold[:, None])  # the candidates, row-major
        row, pix = np.searchsorted(todo, hit // n_pix), hit % n_pix  # row: position in `todo`
        rows = torch.from_numpy(todo[row]).to(u.device)
        pixels = torch.from_numpy(pix).to(u.device)
        keys = _padded_keys(gate_at(rows, pixels), u[rows, pixels]).cpu()
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


def _exact_top(rows: np.ndarray, counts: torch.Tensor, u: torch.Tensor,
               gate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k_max: int, n_pix: int) -> np.ndarray:
    """Flat indices of the seeds of images `rows` from all their keys (the top `k_max` of each row,
    sorted, its first counts[r]: the dense draw)."""
    r = torch.from_numpy(rows).to(u.device)
    pix = torch.arange(n_pix, device=u.device)
    gate = gate_at(r.repeat_interleave(n_pix), pix.repeat(len(rows))).view(len(rows), n_pix)
    top = gumbel_keys(gate, u[r]).topk(min(k_max, n_pix), dim=-1, sorted=True).indices.cpu().numpy()
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
