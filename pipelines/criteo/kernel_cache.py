"""``cached_njit``: ``numba.njit(cache=True)`` that works where Numba finds nowhere to cache.

Numba keeps a compiled kernel next to its module (``__pycache__``), else in the user's cache
directory (``~/.cache/numba``), or in ``NUMBA_CACHE_DIR`` when that is set. A package installed
read-only, run by a user whose home is not writable (a container with an arbitrary UID), has
none of them, and ``njit(cache=True)`` then fails at import with "no locator available": every
Spark task that parses or hashes would fail. Here the kernel is cached in a per-user folder
of the temporary directory instead (with a warning), or, where even that cannot be written,
compiled in each process that loads it (~1.5 s, once per Spark worker daemon).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import numba

log = logging.getLogger(__name__)


def _fallback_dir() -> str | None:
    path = os.path.join(tempfile.gettempdir(), f"bigopt-numba-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    # ours alone: compiled code loaded from a folder another user can write would be theirs
    st = os.stat(path)
    return path if st.st_uid == os.getuid() and not st.st_mode & 0o022 else None


def _cached(func: Callable, options: dict):
    """``numba.njit(cache=True, **options)(func)``, or None where Numba finds no place to cache
    it (it looks when the decorator runs)."""
    try:
        return numba.njit(cache=True, **options)(func)
    except RuntimeError as e:
        if "no locator available" not in str(e):
            raise
        return None


def cached_njit(**options) -> Callable[[Callable], Callable]:
    """``numba.njit(cache=True, **options)`` as a decorator, with the fallbacks above."""

    def decorate(func: Callable) -> Callable:
        if (jit := _cached(func, options)) is not None:
            return jit
        path = None if numba.config.CACHE_DIR else _fallback_dir()
        if path is not None:
            log.warning("Numba cannot cache %s next to its module or in the user's cache directory; "
                        "caching it in %s (set NUMBA_CACHE_DIR to choose)", func.__qualname__, path)
            numba.config.CACHE_DIR = path  # read by Numba's locator whenever it looks for one
            if (jit := _cached(func, options)) is not None:
                return jit
        log.warning("Numba has nowhere to cache %s: it is compiled in every process that loads it "
                    "(set NUMBA_CACHE_DIR to a writable folder)", func.__qualname__)
        return numba.njit(**options)(func)

    return decorate
