"""Partial distance-2 colourings of a sparsity pattern: columns (or rows) that never share a nonzero get one colour.

Everything is vectorised over the bipartite graph (nets = rows for a column colouring, columns for a
row colouring) with per-net bitmasks of used colours, so no conflict graph is ever built. Candidates:
structured colourings read off the vertex numbering (v mod k, optimal on banded patterns; linear
"lattice" colourings of grid coordinates, optimal on 5-point stencils; "box" colourings for
convolution windows), speculative greedy in largest-first and random priority orders, and
Culberson's iterated greedy, which re-colours class by class and never uses more colours. Every
structured candidate is checked before use. The one with fewest colours wins.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .pattern import Pattern

_ONE = np.uint64(1)
_MASK_BYTES = 256 * 2**20  # memory allowed for the per-net colour bitmasks of the greedy passes


@dataclass(frozen=True, eq=False)
class Coloring:
    """colors[v] for each column (side="column") or row (side="row"); vertices of one colour share no nonzero."""

    side: str
    colors: np.ndarray
    n_colors: int
    lower_bound: int
    order: str
    seconds: float
    peeled: np.ndarray | None = None
    """Symmetric colourings only (see `color_symmetric`): the dense lines given a colour each, whose
    entries elsewhere are read from their own product by symmetry; None for a plain colouring."""

    def __post_init__(self) -> None:
        c = np.ascontiguousarray(self.colors, dtype=np.int64)
        c.flags.writeable = False
        object.__setattr__(self, "colors", c)

    def groups(self) -> list[np.ndarray]:
        """The vertices of each colour, colour by colour."""
        order = np.argsort(self.colors, kind="stable")
        bounds = np.searchsorted(self.colors[order], np.arange(self.n_colors + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in range(self.n_colors)]

    def is_valid(self, pattern: Pattern) -> bool:
        """True when no two vertices of one colour share a nonzero of `pattern`."""
        m = _nets(pattern, self.side)
        return m.shape[1] == self.colors.shape[0] and _valid(m, self.colors)

    def __repr__(self) -> str:
        return (f"Coloring(side={self.side!r}, n_colors={self.n_colors}, lower_bound={self.lower_bound}, "
                f"order={self.order!r}, seconds={self.seconds:.3g})")


def color_columns(pattern: Pattern | sp.sparray | sp.spmatrix, *, seed: int = 0) -> Coloring:
    """Colour the columns: columns with one colour have no nonzero in a common row (one JVP per colour)."""
    return _color(pattern, "column", seed)


def color_symmetric(pattern: Pattern, plain: Coloring, *, seed: int = 0) -> Coloring:
    """A colouring of a numerically symmetric Jacobian (a Hessian) that peels off its dense lines.

    NOTE: [Peeling dense lines of a symmetric Jacobian]
    One dense row and column (an arrowhead: every variable coupled to one global one)
    make every column and row colouring trivial: n products. For a symmetric matrix,
    the dense lines' vertices S get a colour each, so their products are whole columns
    (equally rows) H[:, s]; every entry in a row of S is then known by symmetry
    (H[s, j] = H[j, s]), so the other columns only need to be apart where they share a
    row outside S. Colouring those columns on the pattern without the rows and columns
    of S gives |S| + c products: 1 + 3 for an arrowhead over a band. This is what a star
    colouring gains on such patterns (Gebremedhin, Manne, Pothen 2005), by peeling
    instead of the two-coloured-star bookkeeping, and it decompresses with one gather.
    Tried with the 1, 2, 4, ... densest lines (those over 4x the median line and 8
    entries); the fewest products win, `plain` when peeling does not beat it.
    """
    start = time.perf_counter()
    n = pattern.shape[0]
    degree = np.bincount(pattern.rows, minlength=n)
    threshold = max(8, 4 * float(np.median(degree))) if n else 0
    dense = np.argsort(-degree, kind="stable")
    dense = dense[degree[dense] > threshold]
    best = plain
    k = 1
    while k <= min(dense.shape[0], 64) and k < best.n_colors:
        peel = np.zeros(n, bool)
        peel[dense[:k]] = True
        keep = ~peel[pattern.rows] & ~peel[pattern.cols]
        rest = np.nonzero(~peel)[0]
        renumber = np.full(n, -1, np.int64)
        renumber[rest] = np.arange(rest.shape[0])
        inner = Pattern((rest.shape[0], rest.shape[0]), renumber[pattern.rows[keep]], renumber[pattern.cols[keep]])
        colored = _color(inner, plain.side, seed)
        if colored.n_colors + k < best.n_colors:
            colors = np.empty(n, np.int64)
            colors[rest] = colored.colors
            colors[dense[:k]] = colored.n_colors + np.arange(k)
            best = Coloring(plain.side, colors, colored.n_colors + k, plain.lower_bound,
                            f"{k} dense line(s) peeled, then {colored.order}", 0.0, peeled=np.sort(dense[:k]))
        k *= 2
    if best is plain:
        return plain
    return dataclasses.replace(best, seconds=plain.seconds + time.perf_counter() - start)


def color_rows(pattern: Pattern | sp.sparray | sp.spmatrix, *, seed: int = 0) -> Coloring:
    """Colour the rows: rows with one colour have no nonzero in a common column (one VJP per colour)."""
    return _color(pattern, "row", seed)


def _nets(pattern, side: str) -> sp.csr_array:
    """Boolean CSR (nets x vertices): for a column colouring the nets are the rows, and vice versa."""
    if side not in ("column", "row"):
        raise ValueError(f"side must be 'column' or 'row', got {side!r}")
    if isinstance(pattern, Pattern):
        m = pattern.to_scipy()
    elif sp.issparse(pattern):
        m = sp.csr_array(pattern, dtype=bool)
        m.sum_duplicates()
        m.eliminate_zeros()
    else:
        raise TypeError(f"expected a Pattern or a scipy sparse matrix, got {type(pattern).__name__}")
    if side == "row":
        m = sp.csr_array(m.T)
        m.sort_indices()
    return m


def _valid(nets: sp.csr_array, colors: np.ndarray) -> bool:
    if nets.nnz == 0:
        return True
    k = int(colors.max()) + 1
    c = colors[nets.indices]
    if c.min() < 0:
        return False
    net_of = np.repeat(np.arange(nets.shape[0], dtype=np.int64), np.diff(nets.indptr))
    key = net_of * k + c
    if nets.shape[0] * k <= min(20_000_000, 16 * nets.nnz):  # a count array not much larger than the entries
        return int(np.bincount(key).max()) <= 1
    key.sort()
    return not (key[1:] == key[:-1]).any()


class _Graph:
    """The bipartite graph in both directions, with helpers for per-vertex net lists."""

    def __init__(self, nets: sp.csr_array) -> None:
        self.nets = nets
        self.n_nets, self.n = nets.shape
        t = sp.csc_array(nets)  # vertex -> nets, as the CSC of the same matrix
        t.sort_indices()
        self.v_ptr = t.indptr.astype(np.int64)
        self.v_nets = t.indices.astype(np.int64)
        self.degree = np.diff(self.v_ptr)
        self.net_size = np.diff(nets.indptr).astype(np.int64)

    def entries(self, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Net ids of the vertices vs (concatenated), segment starts, segment lengths."""
        lens = self.degree[vs]
        starts = np.zeros(vs.size, np.int64)
        if vs.size > 1:
            np.cumsum(lens[:-1], out=starts[1:])
        total = int(lens.sum())
        idx = np.repeat(self.v_ptr[vs] - starts, lens) + np.arange(total, dtype=np.int64)
        return self.v_nets[idx], starts, lens


