"""`hessian` and `batch_jacobian` against torch in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch.utils import _pytree

import autojac


def t64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def close(got, want):
    g_leaves, g_spec = _pytree.tree_flatten(got)
    w_leaves, w_spec = _pytree.tree_flatten(want)
    assert g_spec == w_spec
    for a, b in zip(g_leaves, w_leaves):
        torch.testing.assert_close(a, b)


def energy(x):
    return (x ** 3).sum() + (x[..., :-1] * x[..., 1:]).sin().sum()


def logistic_loss(w, X=t64(20, 5, seed=3), y=(t64(20, seed=4) > 0).double()):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)


def pairwise(q):  # an energy with pairwise terms: 1 / distance between every two points
    p = q.reshape(-1, 2)
    d = ((p[:, None] - p[None]) ** 2).sum(-1) + torch.eye(len(p), dtype=q.dtype, device=q.device)
    return d.rsqrt().triu(1).sum()


MODES = ["auto", "reverse", "forward", "forward-trick"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f, x", [(energy, t64(7)), (logistic_loss, t64(5)), (pairwise, t64(8))], ids=["energy", "logistic", "pairwise"])
def test_hessian_matches_torch(f, x, mode):
    want = torch.autograd.functional.hessian(f, x)
    for _ in range(3):  # the first call and warm calls (exploring)
        torch.testing.assert_close(autojac.hessian(f, x, mode=mode), want)


def test_hessian_of_several_inputs_and_structures():
    a, b = t64(3), t64(2, seed=1)
    f = lambda a, b: (a.sin() * b.sum()).sum() + (a @ a) * b.prod()  # noqa: E731
    close(autojac.hessian(f, (a, b)), torch.autograd.functional.hessian(f, (a, b)))
    close(autojac.hessian(f, (a, b), argnums=1), torch.func.hessian(f, argnums=1)(a, b))
    params = {"w": t64(2, 2), "b": t64(2, seed=2)}
    g = lambda p: (torch.tanh(p["w"] @ p["b"]) ** 2).sum()  # noqa: E731
    close(autojac.hessian(g, params), torch.func.hessian(g)(params))


def test_hessian_refuses_a_vector_function_and_keeps_create_graph():
    with pytest.raises(autojac.InputTypeError, match="must return a scalar"):
        autojac.hessian(torch.sin, t64(3))
    x = t64(4).requires_grad_()
    H = autojac.hessian(energy, x, create_graph=True)
    assert H.requires_grad
    third = torch.autograd.grad(H.sum(), x)[0]
    want = torch.autograd.grad(torch.autograd.functional.hessian(energy, x, create_graph=True).sum(), x)[0]
    torch.testing.assert_close(third, want)


def test_hessian_with_aux():
    f = lambda x: ((x ** 2).sum() * 3, x.norm())  # noqa: E731
    H, aux = autojac.hessian(f, t64(3), has_aux=True)
    torch.testing.assert_close(H, 6 * torch.eye(3, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(aux, t64(3).norm())


# --- batch_jacobian --------------------------------------------------------------------------------

def per_sample(f, *xs):
    """The reference: torch's Jacobian of f on each sample alone."""
    rows = []
    for b in range(xs[0].shape[0]):
        single = lambda *s: f(*(t.unsqueeze(0) for t in s))[0]  # noqa: E731
        rows.append(torch.autograd.functional.jacobian(single, tuple(x[b] for x in xs) if len(xs) > 1 else xs[0][b]))
    if len(xs) > 1:
        return tuple(torch.stack([r[j] for r in rows]) for j in range(len(xs)))
    return torch.stack(rows)


torch.manual_seed(0)
MLP = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().to(DEVICE)
WIDE = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 40)).double().to(DEVICE)
CNN = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 5)).double().to(DEVICE)


def physics(q):  # per-sample springs: q is (B, 4, 2)
    d = q[:, 1:] - q[:, :-1]
    return (d.norm(dim=-1) - 1.0) ** 2


