"""The one worker pool of the library: numpy's selections, sorts and generators run single-threaded and release
the GIL, so two workers (this machine's cores) overlap them; torch ops keep their own intra-op threads."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="obim")
