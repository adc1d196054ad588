"""Greedy repair on exact costs: trim a choice of widths until every limit holds, then fill up to the limits.

Moves are one allowed step of one group, or removing / restoring a whole removable block (its inner groups
together), so removable blocks are always whole or gone. Trimming takes the move that loses the least value
per unit of excess removed; filling the move that gains the most value per unit of added load (costs in units
of their limits).
"""
from __future__ import annotations

import numpy as np

from .instance import Instance, within_limit


class LocalSearch:
    """Widths as choice indices with exact step costs, for greedy trimming and filling."""

    def __init__(self, inst: Instance) -> None:
        n, m = len(inst.names), max(len(g) for g in inst.grids)
        self.inst, self.size, self.rows = inst, np.array([len(g) for g in inst.grids]), np.arange(n)
        self.grid, self.val = _padded(inst.grids, m, np.int64), _padded(inst.values, m, np.float64)
        self.unary = [_padded(uk, m, uk[0].dtype) for uk in inst.unary]
        self.adj = [np.zeros((n, n), np.int64 if inst.integral[k] else np.float64) for k in range(inst.n_constraints)]
        self.tables = []  # (i, j, per-constraint tables or None)
        for (i, j), e in inst.edges.items():
            for k, c in enumerate(e.coef):
                self.adj[k][i, j] = self.adj[k][j, i] = c
            if any(t is not None for t in e.tables):
                self.tables.append((i, j, e.tables))
        self.tied = np.zeros(n, bool)
        for tie in inst.ties:
            self.tied[list(tie)] = True
        self.scale = inst.scale()

    def complete(self, idx: np.ndarray) -> np.ndarray:
        """A feasible solution near ``idx``: blocks made whole or gone, trimmed until it fits, then filled."""
        idx = self._mend_ties(np.array(idx, dtype=np.int64))
        costs = self.inst.costs(idx)
        costs = self._trim(idx, costs)
        self._fill(idx, costs)
        return idx

    def _mend_ties(self, idx: np.ndarray) -> np.ndarray:
        """A half-removed block is removed whole (cheaper than restoring it; filling may restore it)."""
        for tie in self.inst.ties:
            zero = [self.grid[i, idx[i]] == 0 for i in tie]
            if any(zero) and not all(zero):
                idx[list(tie)] = 0
        return idx

    # ------------------------------------------------------------------------------------ moves
    def _steps(self, idx: np.ndarray, direction: int):
        """One step of each group alone: ``(target idx, allowed, value change, cost change per constraint)``."""
        to = np.clip(idx + direction, 0, self.size - 1)
        x, y = self.grid[self.rows, idx], self.grid[self.rows, to]
        dv = self.val[self.rows, to] - self.val[self.rows, idx]
        dc = []
        for k, (u, a) in enumerate(zip(self.unary, self.adj)):
            d = u[self.rows, to] - u[self.rows, idx] + (y - x) * (a @ x)
            for i, j, tables in self.tables:
                t = tables[k]
                if t is not None:
                    d[i] += t[to[i], idx[j]] - t[idx[i], idx[j]]
                    d[j] += t[idx[i], to[j]] - t[idx[i], idx[j]]
            dc.append(d)
        ok = (to != idx) & ~(self.tied & ((x == 0) != (y == 0)))  # tied groups cross 0 only as a block
        return to, ok, dv, dc

    def _block_moves(self, idx: np.ndarray, costs: list, direction: int) -> list[tuple[float, list, np.ndarray]]:
        """Remove a whole block (down) or restore a removed one at its smallest widths (up)."""
        moves = []
        for tie in self.inst.ties:
            tie = list(tie)
            gone = all(self.grid[i, idx[i]] == 0 for i in tie)
            if gone == (direction < 0):
                continue
            new = idx.copy()
            new[tie] = 0 if direction < 0 else 1
            after = self.inst.costs(new)
            moves.append((self.inst.value(new) - self.inst.value(idx), [a - c for a, c in zip(after, costs)], new))
        return moves

    def _take(self, idx: np.ndarray, costs: list, block, i: int, to: np.ndarray, dc: list) -> list:
        """Apply the chosen move (a block move when ``block`` is given, else group ``i``'s step); new costs."""
        if block is not None:
            idx[:] = block[1]
            return [self._exact(k, c + d) for k, (c, d) in enumerate(zip(costs, block[0]))]
        idx[i] = to[i]
        return [self._exact(k, c + d[i]) for k, (c, d) in enumerate(zip(costs, dc))]

    def _exact(self, k: int, value):
        return int(value) if self.inst.integral[k] else float(value)

    # ------------------------------------------------------------------------------ trim and fill
    def _trim(self, idx: np.ndarray, costs: list) -> list:
        """Take the moves losing least value per unit of excess removed until every limit holds."""
        while not self.inst.within(costs):
            over = [k for k, c in enumerate(costs) if not within_limit(c, self.inst.limits[k], self.inst.integral[k])]
            to, ok, dv, dc = self._steps(idx, -1)
            relief = sum(-dc[k].astype(np.float64) * self.scale[k] for k in over)
            ratio = np.where(ok & (relief > 0), -dv / np.where(relief > 0, relief, 1.0), np.inf)
            i = int(np.argmin(ratio))
            best = ratio[i]
            block = None
            for bdv, bdc, new in self._block_moves(idx, costs, -1):
                r = sum(-float(bdc[k]) * self.scale[k] for k in over)
                if r > 0 and -bdv / r < best:
                    best, block = -bdv / r, (bdc, new)
            if best == np.inf:
                break
            costs = self._take(idx, costs, block, i, to, dc)
        return costs

    def _fill(self, idx: np.ndarray, costs: list) -> None:
        """Take the moves gaining most value per unit of added load while every limit holds."""
        while True:
            to, ok, dv, dc = self._steps(idx, +1)
            fits = ok.copy()
            for k, (c, d) in enumerate(zip(costs, dc)):
                fits &= within_limit(c + d, self.inst.limits[k], self.inst.integral[k])
            load = sum(np.maximum(d.astype(np.float64), 0.0) * s for d, s in zip(dc, self.scale))
            gain = np.where(fits, np.where(load > 0, dv / np.where(load > 0, load, 1.0), np.inf), -np.inf)
            i = int(np.argmax(gain))
            best, block = gain[i], None
            for bdv, bdc, new in self._block_moves(idx, costs, +1):
                after = [c + d for c, d in zip(costs, bdc)]
                if not self.inst.within(after):
                    continue
                bload = sum(max(float(d), 0.0) * s for d, s in zip(bdc, self.scale))
                g = bdv / bload if bload > 0 else np.inf
                if g > best:
                    best, block = g, (bdc, new)
            if best == -np.inf:
                return
            costs = self._take(idx, costs, block, i, to, dc)


def _padded(rows: list[np.ndarray], m: int, dtype) -> np.ndarray:
    """Rows of different lengths in one ``(n, m + 1)`` array, each continued with its last entry."""
    out = np.zeros((len(rows), m + 1), dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)], out[i, len(r):] = r, r[-1]
    return out
