"""Merge configs (interfaces.md section 1): parsed, checked and resolved before any weight is read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import mapping, number_in, require
from .errors import ObimError
from .methods import Method, get_method
from .safeio import read_yaml_text
from .texts import ValidationSpec

TOP_KEYS = ("method", "base_model", "models", "parameters", "order", "seed", "dtype", "tokenizer_source", "shard_size")
STAT_KEYS = ("hdiag", "gram", "fisher")  # a model's statistics file, by kind (obim.merging.statistics.KINDS)
MODEL_KEYS = ("name", "path", "retention", *STAT_KEYS, "validation", "parameters")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass
class ModelSpec:
    name: str
    path: str
    params: dict[str, Any]
    statistics: dict[str, str] = field(default_factory=dict)  # kind -> its file (hdiag, gram, fisher)
    validation: ValidationSpec | None = None
    retention: float | None = None

    @property
    def hdiag(self) -> str | None:
        return self.statistics.get("hdiag")


@dataclass
class MergeConfig:
    method: Method
    base_model: str
    models: list[ModelSpec]
    order: str | list[str] = "rotation"
    seed: int = 0
    dtype: str | None = None
    tokenizer_source: str = "base"
    shard_size: int = DEFAULT_SHARD_SIZE
    parameters: dict[str, Any] = field(default_factory=dict)  # method-wide, defaults filled in

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def base_order(self) -> list[int]:
        if self.order == "rotation":
            return list(range(len(self.models)))
        return [self.names.index(n) for n in self.order]

    @property
    def tokenizer_path(self) -> str:
        """The model whose tokenizer the merged model gets: the base's, or the `tokenizer_source` model's."""
        if self.tokenizer_source == "base":
            return self.base_model
        return self.models[self.names.index(self.tokenizer_source)].path

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (what obim_merge.yaml records); loading it again gives the same merge."""
        models = []
        for m in self.models:
            d: dict[str, Any] = {"name": m.name, "path": m.path}
            if m.retention is not None:
                d["retention"] = m.retention
            d.update({k: m.statistics[k] for k in STAT_KEYS if k in m.statistics})
            if m.validation is not None:
                d["validation"] = dict(vars(m.validation))
            d["parameters"] = {k: v for k, v in m.params.items() if self.parameters.get(k) != v}
            models.append(d)
        return {
            "method": self.method.name,
            "base_model": self.base_model,
            "models": models,
            "parameters": dict(self.parameters),
            "order": self.order if isinstance(self.order, str) else list(self.order),
            "seed": self.seed,
            "dtype": self.dtype,
            "tokenizer_source": self.tokenizer_source,
            "shard_size": self.shard_size,
        }


