"""The one worker pool of the library: numpy's selections, sorts and generators run single-threaded and release
the GIL, so two workers (this machine's cores) overlap them; torch ops keep their own intra-op threads."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_PREFIX = "obim-worker"


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix=_PREFIX)


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """list(map(fn, items)) on the pool; inline when called from a pool worker (nested use would deadlock)."""
    items = list(items)
    if len(items) < 2 or threading.current_thread().name.startswith(_PREFIX):
        return [fn(x) for x in items]
    return list(_pool().map(fn, items))
