"""Sparsity detection against the true Jacobian: per op family, known patterns, aliasing, and random compositions."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

from autojac._structure import Pattern, detect



@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Constants made inside the test functions match the float64 inputs."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def true_jacobian(f, xs):
    """Dense (n_out, n_in) Jacobian of f(*xs), outputs and inputs flattened and concatenated."""
    def flat(*a):
        out = f(*a)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return torch.cat([o.reshape(-1) for o in outs])
    jac = torch.autograd.functional.jacobian(flat, tuple(xs))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)


def check(f, *xs, exact=True):
    xs = tuple(x.double() for x in xs)
    p = detect(f, xs)
    jac = true_jacobian(f, xs)
    assert p.shape == tuple(jac.shape)
    assert p.covers(jac), "detected pattern misses a nonzero"
    if exact:
        assert torch.equal(p.to_dense(), jac != 0), f"pattern is not exact: {p.nnz} vs {int((jac != 0).sum())}"
        assert p.dense_ops == ()
    return p


def rnd(*shape):
    return torch.randn(*shape)


def sparse_const(*shape, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, generator=g, dtype=torch.float64)
    return values * (torch.rand(*shape, generator=g, dtype=torch.float64) < density)


W34 = sparse_const(4, 5)
IDX = torch.tensor([3, 0, 0, 7, 11])

# (name, f, input shapes, exact); constants are default arguments, made once outside f: a constant
# drawn at random inside f is a different one on every call, so its zeros cannot be relied on.
OPS = [
    # element-wise and broadcasting
    ("unary", lambda x: torch.sin(x) * torch.exp(x) + x.abs() ** 1.5 + torch.tanh(x), [(12,)], True),
    ("broadcast", lambda x, y: x.reshape(3, 4) * y.reshape(1, 4) + y.reshape(4).sum(), [(12,), (4,)], True),
    ("scalar", lambda x: 2.0 * x - 1, [(5,)], True),
    ("mul by sparse constant", lambda x, c0=sparse_const(12): x * c0, [(12,)], True),
    ("div of constant", lambda x, c0=sparse_const(12, seed=3): c0 / (x ** 2 + 1), [(12,)], True),
    ("where constant", lambda x: torch.where(torch.arange(12) % 3 == 0, x, x.flip(0)), [(12,)], True),
    ("where varying", lambda x: torch.where(x > 0, x, 2 * x), [(12,)], True),
    ("masked_fill", lambda x: x.masked_fill(torch.arange(12) < 4, 0.0), [(12,)], True),
    ("clamp", lambda x: x.clamp(-10, 10) + F.gelu(x) + F.silu(x) + F.softplus(x), [(12,)], True),
    # reductions
    ("sum", lambda x: x.reshape(3, 4).sum(0), [(12,)], True),
    ("sum dims", lambda x: x.reshape(2, 3, 4).sum((0, 2), keepdim=True), [(24,)], True),
    ("mean", lambda x: x.reshape(3, 4).mean(1) + x.mean(), [(12,)], True),
    ("prod", lambda x: x.reshape(3, 4).prod(1), [(12,)], True),
    ("norm", lambda x: torch.linalg.vector_norm(x.reshape(3, 4), dim=1) + x.norm(), [(12,)], True),
    ("var std", lambda x: x.reshape(3, 4).var(1) + x.reshape(3, 4).std(1), [(12,)], True),
    ("logsumexp", lambda x: torch.logsumexp(x.reshape(3, 4), 0), [(12,)], True),
    ("amax", lambda x: x.reshape(3, 4).amax(1) + x.reshape(3, 4).max(0).values.sum(), [(12,)], False),
    ("softmax", lambda x: F.softmax(x.reshape(3, 4), -1) + F.log_softmax(x.reshape(3, 4), 0), [(12,)], True),
    ("cumsum", lambda x: x.reshape(3, 4).cumsum(1), [(12,)], True),
    ("cumprod", lambda x: x.reshape(3, 4).cumprod(0) + torch.logcumsumexp(x.reshape(3, 4), 1), [(12,)], True),
    ("sort topk", lambda x: x.reshape(3, 4).sort(1).values.sum() + x.topk(3).values.sum(), [(12,)], False),
    # data movement
    ("views", lambda x: x.reshape(3, 4).t().reshape(-1)[2:9].unsqueeze(0).expand(2, 7).squeeze(), [(12,)], True),
    ("permute", lambda x: x.reshape(2, 3, 4).permute(2, 0, 1).transpose(0, 1).select(2, 1), [(24,)], True),
    ("narrow cat stack", lambda x: torch.cat([x.narrow(0, 2, 5), torch.stack([x[:3], x[3:6]]).reshape(-1)]), [(12,)], True),
    ("pad", lambda x: F.pad(x.reshape(3, 4), (1, 2, 0, 1), value=3.0), [(12,)], True),
    ("pad modes", lambda x: F.pad(x.reshape(1, 3, 4), (2, 1), mode="reflect") + F.pad(x.reshape(1, 3, 4), (2, 1), mode="replicate") + F.pad(x.reshape(1, 3, 4), (2, 1), mode="circular"), [(12,)], True),
    ("roll flip repeat", lambda x: x.reshape(3, 4).roll(1, 0).flip(1).repeat(2, 1), [(12,)], True),
    ("index_select gather", lambda x: x.index_select(0, IDX) + x.reshape(3, 4).gather(1, torch.tensor([[0, 3], [1, 1], [2, 0]])).reshape(-1)[:5], [(12,)], True),
    ("advanced indexing", lambda x: x.reshape(3, 4)[torch.tensor([2, 0]), 1:] * x.reshape(3, 4)[:, torch.tensor([1, 1, 3])].t()[:2], [(12,)], True),
    ("boolean mask", lambda x: x[torch.tensor([True, False] * 6)], [(12,)], True),
    ("tril diag", lambda x: torch.tril(x.reshape(4, 4)) + torch.diag_embed(x[:4]) + torch.diag(x.reshape(4, 4).diagonal()), [(16,)], True),
    ("unfold", lambda x: x.unfold(0, 3, 2).sum(1), [(11,)], True),
    # products and convolutions
    ("matmul sparse const", lambda x: x.reshape(3, 4) @ W34, [(12,)], True),
    ("matmul const left", lambda x: W34.t() @ x.reshape(4, 3), [(12,)], True),
    ("mv dot", lambda x: W34.t() @ x[:4] + x[4:9] @ x[:5], [(12,)], True),
    ("bilinear", lambda x, y: x.reshape(2, 3) @ y.reshape(3, 2), [(6,), (6,)], True),
    ("bmm", lambda x, c0=sparse_const(2, 3, 4, seed=5): torch.bmm(x.reshape(2, 2, 3), c0), [(12,)], True),
    ("addmm linear", lambda x, c0=sparse_const(5, 4, seed=1): F.linear(x.reshape(3, 4), c0, torch.ones(5)), [(12,)], True),
    ("linear varying weight", lambda x, w: F.linear(x.reshape(3, 4), w.reshape(2, 4)), [(12,), (8,)], True),
    ("einsum", lambda x, c0=sparse_const(4, 5, seed=2): torch.einsum("ij,jk,k->i", x.reshape(3, 4), c0, torch.ones(5)), [(12,)], True),
    ("conv1d", lambda x, c0=sparse_const(3, 2, 3, seed=4): F.conv1d(x.reshape(1, 2, 8), c0, padding=1, stride=2), [(16,)], True),
    ("conv2d", lambda x, c0=sparse_const(2, 1, 3, 3, seed=6): F.conv2d(x.reshape(1, 1, 5, 5), c0, padding=1, dilation=(1, 2)), [(25,)], True),
    ("conv3d groups", lambda x, c0=sparse_const(4, 1, 2, 2, 2, density=0.7): F.conv3d(x.reshape(1, 2, 3, 3, 3), c0, groups=2), [(54,)], True),
    ("conv varying weight", lambda x, w: F.conv1d(x.reshape(1, 1, 6), w.reshape(1, 1, 3)), [(6,), (3,)], False),
    ("conv_transpose", lambda x, c0=sparse_const(1, 2, 3, density=0.8): F.conv_transpose1d(x.reshape(1, 1, 5), c0, stride=2), [(5,)], True),
    # scatter family
    ("scatter", lambda x: torch.zeros(6).scatter(0, torch.tensor([4, 1, 1]), x[:3]), [(6,)], True),
    ("scatter_add", lambda x: x.scatter_add(0, torch.tensor([4, 1, 1]), x[2:5] ** 2), [(6,)], True),
    ("index_put", lambda x: x.index_put((torch.tensor([0, 5]),), x[1:3] * 2), [(6,)], True),
    ("index_put accumulate", lambda x: x.index_put((torch.tensor([0, 0]),), x[1:3] * 2, accumulate=True), [(6,)], True),
    ("index_add", lambda x: x.reshape(3, 2).index_add(0, torch.tensor([2, 2]), x[:4].reshape(2, 2) ** 2), [(6,)], True),
    # zero derivative and creation
    ("zero derivative", lambda x: torch.sign(x) + x.floor() + x.ceil() + x.round() + x.trunc() + (x > 0) + x.argmax() + x.long() + x.detach(), [(6,)], True),
    ("creation", lambda x: x + torch.zeros(6) + torch.ones(6) + torch.full((6,), 2.0) + torch.arange(6.0) + torch.randn(6) + torch.empty(6).fill_(1.0), [(6,)], True),
    # normalisation, pooling, resampling, losses
    ("layer_norm", lambda x: F.layer_norm(x.reshape(3, 4), (4,), torch.randn(4), torch.randn(4)), [(12,)], True),
    ("group_norm", lambda x: F.group_norm(x.reshape(1, 4, 3), 2), [(12,)], True),
    ("batch_norm train", lambda x: F.batch_norm(x.reshape(3, 2, 2), None, None, training=True), [(12,)], True),
    ("batch_norm eval", lambda x: F.batch_norm(x.reshape(3, 2, 2), torch.zeros(2), torch.ones(2), training=False), [(12,)], True),
    ("max_pool", lambda x: F.max_pool2d(x.reshape(1, 1, 4, 4), 2), [(16,)], False),
    ("avg_pool", lambda x: F.avg_pool2d(x.reshape(1, 1, 5, 5), 3, stride=2, padding=1) + F.adaptive_avg_pool1d(x.reshape(1, 5, 5), 2).sum(), [(25,)], True),
    ("interpolate", lambda x: F.interpolate(x.reshape(1, 1, 6), scale_factor=2, mode="linear") + F.interpolate(x.reshape(1, 1, 6), scale_factor=2, mode="nearest"), [(6,)], True),
    ("bilinear upsample", lambda x: F.interpolate(x.reshape(1, 1, 3, 4), size=(5, 7), mode="bilinear", align_corners=True), [(12,)], True),
    ("embedding", lambda x: F.embedding(torch.tensor([[2, 0], [2, 1]]), x.reshape(3, 4)), [(12,)], True),
    ("cross_entropy", lambda x: F.cross_entropy(x.reshape(3, 4), torch.tensor([0, 3, 1]), reduction="none"), [(12,)], True),
    ("mse_loss", lambda x: F.mse_loss(x, torch.zeros(6)), [(6,)], True),
    ("fft", lambda x: torch.fft.rfft(x.reshape(3, 4), dim=1).abs() + torch.fft.fft(x.reshape(3, 4), dim=0).abs()[:, :3], [(12,)], True),
    ("glu hardswish", lambda x: F.glu(x.reshape(3, 4), 1) + F.hardswish(x.reshape(3, 4)[:, :2]), [(12,)], True),
]


@pytest.mark.parametrize("name,f,shapes,exact", OPS, ids=[o[0] for o in OPS])
def test_op_family(name, f, shapes, exact):
    torch.manual_seed(0)
    check(f, *[rnd(*s) for s in shapes], exact=exact)


def test_linear_algebra_is_dense_and_recorded():
    p = check(lambda x: torch.linalg.solve(x.reshape(3, 3) + 4 * torch.eye(3), torch.ones(3)), rnd(9), exact=False)
    assert p.nnz == 27 and any("linalg_solve" in op for op in p.dense_ops)


def test_input_dependent_index_is_dense_and_recorded():
    p = check(lambda x: x[2:5] * x[x[:3].argsort()], rnd(6), exact=False)
    assert any("index" in op and "input-dependent" in op for op in p.dense_ops)
    assert p.valid_everywhere


def test_data_dependent_control_flow_is_valid_here_only():
    def f(x):
        return x * 2 if x.sum() > 0 else x[:3].sum() * x
    x = torch.ones(5)
    p = check(f, x)
    assert not p.valid_everywhere and p.source == "real trace" and p.notes
    assert p.nnz == 5
    assert detect(lambda x: x * 2, (x,)).valid_everywhere


# -- known patterns ---------------------------------------------------------------------------------

def brusselator(n):
    def f(u):
        u = u.reshape(2, n, n)
        a, b = u[0], u[1]
        def lap(z):
            return torch.roll(z, 1, 0) + torch.roll(z, -1, 0) + torch.roll(z, 1, 1) + torch.roll(z, -1, 1) - 4 * z
        return torch.stack([1 + a * a * b - 4.4 * a + 10 * lap(a), 3.4 * a - a * a * b + 10 * lap(b)]).reshape(-1)
    return f


def periodic_laplacian_pattern(n):
    ring = sp.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), format="lil", dtype=bool)
    ring[0, n - 1] = ring[n - 1, 0] = True
    ring = sp.csr_array(ring)
    eye = sp.identity(n, dtype=bool, format="csr")
    return sp.csr_array(sp.kron(eye, ring) + sp.kron(ring, eye)).astype(bool)


def test_brusselator():
    n = 8
    p = check(brusselator(n), rnd(2 * n * n))
    lap = periodic_laplacian_pattern(n)
    eye = sp.identity(n * n, dtype=bool, format="csr")
    expected = sp.bmat([[lap, eye], [eye, lap]]).astype(bool).toarray()
    assert np.array_equal(p.to_dense().numpy(), expected)
    assert p.max_row_nnz == 6 and p.max_col_nnz == 6


def test_a_detected_pattern_keeps_the_grids_its_sides_were_seen_in():
    # The flat input is reshaped to (2, n, n) inside f, and the flat output is a view of a (2, n, n) stack: both
    # sides' grids. A (n, n) slice of either is not its whole storage: no grid. NOTE: [Grids the trace saw]
    n = 8
    p = detect(brusselator(n), (rnd(2 * n * n),))
    assert p.grids == (((2, n, n),), ((2, n, n),))
    # A transposed view of the input is not laid out like the input: not a grid of its numbering.
    q = detect(lambda u: (u.reshape(n, 2 * n).t() * 2).reshape(-1), (rnd(2 * n * n),))
    assert q.grids[1] == ((n, 2 * n),)
    # Several inputs of one shape are stacked; a 1-D input alone has no grid.
    r = detect(lambda a, b: a * b, (rnd(3, 5), rnd(3, 5)))
    assert r.grids == (((3, 5),), ((2, 3, 5),))
    assert detect(lambda x: x.sin(), (rnd(7),)).grids == ((), ())


def test_a_users_split_mask_gives_its_shapes_as_grids():
    mask = torch.rand(6, 4, 5) < 0.3
    assert Pattern.from_user(mask, out_shape=(2, 3), in_shape=(4, 5)).grids == (((2, 3),), ((4, 5),))
    assert Pattern.from_user(mask.reshape(6, 20)).grids == ((), ())


def test_brusselator_by_slicing_equals_roll():
    n = 6
    def f(u):
        u = u.reshape(2, n, n)
        a, b = u[0], u[1]
        def lap(z):
            zp = torch.cat([z[-1:], z, z[:1]], 0)
            zp = torch.cat([zp[:, -1:], zp, zp[:, :1]], 1)
            return zp[:-2, 1:-1] + zp[2:, 1:-1] + zp[1:-1, :-2] + zp[1:-1, 2:] - 4 * z
        return torch.stack([1 + a * a * b - 4.4 * a + 10 * lap(a), 3.4 * a - a * a * b + 10 * lap(b)]).reshape(-1)
    assert check(f, rnd(2 * n * n)) == detect(brusselator(n), (rnd(2 * n * n),))


def test_heat_equation_conv2d():
    n = 7
    stencil = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).reshape(1, 1, 3, 3)
    p = check(lambda u: F.conv2d(u.reshape(1, 1, n, n), stencil, padding=1).reshape(-1), rnd(n * n))
    path = sp.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)
    eye = sp.identity(n, dtype=bool)
    expected = (sp.kron(eye, path) + sp.kron(path, eye)).astype(bool).toarray()
    assert np.array_equal(p.to_dense().numpy(), expected)


def test_conv1d_chain_is_banded():
    k1, k2 = torch.randn(1, 1, 3), torch.randn(1, 1, 3)
    p = check(lambda x: F.conv1d(F.conv1d(x.reshape(1, 1, -1), k1, padding=1), k2, padding=1).reshape(-1), rnd(20))
    i, j = np.indices((20, 20))
    assert np.array_equal(p.to_dense().numpy(), np.abs(i - j) <= 2)


def test_elementwise_map_is_diagonal():
    p = check(lambda x: torch.sin(x) * torch.exp(-x * x) + x ** 3, rnd(300))
    assert np.array_equal(p.rows, np.arange(300)) and np.array_equal(p.cols, np.arange(300))


def test_one_dense_output_row():
    p = check(lambda x: torch.cat([x ** 2, (x ** 3).sum().reshape(1)]), rnd(10))
    assert p.max_row_nnz == 10 and p.nnz == 20


def test_permutation():
    perm = torch.randperm(15)
    p = check(lambda x: x[perm] * 3, rnd(15))
    assert np.array_equal(p.cols, perm.numpy())


def test_per_sample_mlp_is_block_diagonal():
    w1, w2 = torch.randn(16, 5), torch.randn(3, 16)
    batch = 7
    p = check(lambda x: torch.tanh(x.reshape(batch, 5) @ w1.t()) @ w2.t(), rnd(batch * 5))
    expected = np.kron(np.eye(batch, dtype=bool), np.ones((3, 5), bool))
    assert np.array_equal(p.to_dense().numpy(), expected)


def test_module_and_several_inputs_and_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv1d(3, 1, 1)).double()
    check(lambda x, y: (net(x.reshape(1, 2, 6)).reshape(-1) * y.sum(), y ** 2), rnd(12), rnd(3))


def test_recurrent_layers_with_undeclared_aliases():
    # The CPU GRU cell splits gates with unsafe_split: views its schema does not declare.
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 2, batch_first=True).double()
    check(lambda x: gru(x.reshape(2, 4, 3))[0], rnd(24))


def test_complex_views():
    check(lambda x: torch.view_as_real(torch.fft.fft(x)).sum(1) + torch.view_as_complex(x.reshape(4, 2)).abs().sum(),
          rnd(8), exact=False)


def test_nonfinite_free_batched_layers_detect_on_fake_tensors():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 2)).double()
    p = check(lambda x: net(x.reshape(3, 4)), rnd(12))
    assert p.valid_everywhere and p.source == "fake trace"


def test_batchnorm_module_state_is_untouched():
    bn = torch.nn.BatchNorm1d(2).double()
    before = bn.num_batches_tracked.clone(), bn.running_mean.clone()
    detect(lambda x: bn(x.reshape(3, 2)), (rnd(6),))
    assert torch.equal(bn.num_batches_tracked, before[0]) and torch.equal(bn.running_mean, before[1])


# -- aliasing and in-place writes -------------------------------------------------------------------

def test_inplace_writes_through_views():
    def f(x):
        y = x.clone()
        y[1:3] = x[5:7] * 2
        z = y.view(2, 4)
        z[1].mul_(x[0])
        z[0, 0] = 1.0
        y.add_(x.flip(0))
        return y
    check(f, rnd(8))


def test_function_mutating_its_input():
    def f(x):
        x.mul_(2)
        x[0] = x[3]
        return x
    x = rnd(5)
    saved = x.clone()
    p = detect(f, (x,))
    assert torch.equal(x, saved), "detection must not modify the caller's tensors"
    assert torch.equal(p.to_dense(), true_jacobian(lambda x: f(x.clone()), (x,)) != 0)


def test_preallocated_output_filled_by_loop():
    def f(x):
        out = torch.empty(4)
        for i in range(4):
            out[i] = x[i] * x[(i + 1) % 4]
        return out
    check(f, rnd(4))


def test_detached_parts_have_no_derivative():
    check(lambda x: x * x.detach().sum() + x.detach() ** 2, rnd(5))
    check(lambda x: x.detach().clone().copy_(x[0] * x), rnd(5))  # written after detaching: differentiable


def test_no_grad_blocks_are_kept():
    # Forward-mode AD differentiates through no_grad blocks, reverse mode does not: keep the superset.
    def f(x):
        with torch.no_grad():
            scale = x.sum()
        return x * scale
    assert detect(f, (rnd(5),)).nnz == 25


# -- user patterns -------------------------------------------------------------------------------------

def test_from_user_dense_sparse_and_split_shapes():
    mask = torch.rand(6, 4) < 0.3
    a = Pattern.from_user(mask)
    b = Pattern.from_user(mask.to_sparse())
    c = Pattern.from_user(mask.reshape(2, 3, 4), out_shape=(2, 3), in_shape=(4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        d = Pattern.from_user(mask.to_sparse_csr(), shape=(6, 4))
    assert a == b == c == d
    assert torch.equal(a.to_dense(), mask) and a.nnz == int(mask.sum())
    assert np.array_equal(a.to_scipy().toarray(), mask.numpy())


def test_from_user_errors_say_what_to_do():
    with pytest.raises(TypeError, match="mask != 0"):
        Pattern.from_user(torch.ones(3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        Pattern.from_user(torch.ones(3, 3, dtype=torch.bool), shape=(4, 2))
    with pytest.raises(ValueError, match="shape=\\(n_out, n_in\\)"):
        Pattern.from_user(torch.ones(2, 3, 3, dtype=torch.bool))


def test_detect_errors():
    with pytest.raises(TypeError, match="floating-point inputs"):
        detect(lambda x: x, (torch.arange(3),))
    with pytest.raises(TypeError, match="floating-point outputs"):
        detect(lambda x: (x > 0), (rnd(3),))
    with pytest.raises(ValueError, match="trace must be"):
        detect(lambda x: x, (rnd(3),), trace="symbolic")


# -- random compositions -----------------------------------------------------------------------------

def _unary_ops(draw, shape):
    """One random op on a 2-D tensor: (function, output shape, exact)."""
    r, c = shape
    kind = draw(st.sampled_from(["sin", "scale", "sum", "mean", "lse", "t", "flip", "roll", "pad", "cat",
                                 "index", "gather", "matmul", "conv1d", "bcast", "reshape", "slice"]))
    seed = draw(st.integers(0, 1000))
    note(f"{kind}(seed={seed}) on {shape}")
    g = torch.Generator().manual_seed(seed)
    if kind == "sin":
        return (lambda x: torch.sin(x) + x * x), shape
    if kind == "scale":
        c_ = torch.randn(r, c, generator=g) * (torch.rand(r, c, generator=g) < 0.6)
        return (lambda x: x * c_), shape
    if kind in ("sum", "mean", "lse"):
        dim = draw(st.integers(0, 1))
        red = {"sum": lambda x: x.sum(dim, keepdim=True), "mean": lambda x: x.mean(dim, keepdim=True),
               "lse": lambda x: torch.logsumexp(x, dim, keepdim=True)}[kind]
        return red, (1, c) if dim == 0 else (r, 1)
    if kind == "t":
        return (lambda x: x.t()), (c, r)
    if kind == "flip":
        return (lambda x: x.flip(1)), shape
    if kind == "roll":
        k = draw(st.integers(-3, 3))
        return (lambda x: x.roll(k, 0)), shape
    if kind == "pad":
        return (lambda x: F.pad(x, (1, 0, 0, 2))), (r + 2, c + 1)
    if kind == "cat":
        return (lambda x: torch.cat([x, x[:1] * 2], 0)), (r + 1, c)
    if kind == "index":
        idx = torch.randint(0, c, (draw(st.integers(1, 5)),), generator=g)
        return (lambda x: x[:, idx]), (r, idx.numel())
    if kind == "gather":
        idx = torch.randint(0, r, (2, c), generator=g)
        return (lambda x: x.gather(0, idx)), (2, c)
    if kind == "matmul":
        k = draw(st.integers(1, 5))
        m = torch.randn(c, k, generator=g) * (torch.rand(c, k, generator=g) < 0.5)
        return (lambda x: x @ m), (r, k)
    if kind == "conv1d":
        w = torch.randn(2, r, 3, generator=g) * (torch.rand(2, r, 3, generator=g) < 0.6)
        return (lambda x: F.conv1d(x.unsqueeze(0), w, padding=1)[0]), (2, c)
    if kind == "bcast":
        # Additive: a product with an element that is identically zero (padding, a zero weight column)
        # has a zero derivative the rules cannot see, so exactness would not hold.
        return (lambda x: x + torch.tanh(x.mean(1, keepdim=True)) + x[:1]), shape
    if kind == "reshape":
        return (lambda x: x.reshape(c, r)), (c, r)
    return (lambda x: x[1:] if r > 1 else x), (max(r - 1, 1), c)


@st.composite
def programs(draw):
    """A chain of 1-4 random ops on a 2-D reshape of the input; every rule involved is exact."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    start = shape
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        fn, shape = _unary_ops(draw, shape)
        ops.append(fn)
    def f(x):
        y = x.reshape(start)
        for fn in ops:
            y = fn(y)
        return y
    return f, start


