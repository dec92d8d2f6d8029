"""Running one method over all basis chunks, halving the chunk when memory runs out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .assemble import Assembler
from .basis import balanced_chunks, basis_chunk
from .._core.problem import Problem
from .._methods.base import Method, grad_mode

logger = logging.getLogger("autojac")

def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text
    )


def run_method(
    method: Method,
    f: Callable,
    xs: Sequence[torch.Tensor],
    problem: Problem,
    chunk_size: int,
    create_graph: bool,
    events: list[str],
    progress: Callable[[int], None] | None = None,
    check: Callable[[Method, object, object], None] | None = None,
) -> object:
    """Compute the whole Jacobian with `method`, `chunk_size` basis vectors at a time.

    If a chunk runs out of memory, the rest of the basis is re-chunked at half
    the size (down to 1) and the chunks already done are kept. Each halving is
    appended to `events`. `check(method, state, result)` runs on the result
    before it is returned, with the method's state still alive (see `_verify`).
    """
    with grad_mode(create_graph):  # once for the whole run: entering it costs microseconds
        return _run(method, f, xs, problem, chunk_size, create_graph, events, progress, check)


def _run(method, f, xs, problem, chunk_size, create_graph, events, progress, check):
    n = method.basis_size(problem)
    shapes, sizes, dtypes = method.basis_layout(problem)
    state = method.prepare(f, xs, problem, create_graph)
    assembler = Assembler(problem, by_rows=method.by_rows)
    done = 0
    while done < n:
        offset = done
        for start, stop in balanced_chunks(n - offset, chunk_size):
            start, stop = start + offset, stop + offset
            try:
                basis = basis_chunk(start, stop, shapes, sizes, dtypes, problem.inputs.device)
                parts = method.chunk(state, basis)
                assembler.add(start, stop, parts)
                parts = None
            except Exception as exc:
                if not is_out_of_memory(exc) or stop - start == 1:
                    raise
                basis = parts = None  # drop this chunk's tensors before retrying
                _release_cached_memory(problem.inputs.device)
                chunk_size = max(1, (stop - start) // 2)
                events.append(f"{method.name}: out of memory at chunk size {stop - start}; retried at {chunk_size}")
                logger.debug(events[-1])
                break
            done = stop
            if progress is not None:
                progress(stop - start)
    result = assembler.result()
    if check is not None:
        check(method, state, result)
    return result


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
