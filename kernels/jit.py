"""Numba's ``njit`` with the on-disk cache where there is a writable place for it."""

from __future__ import annotations

import types
from collections.abc import Callable

from numba import njit
from numba.core.registry import CPUDispatcher


def renamed(f: Callable, suffix: str) -> Callable:
    """A copy of function ``f`` named ``f.__name__ + suffix`` (so it gets its own on-disk cache entry)."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__doc__ = f.__doc__
    return g


def cached(suffix: str = "", **options: object) -> Callable[[Callable], CPUDispatcher]:
    """Decorator: ``njit(cache=True, **options)`` of the function (of a copy named ``name + suffix``
    when ``suffix`` is given), or ``njit(**options)`` where Numba finds no writable place for its
    cache (a read-only install and no writable user cache directory): slower first calls, same bits."""

    def compile_(f: Callable) -> CPUDispatcher:
        if suffix:
            f = renamed(f, suffix)
        try:
            return njit(cache=True, **options)(f)
        except RuntimeError as err:
            if "no locator available" not in str(err):
                raise
            return njit(**options)(f)

    return compile_
