"""Measure which backward nodes torch.autograd's vmap runs as a loop, and write autojac's table of them.

`torch.autograd.grad(..., is_grads_batched=True)` batches with torch's legacy vmap, which falls back to a
Python-free but per-vector loop for every op of a backward formula it has no batching rule for (NOTE: [The
autograd engine's vmap loops] in autojac/_measure/engine_loops.py). A first call reads a function's autograd
graph (the evaluation it starts from) and adds up these counts per node to price that engine against
torch.func's before running anything.

For each op below: one evaluation on inputs that require grad, one batched backward of 3 vectors under
`LoopProbe`, and the fallbacks it counted are credited to the op's own node (the graph's only node that is not
a leaf's AccumulateGrad or already in the table). Run it on a new torch:

    python benchmarks/fallback_table.py            # prints the table
    python benchmarks/fallback_table.py --write    # rewrites autojac/_measure/fallback_table.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

from autojac._measure.engine_loops import LoopProbe

A = lambda: torch.randn(4, 6, dtype=torch.float64)  # noqa: E731
P = lambda: torch.rand(4, 6, dtype=torch.float64) + 0.5  # noqa: E731

# (name, inputs, function); every input requires grad.
OPS = [
    ("add", (A, A), lambda a, b: a + b), ("sub", (A, A), lambda a, b: a - b), ("mul", (A, A), lambda a, b: a * b),
    ("div", (A, P), lambda a, b: a / b), ("rsub", (A,), lambda a: 1 - a), ("neg", (A,), torch.neg),
    ("pow", (P,), lambda a: a ** 3), ("pow_tensor", (P, A), lambda a, b: a ** b), ("sqrt", (P,), torch.sqrt),
    ("rsqrt", (P,), torch.rsqrt), ("exp", (A,), torch.exp), ("log", (P,), torch.log), ("log1p", (P,), torch.log1p),
    ("expm1", (A,), torch.expm1), ("sin", (A,), torch.sin), ("cos", (A,), torch.cos), ("tan", (A,), torch.tan),
    ("tanh", (A,), torch.tanh), ("sigmoid", (A,), torch.sigmoid), ("atan", (A,), torch.atan),
    ("asin", (lambda: torch.rand(4, 6, dtype=torch.float64) * 0.9,), torch.asin), ("sinh", (A,), torch.sinh),
    ("cosh", (A,), torch.cosh), ("abs", (A,), torch.abs), ("reciprocal", (P,), torch.reciprocal),
    ("relu", (A,), torch.relu), ("gelu", (A,), F.gelu), ("silu", (A,), F.silu), ("elu", (A,), F.elu),
    ("leaky_relu", (A,), F.leaky_relu), ("softplus", (A,), F.softplus), ("hardtanh", (A,), F.hardtanh),
    ("mish", (A,), F.mish), ("clamp", (A,), lambda a: a.clamp(-0.5, 0.5)), ("where", (A, A), lambda a, b: torch.where(a > 0, a, b)),
    ("maximum", (A, A), torch.maximum), ("minimum", (A, A), torch.minimum), ("atan2", (A, A), torch.atan2),
    ("sum", (A,), lambda a: a.sum(-1)), ("mean", (A,), lambda a: a.mean(-1)), ("prod", (P,), lambda a: a.prod(-1)),
    ("amax", (A,), lambda a: a.amax(-1)), ("max_dim", (A,), lambda a: a.max(-1).values), ("norm", (A,), lambda a: a.norm(dim=-1)),
    ("logsumexp", (A,), lambda a: a.logsumexp(-1)), ("softmax", (A,), lambda a: a.softmax(-1)),
    ("log_softmax", (A,), lambda a: a.log_softmax(-1)), ("var", (A,), lambda a: a.var(-1)),
    ("cumsum", (A,), lambda a: a.cumsum(-1)), ("cumprod", (P,), lambda a: a.cumprod(-1)),
    ("mm", (A, lambda: torch.randn(6, 3, dtype=torch.float64)), torch.mm),
    ("mv", (A, lambda: torch.randn(6, dtype=torch.float64)), torch.mv),
    ("addmm", (lambda: torch.randn(3, dtype=torch.float64), A, lambda: torch.randn(3, 6, dtype=torch.float64)),
     lambda b, x, w: F.linear(x, w, b)),
    ("matmul_vector", (lambda: torch.randn(6, dtype=torch.float64), A), lambda x, w: x @ w.T),
    ("bmm", (lambda: torch.randn(2, 4, 6, dtype=torch.float64), lambda: torch.randn(2, 6, 3, dtype=torch.float64)), torch.bmm),
    ("t", (A,), lambda a: a.t()), ("transpose", (A,), lambda a: a.transpose(0, 1)), ("permute", (A,), lambda a: a.permute(1, 0)),
    ("view", (A,), lambda a: a.view(24)), ("reshape", (A,), lambda a: a.t().reshape(24)), ("expand", (lambda: torch.randn(1, 6, dtype=torch.float64),), lambda a: a.expand(4, 6)),
    ("unsqueeze", (A,), lambda a: a.unsqueeze(0)), ("squeeze", (lambda: torch.randn(4, 1, dtype=torch.float64),), lambda a: a.squeeze(1)),
    ("select", (A,), lambda a: a[1]), ("slice", (A,), lambda a: a[1:3]), ("index", (A,), lambda a: a[torch.tensor([0, 2, 2])]),
    ("index_select", (A,), lambda a: a.index_select(1, torch.tensor([0, 2]))), ("gather", (A,), lambda a: a.gather(1, torch.tensor([[0], [1], [2], [3]]))),
    ("cat", (A, A), lambda a, b: torch.cat([a, b])), ("stack", (A, A), lambda a, b: torch.stack([a, b])),
    ("split", (A,), lambda a: a.split(2)[0]), ("chunk", (A,), lambda a: a.chunk(3, 1)[1]),
    ("unbind", (A,), lambda a: a.unbind(0)[1]), ("roll", (A,), lambda a: a.roll(1, 1)), ("flip", (A,), lambda a: a.flip(1)),
    ("repeat", (A,), lambda a: a.repeat(2, 1)), ("pad", (A,), lambda a: F.pad(a, (1, 1))), ("diagonal", (A,), lambda a: a.diagonal()),
    ("tril", (A,), lambda a: a.tril()), ("masked_fill", (A,), lambda a: a.masked_fill(a > 0, 0.0)),
    ("clone", (A,), torch.clone), ("to_float", (A,), lambda a: a.float()),
    ("layer_norm", (A,), lambda a: F.layer_norm(a, (6,))),
    ("group_norm", (lambda: torch.randn(2, 4, 6, dtype=torch.float64),), lambda a: F.group_norm(a, 2)),
    ("batch_norm_eval", (lambda: torch.randn(3, 4, 5, dtype=torch.float64),),
     lambda a: F.batch_norm(a, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), training=False)),
    ("conv1d", (lambda: torch.randn(1, 2, 8, dtype=torch.float64), lambda: torch.randn(3, 2, 3, dtype=torch.float64)), F.conv1d),
    ("conv2d", (lambda: torch.randn(1, 2, 6, 6, dtype=torch.float64), lambda: torch.randn(3, 2, 3, 3, dtype=torch.float64)), F.conv2d),
    ("max_pool2d", (lambda: torch.randn(1, 2, 6, 6, dtype=torch.float64),), lambda a: F.max_pool2d(a, 2)),
    ("avg_pool2d", (lambda: torch.randn(1, 2, 6, 6, dtype=torch.float64),), lambda a: F.avg_pool2d(a, 2)),
    ("sdpa", (lambda: torch.randn(1, 2, 4, 8), lambda: torch.randn(1, 2, 4, 8), lambda: torch.randn(1, 2, 4, 8)),
     F.scaled_dot_product_attention),
    ("embedding", (lambda: torch.randn(10, 4, dtype=torch.float64),), lambda w: F.embedding(torch.tensor([1, 3, 3]), w)),
    ("mse", (A, A), lambda a, b: F.mse_loss(a, b, reduction="none")),
    ("cross_entropy", (A,), lambda a: F.cross_entropy(a, torch.tensor([0, 1, 2, 3]), reduction="none")),
    ("einsum", (A, lambda: torch.randn(6, 3, dtype=torch.float64)), lambda a, b: torch.einsum("ij,jk->ik", a, b)),
    ("linalg_solve", (lambda: torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64), A), torch.linalg.solve),
]


def _nodes(ys) -> list:
    seen, stack, out = set(), [y.grad_fn for y in ys if y.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return out


def measure() -> tuple[dict[str, int], list[str]]:
    table: dict[str, int] = {}
    notes = []
    torch.manual_seed(0)
    for name, makers, fn in OPS:
        xs = [m().requires_grad_() for m in makers]
        y = fn(*xs)
        names = sorted({type(n).__name__ for n in _nodes([y])} - {"AccumulateGrad"})
        k = 3
        basis = torch.randn(k, *y.shape, dtype=y.dtype)
        with LoopProbe() as probe:
            torch.autograd.grad([y], xs, [basis], is_grads_batched=True, allow_unused=True)
        if not probe.active:
            sys.exit("the loop probe could not watch (another probe open, or the debug flag already on)")
        new = [n for n in names if n not in table]
        known = sum(table[n] for n in names if n in table)
        if len(new) == 1 or (new and probe.loops == known):  # (several new nodes and nothing left: none loops)
            for n in new:
                table[n] = max(probe.loops - known, 0)
        elif new:
            notes.append(f"{name}: nodes {new} not told apart ({probe.loops} fallbacks)")
        if probe.loops:
            notes.append(f"{name}: {probe.loops} fallback(s) {probe.ops} in {names}")
    return table, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite autojac/_measure/fallback_table.py")
    args = parser.parse_args()
    table, notes = measure()
    for note in notes:
        print(note)
    body = "".join(f"    {name!r}: {count},\n" for name, count in sorted(table.items()))
    text = (f'"""Fallbacks of torch.autograd\'s vmap per backward node, as measured by benchmarks/fallback_table.py on torch '
            f'{torch.__version__.split("+")[0]}.\n\nGenerated: do not edit; run `python benchmarks/fallback_table.py --write` '
            'on a new torch. A node missing here counts as none.\n"""\n\n'
            f'TORCH = {torch.__version__.split("+")[0]!r}\n\nFALLBACKS: dict[str, int] = {{\n{body}}}\n')
    if args.write:
        path = pathlib.Path(__file__).resolve().parent.parent / "autojac" / "_measure" / "fallback_table.py"
        path.write_text(text)
        print(f"wrote {path} ({len(table)} nodes, {sum(1 for v in table.values() if v)} with fallbacks)")
    else:
        print(text)


if __name__ == "__main__":
    main()
