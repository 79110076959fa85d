"""AlpacaEval: lm-eval generates each model's outputs (task `obim_alpaca_eval`); the score needs an LLM judge.

The outputs are written in alpaca_eval's JSON format. When the `alpaca_eval` command is installed and a judge is
configured ($OBIM_ALPACA_EVAL_ANNOTATORS names an annotators config, or $OPENAI_API_KEY is set for alpaca_eval's
default), it is run and its win rate is the score; otherwise the score is None (reported as missing, with the
outputs' path), never a number we did not measure.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

from obim.merging.errors import ObimError

JUDGED = {"obim_alpaca_eval"}


def alpaca_eval_outputs(samples: list[dict], generator: str) -> list[dict]:
    """lm-eval's logged samples -> alpaca_eval's model_outputs records, in the dataset's order."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resp = s.get("filtered_resps") or s.get("resps") or [""]
        while isinstance(resp, list):  # lm-eval nests responses per request (and per filter)
            resp = resp[0] if resp else ""
        doc = s["doc"]
        out.append(
            {
                "instruction": doc["instruction"],
                "output": str(resp).strip(),
                "generator": generator,
                "dataset": doc.get("dataset", ""),
            }
        )
    return out


def judge_configured() -> bool:
    return shutil.which("alpaca_eval") is not None and bool(
        os.environ.get("OBIM_ALPACA_EVAL_ANNOTATORS") or os.environ.get("OPENAI_API_KEY")
    )


def run_judge(outputs: Path) -> float:
    """alpaca_eval's win rate (percent; $OBIM_ALPACA_EVAL_METRIC picks another leaderboard column) of one
    outputs file, annotations beside it."""
    out_dir = outputs.parent / f"{outputs.stem}-judged"
    cmd = ["alpaca_eval", "evaluate", "--model_outputs", str(outputs), "--output_path", str(out_dir)]
    if os.environ.get("OBIM_ALPACA_EVAL_ANNOTATORS"):
        cmd += ["--annotators_config", os.environ["OBIM_ALPACA_EVAL_ANNOTATORS"]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ObimError(f"alpaca_eval on {outputs} failed (exit status {proc.returncode}): {tail[0]}")
    boards = sorted(out_dir.rglob("leaderboard.csv"))
    if not boards:
        raise ObimError(f"alpaca_eval on {outputs}: no leaderboard.csv under {out_dir}")
    generator = json.loads(outputs.read_text())[0]["generator"]
    metric = os.environ.get("OBIM_ALPACA_EVAL_METRIC", "win_rate")
    with open(boards[-1]) as f:
        for row in csv.DictReader(f):
            name = row.get("") or row.get("name") or row.get("generator") or next(iter(row.values()))
            if name == generator:
                if not row.get(metric):
                    raise ObimError(f"{boards[-1]}: no '{metric}' for {generator}")
                return float(row[metric])
    raise ObimError(f"{boards[-1]}: no row for generator {generator}")


def judge(task: str, samples: list[dict], model_dir: str, outputs_dir: str | None) -> float | None:
    """Write the task's outputs and score them when a judge is configured (None otherwise)."""
    if task not in JUDGED:
        raise ObimError(f"{task}: not a judged task")
    # a name of our own: alpaca_eval returns its published number for a generator it already lists
    generator = f"obim-{Path(str(model_dir)).name or 'model'}"
    records = alpaca_eval_outputs(samples, generator)
    out = Path(outputs_dir or ".") / "alpaca_eval_outputs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    if not judge_configured():
        print(f"[alpaca_eval] no judge configured: outputs in {out} (score left empty)")
        return None
    try:
        return run_judge(out)
    except ObimError as e:  # keep the generations (cached): a later run judges them again
        print(f"[alpaca_eval] {e}; score left empty, outputs in {out}")
        return None
