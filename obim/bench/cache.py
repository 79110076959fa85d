"""Content-addressed caches shared by sweep jobs: saliency statistics, merged models and evaluations.

Each entry is named by a hash of everything that determines it (inputs' fingerprints, options, versions), filled
under a file lock (parallel jobs compute it once) and made visible by a rename, so an interrupted job leaves
nothing a later one mistakes for complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FINGERPRINT_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def user_cache_root() -> Path:
    """obim's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "obim"


def default_cache_dir() -> Path:
    return Path(os.environ["OBIM_CACHE"]) if os.environ.get("OBIM_CACHE") else user_cache_root() / "cache"


def digest(obj: Any, n: int = 16) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def model_fingerprint(path: str) -> str:
    """Identifies a model's weights without reading them: for a local directory, the content of its config and
    index files plus the name, size and mtime of each weight file; for a hub id, the id (pin a revision by path)."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    parts: list[Any] = [str(p.resolve())]
    for name in FINGERPRINT_FILES:
        f = p / name
        if f.is_file():
            parts.append([name, file_digest(f)])
    for f in sorted(p.iterdir()):
        if f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            parts.append([f.name, st.st_size, st.st_mtime_ns])
    return digest(parts)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold `path`.lock: one process fills a cache entry while the others wait, then find it filled."""
    from filelock import FileLock

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock"):
        yield


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    from obim.merging.staging import atomic_write_file

    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_file(Path(path), lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> Any | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
