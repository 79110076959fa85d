"""Validation data for saliency: which samples a model runs forward on (JSONL files here; hub builders later)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ObimError


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
    def from_dict(cls, d: Any, where: str) -> "ValidationSpec":
        if isinstance(d, str):
            d = {"data": d}
        if not isinstance(d, dict) or "data" not in d:
            raise ObimError(f"{where}: expected a mapping with at least `data: FILE.jsonl`")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ObimError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
        return cls(**d)


def read_texts(path: str | Path, size: int | None = None, field: str = "text") -> list[str]:
    """The first `size` samples (all when None) of a JSONL validation file's `field`."""
    path = Path(path)
    if not path.is_file():
        raise ObimError(f"{path}: validation file not found")
    if size is not None and size < 1:
        raise ObimError(f"validation size must be at least 1, got {size}")
    texts: list[str] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ObimError(f"{path}:{lineno}: not a JSON object with a '{field}' field") from None
            if not isinstance(text, str):
                raise ObimError(f"{path}:{lineno}: field '{field}' is not a string")
            texts.append(text)
            if size is not None and len(texts) >= size:
                break
    if not texts:
        raise ObimError(f"{path}: validation set is empty")
    return texts
