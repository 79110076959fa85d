"""Validation text for saliency in a merge config: JSONL files of samples a model runs forward on (obim-merge,
obim-saliency). The sweep builds such sets from datasets in obim.bench.validation."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import number_in, require
from .errors import ObimError
from .safeio import open_regular


@dataclass(frozen=True)
class ValidationSpec:
    """How to compute a model's hdiag when none is given: `models[i].validation` in a merge config."""

    data: str
    size: int | None = None
    max_length: int = 512
    batch_size: int = 8
    text_field: str = "text"
    dtype: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ValidationSpec:
        if isinstance(d, str):
            d = {"data": d}
        if not isinstance(d, dict) or "data" not in d:
            raise ObimError(f"{where}: expected a mapping with at least `data: FILE.jsonl`")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ObimError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
        positive = number_in(1, float("inf"), integer=True)
        for key in ("size", "max_length", "batch_size"):
            if d.get(key) is not None or key != "size":
                require(f"{where}.{key}", d.get(key, getattr(cls, key)), positive)
        return cls(**d)


def read_jsonl(path: str | Path, what: str = "a JSON object") -> Iterator[tuple[int, Any]]:
    """(line number, record) of each non-blank line of a JSONL validation file; a bad line is a one-line error
    naming the file, the line and `what` it should be."""
    path = Path(path)
    with io.TextIOWrapper(open_regular(path, "validation file"), encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise ObimError(f"{path}:{lineno}: not {what}") from None
        except UnicodeDecodeError:
            raise ObimError(f"{path}: not UTF-8 text") from None


def read_texts(path: str | Path, size: int | None = None, field: str = "text") -> list[str]:
    """The first `size` samples (all when None) of a JSONL validation file's `field`."""
    path = Path(path)
    if size is not None and size < 1:
        raise ObimError(f"validation size must be at least 1, got {size}")
    what = f"a JSON object with a '{field}' field"
    texts: list[str] = []
    for lineno, rec in read_jsonl(path, what):
        try:
            text = rec[field]
        except (KeyError, TypeError):
            raise ObimError(f"{path}:{lineno}: not {what}") from None
        if not isinstance(text, str):
            raise ObimError(f"{path}:{lineno}: field '{field}' is not a string")
        texts.append(text)
        if size is not None and len(texts) >= size:
            break
    if not texts:
        raise ObimError(f"{path}: validation set is empty")
    return texts