@settings(max_examples=60, deadline=None)
@given(programs())
def test_random_compositions_are_exact(program):
    f, shape = program
    torch.manual_seed(1)
    check(f, rnd(shape[0] * shape[1]) + 0.1, exact=True)


def test_a_constant_operand_too_large_to_spell_out_is_taken_as_dense(monkeypatch):
    # A weight with a few exact zeros would need every (output, input) pair spelled out; past the limit the
    # operand counts as dense: a superset of the pattern (never a missed nonzero), and the op is named.
    from autojac._structure import linear

    W = torch.randn(6, 5, dtype=torch.float64)
    W[0, 0] = 0.0
    f = lambda x: W @ x  # noqa: E731
    x = torch.randn(5, dtype=torch.float64)
    exact = detect(f, (x,))
    assert not exact.to_dense()[0, 0] and not exact.dense_ops
    monkeypatch.setattr(linear, "EXACT_PAIRS_LIMIT", 10)
    capped = detect(f, (x,))
    assert capped.to_dense().all() and any("too large to spell out" in op for op in capped.dense_ops)


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T"])
def test_a_dense_constant_operand_is_never_copied_to_the_host(monkeypatch, transposed):
    """NOTE: [A dense constant is known before it is loaded]: a dense weight's nonzeros are counted where it lives
    and its values are never loaded (on a GPU, a 1 GiB weight copied to the host and laid out by a position map
    took 2.7 s an mm); a weight with zeros is still spelled out exactly, also past a million elements."""
    from autojac._structure import engine

    loads = []
    real_load = engine.Engine._load
    monkeypatch.setattr(engine.Engine, "_load", lambda self, store: (loads.append(store.numel), real_load(self, store)))
    g = torch.Generator().manual_seed(4)
    dense = torch.randn(300, 4000, generator=g, dtype=torch.float64)
    W = dense.t().contiguous().t() if transposed else dense  # a column-major layout counts in place too
    f = lambda x: torch.tanh(W @ x)  # noqa: E731
    p = detect(f, (rnd(4000),))
    assert p.to_dense().all() and loads == []
    banded = torch.zeros(1200, 1200, dtype=torch.float64)
    i = torch.arange(1200)
    banded[i, i] = 2.0
    banded[i[1:], i[:-1]] = -1.0
    h = lambda x: banded @ x  # noqa: E731
    q = detect(h, (rnd(1200),))
    assert q.nnz == 1200 + 1199 and not q.dense_ops and loads  # exact, so its values were loaded