@pytest.mark.parametrize("mode", ["auto", "reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("f, X", [(MLP, t64(9, 6)), (WIDE, t64(7, 3)), (CNN, t64(4, 2, 5, 5)), (physics, t64(6, 4, 2))],
                         ids=["mlp", "wide_out", "cnn", "physics"])
def test_batch_jacobian_matches_per_sample_jacobians(f, X, mode):
    want = per_sample(f, X)
    for _ in range(3):
        got = autojac.batch_jacobian(f, X, mode=mode)
        torch.testing.assert_close(got, want)
        assert got.is_contiguous()


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("f, X", [(MLP, t64(9, 6)), (CNN, t64(4, 2, 5, 5)), (physics, t64(6, 4, 2))],
                         ids=["mlp", "cnn", "physics"])
def test_batch_jacobian_runs_the_repeat_trick_on_copies_folded_into_the_batch(f, X, mode):
    # NOTE: [The sum trick's copies fold into the batch]
    want = per_sample(f, X)
    got = autojac.batch_jacobian(f, X, mode=mode, vectorize="repeat", chunk_size=3)
    assert autojac.last_report().method == f"{mode}/repeat"
    torch.testing.assert_close(got, want)


def test_the_planner_leaves_the_batch_repeat_trick_to_an_explicit_request():
    X = t64(9, 6)
    autojac.clear_cache()
    for _ in range(4):
        autojac.batch_jacobian(MLP, X)
    names = {c.name for c in autojac.plan(MLP, X, kind="batch_jacobian").candidates}
    assert "reverse/vmap [func]" in names and not any("repeat" in n for n in names), names


def test_the_repeat_trick_over_several_inputs_and_outputs_and_a_function_that_reads_its_batch_size():
    f = lambda a, b: {"p": torch.tanh(a * b[:, :1]), "q": (a ** 2).sum(-1, keepdim=True) + b}  # noqa: E731
    A, Bm = t64(5, 3), t64(5, 3, seed=1)
    for mode in ("reverse", "forward"):
        got = autojac.batch_jacobian(f, (A, Bm), mode=mode, vectorize="repeat")
        want = autojac.batch_jacobian(f, (A, Bm), mode=mode, vectorize="loop")
        close(got, want)
    reads = lambda x: torch.tanh(x) * x.shape[0]  # noqa: E731 - sample-independent at one batch size only
    X = t64(6, 4)
    with pytest.raises(autojac.UnsupportedFunctionError, match="repeat"):
        autojac.batch_jacobian(reads, X, vectorize="repeat")
    torch.testing.assert_close(autojac.batch_jacobian(reads, X), per_sample(lambda x: torch.tanh(x) * 6, X))


def test_batch_jacobian_of_several_inputs_and_outputs():
    f = lambda a, b: (torch.tanh(a.unsqueeze(1) @ b.mT).reshape(-1, 1), a.sum(-1) * b.sum((-1, -2)))  # noqa: E731
    A, Bm = t64(5, 3), t64(5, 1, 3, seed=1)
    got = autojac.batch_jacobian(f, (A, Bm))
    for b in range(5):
        want = torch.autograd.functional.jacobian(lambda a, bb: tuple(o[0] for o in f(a[None], bb[None])), (A[b], Bm[b]))
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(got[i][j][b], want[i][j])


@pytest.mark.parametrize("name, f", [
    ("batch norm in training", torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)).double().to(DEVICE)),
    ("mean over the batch", lambda x: x - x.mean(0)),
    ("attention across the batch", lambda x: torch.softmax(x @ x.T, dim=0) @ x),
    # mixing that does not reach every sample (a pullback from one sample missed these: errors up to 4.5)
    ("a running sum over the batch", lambda x: torch.tanh(x.cumsum(0))),
    ("each sample coupled to the next", lambda x: torch.tanh(x) + torch.cat([x[1:] ** 2, torch.zeros_like(x[:1])])),
    ("two samples coupled", lambda x: torch.tanh(x) + torch.cat([x[2:3] * x[3:4], torch.zeros_like(x[1:])])),
    ("the last sample reads the first", lambda x: torch.cat([x[:-1], x[-1:] + x[:1] ** 2])),
])
@pytest.mark.parametrize("batch", [8, 11])
def test_functions_that_mix_samples_are_refused(name, f, batch):
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, t64(batch, 6))


@pytest.mark.parametrize("batch", [2, 3, 5, 7, 16, 33])
def test_independent_samples_pass_the_check_at_every_batch_size(batch):
    X = t64(batch, 6)
    torch.testing.assert_close(autojac.batch_jacobian(MLP, X), per_sample(MLP, X))


def _mixing(alpha):
    return lambda X: X.sin() + alpha * X.mean(0)


def test_a_closure_that_mixes_samples_only_for_some_captured_values_is_checked_for_each():
    # The independence check is cached by key (code, captured shapes): a closure rebuilt with a mixing
    # weight that is no longer zero, or the same weight written in place, must be checked again.
    X = t64(6, 3)
    zero = torch.zeros((), dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(autojac.batch_jacobian(_mixing(zero), X), torch.diag_embed(X.cos()))
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(_mixing(torch.ones((), dtype=torch.float64, device=DEVICE)), X)
    f = _mixing(zero)
    torch.testing.assert_close(autojac.batch_jacobian(f, X), torch.diag_embed(X.cos()))
    zero.add_(0.5)
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, X)


