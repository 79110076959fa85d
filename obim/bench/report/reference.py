"""The committed reference results of the toy experiments, and a sweep's numbers held against them.

`python experiments/tables.py --reference` writes the reference tables (results/<experiment>/) and records in
obim/bench/zoo/reference.json what they came from and how far they spread: each zoo draw's recipe hash and
weights fingerprint, and every row's mean and standard deviation across the draws. A user's sweep never rewrites
them; its console says whether its zoo is the reference's (the same fingerprint: the same weights, so the same
numbers up to the evaluation's own kernels) and whether its averages fall inside the reference's spread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .results import JobRecord, Table

REFERENCE = Path(__file__).resolve().parents[1] / "zoo" / "reference.json"  # package data of obim.bench
SPREAD = 2.0  # a number is inside the reference's spread when within this many sds of its mean


def load_reference(path: Path | None = None) -> dict[str, Any] | None:
    try:
        return json.loads((path or REFERENCE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reference_entry(tables: list[Table], results: list[JobRecord]) -> dict[str, Any]:
    """One experiment's part of reference.json: its draws and every table row's mean and sd across them."""
    draws = {str(r.zoo["seed"]): {k: r.zoo.get(k) for k in ("recipe_hash", "fingerprint")} for r in results if r.zoo}
    rows: dict[str, Any] = {}
    for t in tables:
        rows[t.name] = {
            label: {
                c: {"mean": ours.get(c), "sd": (t.sd.get(label) or {}).get(c), "draws": len(t.draws.get(label, []))}
                for c in t.columns
                if ours.get(c) is not None
            }
            for label, ours, _ in t.rows
        }
    return {"draws": dict(sorted(draws.items())), "tables": rows}


def write_reference(experiment: str, entry: dict[str, Any], path: Path | None = None) -> Path:
    from obim.merging.staging import atomic_write_file

    path = path or REFERENCE
    ref = load_reference(path) or {}
    ref[experiment] = entry
    text = json.dumps(ref, indent=1, sort_keys=True) + "\n"
    atomic_write_file(path, lambda tmp: tmp.write_text(text))
    return path


def against_reference(
    experiment: str, tables: list[Table], results: list[JobRecord], ref: dict[str, Any] | None
) -> list[str]:
    """Console lines: each of the sweep's zoo draws against the reference's (the same weights or not), then how
    many of the main table's averages fall inside the reference's mean ± SPREAD sd across draws."""
    entry = (ref or {}).get(experiment)
    zoos = {r.zoo["seed"]: r.zoo for r in results if r.zoo}
    if not zoos:
        return []
    if entry is None:
        return [f"reference: none recorded for {experiment}; these numbers are this zoo's own draw"]
    lines = []
    for seed, z in sorted(zoos.items()):
        want = (entry.get("draws") or {}).get(str(seed))
        fp = (z.get("fingerprint") or "")[:16]
        if want is None:
            lines.append(f"zoo draw {seed}: {fp}; the reference has no draw {seed}")
        elif want.get("fingerprint") == z.get("fingerprint"):
            lines.append(f"zoo draw {seed}: {fp}, the reference's own weights")
        else:
            why = "another recipe" if want.get("recipe_hash") != z.get("recipe_hash") else "other CPU kernels or code"
            lines.append(
                f"zoo draw {seed}: {fp}, not the reference's {(want.get('fingerprint') or '')[:16]} ({why}): "
                "other weights, so other numbers"
            )
    for t in tables:
        spread = (entry.get("tables") or {}).get(t.name)
        if not spread:
            continue
        inside, outside = 0, []
        for label, ours, _ in t.rows:
            v, r = ours.get("avg"), (spread.get(label) or {}).get("avg")
            if v is None or not r or r.get("sd") is None or r.get("mean") is None:
                continue
            if abs(v - r["mean"]) <= SPREAD * r["sd"]:
                inside += 1
            else:
                outside.append(f"{label} {v:.1f} (reference {r['mean']:.1f} ± {r['sd']:.1f})")
        if inside or outside:
            n = inside + len(outside)
            line = f"{t.name} averages: {inside} of {n} inside the reference's mean ± {SPREAD:g} sd across its draws"
            shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
            lines.append(line + (f"; outside: {shown}" if outside else ""))
        break  # the main table only: the first one the reference covers
    return lines
