"""Evaluation through lm-eval (every metric comes from lm_eval.simple_evaluate): the toy tasks shipped in
obim/tasks and any task lm-eval knows, with lm-eval's own `hf` or `vllm` model classes."""

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

METRICS = ("exact_match", "pass@1", "acc", "acc_norm")


def tasks_dir() -> str:
    """The folder to pass to lm_eval.tasks.TaskManager(include_path=...): obim's toy tasks."""
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


def model_args_string(model_dir: str | Path, model_args: dict[str, Any] | str | None) -> str:
    """lm-eval's `model_args` string: pretrained=DIR plus the backend's options."""
    if isinstance(model_args, str):
        extra = model_args
    else:
        extra = ",".join(f"{k}={v}" for k, v in (model_args or {}).items() if v is not None)
    return f"pretrained={model_dir}" + (f",{extra}" if extra else "")


def evaluate_model(model_dir: str | Path, tasks: list[str], *, backend: str = "hf", batch_size: int | str = 32,
                   limit: int | None = None, device: str = "cpu",
                   model_args: dict[str, Any] | str | None = None) -> dict[str, float]:
    """{task: score in percent} of one model directory, through lm-eval's own model classes.

    `vllm` runs in a child process: vLLM spawns workers and keeps its memory until its process ends."""
    if backend == "vllm":
        return _evaluate_in_child(model_dir, tasks, batch_size=batch_size, limit=limit, model_args=model_args)
    if backend not in ("hf", "vllm"):
        raise ObimError(f"eval backend: expected hf or vllm, got {backend!r}")
    if model_args is None:
        model_args = {"dtype": "float32"}
    import lm_eval

    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    out = lm_eval.simple_evaluate(
        model=backend, model_args=model_args_string(model_dir, model_args), tasks=tasks, batch_size=batch_size,
        device=device, limit=limit, task_manager=task_manager(),
        confirm_run_unsafe_code=True, log_samples=False,
    )
    return {t: 100.0 * primary_score(out["results"][t]) for t in tasks}


def _evaluate_in_child(model_dir, tasks, *, batch_size, limit, model_args) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="obim-eval-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "scores.json"
        req.write_text(json.dumps({"model_dir": str(model_dir), "tasks": tasks, "batch_size": batch_size,
                                   "limit": limit, "model_args": model_args, "out": str(res)}))
        env = {**os.environ, "HF_ALLOW_CODE_EVAL": "1", "VLLM_TARGET_DEVICE": os.environ.get(
            "VLLM_TARGET_DEVICE", "cuda" if _cuda() else "cpu")}
        proc = subprocess.run([sys.executable, "-m", "obim.evaluation", str(req)], env=env)
        if proc.returncode != 0 or not res.is_file():
            raise ObimError(f"vllm evaluation of {model_dir} failed (exit status {proc.returncode}; see above)")
        return json.loads(res.read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _child_main(request: str) -> None:
    r = json.loads(Path(request).read_text())
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="vllm", model_args=model_args_string(r["model_dir"], r["model_args"]), tasks=r["tasks"],
        batch_size=r["batch_size"], limit=r["limit"], task_manager=task_manager(), confirm_run_unsafe_code=True,
        log_samples=False,
    )
    Path(r["out"]).write_text(json.dumps({t: 100.0 * primary_score(out["results"][t]) for t in r["tasks"]}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the scores are written: skip vLLM's exit-time teardown, which can abort (SIGABRT) on CPU


if __name__ == "__main__":  # the vllm child process (vLLM spawns workers: the guard is required)
    _child_main(sys.argv[1])