@pytest.mark.parametrize("features", [4, 40], ids=["sum_over_batch", "broadcast"])
def test_a_mixing_weight_written_in_place_is_refused_on_either_route(features):
    """The verdict of a function whose tensors changed is confirmed on the result (NOTE: [Independence confirmed
    on the result]): the sum over the batch (fewer output features) and the broadcast (more) both miss mixing
    by construction, so the confirmation has to catch it whichever route computed the blocks."""
    W = t64(6, features, seed=2)
    alpha = torch.zeros((), dtype=torch.float64, device=DEVICE)
    f = lambda X: torch.tanh(X @ W) + alpha * (X @ W)[:1]  # noqa: E731 - sample 0 reaches every sample
    X = t64(9, 6)
    torch.testing.assert_close(autojac.batch_jacobian(f, X), per_sample(f, X))
    alpha.add_(0.25)
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, X)
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, X)  # refused again: the mixing verdict is not kept as a pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inputs, outputs", [(6, 4), (3, 40)], ids=["sum_over_batch", "broadcast"])
def test_weights_a_training_step_writes_are_confirmed_within_the_jacobians_evaluation(dtype, inputs, outputs):
    """An optimizer writes the weights in place every step: the verdict is confirmed on the result, not checked
    again before it (that took 1 + log2 B products and 2.2 of a 3.1 ms call at B = 512). The sum over the batch
    gets the product from one more output, the broadcast from one more input, in the Jacobian's own evaluation:
    no evaluation is added. The blocks stay right at every step, and float32 rounding is not taken for mixing."""
    torch.manual_seed(0)  # the net's weights, not whatever tests ran before left in the global RNG
    net = torch.nn.Sequential(torch.nn.Linear(inputs, 16), torch.nn.Tanh(), torch.nn.Linear(16, outputs)).to(dtype).to(DEVICE)
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    X = t64(12, inputs).to(dtype)
    autojac.batch_jacobian(net, X)
    for _ in range(3):
        loss = net(X).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        calls.clear()
        got = autojac.batch_jacobian(net, X)
        assert len(calls) == autojac.last_report().evaluations
        # float32: two summation orders (the sum trick's against vmap(jacrev)'s) differ by a few ulps of the sums
        tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(got, per_sample(net, X), **tolerance)


@pytest.mark.parametrize("features", [4, 40], ids=["sum_over_batch", "broadcast"])
def test_a_plan_you_pass_is_confirmed_by_one_more_evaluation(features):
    """A plan fixes the function it runs (no extra output or input can join it): a verdict gone stale is then
    confirmed by one more evaluation and product of `f`, which still refuses mixing that a write introduced."""
    W = t64(6, features, seed=3)
    alpha = torch.zeros((), dtype=torch.float64, device=DEVICE)
    calls = []

    def f(X):
        calls.append(1)
        return torch.tanh(X @ W) + alpha * (X @ W)[:1]

    X = t64(9, 6)
    p = autojac.plan(f, X, kind="batch_jacobian")
    autojac.batch_jacobian(f, X, plan=p)
    W.mul_(1.1)
    calls.clear()
    got = autojac.batch_jacobian(f, X, plan=p)
    assert len(calls) == autojac.last_report().evaluations + 1
    torch.testing.assert_close(got, per_sample(f, X))
    alpha.add_(0.25)
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, X, plan=p)


_REBOUND = torch.randn(6, 2, dtype=torch.float64).to(DEVICE)


def _reads_rebound(X):
    return torch.tanh(X @ _REBOUND)


def test_outputs_whose_shapes_changed_with_the_values_are_checked_again():
    """The verdict keeps the outputs' shapes; a global rebound to a tensor of another shape, or a mask written
    in place that selects more features, changes them: checked again as on a first call, never confirmed
    against the old shapes (a probe of the old shapes raised a size mismatch)."""
    global _REBOUND
    X = t64(9, 6)
    autojac.batch_jacobian(_reads_rebound, X)
    _REBOUND = t64(6, 3, seed=4)
    torch.testing.assert_close(autojac.batch_jacobian(_reads_rebound, X), per_sample(_reads_rebound, X))
    mask = torch.tensor([True, True, False, False], device=DEVICE)
    W = t64(6, 4, seed=5)
    f = lambda X: torch.tanh(X @ W)[:, mask]  # noqa: E731
    assert autojac.batch_jacobian(f, X).shape == (9, 2, 6)
    mask[2] = True
    torch.testing.assert_close(autojac.batch_jacobian(f, X), per_sample(f, X))


