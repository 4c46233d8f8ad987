"""Factorised pixel head of the hit transformer (model.pixel_head: factorised).

A layer of 1024 x 1024 pixels (the full `epical`) is too large for one categorical over its cells,
so the next pixel of a layer is drawn as its pixel row (an ny-way head), then its column given the
row (an nx-way head). With cell_field both factors carry the fire-probability field, held constant
on tiles of field_tile x field_tile pixels so that the row and column sums of the first-success law
stay exact and cheap (docs/calorimeter.md, "Full `epical`: factorised pixel head").

`FactorisedPixelHead` is a mixin of `uhg.models.transformer.HitTransformer`: it reads the modules
that class builds (row_out, col_head as the pixel-row head, x_head, y_out, field_head, cell_basis)
and its `layout`, `config`, `grid` and `row_width`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def layer_fire_rate(row_remaining: torch.Tensor, first: torch.Tensor, width: torch.Tensor,
                    low: float = 1e-6) -> torch.Tensor:
    """The uniform pacing of a layer's cells: the chance rho that a cell fires when the layer's
    pixels still to place (`row_remaining`) spread evenly over its cells from `first` to its
    `width`, clamped to [low, 0.999]. One expression for the flat and the factorised head."""
    left = (width - first).clamp_min(1)
    return (row_remaining.float() / left).clamp(low, 0.999)


def first_draw_hazard(step: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """cell_profile: the chance 1 - (S_{u+1} / S_u)^n that the smallest of n independent draws from a
    profile is unit u (a cell, or a pixel row) given that none is before u, from step = log(S_{u+1} / S_u)
    (S_u: the profile's mass from u on). One expression for the flat and the factorised head."""
    return -torch.expm1(n * step)


def tile_centres(grid: tuple[int, int], tile: int) -> np.ndarray:
    """(tiles, 2) centre (x, y) of every tile of a layer in pixel pitches about the layer centre,
    tiles in row-major order."""
    ny, nx = grid
    ty, tx = np.meshgrid(np.arange(ny // tile), np.arange(nx // tile), indexing="ij")
    return np.stack([(tx.ravel() + 0.5) * tile - nx / 2, (ty.ravel() + 0.5) * tile - ny / 2], 1)


@dataclass
class PixelSpan:
    """What both factors of a token share: the open cells of its layer (`first`, `last` flat cell,
    `width` the layer's cells), the hidden state given the layer (`hr`) and, with cell_field, the
    tile log-odds `ell` (N, tile rows, tile cols); with cell_profile also the log-odds of the uniform
    pacing alone (`ell_even`, the same shape), the pixels of the layer still to place (`n`) and the
    profile's tables (`profile`, `_profile_tables`), which both factors read. Computed once per token
    by `pixel_span`."""

    first: torch.Tensor
    last: torch.Tensor
    width: torch.Tensor
    hr: torch.Tensor
    ell: torch.Tensor | None
    ell_even: torch.Tensor | None = None
    n: torch.Tensor | None = None
    profile: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class FactorisedPixelHead(nn.Module):
    """The pixel row, then the pixel column given the row, of the next pixel of a layer."""

    def _tile(self, cells: torch.Tensor) -> torch.Tensor:
        """Field tile of flat cells (row-major tiles of field_tile x field_tile pixels)."""
        nx = self.grid[1]
        T = self.config.field_tile
        return (cells // nx // T) * (nx // T) + (cells % nx) // T

    def _grid_span(self, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                   row_remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first, last, width): the first and last flat cell the next pixel may take in its layer
        (after the previous pixel of the layer, leaving room for the layer's pixels after it) and
        the layer's cells (END rows: the whole grid)."""
        width = torch.cat([self.row_width, self.row_width.new_full((1,), self.layout.n_cols)])[row]
        first = torch.where(row == prev_row, prev_col + 1, 0)
        return first, width - row_remaining.clamp_min(1), width

    def _tile_field(self, hr: torch.Tensor, first: torch.Tensor, width: torch.Tensor,
                    row_remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cell_field on tiles: (N, tile rows, tile cols) log-odds l of each pixel of a tile firing, the
        logit of the layer's uniform pacing (pixels still to place / cells left) plus the field; and
        the uniform pacing's log-odds alone (N,)."""
        ny, nx = self.grid
        T = self.config.field_tile
        # 1e-7, not the flat head's 1e-6: one pixel left for a 1 M-cell layer is a rate of 1e-6
        even = torch.logit(layer_fire_rate(row_remaining, first, width, low=1e-7))
        ell = even.unsqueeze(-1) + self.field_head(hr.float()).float() @ self.cell_basis.float().T
        return ell.view(len(hr), ny // T, nx // T), even

    def pixel_span(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                   row_remaining: torch.Tensor) -> PixelSpan:
        """The parts of both factors that do not depend on the pixel row (see PixelSpan)."""
        first, last, width = self._grid_span(row, prev_row, prev_col, row_remaining)
        hr = h + self.row_out(row)
        if not self.cell_field:
            return PixelSpan(first, last, width, hr, None)
        ell, even = self._tile_field(hr, first, width, row_remaining)
        if not self.config.cell_profile:
            return PixelSpan(first, last, width, hr, ell)
        n = row_remaining.float().clamp_min(1)
        return PixelSpan(first, last, width, hr, ell, even[:, None, None].expand(ell.shape), n, self._profile_tables())

    def _profile_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cell_profile with the profile q constant on tiles (q of a pixel: its tile's mass / field_tile^2):
        (layers, tile rows, nx) log q of the pixels along a pixel row of each tile row, (layers, tile
        rows, nx) log of the mass of a pixel row of each tile row from column x on, and (layers, ny)
        log S_{y+1}, the mass of the pixel rows after row y."""
        ny, nx = self.grid
        T = self.config.field_tile
        log_q = (self.profile_log_q() - 2 * np.log(T)).view(-1, ny // T, nx // T).repeat_interleave(T, -1)
        row_tail = torch.logcumsumexp(log_q.flip(-1), -1).flip(-1)
        rows = row_tail[..., 0].repeat_interleave(T, -1)  # (layers, ny): the mass of each pixel row
        after = torch.logcumsumexp(rows.flip(-1), -1).flip(-1)[:, 1:]
        return log_q, row_tail, torch.cat([after, after.new_full((len(after), 1), float("-inf"))], 1)

    @staticmethod
    def _first_draw_log_prob(log_own: torch.Tensor, log_after: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log(S_u^n - S_{u+1}^n), S_u = own + after: up to a constant per token the log-chance that the
        smallest of n draws from the profile is unit u (a pixel row, or a cell of a row), from the log
        mass of u (`log_own`) and of everything after it (`log_after`); floored at 1e-30 so that a unit
        the profile nearly excludes stays possible."""
        log_tail = torch.logaddexp(log_own, log_after)
        step = torch.log1p(-torch.exp(log_own - log_tail))  # log(S_{u+1} / S_u)
        return n * log_tail + torch.log(first_draw_hazard(step, n).clamp_min(1e-30))

    def _profile_row_log_prob(self, row: torch.Tensor, span: PixelSpan) -> torch.Tensor:
        """cell_profile: (N, ny) the law of the pixel row of the smallest of the layer's n pixels still to
        place drawn from its profile over the cells from `first` on (the first open row counts its
        open cells only); with the column law of `_profile_col_log_prob`, exactly that of a cell."""
        ny, nx = self.grid
        T = self.config.field_tile
        _, row_tail, after = span.profile
        r = row.clamp_max(len(after) - 1)  # END (row n_rows) takes no cell: any finite value serves
        y0, x0 = span.first // nx, span.first % nx
        own = row_tail[r, :, 0].repeat_interleave(T, -1)  # (N, ny)
        own = torch.where(torch.arange(ny, device=row.device) == y0.unsqueeze(-1),
                          row_tail[r, y0 // T, x0].unsqueeze(-1), own)
        return self._first_draw_log_prob(own, after[r], span.n.unsqueeze(-1))

    def _profile_col_log_prob(self, row: torch.Tensor, y: torch.Tensor, span: PixelSpan) -> torch.Tensor:
        """cell_profile: (N, nx) the law of the column of that smallest draw given its pixel row y."""
        T = self.config.field_tile
        log_q, row_tail, after = span.profile
        r = row.clamp_max(len(after) - 1)
        # the mass after cell x of row y: the rest of the row, then the rows after it
        rest = torch.cat([row_tail[r, y // T, 1:], row_tail.new_full((len(r), 1), float("-inf"))], 1)
        return self._first_draw_log_prob(log_q[r, y // T], torch.logaddexp(rest, after[r, y].unsqueeze(-1)),
                                         span.n.unsqueeze(-1))

    def pixel_row_logits(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                         row_remaining: torch.Tensor, span: PixelSpan | None = None) -> torch.Tensor:
        """(N, ny) logits of the pixel row of the next pixel in layer `row` (its first factor).

        Rows before the previous pixel's, and rows that would leave too few cells for the layer's
        pixels after this one, are -inf. With cell_field every pixel fires on its own with
        probability sigmoid(l) (l constant on a tile), the next pixel is the first to fire in (row,
        column) order, and its row is row y with log-probability sum_{y' < y} A(y') + log(1 - e^A(y)),
        A(y) = sum of log sigmoid(-l) over the open cells of row y (the first and last open rows are
        cut where the layer's span starts and ends): the flat head's first-success law exactly, and
        cheap because l is constant on tiles (A of a full row is field_tile x its tile row's sum).
        span: `pixel_span` of these tokens, when the caller has it (shared with pixel_col_logits)."""
        ny, nx = self.grid
        if span is None:
            span = self.pixel_span(h, row, prev_row, prev_col, row_remaining)
        y = torch.arange(ny, device=h.device)
        ok = (y >= (span.first // nx).unsqueeze(-1)) & (y <= (span.last // nx).unsqueeze(-1))
        ok = ok | (row == self.layout.n_rows).unsqueeze(-1)
        logits = self.col_head(span.hr)
        if self.cell_field:
            logits = self._first_success_rows(logits.float(), span.ell, span)
            if self.config.cell_profile:  # the field moves the profile's law, not the uniform pacing's
                logits = logits - self._first_success_rows(0.0, span.ell_even, span) + self._profile_row_log_prob(row, span)
        return logits.masked_fill(~ok, float("-inf"))

    def _first_success_rows(self, base: torch.Tensor | float, ell: torch.Tensor, span: PixelSpan) -> torch.Tensor:
        """(N, ny) `base` plus the first-success law of the pixel rows for the tile log-odds `ell`
        (pixel_row_logits; added in this order, so that the head without cell_profile sums as before)."""
        ny, nx = self.grid
        T = self.config.field_tile
        y0, x0, y1, x1 = span.first // nx, span.first % nx, span.last // nx, span.last % nx
        y, x, n = (torch.arange(k, device=ell.device) for k in (ny, nx, len(ell)))
        lneg = F.logsigmoid(-ell)  # (N, ny / T, nx / T)
        a = (T * lneg.sum(-1)).repeat_interleave(T, 1)  # (N, ny): A of every full row
        # the first and last open rows are cut at x0 / x1: A of their open cells only
        for at in (y1, y0):  # y0 last: where y0 == y1 its sum holds both cuts
            cells = lneg[n, (at // T).clamp_max(ny // T - 1)].repeat_interleave(T, 1)  # (N, nx)
            lo = torch.where(at == y0, x0, 0).unsqueeze(-1)
            hi = torch.where(at == y1, x1, nx - 1).unsqueeze(-1)
            part = cells.masked_fill((x < lo) | (x > hi), 0.0).sum(-1, keepdim=True)
            a = torch.where(y == at.unsqueeze(-1), part, a)
        a = a.masked_fill(y < y0.unsqueeze(-1), 0.0).clamp_max(-1e-12)  # rows before the start: skipped
        before = torch.cumsum(a, -1) - a
        return base + before + torch.log(-torch.expm1(a))

    def pixel_col_logits(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                         row_remaining: torch.Tensor, y: torch.Tensor, span: PixelSpan | None = None) -> torch.Tensor:
        """(N, nx) logits of the pixel column of the next pixel given its pixel row `y` (the second
        factor). With cell_field: log sigmoid(l_x) + sum of log sigmoid(-l) over the open cells of
        row y before x (the first fired cell of the row). span: as in pixel_row_logits."""
        ny, nx = self.grid
        if span is None:
            span = self.pixel_span(h, row, prev_row, prev_col, row_remaining)
        first, last = span.first, span.last
        x = torch.arange(nx, device=h.device)
        lo = torch.where(y == first // nx, first % nx, 0).unsqueeze(-1)
        hi = torch.where(y == last // nx, last % nx, nx - 1).unsqueeze(-1)
        ok = ((x >= lo) & (x <= hi)) | (row == self.layout.n_rows).unsqueeze(-1)
        logits = self.x_head(span.hr + self.y_out(y))
        if self.cell_field:
            logits = self._first_success_cols(logits.float(), span.ell, y, lo)
            if self.config.cell_profile:  # as in pixel_row_logits
                logits = logits - self._first_success_cols(0.0, span.ell_even, y, lo) + self._profile_col_log_prob(row, y, span)
        return logits.masked_fill(~ok, float("-inf"))

    def _first_success_cols(self, base: torch.Tensor | float, ell: torch.Tensor, y: torch.Tensor,
                            lo: torch.Tensor) -> torch.Tensor:
        """(N, nx) `base` plus the first-success law of the columns of pixel row y from column lo on for
        the tile log-odds `ell` (pixel_col_logits; in the order of _first_success_rows)."""
        T = self.config.field_tile
        ell = ell[torch.arange(len(ell), device=ell.device), y // T].repeat_interleave(T, 1)  # (N, nx)
        off = F.logsigmoid(-ell).masked_fill(torch.arange(ell.shape[1], device=ell.device) < lo, 0.0)
        return base + F.logsigmoid(ell) + torch.cumsum(off, -1) - off

    def cell_log_prob(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                      row_remaining: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """(N,) log p(cell) = log p(pixel row) + log p(pixel column | row) of flat cells `cell` of
        layers `row` (pixel_head=factorised); each factor is a normalised softmax."""
        nx = self.grid[1]
        y, x = cell // nx, cell % nx
        span = self.pixel_span(h, row, prev_row, prev_col, row_remaining)
        lp_y = F.log_softmax(self.pixel_row_logits(h, row, prev_row, prev_col, row_remaining, span), -1)
        lp_x = F.log_softmax(self.pixel_col_logits(h, row, prev_row, prev_col, row_remaining, y, span), -1)
        return lp_y.gather(1, y[:, None])[:, 0] + lp_x.gather(1, x[:, None])[:, 0]
