"""Seeds and decompression: compressed products of a random Jacobian on a pattern decompress to that Jacobian."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autojac._structure import Decompressor, Pattern, color_columns, color_rows, detect, seeds


def random_jacobian(p: Pattern, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(p.nnz, generator=g, dtype=torch.float64) + 3.0
    return torch.zeros(p.shape, dtype=torch.float64).index_put_(
        (torch.from_numpy(p.rows.copy()), torch.from_numpy(p.cols.copy())), values)


def products(jac: torch.Tensor, coloring, shapes) -> torch.Tensor:
    """One compressed product per colour, computed densely: J @ s_c (columns) or s_c^T J (rows)."""
    parts = seeds(coloring, 0, coloring.n_colors, shapes, dtype=jac.dtype)
    s = torch.cat([t.reshape(coloring.n_colors, -1) for t in parts], 1)
    return s @ jac.t() if coloring.side == "column" else s @ jac


@st.composite
def patterns(draw):
    n_out, n_in = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return Pattern.from_user(rng.random((n_out, n_in)) < draw(st.sampled_from([0.05, 0.2, 0.6])))


@settings(max_examples=80, deadline=None)
@given(patterns(), st.booleans())
def test_round_trip(p, by_rows):
    jac = random_jacobian(p)
    c = color_rows(p) if by_rows else color_columns(p)
    n = p.shape[0] if by_rows else p.shape[1]
    d = Decompressor(p, c)
    values = d.decompress(products(jac, c, [(n,)]))
    assert torch.equal(d.to_dense(values), jac)
    assert torch.equal(d.to_sparse_coo(values).to_dense(), jac)
    assert torch.equal(d.to_sparse_csr(values).to_dense(), jac)


def test_seed_chunks_and_parts():
    p = Pattern.from_user(np.kron(np.eye(4, dtype=bool), np.ones((2, 3), bool)))  # 8 x 12
    c = color_columns(p)
    shapes = [(2, 3), (6,)]
    whole = seeds(c, 0, c.n_colors, shapes)
    assert [tuple(t.shape) for t in whole] == [(3, 2, 3), (3, 6)]
    chunks = [seeds(c, a, min(a + 2, c.n_colors), shapes) for a in range(0, c.n_colors, 2)]
    for k in range(2):
        assert torch.equal(torch.cat([ch[k] for ch in chunks]), whole[k])
    flat = torch.cat([t.reshape(3, -1) for t in whole], 1)
    assert torch.equal(flat.sum(0), torch.ones(12, dtype=flat.dtype))  # every column in exactly one seed


def test_brusselator_end_to_end():
    n = 6
    def f(u):
        u = u.reshape(2, n, n)
        a, b = u[0], u[1]
        def lap(z):
            return torch.roll(z, 1, 0) + torch.roll(z, -1, 0) + torch.roll(z, 1, 1) + torch.roll(z, -1, 1) - 4 * z
        return torch.stack([1 + a * a * b - 4.4 * a + 10 * lap(a), 3.4 * a - a * a * b + 10 * lap(b)]).reshape(-1)
    x = torch.randn(2 * n * n, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(f, x)
    p = detect(f, (x,))
    for c in (color_columns(p), color_rows(p)):
        (s,) = seeds(c, 0, c.n_colors, [x.shape], dtype=x.dtype)
        if c.side == "column":
            prods = torch.stack([torch.func.jvp(f, (x,), (v,))[1] for v in s])
        else:
            _, vjp = torch.func.vjp(f, x)
            prods = torch.stack([vjp(v)[0] for v in s])
        d = Decompressor(p, c)
        assert torch.allclose(d.to_dense(d.decompress(prods)), jac, atol=1e-12)


def test_errors_say_what_is_expected():
    p = Pattern.from_user(np.eye(4, dtype=bool))
    c = color_columns(p)
    d = Decompressor(p, c)
    with pytest.raises(ValueError, match="one row per colour"):
        d.decompress(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="input shapes"):
        seeds(c, 0, 1, [(3,)])
    with pytest.raises(ValueError, match="outside"):
        seeds(c, 0, 5, [(4,)])
    with pytest.raises(ValueError, match="rows"):
        Decompressor(Pattern.from_user(np.ones((3, 4), bool)), color_rows(p))


def test_dtype_and_device_of_dense_result():
    p = Pattern.from_user(sp.random(5, 6, density=0.4, random_state=0).toarray() != 0)
    c = color_rows(p)
    d = Decompressor(p, c)
    vals = d.decompress(products(random_jacobian(p), c, [(5,)]))
    assert d.to_dense(vals, dtype=torch.float32).dtype == torch.float32


# --- NOTE: [Peeling dense lines of a symmetric Jacobian] ----------------------------------------

@st.composite
def symmetric_with_dense_lines(draw):
    """A symmetric pattern: a random band or scatter, plus a few dense rows and their columns."""
    n = draw(st.integers(12, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = rng.random((n, n)) < draw(st.sampled_from([0.0, 0.03, 0.1]))
    width = draw(st.integers(0, 2))
    for k in range(-width, width + 1):
        m |= np.eye(n, k=k, dtype=bool)
    hubs = rng.choice(n, size=draw(st.integers(1, 3)), replace=False)
    m[hubs, :] = True
    m = m | m.T
    return Pattern.from_user(m)


def random_symmetric(p: Pattern, seed=0) -> torch.Tensor:
    half = random_jacobian(p, seed)
    return half + half.t()  # the pattern is symmetric, so this stays on it


@settings(max_examples=80, deadline=None)
@given(symmetric_with_dense_lines(), st.booleans())
def test_peeled_colourings_of_symmetric_matrices_round_trip(p, by_rows):
    from autojac._structure import color_symmetric

    jac = random_symmetric(p)
    plain = color_rows(p) if by_rows else color_columns(p)
    c = color_symmetric(p, plain)
    assert c.n_colors <= plain.n_colors
    d = Decompressor(p, c)
    values = d.decompress(products(jac, c, [(p.shape[0],)]))
    torch.testing.assert_close(d.to_dense(values), jac, rtol=0, atol=1e-12)


def test_an_arrowhead_over_a_band_needs_the_band_plus_one():
    from autojac._structure import color_symmetric

    n = 500
    m = np.eye(n, dtype=bool) | np.eye(n, k=1, dtype=bool) | np.eye(n, k=-1, dtype=bool)
    m[0, :] = m[:, 0] = True
    p = Pattern.from_user(m)
    plain = color_columns(p)
    assert plain.n_colors == n  # the dense row shares a nonzero with every column
    c = color_symmetric(p, plain)
    assert c.n_colors == 4 and list(c.peeled) == [0], c
    jac = random_symmetric(p, seed=1)
    d = Decompressor(p, c)
    torch.testing.assert_close(d.to_dense(d.decompress(products(jac, c, [(n,)]))), jac, rtol=0, atol=1e-12)


def test_large_dense_results_start_from_fresh_zeros_and_stay_valid():
    """Dense results of sparse patterns come from calloc or, when the writes reach few pages, an anonymous
    mapping (NOTE: [Pages a sparse result touches]): zeros everywhere else, writable, alive after the
    allocating call returns, whatever dtype."""
    import gc

    from autojac._core import zeros as Z

    n = 3000  # 3000 x 3000 float64 = 72 MB: the diagonal reaches 3000 of its 17578 pages
    p = Pattern.from_user(np.eye(n, dtype=bool))
    d = Decompressor(p, color_rows(p))
    values = torch.arange(1.0, n + 1, dtype=torch.float64)
    flat = torch.arange(n) * (n + 1)
    assert Z.pages_touched(flat, 8) == n
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        dense = d.to_dense(values, dtype=dtype)
        gc.collect()
        assert dense.shape == (n, n) and dense.dtype == dtype
        assert torch.equal(dense.diagonal(), values.to(dtype))
        assert int(torch.count_nonzero(dense)) == n  # every other entry zero
        dense[0, 1] = 5.0  # an ordinary writable tensor
        assert float(dense[0, 1]) == 5.0 and int(torch.count_nonzero(dense)) == n + 1
    # Writes reaching most pages: the calloc path; small results: torch.zeros.
    assert Z.pages_touched(torch.arange(0, 1 << 20, 512), 8) == 1 << 11
    full = Z.zeros((512, 512), torch.float64, torch.device("cpu"), touched_pages=512)
    assert full.shape == (512, 512) and not bool(full.any())
    tiny = Z.zeros((4, 4), torch.float32, torch.device("cpu"), touched_pages=1)
    assert tiny.shape == (4, 4) and not bool(tiny.any())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pages_faulted_ahead_on_every_core_stay_zero(threads):
    """A result whose writes reach most pages has zeros written one page apart first, by one op torch splits over
    its threads (NOTE: [Faulting a sparse result's pages on every core]): exactly there (seen on a tensor of
    ones), never in a tail shorter than a page, nothing on one thread; `zeros` stays all zeros in every dtype,
    and under inference mode."""
    from autojac._core import zeros as Z

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.complex64):
            per_page = Z.PAGE_BYTES // dtype.itemsize
            pages = 37
            ones = torch.ones(pages * per_page + 5, dtype=dtype)
            Z.fault_pages(ones)
            written = (ones == 0).reshape(-1)
            if torch.get_num_threads() < 2:
                assert not bool(written.any())
            else:
                width = min(per_page, -(-Z.GRAIN_ELEMENTS * torch.get_num_threads() // pages))
                want = torch.zeros(pages * per_page + 5, dtype=torch.bool)
                want[:pages * per_page].view(pages, per_page)[:, :width] = True
                assert torch.equal(written, want)
            n = (5 << 20) // dtype.itemsize + 7  # 5 MiB and a few elements: not a whole number of pages
            out = Z.zeros((n,), dtype, torch.device("cpu"), touched_pages=n * dtype.itemsize // Z.PAGE_BYTES)
            assert out.shape == (n,) and out.dtype == dtype and not bool(out.any())
        with torch.inference_mode():
            p = Pattern.from_user(np.eye(1024, dtype=bool) | np.eye(1024, k=1, dtype=bool))
            d = Decompressor(p, color_columns(p))
            values = torch.arange(1.0, p.nnz + 1, dtype=torch.float64)
            dense = d.to_dense(values)  # 8 MiB, every page reached
            expected = torch.zeros(1024, 1024, dtype=torch.float64)
            expected[torch.from_numpy(p.rows), torch.from_numpy(p.cols)] = values
            assert torch.equal(dense, expected)
    finally:
        torch.set_num_threads(before)


def test_csr_results_leave_the_warning_filters_alone_across_threads():
    """NOTE: [The CSR beta notice, silenced once]: CSR results from several threads at once, in a fresh process
    (torch says its beta notice once a process): no notice shown, and the filter list as it was, including a
    filter another thread adds meanwhile."""
    import subprocess
    import sys

    script = r"""
import threading, warnings
import torch, autojac
warnings.simplefilter("always")
shown = []
warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
before = list(warnings.filters)
x = torch.randn(300, dtype=torch.float64)
f = lambda u: u.sin() * torch.roll(u, 1)
want = torch.autograd.functional.jacobian(f, x)
errors = []
def work():
    try:
        for _ in range(3):
            got = autojac.jacobian(f, x, output="csr")
            assert got.layout == torch.sparse_csr and torch.equal(got.to_dense(), want)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
warnings.filterwarnings("ignore", message="added meanwhile")
for t in threads: t.join()
after = list(warnings.filters)
assert not errors, errors
assert not [s for s in shown if "in beta" in s], shown
assert after[0][1].pattern == "added meanwhile" and after[1:] == before, (before, after)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