def test_a_function_computing_in_a_lower_precision_is_confirmed_not_refused():
    """The result's rounding is float64's, the function's float32's: the products disagree beyond the former,
    which the bit-by-bit check then settles (before, a valid function was refused on every training step).
    Mixing is still refused."""
    W = torch.randn(64, 4, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    alpha = torch.zeros((), device=DEVICE)
    f = lambda X: torch.tanh(X.float() @ W).double() + alpha * X.float().mean(0).sum()  # noqa: E731
    X = t64(256, 64)
    autojac.batch_jacobian(f, X)
    for _ in range(2):
        with torch.no_grad():
            W.add_(0.01)
        assert autojac.batch_jacobian(f, X).shape == (256, 4, 64)
    alpha.add_(0.5)
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, X)


@pytest.mark.parametrize("outputs", [3, 40], ids=["sum_over_batch", "broadcast"])
def test_a_training_step_under_inference_mode_is_confirmed(outputs):
    """Under inference mode the probe made for the call must still be a tensor whose version can be watched."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, outputs)).double().to(DEVICE)
    X = t64(10, 6)
    with torch.inference_mode():
        autojac.batch_jacobian(net, X)
    with torch.no_grad():
        net[0].weight.add_(0.01)
    with torch.inference_mode():
        got = autojac.batch_jacobian(net, X)
    torch.testing.assert_close(got, per_sample(net, X))


def test_one_sample_has_nothing_to_confirm():
    """B = 1 cannot mix: a weight step adds no probe pass (it pushed a tight budget over)."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().to(DEVICE)
    X = t64(1, 6)
    autojac.batch_jacobian(net, X)
    with torch.no_grad():
        net[0].weight.add_(0.01)
    got = autojac.batch_jacobian(net, X)
    assert sum(autojac.last_report().chunk_sizes) == 4
    torch.testing.assert_close(got, per_sample(net, X))


def test_a_random_function_and_one_that_counts_its_calls_are_confirmed_as_they_ran():
    """The confirmation evaluates `f` again: it replays the RNG the Jacobian's evaluation started from
    (dropout draws the same mask) and puts module buffers back, so an independent function that draws random
    numbers or writes a buffer is not refused; the counter advances once per call, as for one evaluation."""
    def reference(f, X, seed):
        torch.manual_seed(seed)
        return torch.autograd.functional.jacobian(lambda Z: f(Z).sum(0), X).movedim(1, 0)

    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 3)).double().to(DEVICE)
    X = t64(10, 6)
    for step in range(3):
        torch.manual_seed(100 + step)
        got = autojac.batch_jacobian(net, X)
        torch.testing.assert_close(got, reference(net, X, 100 + step))
        with torch.no_grad():
            net[0].weight.add_(0.01)

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3).double()
            self.register_buffer("n", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.n += 1
            return torch.tanh(self.lin(x)) * (1 + 0.1 * self.n)

    m = Counting().to(DEVICE)
    for step in range(3):
        before = m.n.clone()
        got = autojac.batch_jacobian(m, X)
        assert float(m.n) == float(before) + 1
        with torch.no_grad():
            m.n.copy_(before)  # the reference's one evaluation starts where the call's did
        torch.testing.assert_close(got, reference(m, X, 0))


def _wide_layer():
    W1, W2 = t64(4, 16384, seed=6) / 2, t64(16384, 4, seed=7) / 128  # one pass: 8 MiB a 16384-wide activation
    return lambda x: torch.tanh(x @ W1) @ W2


SPLIT_BUDGET = "12MiB"  # the 8 MiB workspace reserve and 4 MiB: a pass over 8 samples fits, over 64 not


def test_batch_jacobian_splits_the_batch_when_one_pass_does_not_fit():
    X = t64(64, 4)
    wide = _wide_layer()
    with pytest.raises(autojac.MemoryBudgetError):  # the whole batch at once does not fit
        autojac.jacobian(lambda x: wide(x).sum(0), X, memory_budget=SPLIT_BUDGET)
    got = autojac.batch_jacobian(wide, X, memory_budget=SPLIT_BUDGET)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.jacrev(wide))(X))


def test_a_batch_that_must_be_split_is_refused_for_an_f_that_reads_its_batch_size():
    """NOTE: [A batch split in parts]: the halves' blocks of `f / x.shape[0]` came back 2x to 64x too large, and an
    `f` holding per-sample targets of the whole batch's size failed with its own shape error."""
    X = t64(64, 4)
    wide, budget = _wide_layer(), SPLIT_BUDGET
    with pytest.raises(autojac.UnsupportedFunctionError, match="reads the batch size"):
        autojac.batch_jacobian(lambda x: wide(x) / x.shape[0], X, memory_budget=budget)
    targets = t64(64, 4, seed=5)
    with pytest.raises(autojac.UnsupportedFunctionError, match="failed on a batch of 1"):
        autojac.batch_jacobian(lambda x: (wide(x) - targets) ** 2, X, memory_budget=budget)


