"""The model card written into every merged folder (README.md, in the Hugging Face Hub's model-card form): YAML
front matter the Hub reads (base_model, base_model_relation, library_name, tags), then what was merged, how, and the
resolved merge config. Only Hub model ids go into `base_model`: the Hub refuses local paths there, so a local
input is named in the text only. Deterministic: the same config gives the same bytes (no date, no host)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .config import MergeConfig, map_paths
from .version import obim_version

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # namespace/name, or a legacy name (gpt2)


def hub_id(path: str) -> str | None:
    """`path` when it names a Hub model (namespace/name or a legacy name, not a local folder), else None."""
    return path if HUB_ID.match(path) and not os.path.lexists(Path(path).expanduser()) else None


def shown(path: str) -> str:
    """How the card names an input: a Hub id as it is; a local file or folder by its name only (the card is
    meant for upload: no home directory or machine layout in it; obim_merge.yaml keeps the full paths)."""
    return path if hub_id(path) else f"local: {Path(path).expanduser().resolve().name}"


def _redacted(d: dict[str, Any]) -> dict[str, Any]:
    return map_paths(d, shown)


def model_card(cfg: MergeConfig, resolved: dict[str, Any]) -> str:
    """README.md for a merged folder, from the checked config and its resolved form (obim_merge.yaml's); the
    folder's own name is not in it (the same config, the same bytes, wherever it is written)."""
    method = cfg.method
    sources = [cfg.base_model, *(m.path for m in cfg.models)]
    ids = list(dict.fromkeys(i for i in map(hub_id, sources) if i))
    front: dict[str, Any] = {}
    if ids:
        front["base_model"] = ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = list(dict.fromkeys(["merge", "obim", method.name]))
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, default_flow_style=False).strip(),
        "---",
        "",
        f"# Merge of {', '.join(m.name for m in cfg.models)} ({method.pretty_name})",
        "",
        f"A merge of {len(cfg.models)} model{'s' * (len(cfg.models) != 1)} into a base, made with obim "
        f"{obim_version()} by **{method.pretty_name}** (`{method.name}`"
        + (f", {method.reference_url}" if method.reference_url else "")
        + f"): {method.doc}.",
        "",
        "## Models",
        "",
        f"- base: `{shown(cfg.base_model)}`",
    ]
    for m in cfg.models:
        extra = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.params.items())]
        lines.append(f"- {m.name}: `{shown(m.path)}`" + (f" ({', '.join(extra)})" if extra else ""))
    if method.combiner.uses_order:
        order = cfg.order if isinstance(cfg.order, str) else " > ".join(cfg.order)
        lines += ["", f"Merge order (iterative merging): {order}."]
    lines += ["", f"Seed {cfg.seed} (random draws: DARE, DELLA, the saliency of non-linear tensors)."]
    kind = method.statistics
    saliency = [m for m in cfg.models if kind and (kind in m.statistics or m.validation is not None)]
    if saliency:
        lines += ["", f"## Statistics ({kind})", ""]
        for m in saliency:
            if m.validation is not None:
                v = m.validation
                lines.append(f"- {m.name}: computed on `{shown(v.data)}` ({v.size} samples, max length {v.max_length})")
            else:
                lines.append(f"- {m.name}: `{shown(str(m.statistics[str(kind)]))}`")
    lines += [
        "",
        "## Merge config",
        "",
        "The resolved config, local paths shortened to their names; `obim_merge.yaml` beside this card holds it "
        "with the full paths, and `obim-merge obim_merge.yaml OUT` merges it again to the same bytes.",
        "",
        "```yaml",
        yaml.safe_dump(_redacted(resolved), sort_keys=False, default_flow_style=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
