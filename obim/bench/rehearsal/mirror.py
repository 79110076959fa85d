"""The rehearsal's offline mirror: one HF_HOME holding, in the hub's own layouts, small copies of every dataset the
real experiments read (obim.bench.rehearsal.data) and the stand-in models (obim.bench.rehearsal.standins) under
the real hub ids, plus the Qwen2 continued-pretraining checkpoints as plain local folders (qwen2_7b_pt takes a
user's own checkpoints from $OBIM_QWEN_CKPTS). With HF_HOME=<mirror> HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 the
real presets run unchanged: the same path a user takes on an offline cluster after mirroring the hub.

Built once into a temporary folder and renamed when complete, at a path named by its version (`mirror_dir`):
a new version is built beside an older one, which is never edited. `mirror.json` records what it holds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import standins

MIRROR_VERSION = 3  # bump when the stand-ins or the datasets change: older mirrors are rebuilt
CHECKPOINTS = "qwen2-7b-pt"  # <mirror>/qwen2-7b-pt/ckpt-1..6: OBIM_QWEN_CKPTS for qwen2_7b_pt

# Which stand-in learns from which dataset (a dataset's processed-cache folder name, <org>___<name>)
DOMAINS = {
    "tatsu-lab___alpaca": "lm",
    "cais___mmlu": "lm",
    "openai___gsm8k": "math",
    "_hendrycks_math": "math",
    "___mbpp": "code",
    "sahil2801___": "code",
    "openai___openai_humaneval": "code",
    "ceval___": "zh",
    "Rakuten___": "ja",
    "kumapo___": "ja",
    "juletxara___": "ja",
    "mkshing___": "ja",
    "polm-stability___": "ja",
}
EVALUATED = ("test", "validation", "val", "eval")  # splits the stand-ins never train on
PER_DOMAIN = 2000  # texts a domain contributes at most (GSM8K and MATH alone hold 15k): keeps the base's mix even


def corpora(home: Path) -> dict[str, list[str]]:
    """Each domain's training texts: records of the mirror's datasets outside the evaluated splits, their string
    fields joined; at most PER_DOMAIN per domain, drawn with a fixed seed."""
    import random

    import datasets

    out: dict[str, list[str]] = {d: [] for d in sorted(set(DOMAINS.values()))}
    for arrow in sorted((home / "datasets").rglob("*.arrow")):
        folder = arrow.relative_to(home / "datasets").parts[0]
        domain = next((d for k, d in DOMAINS.items() if k in folder), None)
        split = arrow.stem.rsplit("-", 1)[-1]
        if domain is None or split in EVALUATED:
            continue
        for rec in datasets.Dataset.from_file(str(arrow)):
            out[domain].append("\n".join(_strings(rec)))
    return {d: random.Random(f"0-{d}").sample(t, min(len(t), PER_DOMAIN)) for d, t in out.items()}


def _strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in _strings(x)]
    return []


def mirror_dir(out: Path) -> Path:
    return Path(out) / f"mirror-v{MIRROR_VERSION}"


def is_built(home: Path) -> bool:
    try:
        return json.loads((home / "mirror.json").read_text())["version"] == MIRROR_VERSION
    except (OSError, ValueError, KeyError):
        return False


def build(home: Path, seed: int = 0, progress: bool = True, say=print) -> dict[str, Any]:
    """Build the mirror at `home` unless a complete one of this version is there; returns its mirror.json."""
    from .data import write_datasets
    from .hubcache import write_repo

    home = Path(home)
    if is_built(home):
        return json.loads((home / "mirror.json").read_text())
    home.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        say(f"rehearsal mirror: datasets -> {home}")
        written = write_datasets(tmp)
        texts = corpora(tmp)
        say(
            "rehearsal mirror: training the stand-in models ("
            + ", ".join(f"{d} {len(t)}" for d, t in texts.items())
            + " texts)"
        )
        stage = tmp / "stage"
        llama = {r: stage / r for r in [standins.LLAMA_BASE, *standins.LLAMA_EXPERTS]}
        losses = standins.build_llama(llama, texts, seed, progress)
        ckpts = [tmp / CHECKPOINTS / f"ckpt-{i}" for i in range(1, standins.QWEN_CHECKPOINTS + 1)]
        losses |= standins.build_qwen(stage / standins.QWEN_BASE, ckpts, texts, seed, progress)
        for repo, src in [*llama.items(), (standins.QWEN_BASE, stage / standins.QWEN_BASE)]:
            write_repo(tmp / "hub", repo, src)
        shutil.rmtree(stage)
        info = {
            "version": MIRROR_VERSION,
            "seed": seed,
            "models": [*sorted(llama), standins.QWEN_BASE],
            "checkpoints": str(CHECKPOINTS),
            "final_loss": {k: round(v, 4) for k, v in losses.items()},
            "datasets": [
                {"kind": w.kind, "repo_id": w.repo_id, "config": w.config, "filename": w.filename, "rows": w.rows}
                for w in written
            ],
            "build_s": round(time.perf_counter() - t0, 1),
        }
        (tmp / "mirror.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if home.exists():  # an incomplete earlier build (no mirror.json): set aside, not deleted
            home.rename(home.with_name(f"{home.name}.incomplete-{int(time.time())}"))
        tmp.rename(home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