def test_batch_jacobian_bad_input():
    with pytest.raises(autojac.InputError, match="same leading batch dimension"):
        autojac.batch_jacobian(lambda a, b: a + b.sum(), (t64(3, 2), t64(4, 2)))
    with pytest.raises(autojac.InputTypeError, match="leading batch dimension 3"):
        autojac.batch_jacobian(lambda a: a.sum(), t64(3, 2))
    # torch's own "only Tensors of floating point dtype can require gradients" came out of the first evaluation
    with pytest.raises(autojac.InputTypeError, match="^batch_jacobian: input 0 must be a real floating-point"):
        autojac.batch_jacobian(lambda a: a * 2, torch.arange(6, device=DEVICE).view(3, 2))
    with pytest.raises(autojac.InputTypeError, match="torch.view_as_real"):
        autojac.batch_jacobian(lambda a: a * 2, torch.randn(3, 2, dtype=torch.complex128, device=DEVICE))
    with pytest.raises(autojac.InputTypeError, match="^batch_jacobian: output 1 of `f` must be a real floating-point"):
        autojac.batch_jacobian(lambda a: (a.sin(), (a > 0).long()), t64(3, 2))


def test_errors_name_the_function_the_user_called():
    # hessian and batch_jacobian compute through jacobian; their errors used to begin "jacobian:" and point
    # at `help(autojac.jacobian)` and at plans of the wrong kind.
    x, X = t64(4), t64(3, 4, seed=1)
    with pytest.raises(autojac.InputError, match=r"^hessian: `chunk_size` must be a positive int"):
        autojac.hessian(energy, x, chunk_size=0)
    with pytest.raises(autojac.InputTypeError, match=r"^hessian: .*`vectorized`.*help\(autojac\.hessian\)"):
        autojac.hessian(energy, x, vectorized=True)
    with pytest.raises(autojac.MemoryBudgetError, match=r"^hessian: .* but the Hessian alone \(4 x 4\)"):
        autojac.hessian(energy, x, memory_budget=16)
    with pytest.raises(autojac.StrictError, match=r"^hessian: with strict=True"):
        autojac.hessian(lambda t: 3 * t[0] + t[1], x, strict=True)  # a constant gradient
    with pytest.raises(autojac.InputError, match=r"^batch_jacobian: `chunk_size` must be a positive int"):
        autojac.batch_jacobian(torch.sin, X, chunk_size=-1)
    with pytest.raises(autojac.MemoryBudgetError, match=r"^batch_jacobian: .* but the per-sample Jacobians alone"):
        autojac.batch_jacobian(torch.sin, X, memory_budget=16)
    with pytest.raises(autojac.PlanMismatchError, match=r'^batch_jacobian: .*kind="batch_jacobian"'):
        autojac.batch_jacobian(torch.sin, X, plan=autojac.plan(torch.sin, x))


def test_methods_failing_for_one_reason_are_named_together():
    with pytest.raises(autojac.UnsupportedFunctionError) as info:
        autojac.jacobian(lambda t: t - t.mean(0), t64(5), vectorize="repeat")
    text = str(info.value)
    assert text.startswith("jacobian: none of the allowed methods could differentiate `f`: "
                           "reverse/repeat, forward/repeat, forward-trick/repeat: NotBatchAwareError")
    assert text.count("NotBatchAwareError") == 1
    assert "vectorize='vmap' or 'loop'" in text


def test_torch_func_transforms_over_hessian_and_batch_jacobian():
    x = t64(5)
    third = torch.func.jacrev(lambda t: autojac.hessian(energy, t))(x)
    torch.testing.assert_close(third, torch.func.jacrev(torch.func.hessian(energy))(x))
    X = t64(3, 5, seed=1)
    torch.testing.assert_close(torch.func.vmap(lambda t: autojac.hessian(energy, t))(X),
                               torch.func.vmap(torch.func.hessian(energy))(X))
    torch.testing.assert_close(torch.func.grad(lambda t: autojac.hessian(energy, t).sum())(x),
                               torch.func.grad(lambda t: torch.func.hessian(energy)(t).sum())(x))
    with pytest.raises(autojac.UnsupportedFunctionError, match="cannot run inside a torch.func transform"):
        torch.func.jacrev(lambda Xb: autojac.batch_jacobian(MLP, Xb))(t64(4, 6))


