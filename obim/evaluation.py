"""Evaluation through lm-eval (every metric comes from lm_eval.simple_evaluate): the tasks shipped in obim/tasks
(the toy benchmarks; the paper's GSM8K/MATH prompts and AlpacaEval generation in obim/tasks/paper) and any task
lm-eval knows, with lm-eval's own `hf` or `vllm` model classes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import ObimError

METRICS = ("exact_match", "pass@1", "acc", "acc_norm", "rouge2")  # rouge2: japanese_leaderboard's xlsum (0-1)


def tasks_dir() -> str:
    """The folder to pass to lm_eval.tasks.TaskManager(include_path=...): obim's tasks (the toy benchmarks, and
    the paper's GSM8K/MATH/AlpacaEval forms in paper/)."""
    return str(Path(__file__).parent / "tasks")


@functools.cache
def task_manager():
    """One TaskManager per process: building it indexes lm-eval's bundled tasks (~9 s here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir())


def primary_score(result: dict) -> float:
    """The task's main metric from an lm-eval result entry ('exact_match,none', 'pass@1,none', 'acc,none')."""
    for m in METRICS:
        for key, v in result.items():
            if key.split(",")[0] == m and isinstance(v, (int, float)):
                return float(v)
    raise KeyError(f"no known metric in {sorted(result)}")


def task_score(out: dict, task: str) -> float:
    """A task's or group's score in percent from simple_evaluate's output. A group that aggregates no metric
    itself (japanese_leaderboard) scores the mean of its subtasks' scores, as its leaderboard averages them."""
    try:
        return 100.0 * primary_score(out["results"].get(task) or out.get("groups", {}).get(task) or {})
    except KeyError:
        subtasks = (out.get("group_subtasks") or {}).get(task)
        if not subtasks:
            raise ObimError(f"lm-eval task {task}: no score among its metrics "
                            f"{sorted((out['results'].get(task) or {}))}") from None
        return sum(task_score(out, t) for t in subtasks) / len(subtasks)


def model_args_string(model_dir: str | Path, model_args: dict[str, Any] | str | None) -> str:
    """lm-eval's `model_args` string: pretrained=DIR plus the backend's options."""
    if isinstance(model_args, str):
        extra = model_args
    else:
        extra = ",".join(f"{k}={v}" for k, v in (model_args or {}).items() if v is not None)
    return f"pretrained={model_dir}" + (f",{extra}" if extra else "")


def evaluate_model(model_dir: str | Path, tasks: list[str], *, backend: str = "hf", batch_size: int | str = 32,
                   limit: int | None = None, device: str = "cpu", model_args: dict[str, Any] | str | None = None,
                   num_fewshot: dict[str, int] | None = None, outputs_dir: str | Path | None = None,
                   ) -> dict[str, float | None]:
    """{task: score in percent} of one model directory, through lm-eval's own model classes (loaded once).

    `num_fewshot` sets a task's shots (others keep their YAML's). Judged tasks (AlpacaEval) score None unless a
    judge is configured; their outputs go to `outputs_dir`. `vllm` runs in a child process: vLLM spawns workers and
    keeps its memory until its process ends."""
    if backend not in ("hf", "vllm"):
        raise ObimError(f"eval backend: expected hf or vllm, got {backend!r}")
    req = {"model_dir": str(model_dir), "tasks": list(tasks), "backend": backend, "batch_size": batch_size,
           "limit": limit, "device": device, "model_args": model_args, "num_fewshot": num_fewshot or {},
           "outputs_dir": str(outputs_dir) if outputs_dir else None}
    if backend == "vllm":
        return _evaluate_in_child(req)
    if model_args is None:
        req["model_args"] = {"dtype": "float32"}
    return _run(req)


def _run(r: dict) -> dict[str, float | None]:
    import lm_eval
    from lm_eval.api.registry import get_model

    from .judge import JUDGED, judge

    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    opts = {"batch_size": r["batch_size"]}
    if r["backend"] == "hf":
        opts["device"] = r["device"]
    lm = get_model(r["backend"]).create_from_arg_string(model_args_string(r["model_dir"], r["model_args"]), opts)
    groups: dict[int | None, list[str]] = {}
    for t in r["tasks"]:
        groups.setdefault(r["num_fewshot"].get(t), []).append(t)
    scores: dict[str, float | None] = {}
    for shots, group in groups.items():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=group, num_fewshot=shots, batch_size=r["batch_size"], limit=r["limit"],
            task_manager=task_manager(), confirm_run_unsafe_code=True,
            log_samples=any(t in JUDGED for t in group),
        )
        for t in group:
            if t in JUDGED:
                scores[t] = judge(t, out["samples"][t], r["model_dir"], r["outputs_dir"])
            else:
                scores[t] = task_score(out, t)
    return {t: scores[t] for t in r["tasks"]}


def _evaluate_in_child(req: dict) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="obim-eval-") as tmp:
        path, res = Path(tmp) / "request.json", Path(tmp) / "scores.json"
        path.write_text(json.dumps({**req, "out": str(res)}))
        env = {**os.environ, "HF_ALLOW_CODE_EVAL": "1", "VLLM_TARGET_DEVICE": os.environ.get(
            "VLLM_TARGET_DEVICE", "cuda" if _cuda() else "cpu")}
        proc = subprocess.run([sys.executable, "-m", "obim.evaluation", str(path)], env=env)
        if proc.returncode != 0 or not res.is_file():
            raise ObimError(f"vllm evaluation of {req['model_dir']} failed (exit status {proc.returncode}; see above)")
        return json.loads(res.read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _child_main(request: str) -> None:
    r = json.loads(Path(request).read_text())
    Path(r["out"]).write_text(json.dumps(_run(r)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the scores are written: skip vLLM's exit-time teardown, which can abort (SIGABRT) on CPU


if __name__ == "__main__":  # the vllm child process (vLLM spawns workers: the guard is required)
    _child_main(sys.argv[1])
