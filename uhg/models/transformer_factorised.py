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
    tile log-odds `ell` (N, tile rows, tile cols). Computed once per token by `pixel_span`."""

    first: torch.Tensor
    last: torch.Tensor
    width: torch.Tensor
    hr: torch.Tensor
    ell: torch.Tensor | None


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
                    row_remaining: torch.Tensor) -> torch.Tensor:
        """cell_field on tiles: (N, tile rows, tile cols) log-odds l of each pixel of a tile firing, the
        logit of the layer's uniform pacing (pixels still to place / cells left) plus the field."""
        ny, nx = self.grid
        T = self.config.field_tile
        # 1e-7, not the flat head's 1e-6: one pixel left for a 1 M-cell layer is a rate of 1e-6
        rho = layer_fire_rate(row_remaining, first, width, low=1e-7)
        ell = torch.logit(rho).unsqueeze(-1) + self.field_head(hr.float()).float() @ self.cell_basis.float().T
        return ell.view(len(hr), ny // T, nx // T)

    def pixel_span(self, h: torch.Tensor, row: torch.Tensor, prev_row: torch.Tensor, prev_col: torch.Tensor,
                   row_remaining: torch.Tensor) -> PixelSpan:
        """The parts of both factors that do not depend on the pixel row (see PixelSpan)."""
        first, last, width = self._grid_span(row, prev_row, prev_col, row_remaining)
        hr = h + self.row_out(row)
        ell = self._tile_field(hr, first, width, row_remaining) if self.cell_field else None
        return PixelSpan(first, last, width, hr, ell)

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
        first, last = span.first, span.last
        y0, x0, y1 = first // nx, first % nx, last // nx
        y = torch.arange(ny, device=h.device)
        ok = (y >= y0.unsqueeze(-1)) & (y <= y1.unsqueeze(-1))
        ok = ok | (row == self.layout.n_rows).unsqueeze(-1)
        logits = self.col_head(span.hr)
        if self.cell_field:
            T = self.config.field_tile
            lneg = F.logsigmoid(-span.ell)  # (N, ny / T, nx / T)
            a = (T * lneg.sum(-1)).repeat_interleave(T, 1)  # (N, ny): A of every full row
            # the first and last open rows are cut at x0 / x1: A of their open cells only
            x, n = torch.arange(nx, device=h.device), torch.arange(len(h), device=h.device)
            x1 = last % nx
            for at in (y1, y0):  # y0 last: where y0 == y1 its sum holds both cuts
                cells = lneg[n, (at // T).clamp_max(ny // T - 1)].repeat_interleave(T, 1)  # (N, nx)
                lo = torch.where(at == y0, x0, 0).unsqueeze(-1)
                hi = torch.where(at == y1, x1, nx - 1).unsqueeze(-1)
                part = cells.masked_fill((x < lo) | (x > hi), 0.0).sum(-1, keepdim=True)
                a = torch.where(y == at.unsqueeze(-1), part, a)
            a = a.masked_fill(y < y0.unsqueeze(-1), 0.0).clamp_max(-1e-12)  # rows before the start: skipped
            before = torch.cumsum(a, -1) - a
            logits = logits.float() + before + torch.log(-torch.expm1(a))
        return logits.masked_fill(~ok, float("-inf"))

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
            T = self.config.field_tile
            ell = span.ell[torch.arange(len(h), device=h.device), y // T].repeat_interleave(T, 1)  # (N, nx)
            off = F.logsigmoid(-ell).masked_fill(x < lo, 0.0)
            logits = logits.float() + F.logsigmoid(ell) + torch.cumsum(off, -1) - off
        return logits.masked_fill(~ok, float("-inf"))

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
