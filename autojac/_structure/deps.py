"""Dependency sets of tensor elements on input elements, stored factored as a row map into a table of distinct sets.

A `Deps` for a tensor of `numel` elements says, for each element (row-major), which global input
elements its derivative may be nonzero for: element i depends on row `rowmap[i]` of `table`
(a canonical boolean CSR matrix, one row per distinct set, `n_in` columns), or on nothing when
`rowmap[i] == -1`. Movement ops only rewrite the row map; tensors whose elements share one set
(a dense layer, a dense fallback) keep one table row, so no rule ever builds `numel x n_in` sets
that are all the same. `None` stands for "no element depends on anything".
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

_I64 = np.int64

# Largest number of (element, input) pairs one union may spell out; beyond it the union is replaced
# by the conservative "every element depends on everything either side depends on" and noted in
# `capped()`, so an intermediate such as x - x.mean() on a huge x cannot exhaust memory.
UNION_LIMIT = 30_000_000
_notes = threading.local()


def capped() -> list[str]:
    """This thread's notes of sets replaced by a conservative union since the engine last read them (per thread:
    detections may run in several threads at once, and each op's notes belong to its own)."""
    notes = getattr(_notes, "capped", None)
    if notes is None:
        notes = _notes.capped = []
    return notes


def stored_limit() -> int | None:
    """This thread's bound on what one op's sets may store (`detect`'s `max_stored`, set by the engine while it
    propagates); None: no bound."""
    return getattr(_notes, "max_stored", None)


def set_stored_limit(limit: int | None) -> None:
    _notes.max_stored = limit


def check_stored(entries: int) -> None:
    """Raise TooDense if sets of `entries` entries would pass this thread's bound (see `stored_limit`)."""
    limit = stored_limit()
    if limit is not None and entries > limit:
        raise TooDense(int(entries))


class TooDense(Exception):
    """Internal: the pattern, or one op's dependency sets, would hold more than the caller's limit (`max_nnz`
    of `detect`, or its `max_stored`: a memory bound)."""

    def __init__(self, nnz: int) -> None:
        super().__init__(f"{nnz} nonzeros")
        self.nnz = nnz


class Deps:
    """Factored per-element dependency sets: `rowmap` (int64, -1 = none) into `table` (CSR, bool)."""

    __slots__ = ("rowmap", "table")

    def __init__(self, rowmap: np.ndarray, table: sp.csr_array) -> None:
        self.rowmap = rowmap
        self.table = table

    @property
    def numel(self) -> int:
        return self.rowmap.shape[0]

    @property
    def n_in(self) -> int:
        return self.table.shape[1]

    def __repr__(self) -> str:
        return f"Deps(numel={self.numel}, table={self.table.shape[0]}x{self.n_in}, nnz={self.table.nnz})"


def csr(indptr: np.ndarray, indices: np.ndarray, n_cols: int, canonical: bool = True) -> sp.csr_array:
    """A boolean CSR matrix from its index arrays; `canonical` promises sorted, duplicate-free rows."""
    n_rows = indptr.shape[0] - 1
    data = np.ones(indices.shape[0], dtype=bool)
    if (_ASSEMBLED and canonical and indptr.dtype == _I64 and indices.dtype == _I64
            and indices.shape[0] == int(indptr[-1])):  # exact arrays: nothing for the constructor's prune to trim
        return _assembled(data, indices, indptr, (n_rows, n_cols))
    m = sp.csr_array((data, indices, indptr), shape=(n_rows, n_cols))
    if canonical:
        # Tell scipy what we know, so additions take the linear merge and nothing re-sorts.
        m.has_sorted_indices = True
        m.has_canonical_format = True
    return m


# NOTE: [CSR tables assembled without scipy's checks]
# scipy's constructor checks the index arrays' contents to choose their dtype (a pass over both) and the
# format (a prune): 25-40 us a table, 16 tables a Brusselator detection, a tenth of its 4.5 ms. The index arrays
# built here are canonical by construction (every caller promises it), so a table whose arrays are int64 and
# exactly nnz long (nothing to prune) is assembled as scipy's constructor leaves one, attribute by attribute.
# Whether that is what the installed scipy's constructor leaves is checked once, at import, on a small table (the
# same attributes, the same values, and the same sums and row picks); if anything differs, every table goes
# through the constructor.