def test_nonzeros_are_counted_in_pieces_on_any_layout(monkeypatch):
    from autojac._structure import engine

    monkeypatch.setattr(engine, "COUNT_PIECE", 1000)
    g = torch.Generator().manual_seed(6)
    t = (torch.rand(90, 70, 3, generator=g) > 0.4).to(torch.float32)
    for view in (t, t.permute(2, 0, 1), t[:, ::3], t.reshape(-1)[5:], t[0, 0, 0]):
        assert engine._count_nonzero(view) == int(torch.count_nonzero(view))


def test_a_memory_bound_stops_a_convolution_before_it_builds_its_sets():
    """`max_stored` (structure first under a budget) is checked by the convolution rule before it builds its
    sets (its transient is several times its result), not swallowed into a dense fallback; above the bound the
    pattern is exact."""
    from autojac._structure.detect import TooDense

    n = 40
    stencil = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).reshape(1, 1, 3, 3)
    f = lambda u: F.conv2d(u.reshape(1, 1, n, n), stencil, padding=1).reshape(-1)  # noqa: E731
    x = rnd(n * n)
    with pytest.raises(TooDense) as caught:
        detect(f, x, max_stored=5 * n * n - 1)  # the rule foresees 5 taps x n^2 outputs
    assert caught.value.nnz == 5 * n * n
    p = detect(f, x, max_stored=10 * n * n)
    assert p.nnz == 5 * n * n - 4 * n and not p.dense_ops