def test_plans_of_hessians_and_batch_jacobians_are_the_ones_they_run():
    x = t64(6)
    p = autojac.plan(energy, x, kind="hessian")
    torch.testing.assert_close(autojac.hessian(energy, x, plan=p), torch.autograd.functional.hessian(energy, x))
    assert autojac.last_report().method == p.name
    X = t64(10, 6)
    p = autojac.plan(MLP, X, kind="batch_jacobian")
    assert (p.problem.n_in, p.problem.n_out) == (60, 4)  # the sum trick: 4 passes for the whole batch
    torch.testing.assert_close(autojac.batch_jacobian(MLP, X, plan=p), per_sample(MLP, X))
    with pytest.raises(autojac.InputError, match="`kind` must be"):
        autojac.plan(energy, x, kind="jvp")


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("f, X", [(MLP, t64(10, 6)), (WIDE, t64(7, 3))], ids=["fewer_outputs", "more_outputs"])
def test_a_batch_plan_in_any_mode_runs_as_planned(f, X, mode):
    """A plan made with a mode runs the function it was made for (the sum over the batch, or the broadcast),
    not the one the features pick by default (a reverse plan of WIDE was refused as made for other inputs)."""
    p = autojac.plan(f, X, kind="batch_jacobian", mode=mode)
    torch.testing.assert_close(autojac.batch_jacobian(f, X, plan=p), per_sample(f, X))
    assert autojac.last_report().method == p.name


def test_a_batch_plan_runs_the_function_it_was_made_for_whatever_its_method():
    """A plan made with mode="auto" for the sum over the batch may hold a forward method (a square `f`: both
    modes take as many passes): it still runs on the sum, the function its inputs say it was made for."""
    import dataclasses

    X = t64(1, 6)
    f = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).double().to(DEVICE)
    p = autojac.plan(f, X, kind="batch_jacobian")
    assert tuple(p.signature.shapes) == ((1, 6),)  # the sum over the batch
    forward = dataclasses.replace(p, mode="forward", vectorize="vmap", engine="")
    torch.testing.assert_close(autojac.batch_jacobian(f, X, plan=forward), per_sample(f, X))
    assert autojac.last_report().method == "forward/vmap"


def test_batch_jacobian_checks_independence_once_per_function():
    calls = []

    def f(X):
        calls.append(1)
        return MLP(X)

    X = t64(12, 6)
    autojac.batch_jacobian(f, X)
    calls.clear()
    reported = 0
    for _ in range(5):
        autojac.batch_jacobian(f, X)
        reported += autojac.last_report().evaluations
    assert len(calls) == reported  # no evaluation besides the Jacobian's own


def test_a_function_that_mixes_samples_only_for_some_inputs_is_checked_each_call_with_cache_false():
    """relu of a batch sum: no mixing while the sum is under 3, mixing above. The verdict is kept for the
    function, not the inputs' values; cache=False checks every call."""
    f = lambda X: torch.tanh(X) + torch.relu(X.sum(0, keepdim=True) - 3)  # noqa: E731
    small = t64(4, 3) * 0.1
    large = small.abs() + 1.0
    torch.testing.assert_close(autojac.batch_jacobian(f, small, cache=False), per_sample(f, small))
    with pytest.raises(autojac.UnsupportedFunctionError, match="mixes samples"):
        autojac.batch_jacobian(f, large, cache=False)


@pytest.mark.parametrize("dtype, outlier", [(torch.float32, 1e4), (torch.float64, 1e9)])
def test_one_huge_sample_does_not_hide_the_others_mixing(dtype, outlier):
    """The independence check's tolerance was the batch's largest entry times sqrt(eps): one sample 1e4 (1e9)
    times larger let `0.5 x**2 + 0.3 x.sum(0)` pass, and its verdict was kept for every batch after it."""
    f = lambda X: 0.5 * X ** 2 + 0.3 * X.sum(0)  # noqa: E731
    X = torch.randn(4, 3, dtype=dtype, device=DEVICE)
    X[0] *= outlier
    with pytest.raises(autojac.UnsupportedFunctionError):
        autojac.batch_jacobian(f, X, cache=False)


def _coupled_energy(Y):
    return (Y.sum(0) ** 2).sum() + (Y ** 3).sum()


def _own_energy(Y):
    return (Y ** 3).sum() + (Y.sin() * Y).sum()


def test_a_jacobian_taken_inside_f_is_seen_by_the_independence_check():
    """f = the gradient field of an energy, by autojac itself: the check ran `f` outside an autojac evaluation,
    so the inner Jacobian came back detached, nothing required grad, and coupled samples were answered."""
    X = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(autojac.UnsupportedFunctionError):
        autojac.batch_jacobian(lambda X: autojac.jacobian(_coupled_energy, X), X, cache=False)
    field = lambda X: autojac.jacobian(_own_energy, X)  # noqa: E731 - independent samples: answered
    want = torch.func.vmap(torch.func.hessian(lambda x: _own_energy(x[None])))(X)
    torch.testing.assert_close(autojac.batch_jacobian(field, X), want)


