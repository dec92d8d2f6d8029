"""The nine methods (three modes x three vectorizations), and the registry that names them."""

from __future__ import annotations

from .base import Method
from .forward import ForwardLoop, ForwardRepeat, ForwardVmap
from .forward_trick import ForwardTrickLoop, ForwardTrickRepeat, ForwardTrickVmap
from .reverse import ReverseLoop, ReverseRepeat, ReverseVmap

METHODS: dict[tuple[str, str, str], Method] = {
    (m.mode, m.vectorize, m.engine): m
    for m in (
        ReverseVmap("func"), ReverseVmap("autograd"), ReverseRepeat(), ReverseLoop(),
        ForwardVmap(), ForwardRepeat(), ForwardLoop(),
        ForwardTrickVmap("func"), ForwardTrickVmap("autograd"), ForwardTrickRepeat(), ForwardTrickLoop(),
    )
}


def method(mode: str, vectorize: str, engine: str | None = None) -> Method:
    """The method of that mode and vectorization; for vmap, `engine` "func" (default) or "autograd"."""
    if engine is None:
        engine = "func" if (vectorize == "vmap" and mode != "forward") else ""
    return METHODS[(mode, vectorize, engine)]


def engines(mode: str, vectorize: str) -> list[Method]:
    """Every engine of one (mode, vectorize), the default first."""
    return [m for key, m in METHODS.items() if key[:2] == (mode, vectorize)]