def test_capped_union_notes_belong_to_their_own_thread_and_detection():
    """A note that a union was capped (made conservative) is read by the detection of the op that capped it:
    not by a detection running in another thread, and not by the next detection after an aborted one."""
    import threading

    from autojac._structure import deps as D

    def other_thread():
        D.capped().append("a note of another thread's op")

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert detect(lambda u: u.sin() * 2, rnd(50)).dense_ops == ()
    D.capped().append("left by a detection that stopped")
    assert detect(lambda u: u.sin() * 2, rnd(50)).dense_ops == ()


def test_a_memory_bound_stops_a_matmul_before_its_groups_are_spelled_out():
    """Under `max_stored`, the union a matmul (or any reduction) builds is refused from the size of its groups,
    before their index arrays exist; the bound is this detection's alone (cleared after it, even when it raised)."""
    from autojac._structure import deps as D
    from autojac._structure.detect import TooDense

    w1, w2 = torch.randn(16, 64, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    f = lambda X: torch.tanh(X @ w1) @ w2  # noqa: E731 - block diagonal, 64 nonzeros a sample
    x = torch.randn(500, 16, dtype=torch.float64)
    with pytest.raises(TooDense) as caught:
        detect(f, x, max_stored=500 * 64 - 1)  # the second product groups 64 hidden units per output row
    assert caught.value.nnz >= 500 * 64
    assert D.stored_limit() is None
    p = detect(f, x)
    assert p.nnz == 500 * 4 * 16 and not p.dense_ops


def test_fake_tensor_logs_are_quiet_only_in_the_tracing_thread():
    """A trace silences torch's fake-tensor error log for its own thread only, and leaves the logger's level as
    it was (NOTE: [Quiet by a thread's filter, not the logger's level])."""
    import logging
    import threading

    from autojac._structure.trace import QuietFakeLog

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler, level = Keep(level=logging.ERROR), logger.level
    logger.addHandler(handler)
    try:
        inside, outside = threading.Event(), threading.Event()

        def other_thread():
            inside.wait()
            logger.error("from another thread")
            outside.set()

        t = threading.Thread(target=other_thread)
        t.start()
        with QuietFakeLog():
            with QuietFakeLog():  # nested: still quiet after the inner one ends
                pass
            logger.error("from the tracing thread")
            inside.set()
            outside.wait()
            assert logger.level == level
        t.join()
        logger.error("after the trace")
    finally:
        logger.removeHandler(handler)
    assert seen == ["from another thread", "after the trace"]


@pytest.mark.parametrize("seed", range(4))
def test_a_narrow_union_spells_the_same_sets_as_the_general_one(monkeypatch, seed):
    """Unions of few inputs an element are merged row by row (deps._narrow_union); the sets must equal the
    sparse-matrix union's, repeated entries on both sides included."""
    import numpy as np

    from autojac._structure import deps as D

    rng = np.random.default_rng(seed)
    # few columns: the two sides share many entries; many columns: hardly any element repeats one
    n, n_in = 300, (40 if seed % 2 else 1_000_000)

    def side(rows, width):
        cols = np.sort(np.stack([rng.choice(n_in, width, replace=False) for _ in range(rows)]), axis=1)
        table = D.csr(np.arange(0, rows * width + 1, width), cols.reshape(-1), n_in)
        return D.Deps(rng.integers(0, rows, n), table)

    def spelled(m):  # a canonical CSR matrix's structure, comparable with ==
        m = m.tocsr()
        m.sum_duplicates()
        return m.indptr.tolist(), m.indices.tolist()

    def sets(d):
        return spelled(D.take_rows(d.table, d.rowmap))

    a, b = side(n, 1 + seed), side(2 * n, 3)
    assert D._narrow_union(a, b) is not None
    narrow = D._union2(a, b)
    monkeypatch.setattr(D, "NARROW_UNION_WIDTH", 0)
    general = D._union2(a, b)
    assert sets(narrow) == sets(general) and general.table.nnz > 0
    assert sets(narrow) == spelled(D.take_rows(a.table, a.rowmap) + D.take_rows(b.table, b.rowmap))


@pytest.mark.parametrize("case", ["all inside", "none inside", "some inside", "duplicated rows"])
def test_a_union_with_one_entry_an_element_spells_the_same_sets_as_the_general_one(monkeypatch, case):
    """deps._join_one: a set of one entry an element joined to sets of a few (without the row-wise deduplication,
    or returning the wide side itself); the sets must equal the sparse-matrix union's."""
    import numpy as np

    from autojac._structure import deps as D

    rng = np.random.default_rng(7)
    n, n_in, w = 200, 5000, 4
    cols = np.sort(np.stack([rng.choice(n_in, w, replace=False) for _ in range(n)]), axis=1)
    rowmap = rng.permutation(n) if case != "duplicated rows" else rng.integers(0, n, n)
    wide = D.Deps(rowmap, D.csr(np.arange(0, n * w + 1, w), cols.reshape(-1), n_in))
    spelled_wide = cols[rowmap]
    if case == "all inside":
        one = spelled_wide[np.arange(n), rng.integers(0, w, n)]
    else:  # entries no set holds, or some it holds
        spare = np.setdiff1d(np.arange(n_in), cols)
        one = rng.choice(spare, n)
        if case == "some inside":
            one[::3] = spelled_wide[::3, 0]
    single = D.Deps(np.arange(n), D.csr(np.arange(n + 1), one, n_in))

    def sets(d):
        m = D.take_rows(d.table, d.rowmap).tocsr()
        m.sum_duplicates()
        return m.indptr.tolist(), m.indices.tolist()

    for a, b in ((wide, single), (single, wide)):
        narrow = D._union2(a, b)
        if case == "all inside":
            assert narrow is wide
        with monkeypatch.context() as m:
            m.setattr(D, "NARROW_UNION_WIDTH", 0)
            general = D._union2(a, b)
        assert sets(narrow) == sets(general)


def test_a_narrow_union_past_the_union_limit_is_capped_like_any_other(monkeypatch):
    """The narrow path spells every element's set out; past UNION_LIMIT entries the general union's conservative
    cap (one shared set, noted) applies to it as well."""
    import numpy as np

    from autojac._structure import deps as D

    n, n_in = 20, 1000
    table = D.csr(np.arange(0, n * 8 + 1, 8), np.arange(n * 8) % n_in, n_in)
    a, b = D.Deps(np.arange(n), table), D.Deps(np.arange(n)[::-1].copy(), table)
    assert D._narrow_union(a, b) is not None
    monkeypatch.setattr(D, "UNION_LIMIT", 100)
    D.capped().clear()
    u = D._union2(a, b)
    assert u.table.shape[0] == 1 and D.capped(), (u, D.capped())
    D.capped().clear()


def test_a_view_read_again_after_its_storage_is_written_follows_the_write():
    """A view's sets are taken once per state of its storage: read, overwritten through another view, read again,
    it depends on what was written (the engine keeps the first reading only while the storage's sets stay)."""
    def f(u):
        v = u.clone()
        a = v[:5]
        before = a * 2.0
        v[:5] = u[5:10] ** 2
        after = a * 3.0
        return torch.cat([before, after, a.sin()])

    check(f, rnd(10))


def test_tables_assembled_without_the_constructor_agree_with_it():
    """NOTE: [CSR tables assembled without scipy's checks]: on this scipy the fast assembly is used, and a table
    made through it behaves as the constructor's in the operations detection uses."""
    from autojac._structure import deps as D

    assert D._ASSEMBLED  # the installed scipy passed the import-time comparison
    rng = np.random.default_rng(3)
    dense = rng.random((40, 30)) < 0.2
    ref = sp.csr_array(dense)
    ref.sort_indices()
    fast = D.csr(ref.indptr.astype(np.int64), ref.indices.astype(np.int64), 30)
    other = sp.csr_array(rng.random((40, 30)) < 0.1)
    rows = rng.integers(0, 40, 25)
    assert fast.shape == ref.shape and fast.nnz == ref.nnz and fast.has_canonical_format
    np.testing.assert_array_equal(fast.toarray(), dense)
    np.testing.assert_array_equal((fast + other).toarray(), dense | other.toarray())
    np.testing.assert_array_equal(D.take_rows(fast, rows).toarray(), dense[rows])
    np.testing.assert_array_equal(fast.T.toarray(), dense.T)
    np.testing.assert_array_equal((fast @ other.T).toarray() != 0, (dense.astype(int) @ other.toarray().T.astype(int)) != 0)
    # Index arrays longer than the table's entries go through the constructor, which trims them (a table's
    # `indices` is read whole elsewhere: stacking tables concatenates them).
    long = D.csr(np.array([0, 1, 2], np.int64), np.array([3, 5, 7], np.int64), 10)
    assert long.indices.tolist() == [3, 5] and long.nnz == 2