def test_hessian_of_an_f_that_writes_what_it_captures_says_what_to_do():
    """torch.func.grad refuses an in-place write into a captured tensor: an autojac error with a way out (the
    Jacobian of an autograd gradient, which it names), not torch's RuntimeError from inside."""
    step = torch.zeros((), dtype=torch.float64, device=DEVICE)

    def f(x):
        step.add_(1)
        return (x ** 3).sum() * 2.0

    x = t64(5)
    with pytest.raises(autojac.UnsupportedFunctionError, match="writes in place into a tensor it captures"):
        autojac.hessian(f, x)
    way_out = autojac.jacobian(lambda x: torch.autograd.grad(f(x), x, create_graph=True)[0], x)
    torch.testing.assert_close(way_out, torch.diag(12.0 * x))


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _CubeOnce(_Cube):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


def test_a_hessian_through_a_once_differentiable_backward_is_refused_not_wrong():
    # torch computes such a backward without a graph: the Hessian lost its terms (off by 60 on entries of 50,
    # "verified" against a VJP on the same graph). NOTE: [Second derivatives through @once_differentiable]
    W = t64(4, 4, seed=5)
    x = t64(4)
    right = autojac.hessian(lambda t: (_Cube.apply(t @ W) * t).sum(), x)
    torch.testing.assert_close(right, torch.func.hessian(lambda t: ((t @ W) ** 3 * t).sum())(x))
    for _ in range(2):  # a new closure each call: refused every time, not only when first walked
        with pytest.raises(autojac.UnsupportedFunctionError, match="_CubeOnce.*once_differentiable"):
            autojac.hessian(lambda t: (_CubeOnce.apply(t @ W) * t).sum(), x)


def test_a_jacobian_to_differentiate_through_a_once_differentiable_backward_is_refused():
    W = t64(4, 4, seed=5)
    x = t64(4)
    once = lambda t: _CubeOnce.apply(t @ W) * t  # noqa: E731
    plain = autojac.jacobian(once, x)  # first derivatives are right
    torch.testing.assert_close(plain, torch.func.jacrev(lambda t: ((t @ W) ** 3) * t)(x))
    with pytest.raises(autojac.UnsupportedFunctionError, match="create_graph=True.*_CubeOnce"):
        autojac.jacobian(once, x, create_graph=True)
    with pytest.raises(autojac.UnsupportedFunctionError, match="_CubeOnce"):  # nested: the inner one builds its graph
        autojac.jacobian(lambda y: autojac.jacobian(once, y).sum(0), x)


def test_a_hessian_through_a_non_reentrant_checkpoint_says_which_route_works():
    from torch.utils.checkpoint import checkpoint
    W = t64(4, 4, seed=5)
    body = lambda t: torch.tanh(t @ W) * t  # noqa: E731
    f = lambda t: checkpoint(body, t, use_reentrant=False).sum()  # noqa: E731
    x = t64(4)
    with pytest.raises(autojac.UnsupportedFunctionError, match="saved-tensor hooks") as info:
        autojac.hessian(f, x)
    assert "torch.autograd.grad(f(x), x, create_graph=True)" in str(info.value)
    # ... and that route is right
    got = autojac.jacobian(lambda t: torch.autograd.grad(f(t), t, create_graph=True)[0], x)
    torch.testing.assert_close(got, torch.func.hessian(lambda t: body(t).sum())(x))


def test_a_once_differentiable_backward_is_seen_under_other_decorators_and_only_on_an_input_s_path():
    import functools

    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            return fn(*args)
        return wrapper

    class CubeOnceLogged(_Cube):
        @staticmethod
        @logged
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    W, x = t64(4, 4, seed=5), t64(4)
    with pytest.raises(autojac.UnsupportedFunctionError, match="CubeOnceLogged"):
        autojac.hessian(lambda t: (CubeOnceLogged.apply(t @ W) * t).sum(), x)
    # On a parameter's path only: differentiated once, right, and not refused.
    P = torch.nn.Parameter(t64(4, seed=6))
    f = lambda t: _CubeOnce.apply(P) * t  # noqa: E731
    y = x.clone().requires_grad_()
    J = autojac.jacobian(f, y, create_graph=True)
    torch.testing.assert_close(J, torch.diag(P.detach() ** 3))
    (grad,) = torch.autograd.grad(J.sum(), P)
    torch.testing.assert_close(grad, 3 * P.detach() ** 2)


def test_a_plan_made_without_create_graph_is_refused_for_a_call_that_asks_for_it():
    x = t64(4)
    p = autojac.plan(energy, x)
    with pytest.raises(autojac.PlanMismatchError, match="create_graph=True"):
        autojac.jacobian(energy, x, plan=p, create_graph=True)


class _Times(torch.autograd.Function):
    """a * b, twice differentiable through its own backward (which saves the incoming gradient)."""

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, g * a


