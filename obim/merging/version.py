"""obim's version, read from the installed distribution's metadata: pyproject.toml is its single source."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

UNKNOWN = "0+unknown"  # a source checkout on sys.path that was never pip-installed has no metadata


@cache
def obim_version() -> str:
    try:
        return version("obim")
    except PackageNotFoundError:
        return UNKNOWN