def _assembled(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int],
               attributes: dict | None = None) -> sp.csr_array:
    """A canonical CSR table as scipy's constructor leaves one: its other `attributes` (default: the ones
    `_assembly_agrees` read off the constructor at import) and these arrays, unchecked."""
    m = sp.csr_array.__new__(sp.csr_array)
    m.__dict__.update(_FRESH if attributes is None else attributes)
    m._shape, m.data, m.indices, m.indptr = shape, data, indices, indptr
    m.has_sorted_indices = True
    m.has_canonical_format = True
    return m


def _assembly_agrees() -> tuple[bool, dict]:
    """Whether `_assembled` makes what scipy's constructor makes here; the constructor's other attributes."""
    try:
        indptr, indices = np.array([0, 2, 2, 3], _I64), np.array([0, 2, 1], _I64)
        slow = sp.csr_array((np.ones(3, bool), indices, indptr), shape=(3, 4))
        slow.has_sorted_indices = True
        slow.has_canonical_format = True
        fresh = {k: v for k, v in vars(slow).items() if k not in ("_shape", "data", "indices", "indptr")
                 and not isinstance(v, np.ndarray)}
        fast = _assembled(np.ones(3, bool), indices.copy(), indptr.copy(), (3, 4), fresh)
        same = (set(vars(fast)) == set(vars(slow)) and fast.indices.dtype == slow.indices.dtype
                and fast.indptr.dtype == slow.indptr.dtype and fast.shape == slow.shape
                and all(np.array_equal(a.toarray(), b.toarray()) for a, b in
                        ((fast, slow), (fast + fast, slow + slow), (fast[[2, 0]], slow[[2, 0]]))))
        return bool(same), fresh
    except Exception:  # noqa: BLE001 - any difference: the constructor for every table
        return False, {}


