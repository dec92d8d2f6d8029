"""The nine methods (three modes x three vectorizations), and the registry that names them."""

from __future__ import annotations

from .base import Method
from .forward import ForwardLoop, ForwardRepeat, ForwardVmap
from .forward_trick import ForwardTrickLoop, ForwardTrickRepeat, ForwardTrickVmap
from .reverse import ReverseLoop, ReverseRepeat, ReverseVmap

METHODS: dict[tuple[str, str, str], Method] = {
    (m.mode, m.vectorize, m.engine): m
    for m in (
        ReverseVmap(), ReverseVmap("autograd"), ReverseRepeat(), ReverseLoop(),
        ForwardVmap(), ForwardRepeat(), ForwardLoop(),
        ForwardTrickVmap(), ForwardTrickRepeat(), ForwardTrickLoop(),
    )
}


def method(mode: str, vectorize: str, engine: str = "") -> Method:
    return METHODS[(mode, vectorize, engine)]


def engines(mode: str, vectorize: str) -> list[Method]:
    """Every engine of one (mode, vectorize), the default first."""
    return [m for key, m in METHODS.items() if key[:2] == (mode, vectorize)]


