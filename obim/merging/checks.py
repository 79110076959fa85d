"""Option checks shared by the merge config, the CLIs and the sweep plan: each returns an error text (or None),
and `require` turns one into a one-line ObimError naming the option. NaN fails every comparison, so every number
is tested finite first."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .errors import ObimError

Check = Callable[[Any], "str | None"]


def number_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Check:
    """A finite number (an integer when `integer`) in [lo, hi], an end excluded when open; lo/hi may be ±inf."""

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be {'an integer' if integer else 'a number'}, got {v!r}"
        if isinstance(v, float) and not math.isfinite(v):  # an int is finite (isfinite overflows on huge ones)
            return f"must be a finite number, got {v}"
        if integer and v != int(v):
            return f"must be an integer, got {v}"
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}"
        return None

    return check


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def require(where: str, value: Any, check: Check) -> Any:
    """`value` when it passes `check`, else a one-line error naming the option."""
    err = check(value)
    if err:
        raise ObimError(f"{where}: {err}")
    return value


def device_check(v: Any, present: bool = True) -> str | None:
    """cpu, mps, cuda or cuda:N; with `present`, also available on this machine (a dry run plans for others)."""
    if not isinstance(v, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
        return f"expected cpu, cuda, cuda:N or mps, got {v!r}"
    if not present or v == "cpu":
        return None
    import torch

    if v == "mps":
        return None if torch.backends.mps.is_available() else "mps: not available on this machine"
    if not torch.cuda.is_available():
        return f"{v}: CUDA is not available on this machine"
    n = torch.cuda.device_count()
    if ":" in v and int(v.split(":")[1]) >= n:
        return f"{v}: this machine has {n} CUDA device(s)"
    return None


def mapping(v: Any) -> str | None:
    return (
        None if v is None or isinstance(v, dict) else f"expected a mapping (key: value), got {type(v).__name__} {v!r}"
    )