def _lowest_free(forb: np.ndarray) -> np.ndarray:
    """Smallest colour missing from each row of an (n, W) uint64 bitmask; -1 where all W*64 are used."""
    inv = ~forb
    nz = inv != 0
    word = nz.argmax(1)
    rows = np.arange(forb.shape[0])
    x = inv[rows, word]
    low = x & (~x + _ONE)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with no free bit: log2(0), marked -1 below
        bit = np.log2(low.astype(np.float64)).astype(np.int64)  # a power of two: exact in float64
    color = word.astype(np.int64) * 64 + bit
    color[~nz[rows, word]] = -1
    return color


def _forbidden(g: _Graph, netmask: np.ndarray, nets_e: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.bitwise_or.reduceat(netmask[nets_e], starts, axis=0)


def _lowest_free_from(forb: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Smallest free colour >= start (per row), else the smallest free colour at all."""
    w = forb.shape[1]
    word = np.arange(w)[None, :]
    sw, sb = (start // 64)[:, None], (start % 64).astype(np.uint64)[:, None]
    below = np.where(word < sw, ~np.uint64(0), np.where(word == sw, (_ONE << sb) - _ONE, np.uint64(0)))
    c = _lowest_free(forb | below)
    missing = c < 0
    if missing.any():
        c[missing] = _lowest_free(forb[missing])
    return c


def _speculative(g: _Graph, prio: np.ndarray, width: int, max_rounds: int, spread: int = 0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Greedy colouring in rounds: every uncoloured vertex takes its smallest free colour, and where
    vertices of one net picked the same colour only the highest-priority one keeps it. Heavily
    overlapping nets need about one round per colour; with `spread`, each vertex starts its search at
    a random colour below `spread`, which avoids most clashes (more colours, fewer rounds; the
    iterated greedy passes then merge classes). After max_rounds, the vertices still uncoloured
    get a fresh colour each (valid, just not greedy)."""
    colors = np.full(g.n, -1, np.int64)
    colors[g.degree == 0] = 0
    netmask = np.zeros((g.n_nets, width), np.uint64)
    todo = np.nonzero(g.degree > 0)[0]
    rounds = 0
    while todo.size:
        rounds += 1
        if rounds > max_rounds:
            colors[todo] = colors.max() + 1 + np.arange(todo.size)
            break
        nets_e, starts, lens = g.entries(todo)
        forb = _forbidden(g, netmask, nets_e, starts)
        if spread:
            tent = _lowest_free_from(forb, rng.integers(0, min(spread, 64 * width), size=todo.size))
        else:
            tent = _lowest_free(forb)
        if (tent < 0).any():  # more colours than the masks hold: widen and retry the round
            netmask = np.concatenate([netmask, np.zeros_like(netmask)], 1)
            continue
        tent_e = np.repeat(tent, lens)
        prio_e = np.repeat(prio[todo], lens)
        k = int(tent.max()) + 1
        key = nets_e * k + tent_e
        if g.n_nets * k <= 20_000_000:
            best = np.full(g.n_nets * k, -1, np.int64)
            np.maximum.at(best, key, prio_e)
            win_e = best[key] == prio_e
        else:
            order = np.lexsort((-prio_e, key))
            first = np.ones(key.size, bool)
            first[1:] = key[order][1:] != key[order][:-1]
            win_e = np.zeros(key.size, bool)
            win_e[order[first]] = True
        ok = np.logical_and.reduceat(win_e, starts)
        acc_e = np.repeat(ok, lens)
        colors[todo[ok]] = tent[ok]
        c = tent_e[acc_e]
        np.bitwise_or.at(netmask, (nets_e[acc_e], c // 64), _ONE << (c % 64).astype(np.uint64))
        todo = todo[~ok]
    return colors


def _recolor(g: _Graph, colors: np.ndarray, class_order: np.ndarray, width: int) -> np.ndarray:
    """Culberson's iterated greedy step: greedy over the vertices class by class (each class is
    independent, so a whole class is coloured at once); never uses more colours than before."""
    new = np.where(g.degree == 0, 0, -1).astype(np.int64)
    netmask = np.zeros((g.n_nets, width), np.uint64)
    active = g.degree > 0
    by_class = np.argsort(colors, kind="stable")
    bounds = np.searchsorted(colors[by_class], np.arange(int(colors.max()) + 2))
    for c in class_order:
        vs = by_class[bounds[c]:bounds[c + 1]]
        vs = vs[active[vs]]
        if vs.size == 0:
            continue
        nets_e, starts, lens = g.entries(vs)
        tent = _lowest_free(_forbidden(g, netmask, nets_e, starts))
        while (tent < 0).any():
            netmask = np.concatenate([netmask, np.zeros_like(netmask)], 1)
            tent = _lowest_free(_forbidden(g, netmask, nets_e, starts))
        new[vs] = tent
        t = np.repeat(tent, lens)
        netmask[nets_e, t // 64] |= _ONE << (t % 64).astype(np.uint64)  # one vertex per net per class
    return new


def _sample_ok(nets: sp.csr_array, sample: np.ndarray, colors_of) -> bool:
    """Cheap necessary check on a few nets before the full check."""
    ptr, idx = nets.indptr, nets.indices
    for r in sample:
        c = colors_of(idx[ptr[r]:ptr[r + 1]])
        if np.unique(c).size != c.size:
            return False
    return True


def _modular(g: _Graph, lb: int, tries: int, sample: np.ndarray) -> np.ndarray | None:
    """colors = v mod k for the smallest valid k in lb..lb+tries-1: greedy's answer on banded patterns."""
    for k in range(max(lb, 1), max(lb, 1) + tries):
        if _sample_ok(g.nets, sample, lambda vs: vs % k):
            c = np.arange(g.n, dtype=np.int64) % k
            if _valid(g.nets, c):
                return c
    return None


def _run_strides(vs: np.ndarray) -> list[int]:
    """Strides of a box-shaped net: for x + 32y + 1024c (a conv window) the runs of consecutive x
    start 32 apart, and the runs of those runs start 1024 apart. Plain Python on short nets (NumPy's
    per-call cost made this 90% of a stencil's lattice search), NumPy on long ones."""
    if vs.size > 128:
        return _run_strides_numpy(vs)
    out: list[int] = []
    level = vs.tolist()
    for depth in range(3):
        if len(level) < 3:
            break
        d = [b - a for a, b in zip(level, level[1:])]
        counts = collections.Counter(d)
        step = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]  # the most frequent; ties: the smallest
        starts = [level[0]] + [level[i + 1] for i, di in enumerate(d) if di != step]
        if depth:
            out.append(step)
        if len(starts) == len(level):
            break
        level = starts
    return out


def _run_strides_numpy(vs: np.ndarray) -> list[int]:
    out = []
    level = vs
    for _ in range(3):
        if level.size < 3:
            break
        d = np.diff(level)
        vals, counts = np.unique(d, return_counts=True)
        step = int(vals[counts.argmax()])
        starts = level[np.concatenate([[True], d != step])]
        if level is not vs:
            out.append(step)
        if starts.size == level.size:
            break
        level = starts
    return out


def _periods(g: _Graph, sample: np.ndarray) -> list[list[int]]:
    """Candidate radix chains [p] or [p, q] (q a multiple of p) from the most frequent index offsets
    inside nets: the row length of a grid, the size of one species block, ..."""
    ptr, idx = g.nets.indptr, g.nets.indices
    diffs, multi = _sampled_differences(ptr, idx, sample)
    if not diffs:
        return []
    vals, counts = np.unique(np.concatenate(diffs), return_counts=True)
    frequent = np.argsort(-counts, kind="stable")[:6]
    top = vals[frequent[counts[frequent] >= max(3, multi // 4)]]  # offsets shared by many nets: a grid
    cand = {int(d) + e for d in top for e in (-1, 0, 1) if 2 <= int(d) + e < g.n}
    strides, memo = [], {}
    for r in sample[:64]:  # strides depend on a net's shape alone, and a grid's nets have few shapes
        if ptr[r + 1] - ptr[r] < 3:
            continue  # no runs of runs in fewer than 3 vertices
        vs = idx[ptr[r]:ptr[r + 1]]
        shape = (vs - vs[:1]).tobytes()
        if shape not in memo:
            memo[shape] = _run_strides(vs)
        strides += memo[shape]
    if strides:
        vals, counts = np.unique(strides, return_counts=True)
        cand |= {int(v) for v, c in zip(vals, counts) if c >= 8 and 2 <= v < g.n}
    cand = sorted(cand)
    chains = [[p] for p in cand]
    chains += [[p, q] for p in cand for q in cand if q > p and q % p == 0 and q // p >= 2]
    return chains


def _sampled_differences(ptr: np.ndarray, idx: np.ndarray, sample: np.ndarray) -> tuple[list[np.ndarray], int]:
    """(the index differences above 1 within each sampled net, how many sampled nets have two or more vertices):
    nets of one size at a time as an array (a net by net loop was most of `_periods` on a permutation's 256
    sampled nets of 2); nets over 64 vertices by every k-th vertex, 64 at most."""
    diffs = []
    lens = ptr[sample + 1] - ptr[sample]
    for size in np.unique(lens):
        size = int(size)
        if size < 2:
            continue
        nets = sample[lens == size]
        if size > 64:
            for r in nets:
                vs = idx[ptr[r]:ptr[r + 1]][:: -(-size // 64)]
                d = vs[None, :] - vs[:, None]
                diffs.append(d[d > 1])
            continue
        vs = idx[ptr[nets][:, None] + np.arange(size)]  # (nets, size), each row sorted
        d = vs[:, None, :] - vs[:, :, None]
        diffs.append(d[d > 1])
    return diffs, int((lens > 1).sum())


def _probe_nets(g: _Graph, rng: np.random.Generator, nonempty: np.ndarray) -> np.ndarray:
    """Nets to screen candidate colourings on: one net of each distinct shape (the offsets of its
    vertices from its first one: interior, edge, wrap-around and coupling rows of a grid), plus random ones."""
    ptr, idx = g.nets.indptr, g.nets.indices.astype(np.int64)
    lens = np.diff(ptr)
    starts = np.minimum(ptr[:-1], max(idx.size - 1, 0))
    off = idx - np.repeat(idx[starts], lens)
    with np.errstate(over="ignore"):  # a wrapping polynomial hash of each net's offset multiset
        h = np.add.reduceat(off * (off * np.int64(0x9E3779B1) + np.int64(0x7F4A7C15)), starts)
    shapes = np.where(lens > 0, h, 0) + lens
    _, reps = np.unique(shapes[nonempty], return_index=True)
    reps = nonempty[reps]
    reps = reps[rng.permutation(reps.size)[:192]]
    rand = rng.choice(nonempty, size=min(64, nonempty.size), replace=False)
    mixed = np.concatenate([np.stack([reps[:rand.size], rand[:reps.size]], 1).reshape(-1),
                            reps[rand.size:], rand[reps.size:]])
    _, keep = np.unique(mixed, return_index=True)
    return mixed[np.sort(keep)]  # interleaved, so any prefix mixes both kinds


def _coords(v: np.ndarray, chain: list[int]) -> np.ndarray:
    """Mixed-radix digits of vertex indices: for chain [p, q], (v mod p, (v div p) mod (q/p), v div q)."""
    radices = [1, *chain]
    out = []
    for i, r in enumerate(radices):
        hi = v // r
        out.append(hi % (radices[i + 1] // r) if i + 1 < len(radices) else hi)
    return np.stack(out, 1)


@functools.lru_cache(maxsize=64)
def _coefficients(k: int, digits: int) -> np.ndarray:
    """Every (1, a_1, ..., a_digits) with 0 <= a_i < k: the lattice colourings mod k to screen (read-only)."""
    grids = np.meshgrid(*([np.arange(k)] * digits), indexing="ij")
    coefs = np.stack([np.ones(grids[0].size, np.int64)] + [a.reshape(-1) for a in grids], 1)
    coefs.flags.writeable = False
    return coefs


BOX_MAX_FACTOR, BOX_MAX_EXTRA = 2, 8
"""Box colourings are checked only up to this many colours: BOX_MAX_FACTOR times the lower bound plus BOX_MAX_EXTRA."""


def _lattice(g: _Graph, lb: int, best: int, sample: np.ndarray, work: float,
             chains: list[list[int]] | None = None) -> tuple[np.ndarray, str] | None:
    """colors = (sum_i a_i * digit_i(v)) mod k over mixed-radix digits of the vertex index: the
    optimal colourings of stencils on grids (e.g. (x + 3y) mod 5 for the 5-point Laplacian). Also
    box colourings (each digit modulo its extent within a net) for convolution windows. `work`
    bounds the screening effort (in element operations), so the result does not depend on timing.
    The radix chains are guessed from the sampled nets (`_periods`) unless given."""
    if sample.size == 0:
        return None
    if chains is None:
        chains = _periods(g, sample)
    ptr, idx = g.nets.indptr, g.nets.indices
    lens = ptr[sample + 1] - ptr[sample]
    verts = idx[np.repeat(ptr[sample] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))]
    net = np.repeat(np.arange(sample.size), lens)
    seg = np.flatnonzero(np.concatenate([[True], net[1:] != net[:-1]]))  # each sampled net is one run of `net`
    # Every chain's digits of the sampled vertices, padded to three (a zero digit): (chains, vertices, 3).
    # (Chain by chain: one broadcast over all chains computed padding digits too, and took 0.38 against 0.22 ms.)
    digits = np.zeros((len(chains), verts.size, 3), np.int64)
    for c, chain in enumerate(chains):
        digits[c, :, :len(chain) + 1] = _coords(verts, chain)
    found = None
    if chains:
        # Box colouring: digit i taken modulo the widest extent of digit i inside one net.
        extents = (np.maximum.reduceat(digits, seg, axis=1) - np.minimum.reduceat(digits, seg, axis=1)).max(1) + 1
    for c, chain in enumerate(chains):
        widths = extents[c, :len(chain) + 1]
        k = int(np.prod(widths))
        # A box far above the lower bound is not worth checking: greedy colourings, tried after, usually land
        # within 1.5x of the bound (a rule of thumb; a Brusselator's grid boxes of about a thousand colours against
        # a bound of 6 cost 5 ms of checks for nothing).
        if lb <= k < min(best, found[1] if found else best, g.n, BOX_MAX_FACTOR * lb + BOX_MAX_EXTRA):
            scale = np.concatenate([[1], np.cumprod(widths)[:-1]])
            screen = np.sort(net * k + (digits[c, :, :len(chain) + 1] % widths) @ scale)
            if (screen[1:] == screen[:-1]).any():
                continue
            colors = (_coords(np.arange(g.n, dtype=np.int64), chain) % widths) @ scale
            if _valid(g.nets, colors):
                found = (colors, k, f"box {'x'.join(map(str, chain))} ({'x'.join(map(str, widths))})")
    if found is not None:
        best = found[1]
        if best == lb:
            return found[0], found[2]
    quick = int(lens[:24].sum())  # the work allowance is counted in the first 24 nets' vertices
    if chains:
        # A lattice colouring is linear: two vertices of a net clash mod k exactly when their digit difference
        # d satisfies d . a = 0 (mod k). So the sampled nets are screened through their distinct differences
        # (a few dozen on a stencil), not their vertices.
        diffs = _differences(digits, lens)
    for k in range(max(lb, 2), best if chains else 0):
        if k ** max(len(c) for c in chains) > 20_000:
            break  # too many coefficient combinations to screen
        # The chains the work allowance covers, in order (as a chain-by-chain search would screen them).
        covered = 0
        for chain in chains:
            work -= k ** len(chain) * quick
            if work < 0:
                break
            covered += 1
        survivors: list[tuple[int, np.ndarray]] = []
        for periods in (1, 2):  # chains of one length together: one coefficient table
            which = np.array([c for c in range(covered) if len(chains[c]) == periods], np.int64)
            if which.size == 0:
                continue
            coefs = np.zeros((k ** periods, 3), np.int64)
            coefs[:, :periods + 1] = _coefficients(k, periods)
            ok = _no_clash(diffs[which], coefs, k)  # (chains, coefficient rows)
            survivors += [(int(which[c]), coefs[a]) for c, a in zip(*np.nonzero(ok))]
        survivors.sort(key=lambda s: s[0])  # stable: within a chain, coefficient order
        tries: dict[int, int] = {}
        for c, a in survivors:
            if tries.get(c, 0) >= 4:  # the screen is strong: a few full checks per chain at most
                continue
            tries[c] = tries.get(c, 0) + 1
            colors = (_coords(np.arange(g.n, dtype=np.int64), chains[c]) @ a[:len(chains[c]) + 1]) % k
            if _valid(g.nets, colors):
                return colors, f"lattice {'x'.join(map(str, chains[c]))} mod {k}"
        if work < 0:
            break
    return (found[0], found[2]) if found is not None else None


_PAIR_ELEMENTS = 1 << 20
"""Most (net, vertex, vertex) triples the differences are taken over: nets past it are left out of the screen."""


def _differences(digits: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The distinct digit differences between two vertices of one sampled net, per chain: (chains, P, 3),
    each chain's list padded by repeating its first difference. `digits` (chains, vertices, 3) holds the
    sampled nets' vertices net after net, `lens` the nets' sizes; nets past _PAIR_ELEMENTS triples are left
    out (the screen is a filter: the full check decides). Two vertices of a net always differ in some digit
    (mixed-radix digits are unique), so every chain has a difference when any net has two vertices.

    Differences are told apart by a mixed-radix key per chain, each digit offset by its extent in that chain;
    the chains' key ranges are laid end to end, and where they span at most _SEEN_KEYS keys (a chain's digits
    cover the vertex numbers once, so about 8 keys a vertex) the distinct ones are marked in a table instead of
    sorted (a Brusselator's 24600 keys: 0.7-1.0 ms to sort on the 2-core CPU; with the digit-major layout below,
    its differences take 0.46 ms against 1.5 ms, its row colouring about 2.7 against 3.8 ms)."""
    width = int(lens.max(initial=1))
    n_nets = max(1, min(lens.size, _PAIR_ELEMENTS // max(width * width, 1)))
    lens = lens[:n_nets]
    starts = np.zeros(lens.size, np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    slot = np.arange(width)
    real = slot[None, :] < lens[:, None]  # (nets, width)
    pos = np.where(real, starts[:, None] + slot, 0)
    i, j = np.triu_indices(width, 1)
    pairs = (real[:, i] & real[:, j]).reshape(-1)  # (nets x width pairs)
    chains = digits.shape[0]
    if not pairs.any():  # no net holds two vertices: nothing can clash
        return np.zeros((chains, 0, 3), np.int64)
    # Digit-major (chains, 3, vertices), so that every step below runs along a contiguous last axis: a reduction
    # along the middle axis of (chains, vertices, 3) took 0.29 ms on a Brusselator's 20 chains, this one 20 us.
    used = np.ascontiguousarray(digits[:, :int(lens.sum())].transpose(0, 2, 1))
    span = used.max(2) - used.min(2)  # (chains, 3): no difference is larger
    first_of, second_of = pos[:, i].reshape(-1)[pairs], pos[:, j].reshape(-1)[pairs]  # the pairs' vertices
    delta = used[:, :, second_of] - used[:, :, first_of]  # (chains, 3, P_all)
    radix = 2 * span + 1
    sizes = radix.prod(1)
    offset = np.zeros(chains, np.int64)
    np.cumsum(sizes[:-1], out=offset[1:])
    key = (((delta[:, 0] + span[:, 0, None]) * radix[:, 1, None] + delta[:, 1] + span[:, 1, None]) * radix[:, 2, None]
           + delta[:, 2] + span[:, 2, None] + offset[:, None])
    total = int(sizes.sum())
    if total <= _SEEN_KEYS:
        seen = np.zeros(total, bool)
        seen[key.reshape(-1)] = True
        key = np.flatnonzero(seen)
    else:
        key = np.sort(key.reshape(-1))
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]  # distinct, per chain
    chain_of = np.searchsorted(offset, key, side="right") - 1
    key = key - offset[chain_of]
    r, sp = radix[chain_of], span[chain_of]
    flat = np.stack([key // (r[:, 1] * r[:, 2]) - sp[:, 0], key // r[:, 2] % r[:, 1] - sp[:, 1],
                     key % r[:, 2] - sp[:, 2]], 1)
    counts = np.bincount(chain_of, minlength=chains)
    first = np.zeros(chains, np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    out = np.repeat(flat[first][:, None, :], counts.max(), 1)
    out[chain_of, np.arange(chain_of.size) - np.repeat(first, counts)] = flat
    return out


_SEEN_KEYS = 1 << 22
"""Most keys `_differences` marks in a table (4 MiB of bools); wider ranges are sorted."""


def _no_clash(diffs: np.ndarray, coefs: np.ndarray, k: int) -> np.ndarray:
    """(chains, rows): whether no difference of the chain's sampled nets vanishes mod k under that coefficient
    row, i.e. the lattice colouring (digits . row) mod k gives every sampled net distinct colours."""
    step = max(1, (1 << 20) // max(coefs.shape[0] * diffs.shape[1], 1))
    out = []
    for lo in range(0, diffs.shape[0], step):
        d = diffs[lo:lo + step, None, :, :]  # (chains, 1, P, 3)
        a = coefs[None, :, None, :]  # (1, rows, 1, 3)
        dots = d[..., 0] * a[..., 0] + d[..., 1] * a[..., 1] + d[..., 2] * a[..., 2]
        out.append((dots % k != 0).all(2))
    return np.concatenate(out)


def _packing_bound(g: _Graph) -> int:
    """A lower bound on the colours from packing: the vertices of one colour have disjoint nets, so a colour
    holds at most floor(nets / d) vertices, d the fewest nets of any vertex (nets and vertices that touch
    nothing left out). On a periodic 2-D Brusselator of 32 x 32 (2048 vertices, 6 nets each, 2048 nets) that is
    at most 341 a colour, so 7 colours, not the 6 the largest net gives; 7 is the optimum there (a colouring of
    an 8 x 16 tile, repeated, has 7; no lattice colouring does, as 7 does not divide 32)."""
    used = g.degree[g.degree > 0]
    if used.size == 0:
        return 0
    per_colour = int(np.count_nonzero(g.net_size)) // int(used.min())
    return -(-used.size // max(per_colour, 1))


# NOTE: [Grids the trace saw]
# The lattice search guesses its radix chains from index offsets inside sampled nets (`_periods`): on a
# 2-D Brusselator (2 x 32 x 32 unknowns) 20 chains, whose digits, differences and screens were 1.7 of the
# colouring's 2.6 ms, for the chain 32 x 1024 that `f` itself spelled out (`u.reshape(2, n, n)`). A detected
# pattern keeps the shapes its outputs and inputs were seen in (whole views of their storage in the tape: the
# flat numbering laid out row-major; a user's pattern, the problem's own shapes), and for a shape (..., h, w)
# the chain [w, h * w] ([w] in 2-D) is searched first, for colourings within one colour of the lower bound.
# One found is used without the guessed chains' search: that search only ever matched it on the problems
# measured (its count there is the bound, or the bound plus one where no lattice reaches the packing bound,
# as on the periodic Brusselator), and a structured colouring one from the bound gets no greedy passes
# either (see `_color`). A wrong hint (a tensor reshaped but not laid out that way) only costs the time of
# its screen: every colouring is checked on the pattern, whatever its source. 0.9 against 2.6 ms on the
# Brusselator (2-core CPU).


def _grid_chains(pattern, side: str, n: int) -> list[list[int]]:
    """Radix chains from the grids `pattern` saw the vertices in (NOTE: [Grids the trace saw])."""
    chains: list[list[int]] = []
    for shape in getattr(pattern, "grids", ((), ()))[0 if side == "row" else 1]:
        dims = [d for d in shape if d != 1]
        if len(dims) < 2 or math.prod(dims) != n:
            continue
        chain = [dims[-1]] if len(dims) == 2 else [dims[-1], dims[-1] * dims[-2]]
        if chain not in chains:
            chains.append(chain)
    return chains


def _n_colors(c: np.ndarray) -> int:
    return int(c.max()) + 1 if c.size else 0


def _color(pattern, side: str, seed: int) -> Coloring:
    start = time.perf_counter()
    nets = _nets(pattern, side)
    n = nets.shape[1]
    lb = int(np.diff(nets.indptr).max(initial=0))

    def done(colors: np.ndarray, order: str) -> Coloring:
        return Coloring(side, colors, _n_colors(colors), lb, order, time.perf_counter() - start)

    if n == 0:
        return done(np.zeros(0, np.int64), "empty")
    if lb <= 1:
        return done(np.zeros(n, np.int64), "no conflicts")
    if lb == n:  # one net holds every vertex: nothing can share a colour
        return done(np.arange(n, dtype=np.int64), "trivial (a dense line)")
    g = _Graph(nets)
    width = max(1, (2 * lb + 63) // 64)
    lb = max(lb, _packing_bound(g))

    rng = np.random.default_rng(seed)
    multi = np.nonzero(np.diff(nets.indptr) > 1)[0]
    probe = _probe_nets(g, rng, multi)
    candidates: list[tuple[np.ndarray, str]] = []
    # Structured candidates first: optimal on banded and grid patterns, and cheap.
    mod = _modular(g, lb, 3, probe[:48])
    if mod is not None:
        candidates.append((mod, "modular"))
        if _n_colors(mod) == lb:
            return done(mod, "modular")
    best_k = min((_n_colors(c) for c, _ in candidates), default=n + 1)
    grid_chains = _grid_chains(pattern, side, n)
    if grid_chains:  # NOTE: [Grids the trace saw]
        lat = _lattice(g, lb, min(best_k, lb + 2), probe, work=3e6, chains=grid_chains)
        if lat is not None:
            return done(lat[0], f"{lat[1]}, on a grid of the shapes")
    lat = _lattice(g, lb, best_k, probe, work=3e6)
    if lat is not None:
        candidates.append(lat)
        if _n_colors(lat[0]) == lb:
            return done(*lat)
    small = nets.nnz <= 50_000
    spread = 2 * lb
    wide = width if small else max(width, (spread + lb + 63) // 64)
    if not candidates and g.n_nets * wide * 8 > _MASK_BYTES:
        # Bitmasks for this many colours would not fit: nearly dense lines leave little to gain anyway.
        return done(np.arange(n, dtype=np.int64), "trivial (too dense to colour)")
    structured = min((_n_colors(c) for c, _ in candidates), default=n + 1)
    # Greedy orders rarely beat a structured colouring within 2 (and a third) of the bound (on the Brusselator two
    # of them cost 5 ms, a third of the colouring, for 12 colours against the lattice's 8); the iterated greedy
    # below still works on it.
    close = structured <= min(lb + 2, 4 * lb / 3)
    if (small and not close) or structured > 1.5 * lb + 2:
        # Largest-first: conflict degree estimated by the summed sizes of a vertex's nets.
        load = np.zeros(n, np.int64)
        np.add.at(load, nets.indices, np.repeat(g.net_size - 1, g.net_size))
        lf = np.argsort(np.argsort(load * n + rng.permutation(n)))
        if small:
            candidates.append((_speculative(g, lf, width, max_rounds=200), "largest-first"))
            candidates.append((_speculative(g, rng.permutation(n), width, max_rounds=200), "random"))
        else:  # large: start from a spread-out colouring in few rounds, then merge classes
            candidates.append((_speculative(g, lf, wide, max_rounds=100, spread=spread, rng=rng),
                               "largest-first (spread)"))
    best, order = min(candidates, key=lambda c: _n_colors(c[0]))
    passes, stale, improved = 0, 0, 0
    greedy = order.startswith(("largest-first", "random"))
    budget = 12 if small else 6 if greedy else 0
    budget = min(budget, max(1, 3000 // max(_n_colors(best), 1)))  # each pass loops over the classes
    # A structured colouring close to the bound gets one pass: passes that re-colour a lattice class by class
    # did not improve one in any problem measured (a Brusselator's lattice mod 8 against the largest net's bound of
    # 6, before the packing bound of 7: three passes, a third of its colouring time then, for the same 8).
    # One from the bound, it gets none: that pass was a fifth of the Brusselator's colouring (2 of 10 ms, lattice
    # mod 8 against a bound of 7), and a pass takes a colour off a lattice only by luck.
    patience = 1 if close and not greedy else 3
    if close and not greedy and _n_colors(best) <= lb + 1:
        budget = 0
    while passes < budget and stale < patience and _n_colors(best) > lb:
        k = _n_colors(best)
        sizes = np.bincount(best, minlength=k)
        class_order = (np.arange(k)[::-1], np.argsort(-sizes, kind="stable"), rng.permutation(k))[passes % 3]
        new = _recolor(g, best, class_order, width)
        passes += 1
        stale = 0 if _n_colors(new) < k else stale + 1
        improved += _n_colors(new) < k
        best = new  # equal counts still move the search on
    if improved:
        order = f"{order}, then iterated greedy"
    return done(best, order)