class _CubeThroughTimes(_Cube):
    """The usual way to a twice differentiable custom op: its backward applies another Function."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Times.apply(3 * x ** 2, g)


def test_a_jacobian_to_differentiate_is_right_through_custom_functions_in_a_backward():
    # torch.autograd's batched backward (is_grads_batched, torch.autograd.functional.jacobian's vectorize=True)
    # gave this Jacobian a graph whose derivatives were 7.4 off; the check only sees the Jacobian's values.
    W, x = t64(4, 4, seed=5), t64(4)
    f = lambda t: _CubeThroughTimes.apply(t @ W) * t  # noqa: E731
    y = x.clone().requires_grad_()
    want = torch.autograd.grad(torch.func.jacrev(lambda t: (t @ W) ** 3 * t)(y).diagonal().sum(), y)[0]
    for _ in range(12):  # the first call and its plan's later calls (trials included)
        xx = x.clone().requires_grad_()
        J = autojac.jacobian(f, xx, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad(J.diagonal().sum(), xx)[0], want)
        assert autojac.last_report().method not in ("reverse/vmap [autograd]",) and \
            not autojac.last_report().method.startswith("forward-trick")
    with pytest.raises(autojac.UnsupportedFunctionError, match="create_graph=True and `f` uses custom"):
        autojac.jacobian(f, x.clone().requires_grad_(), create_graph=True, mode="forward-trick")


class _CubeOnceVjp(_Cube):
    """`vjp`, torch's alias of `backward`, written once-differentiable."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def vjp(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g

    backward = torch.autograd.Function.backward


def test_once_differentiable_is_seen_on_vjp_and_through_a_nested_plan():
    W, x = t64(4, 4, seed=5), t64(4)
    with pytest.raises(autojac.UnsupportedFunctionError, match="_CubeOnceVjp"):
        autojac.hessian(lambda t: (_CubeOnceVjp.apply(t @ W) * t).sum(), x)
    inner = lambda t: _CubeOnce.apply(t @ W) * t  # noqa: E731
    p = autojac.plan(inner, x)  # made without create_graph, which a Jacobian inside `f` turns on
    with pytest.raises(autojac.PlanMismatchError, match="create_graph=True"):
        autojac.jacobian(lambda t: autojac.jacobian(inner, t, plan=p).sum(0), x, mode="reverse", vectorize="loop")


def test_walking_a_deep_graph_does_not_break_its_deletion():
    # Walking a node gives it a Python wrapper, which takes it out of torch's iterative deletion: a 50,000-op
    # chain walked whole segfaulted when freed (NOTE: [Second derivatives through @once_differentiable]).
    import subprocess
    import sys
    code = ("import torch, autojac\n"
            "def deep(t):\n"
            "    for _ in range(50000):\n"
            "        t = t * 1.0001\n"
            "    return (t ** 2).sum()\n"
            "H = autojac.hessian(deep, torch.ones(2, dtype=torch.float64), mode='reverse', vectorize='loop')\n"
            "print(float(H[0, 0]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert abs(float(done.stdout.strip()) - 2 * 1.0001 ** 100000) < 1e-6


def test_a_custom_function_a_later_call_reaches_fails_the_methods_that_would_build_a_wrong_graph():
    # The first call saw no custom Function (its plan keeps torch.autograd's batched backward); a branch on values
    # reaches one later: that method fails on the call's own graph, and the next one answers (derivatives 36 off
    # before).
    W, x = t64(4, 4, seed=5), t64(4)
    branch = {"custom": False}

    def f(t):
        u = t @ W
        return (_CubeThroughTimes.apply(u) if branch["custom"] else u ** 3) * t

    want_f = lambda t: (t @ W) ** 3 * t  # noqa: E731
    y = x.clone().requires_grad_()
    want = torch.autograd.grad(torch.func.jacrev(want_f)(y).diagonal().sum(), y)[0]
    for call in range(6):
        branch["custom"] = call >= 3
        xx = x.clone().requires_grad_()
        J = autojac.jacobian(f, xx, create_graph=True, mode="reverse")
        torch.testing.assert_close(torch.autograd.grad(J.diagonal().sum(), xx)[0], want)


def test_a_once_differentiable_function_a_later_call_reaches_is_refused_under_create_graph():
    W, x = t64(4, 4, seed=5), t64(4)
    branch = {"once": False}

    def f(t):
        u = t @ W
        return (_CubeOnce.apply(u) if branch["once"] else u ** 3) * t

    for call in range(3):
        autojac.jacobian(f, x.clone().requires_grad_(), create_graph=True, mode="reverse", vectorize="loop")
    branch["once"] = True
    with pytest.raises(autojac.UnsupportedFunctionError, match="_CubeOnce"):
        autojac.jacobian(f, x.clone().requires_grad_(), create_graph=True, mode="reverse", vectorize="loop")