_ASSEMBLED, _FRESH = _assembly_agrees()


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_array:
    """A canonical boolean CSR matrix with ones at (rows, cols); duplicates merge."""
    n_rows, n_cols = shape
    if rows.size == 0:
        return csr(np.zeros(n_rows + 1, _I64), np.zeros(0, _I64), n_cols)
    key = sorted_unique(rows.astype(_I64) * n_cols + cols)
    r = key // n_cols
    indptr = np.zeros(n_rows + 1, _I64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return csr(indptr, key - r * n_cols, n_cols)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (faster here than numpy's hash-based unique for large integer arrays)."""
    a = np.sort(a)
    if a.size > 1:
        a = a[np.concatenate([[True], a[1:] != a[:-1]])]
    return a


def identity(numel: int, offset: int, n_in: int) -> Deps:
    """Each element depends on itself: input elements offset..offset+numel-1 of n_in."""
    table = csr(np.arange(numel + 1, dtype=_I64), np.arange(offset, offset + numel, dtype=_I64), n_in)
    return Deps(np.arange(numel, dtype=_I64), _with_width(table, 1))


def take_rows(table: sp.csr_array, idx: np.ndarray) -> sp.csr_array:
    """Rows `idx` of a canonical CSR matrix (-1 gives an empty row), as a canonical CSR matrix."""
    indptr, indices = table.indptr, table.indices
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    starts = indptr[safe].astype(_I64)
    lens = np.where(valid, indptr[safe + 1] - starts, 0)
    new_indptr = np.zeros(idx.shape[0] + 1, _I64)
    np.cumsum(lens, out=new_indptr[1:])
    total = int(new_indptr[-1])
    if total == idx.shape[0] and valid.all():
        new_indices = indices[starts]  # one entry per row: the common case after movement
    else:
        offs = np.repeat(starts - new_indptr[:-1], lens) + np.arange(total, dtype=_I64)
        new_indices = indices[offs]
    return csr(new_indptr, new_indices, table.shape[1])


def take(d: Deps | None, pos1: np.ndarray) -> Deps | None:
    """Element i of the result is element pos1[i]-1 of d; pos1[i] == 0 means no source."""
    if d is None:
        return None
    ext = np.empty(d.numel + 1, _I64)
    ext[0] = -1
    ext[1:] = d.rowmap
    rowmap = ext[pos1]
    if rowmap.size and rowmap.max() < 0:
        return None
    return Deps(rowmap, d.table)


def concat(parts: Sequence[tuple[Deps | None, int]]) -> Deps | None:
    """Deps of the concatenation of several tensors' flat elements (each given with its numel)."""
    live = [d for d, _ in parts if d is not None]
    if not live:
        return None
    tables: list[sp.csr_array] = []
    base: dict[int, int] = {}
    for d in live:
        if id(d.table) not in base:
            base[id(d.table)] = sum(t.shape[0] for t in tables)
            tables.append(d.table)
    rowmaps = []
    for d, numel in parts:
        if d is None:
            rowmaps.append(np.full(numel, -1, _I64))
        else:
            off = base[id(d.table)]
            rowmaps.append(d.rowmap if off == 0 else np.where(d.rowmap >= 0, d.rowmap + off, -1))
    table = tables[0] if len(tables) == 1 else _vstack(tables)
    return Deps(np.concatenate(rowmaps), table)


def _vstack(tables: Sequence[sp.csr_array]) -> sp.csr_array:
    indptrs, offset = [np.zeros(1, _I64)], 0
    for t in tables:
        indptrs.append(t.indptr[1:].astype(_I64) + offset)
        offset += t.indptr[-1]
    return csr(np.concatenate(indptrs), np.concatenate([t.indices for t in tables]), tables[0].shape[1])


def _increasing(a: np.ndarray) -> bool:
    return a.size < 2 or bool((a[1:] > a[:-1]).all())


def _spelled_out(d: Deps) -> int:
    lens = np.diff(d.table.indptr)
    valid = d.rowmap >= 0
    return int(lens[d.rowmap[valid]].sum())


def _union2(a: Deps, b: Deps) -> Deps:
    ra, rb = a.rowmap, b.rowmap
    if ra is rb and a.table is b.table:
        return a
    for big, small in ((a, b), (b, a)):
        # One side gives every element the same set, holding all the other side has: it is the union.
        if big.table.shape[0] == 1 and big.rowmap.min() >= 0:
            cols = big.table.indices
            other = all_columns([small])
            if np.isin(other, cols, assume_unique=True).all():
                return big
    narrow = _narrow_union(a, b)
    if narrow is not None:
        return narrow
    if _spelled_out(a) + _spelled_out(b) > UNION_LIMIT:
        capped().append(f"union of {ra.shape[0]} elements too large to spell out")
        return uniform(all_columns([a, b]), ra.shape[0], a.n_in)
    if ra.min() >= 0 and _increasing(ra):
        # Every pair (ra[i], rb[i]) is distinct already: no deduplication to do.
        return Deps(np.arange(ra.shape[0], dtype=_I64), take_rows(a.table, ra) + take_rows(b.table, rb))
    if rb.min() >= 0 and _increasing(rb):
        return Deps(np.arange(rb.shape[0], dtype=_I64), take_rows(a.table, ra) + take_rows(b.table, rb))
    nb = b.table.shape[0] + 1
    key = (ra + 1) * nb + (rb + 1)
    uniq, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1).astype(_I64)
    if uniq[0] == 0:  # elements depending on nothing through both: keep them at -1
        uniq = uniq[1:]
        inv -= 1
    rows = take_rows(a.table, uniq // nb - 1) + take_rows(b.table, uniq % nb - 1)
    return Deps(inv, rows)


_WIDTH = "_autojac_row_width"
"""An attribute of tables whose every row holds the same number of entries: that number."""


def _with_width(table: sp.csr_array, width: int) -> sp.csr_array:
    table.__dict__[_WIDTH] = width
    return table


NARROW_UNION_WIDTH = 16
"""`_narrow_union` handles unions of at most this many entries an element."""


def _uniform_width(table: sp.csr_array) -> int:
    """The entries every row of `table` holds, or 0 when rows differ (or are empty); known without a pass for
    the tables `identity` and `_narrow_union` make (`_WIDTH`)."""
    known = table.__dict__.get(_WIDTH)
    if known is not None:
        return known
    rows, nnz = table.shape[0], int(table.indptr[-1])
    width = nnz // rows if rows else 0
    if width == 0 or width * rows != nnz or not (np.diff(table.indptr) == width).all():
        return 0
    return width


def _narrow_union(a: Deps, b: Deps) -> Deps | None:
    """The union of two sides whose sets have a fixed, small size each (stencils, element-wise chains: one to a few
    inputs an element), each with at least half as many table rows as elements (little shared to keep factored:
    the result has a row per element), as one row-wise sort of an (elements, width) array: no sparse matrices
    built and added (0.12 against 0.18 ms a union on a Brusselator's 1024 elements). None where that does not
    hold."""
    n = a.rowmap.shape[0]
    if a.table.shape[0] * 2 < n or b.table.shape[0] * 2 < n or a.rowmap.min() < 0 or b.rowmap.min() < 0:
        return None
    wa, wb = _uniform_width(a.table), _uniform_width(b.table)
    if not wa or not wb or wa + wb > NARROW_UNION_WIDTH or n * (wa + wb) > UNION_LIMIT:
        return None  # past UNION_LIMIT the general union caps it, as for any other union
    ia, ib = a.table.indices[:a.table.indptr[-1]], b.table.indices[:b.table.indptr[-1]]
    ma, mb = ia.reshape(-1, wa)[a.rowmap], ib.reshape(-1, wb)[b.rowmap]  # every element's set, (n, width)
    if min(wa, wb) == 1:
        joined = _join_one(a, ma, mb[:, 0]) if wb == 1 else _join_one(b, mb, ma[:, 0])
        if joined is not None:
            return joined
    m = np.concatenate([ma, mb], 1)
    m.sort(1)
    repeated = m[:, 1:] == m[:, :-1]
    width = wa + wb
    if not repeated.any():
        indptr = np.arange(0, n * width + 1, width, dtype=_I64)
        table = csr(indptr, m.reshape(-1).astype(_I64, copy=False), a.n_in)
        return Deps(np.arange(n, dtype=_I64), _with_width(table, width))
    keep = np.ones(m.shape, bool)
    keep[:, 1:] = ~repeated
    counts = np.full(n, width, _I64)
    for j in range(width - 1):  # column by column: count_nonzero along rows of a few entries took 30 us on 1024
        counts -= repeated[:, j]
    indptr = np.zeros(n + 1, _I64)
    np.cumsum(counts, out=indptr[1:])
    return Deps(np.arange(n, dtype=_I64), csr(indptr, m[keep].astype(_I64, copy=False), a.n_in))


def _join_one(wide: Deps, m: np.ndarray, one: np.ndarray) -> Deps | None:
    """The union of `wide` (its elements' sets as an (n, w) array, rows sorted) with one entry an element (`one`):
    `wide` itself where every element's set holds its entry already (a * a * b joined with a), the entries put in by
    a sort with nothing to deduplicate where none does (a sum of shifted copies, one more term at a time); None
    otherwise. Of a Brusselator's 13 unions, 4 and 7: 30 against 120-140 us, and 60-75 against 75-160 us."""
    inside = m[:, 0] == one
    for j in range(1, m.shape[1]):  # column by column: numpy's reductions along rows of 2-15 entries are slow
        inside |= m[:, j] == one
    if inside.all():
        return wide
    if inside.any():
        return None
    n, w = m.shape
    m = np.concatenate([m, one[:, None]], 1)
    m.sort(1)
    indptr = np.arange(0, n * (w + 1) + 1, w + 1, dtype=_I64)
    return Deps(np.arange(n, dtype=_I64), _with_width(csr(indptr, m.reshape(-1).astype(_I64, copy=False), wide.n_in), w + 1))


def union(ds: Sequence[Deps | None]) -> Deps | None:
    """Element-wise union of several Deps over the same number of elements."""
    live = [d for d in ds if d is not None]
    if not live:
        return None
    out = live[0]
    for d in live[1:]:
        out = _union2(out, d)
    return out


def all_columns(ds: Sequence[Deps | None]) -> np.ndarray:
    """Sorted input indices that any element of any of `ds` depends on."""
    cols = []
    for d in ds:
        if d is None:
            continue
        used = d.rowmap[d.rowmap >= 0]
        if used.size == 0:
            continue
        if used.size >= d.table.shape[0]:
            cols.append(d.table.indices)
        else:
            cols.append(take_rows(d.table, sorted_unique(used)).indices)
    if not cols:
        return np.zeros(0, _I64)
    return sorted_unique(np.concatenate(cols))


def uniform(cols: np.ndarray, numel: int, n_in: int) -> Deps | None:
    """Every element depends on the same set `cols` (the conservative dense fallback)."""
    if cols.size == 0 or numel == 0:
        return None
    table = csr(np.array([0, cols.size], _I64), cols.astype(_I64), n_in)
    return Deps(np.zeros(numel, _I64), table)


def dense(ds: Sequence[Deps | None], numel: int) -> Deps | None:
    """Every output element depends on the union of everything in `ds`."""
    n_in = next((d.n_in for d in ds if d is not None), 0)
    return uniform(all_columns(ds), numel, n_in)


def _row_hashes(m: sp.csr_array, lens: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0x5EED)
    weights = rng.integers(1, 2**63, size=m.shape[1], dtype=np.uint64)
    h = np.zeros(m.shape[0], np.uint64)
    nonempty = lens > 0
    if m.nnz:
        starts = m.indptr[:-1][nonempty]
        with np.errstate(over="ignore"):
            h[nonempty] = np.add.reduceat(weights[m.indices], starts)
            h += lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return h


def dedupe_rows(m: sp.csr_array) -> tuple[np.ndarray, sp.csr_array]:
    """Map each row of canonical `m` to a table of its distinct rows; empty rows map to -1.

    Rows are grouped by a hash and every grouping is verified entry by entry, so two different
    rows never share an id (a collision only costs a duplicate table row).
    """
    lens = np.diff(m.indptr).astype(_I64)
    n = m.shape[0]
    if n == 0:
        return np.zeros(0, _I64), m
    h = _row_hashes(m, lens)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    rep = first[inv]
    bad = lens != lens[rep]
    same = ~bad & (rep != np.arange(n))
    if same.any():
        rows = np.nonzero(same)[0]
        rl = lens[rows]
        total = int(rl.sum())
        if total:
            within = np.arange(total, dtype=_I64) - np.repeat(np.cumsum(rl) - rl, rl)
            a = m.indices[np.repeat(m.indptr[rows], rl) + within]
            b = m.indices[np.repeat(m.indptr[rep[rows]], rl) + within]
            diff = np.repeat(np.arange(rows.size), rl)[a != b]
            bad[rows[sorted_unique(diff)]] = True
    reps = first.astype(_I64)
    ids = inv.astype(_I64)
    if bad.any():  # hash collisions: those rows get ids of their own
        extra = np.nonzero(bad)[0]
        ids[extra] = reps.size + np.arange(extra.size)
        reps = np.concatenate([reps, extra])
    empty_ids = lens[reps] == 0
    if empty_ids.any():
        remap = np.cumsum(~empty_ids) - 1
        remap[empty_ids] = -1
        ids = remap[ids]
        reps = reps[~empty_ids]
    return ids, take_rows(m, reps)


def reduce(d: Deps | None, groups: sp.csr_array) -> Deps | None:
    """Output element r depends on the union of d's elements in row r of `groups` (out x numel)."""
    if d is None:
        return None
    check_stored(groups.nnz)  # before its index arrays, ~50 bytes a group entry
    cols = d.rowmap[groups.indices]
    keep = cols >= 0
    row_of = np.repeat(np.arange(groups.shape[0], dtype=_I64), np.diff(groups.indptr))
    r2 = csr_from_pairs(row_of[keep], cols[keep], (groups.shape[0], d.table.shape[0]))
    if r2.nnz == 0:
        return None
    ids, distinct = dedupe_rows(r2)
    if distinct.shape[0] == distinct.nnz:
        table = take_rows(d.table, distinct.indices)  # one source row each: a gather, no product
    else:
        table = distinct @ d.table
        table.sort_indices()
        table.has_canonical_format = True
    return Deps(ids, table)


def groups_from_positions(pos1: np.ndarray, numel: int) -> sp.csr_array:
    """Group matrix (n_out x numel) from an (n_out, k) array of 1-based element positions (0 = padding)."""
    n_out, k = pos1.shape
    flat = pos1.reshape(-1).astype(_I64)
    keep = flat > 0
    if keep.all():
        return csr(np.arange(0, n_out * k + 1, k, dtype=_I64), flat - 1, numel, canonical=False)
    counts = keep.reshape(n_out, k).sum(1)
    indptr = np.zeros(n_out + 1, _I64)
    np.cumsum(counts, out=indptr[1:])
    return csr(indptr, flat[keep] - 1, numel, canonical=False)


def count(d: Deps | None) -> int:
    """How many (element, input) pairs d holds: the nonzeros `materialize` would spell out."""
    if d is None:
        return 0
    lens = np.diff(d.table.indptr)
    return int(lens[d.rowmap[d.rowmap >= 0]].sum())


def materialize(d: Deps | None, numel: int, n_in: int) -> sp.csr_array:
    """The full `numel x n_in` boolean CSR matrix of d."""
    if d is None:
        return csr(np.zeros(numel + 1, _I64), np.zeros(0, _I64), n_in)
    return take_rows(d.table, d.rowmap)


def write(old: Deps | None, numel: int, pos0: np.ndarray, new: Deps | None) -> Deps | None:
    """Elements pos0 (0-based) of a buffer of `numel` elements are overwritten by `new` (in order)."""
    if old is None and new is None:
        return None
    merged = concat([(old, numel), (new, pos0.shape[0])])
    assert merged is not None
    rowmap = merged.rowmap[:numel].copy()
    rowmap[pos0] = merged.rowmap[numel:]
    if rowmap.size and rowmap.max() < 0:
        return None
    return Deps(rowmap, merged.table)