def _as_plain(src: Any) -> dict:
    if isinstance(src, (str, Path)):
        from omegaconf import OmegaConf

        p = Path(src)
        text = read_yaml_text(p, "merge config")
        try:
            src = OmegaConf.create(text)
        except Exception as e:
            raise ObimError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(src, DictConfig):
            src = OmegaConf.to_container(src, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(src, dict):
        raise ObimError("merge config must be a mapping")
    return src


def parse_size(v: Any, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(v), re.I)
    if not m or (m.group(3) and not m.group(2)):
        raise ObimError(f"{where}: expected a positive size in bytes (e.g. 5000000000, 5GB or 4GiB), got {v!r}")
    # KB, MB, GB: powers of 1000 (as transformers' max_shard_size); KiB, MiB, GiB: powers of 1024
    unit = m.group(2).upper()
    scale = (1024 if m.group(3) else 1000) ** ("KMGT".index(unit) + 1) if unit else 1
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ObimError(f"{where}: size must be positive, got {v!r}")
    return size


def _check_param(method: Method, key: str, value: Any, where: str) -> None:
    p = {p.name: p for p in method.params}[key]
    if value is None and p.default is None:
        return
    err = p.check(value)
    if err:
        raise ObimError(f"{where}: parameter `{key}` of method {method.name} {err}")


def map_paths(d: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A merge config dict (MergeConfig.to_dict's layout) with `fn` applied to every file or model path in it: the
    base, each model's path, statistics files and validation data."""
    d = dict(d, base_model=fn(d["base_model"]), models=[dict(m) for m in d["models"]])
    for m in d["models"]:
        m["path"] = fn(m["path"])
        for k in STAT_KEYS:
            if m.get(k) is not None:
                m[k] = fn(m[k])
        if m.get("validation") is not None:
            m["validation"] = dict(m["validation"], data=fn(m["validation"]["data"]))
    return d


def load_config(src: Any) -> MergeConfig:
    """Parse a merge config (a YAML path, a dict or an OmegaConf DictConfig) and resolve every parameter."""
    raw = _as_plain(src)
    if isinstance(raw, dict) and "merge_method" in raw:  # a mergekit config: the methods both tools define
        from .mergekit import from_mergekit

        raw = from_mergekit(raw, str(src) if isinstance(src, (str, Path)) else "mergekit config")
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise ObimError(
            f"merge config: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid: {', '.join(TOP_KEYS)}"
        )
    for key in ("method", "base_model", "models"):
        if raw.get(key) in (None, "", []):
            raise ObimError(f"merge config: `{key}` is required")
    method = get_method(str(raw["method"]))
    by_name = {p.name: p for p in method.params}

    wide = dict(require("parameters", raw.get("parameters"), mapping) or {})
    bad = set(wide) - set(by_name)
    if bad:
        raise ObimError(
            f"parameters: unknown parameter(s) {', '.join(sorted(bad))} for method {method.name}; "
            f"valid: {', '.join(by_name)}"
        )
    resolved_wide = {k: wide.get(k, p.default) for k, p in by_name.items()}
    for k, v in resolved_wide.items():
        _check_param(method, k, v, "parameters")

    if not isinstance(raw["models"], list):
        raise ObimError("models: expected a list of {name, path, ...}")
    models: list[ModelSpec] = []
    for i, m in enumerate(raw["models"]):
        where = f"models[{i}]"
        if not isinstance(m, dict) or not m.get("name") or not m.get("path"):
            raise ObimError(f"{where}: each model needs `name` and `path`")
        unknown = set(m) - set(MODEL_KEYS)
        if unknown:
            raise ObimError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MODEL_KEYS)}")
        name = str(m["name"])
        where = f"models[{i}] ({name})"
        if name == "base" or name in [x.name for x in models]:
            raise ObimError(f"{where}: model names must be unique and not 'base'")
        own = dict(require(f"{where}.parameters", m.get("parameters"), mapping) or {})
        bad = set(own) - set(by_name)
        if bad:
            raise ObimError(
                f"{where}.parameters: unknown parameter(s) {', '.join(sorted(bad))} for method "
                f"{method.name}; valid: {', '.join(by_name)}"
            )
        fixed = [k for k in own if not by_name[k].per_model]
        if fixed:
            per = [p.name for p in method.params if p.per_model]
            raise ObimError(
                f"{where}.parameters: `{fixed[0]}` is method-wide for {method.name} and cannot be set "
                f"per model; per-model parameters: {', '.join(per) or 'none'}"
            )
        params = dict(resolved_wide)
        retention = m.get("retention")
        if retention is not None and method.retention_param:
            params[method.retention_param] = retention
        params.update(own)
        for k in set(own) | ({method.retention_param} if retention is not None and method.retention_param else set()):
            _check_param(method, k, params[k], where)
        validation = ValidationSpec.from_dict(m["validation"], f"{where}.validation") if m.get("validation") else None
        stats = {k: str(m[k]) for k in STAT_KEYS if m.get(k) is not None}
        other = [k for k in stats if k != method.statistics]
        if other and method.statistics:  # another method's statistics: a file meant for another merge
            raise ObimError(
                f"{where}: `{other[0]}` holds another kind of statistics than method {method.name} merges with; "
                f"it reads `{method.statistics}`"
            )
        models.append(ModelSpec(name, str(m["path"]), params, stats, validation, retention))

    names = [m.name for m in models]
    err = method.validate([m.params for m in models], names)
    if err:
        raise ObimError(err)

    order = raw.get("order", "rotation")
    if order is None:
        order = "rotation"
    if isinstance(order, str):
        if order != "rotation":
            raise ObimError(f"order: expected `rotation` or a list of model names ({', '.join(names)}), got {order!r}")
    elif not isinstance(order, (list, tuple)):
        raise ObimError(f"order: expected `rotation` or a list of model names ({', '.join(names)}), got {order!r}")
    else:
        order = [str(o) for o in order]
        unknown_names = [o for o in order if o not in names]
        if unknown_names:
            raise ObimError(f"order: unknown model '{unknown_names[0]}'; models: {', '.join(names)}")
        dup = [o for o in order if order.count(o) > 1]
        if dup:
            raise ObimError(f"order: model '{dup[0]}' listed twice")
        missing = [n for n in names if n not in order]
        if missing:
            raise ObimError(
                f"order: model '{missing[0]}' is missing; the order must list every model: {', '.join(names)}"
            )

    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ObimError(f"dtype: expected null or one of {', '.join(DTYPES)}, got {dtype!r}")
    tok = str(raw.get("tokenizer_source") or "base")
    if tok != "base" and tok not in names:
        raise ObimError(f"tokenizer_source: expected `base` or a model name ({', '.join(names)}), got {tok!r}")
    seed = int(require("seed", raw.get("seed", 0), number_in(0, 2**63 - 1, integer=True)))
    if method.statistics:
        for i, m in enumerate(models):
            if method.statistics not in m.statistics and m.validation is None:
                raise ObimError(
                    f"models[{i}] ({m.name}): method {method.name} needs {method.statistics} statistics: give "
                    f"`{method.statistics}: FILE.safetensors` (see obim-saliency --kind {method.statistics}) or "
                    "`validation: {data: FILE.jsonl}`"
                )
    return MergeConfig(
        method,
        str(raw["base_model"]),
        models,
        order,
        seed,
        dtype,
        tok,
        parse_size(raw.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size"),
        resolved_wide,
    )
