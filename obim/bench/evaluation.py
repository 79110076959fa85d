"""Evaluation through lm-eval (every metric comes from lm_eval.simple_evaluate): the tasks shipped in obim/tasks
(the toy benchmarks; the paper's GSM8K/MATH prompts and AlpacaEval generation in obim/tasks/paper) and any task
lm-eval knows, with lm-eval's own `hf` or `vllm` model classes."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError

# rouge2: japanese_leaderboard's xlsum (0-1); pass_at_1: lm-eval's own mbpp (obim_mbpp reports pass@1)
METRICS = ("exact_match", "pass@1", "pass_at_1", "acc", "acc_norm", "rouge2")
# bump when how a score is read or computed here changes (the metric chosen, the code sandbox's verdicts): cached
# evaluations are keyed by it; a task's own files key its evaluations (tasks_digest)
# 2: programs run with code_eval's globals (__name__ is not __main__); 3: each score's standard error and item count;
# 4: lm-eval's per-sample records kept (samples/<task>.jsonl beside the judged outputs)
SCORING_VERSION = 4


def tasks_dir() -> str:
    """The folder to pass to lm_eval.tasks.TaskManager(include_path=...): obim's tasks (the toy benchmarks, and
    the paper's GSM8K/MATH/AlpacaEval forms in paper/)."""
    return str(Path(__file__).parent / "tasks")


def _obim_imports(py: Path, root: Path) -> list[Path]:
    """The files of the obim modules a hook module imports (they make its data or its scores too); obim's task
    modules are found in the tasks folder `root`."""
    import ast

    pkg = Path(__file__).resolve().parents[1]  # obim/
    tasks = "obim.bench.tasks"

    def file_of(name: str) -> Path | None:
        if name == tasks or name.startswith(tasks + "."):
            f = root.joinpath(*name[len(tasks) :].split(".")[1:])
        else:
            f = pkg.parent / name.replace(".", "/")
        return next((p for p in (f.with_suffix(".py"), f / "__init__.py") if p.is_file()), None)

    out = []
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            out += [file_of(a.name) for a in node.names if a.name.split(".")[0] == "obim"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the module's own package
                base = py.parent
                for _ in range(node.level - 1):
                    base = base.parent
                inside = base.relative_to(root).parts if base.is_relative_to(root) else None
                rel = ".".join([tasks, *inside]) if inside is not None else ".".join(base.relative_to(pkg.parent).parts)
                module = f"{rel}.{module}" if module else rel
            if module.split(".")[0] != "obim":
                continue
            # `from pkg import sub`: the submodule; `from mod import name`: the module
            subs = [file_of(f"{module}.{a.name}") for a in node.names]
            out += [s for s in subs if s] if all(subs) else [file_of(module)]
    return [f.resolve() for f in out if f is not None]


def _task_files(root: Path) -> dict[str, list[Path]]:
    """Each task or group defined under obim's tasks folder -> the files that define it: its YAML, what it
    `include:`s (recursively), the modules its `!function module.name` hooks load and the obim modules those
    import (followed inside the tasks folder; a module outside it counts by its own source)."""
    imports: dict[Path, list[Path]] = {}  # a hook module is parsed once, however many tasks use it

    def deps(f: Path, seen: set[Path]) -> list[Path]:
        if f in seen or not f.is_file():
            return []
        seen.add(f)
        out = [f]
        if f.suffix == ".py":
            if f not in imports:
                imports[f] = _obim_imports(f, root)
            for dep in imports[f]:
                out += deps(dep, seen) if dep.is_relative_to(root) else ([dep] if dep not in seen else [])
                seen.add(dep)
            return out
        text = f.read_text()
        for inc in re.findall(r"^include:[ \t]*(\S+)", text, re.M):
            out += deps((f.parent / inc).resolve(), seen)
        for mod in sorted(set(re.findall(r"!function[ \t]+([\w.]+)\.\w+", text))):
            out += deps((f.parent / (mod.replace(".", "/") + ".py")).resolve(), seen)
        return out

    found: dict[str, list[Path]] = {}
    for y in sorted(root.rglob("*.yaml")):
        names = re.findall(r"^(?:task|group):[ \t]*([^\s#]+)", y.read_text(), re.M)
        for n in names:
            found.setdefault(n, []).extend(deps(y.resolve(), set()))
    return found


def task_dataset_kwargs(task: str) -> dict[str, Any] | None:
    """The `dataset_kwargs` an obim task's YAML declares (None: not one of obim's tasks)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's `!function x.y` tags, read as their text
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    files = _task_files(Path(tasks_dir()).resolve()).get(task)
    if not files:
        return None
    return dict(yaml.load(files[0].read_text(), Loader=Loader).get("dataset_kwargs") or {})


def tasks_digest(tasks: list[str]) -> str:
    """What obim's own task definitions of `tasks` are (lm-eval's own tasks are covered by its version): the text
    of each task's YAML, its includes and the modules its hooks load, so an edit re-evaluates that task only; a
    group covers its member tasks' files too."""
    from .cache import digest

    root = Path(tasks_dir()).resolve()
    files = _task_files(root)
    todo, seen, parts = list(tasks), set(), []
    while todo:
        t = todo.pop(0)
        if t in seen or t not in files:
            continue
        seen.add(t)
        for f in files[t]:
            text = f.read_text()
            pkg = Path(__file__).resolve().parents[1]
            name = str(f.relative_to(root)) if f.is_relative_to(root) else f"obim/{f.relative_to(pkg)}"
            parts.append([t, name, text])
            if f.suffix != ".py":  # a group's members (`task:` lists) are tasks too
                todo += re.findall(r"^\s*-\s*(?:task:\s*)?([\w.-]+)\s*$", text, re.M)
    return digest(parts)


@functools.cache
def task_manager():
    """One TaskManager per process: building it indexes lm-eval's bundled tasks (~9 s here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir())


def primary_metric(result: dict) -> str:
    """The key of the task's main metric in an lm-eval result entry ('exact_match,none', 'pass@1,none', 'acc,none')."""
    for m in METRICS:
        for key, v in result.items():
            if key.split(",")[0] == m and isinstance(v, (int, float)):
                return key
    raise KeyError(f"no known metric in {sorted(result)}")


def primary_score(result: dict) -> float:
    """The task's main metric from an lm-eval result entry."""
    return float(result[primary_metric(result)])


def primary_stderr(result: dict) -> float | None:
    """The standard error lm-eval computed beside the main metric ('acc_stderr,none'); None where it gave none
    ('N/A': a metric without a stderr function, or bootstrap iterations turned off)."""
    name, _, filt = primary_metric(result).partition(",")
    v = result.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def task_score(out: dict, task: str) -> float:
    """A task's or group's score in percent from simple_evaluate's output. A group that aggregates no metric
    itself (japanese_leaderboard) scores the mean of its subtasks' scores, as its leaderboard averages them."""
    try:
        return 100.0 * primary_score(_entry(out, task))
    except KeyError:
        subtasks = (out.get("group_subtasks") or {}).get(task)
        if not subtasks:
            raise ObimError(
                f"lm-eval task {task}: no score among its metrics {sorted(out['results'].get(task) or {})}"
            ) from None
        return sum(task_score(out, t) for t in subtasks) / len(subtasks)


def _entry(out: dict, task: str) -> dict:
    return out["results"].get(task) or out.get("groups", {}).get(task) or {}


def task_stderr(out: dict, task: str) -> float | None:
    """The standard error of task_score (percent points): lm-eval's own; for a group scored as the mean of its
    subtasks, sqrt(sum se_i^2) / k (subtasks on disjoint items); None where lm-eval gave none."""
    try:
        se = primary_stderr(_entry(out, task))
    except KeyError:
        subtasks = (out.get("group_subtasks") or {}).get(task) or []
        parts = [task_stderr(out, t) for t in subtasks]
        if not parts or any(p is None for p in parts):
            return None
        return math.sqrt(sum(p * p for p in parts if p is not None)) / len(parts)
    return None if se is None else 100.0 * se


def task_items(out: dict, task: str) -> int | None:
    """How many items the task's score is over (lm-eval's effective sample count, after `limit`); a group's, the sum
    over its subtasks."""
    n = (out.get("n-samples") or {}).get(task)
    if n is not None:
        return int(n.get("effective", n.get("original", 0)))
    subtasks = (out.get("group_subtasks") or {}).get(task)
    if not subtasks:
        return None
    counts = [task_items(out, t) for t in subtasks]
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def model_args_string(model_dir: str | Path, model_args: dict[str, Any] | str | None) -> str:
    """lm-eval's `model_args` string: pretrained=DIR plus the backend's options."""
    if isinstance(model_args, str):
        extra = model_args
    else:
        extra = ",".join(f"{k}={v}" for k, v in (model_args or {}).items() if v is not None)
    return f"pretrained={model_dir}" + (f",{extra}" if extra else "")


def code_allowed(allow_code: bool = False) -> bool:
    """Code execution is opted in: `allow_code` (eval.allow_code=true) or HF_ALLOW_CODE_EVAL=1 (lm-eval's way)."""
    return bool(allow_code) or os.environ.get("HF_ALLOW_CODE_EVAL") == "1"


def code_tasks(tasks: list[str]) -> list[str]:
    """Those of `tasks` (lm-eval tasks, groups or tags, obim's or lm-eval's own) that execute generated code: their
    config says `unsafe_code: true`, or for a group or tag, one of its subtasks' does. Read from the task index
    (configs as parsed YAML), so nothing is built or downloaded."""
    index = task_manager().task_index
    return [t for t in tasks if _unsafe(index, t, set())]


def _unsafe(index: dict, name: str, seen: set[str]) -> bool:
    entry = index.get(name)
    if entry is None or name in seen:
        return False
    seen.add(name)
    if entry.kind.name == "TAG":
        return any(_unsafe(index, t, seen) for t in sorted(entry.tags))
    cfg = entry.cfg or {}
    if entry.kind.name == "GROUP":
        return _group_unsafe(index, cfg, seen)
    return bool(cfg.get("unsafe_code", False))


def _group_unsafe(index: dict, cfg: dict, seen: set[str]) -> bool:
    if "unsafe_code" in cfg:  # a group's own task keys override its members'
        return bool(cfg["unsafe_code"])
    members = cfg.get("task") or []
    for item in members if isinstance(members, list) else [members]:
        if isinstance(item, str):
            if _unsafe(index, item, seen):
                return True
        elif isinstance(item, dict):
            if "unsafe_code" in item:  # a member listed with overrides
                if item["unsafe_code"]:
                    return True
                continue
            ref = item.get("group", item.get("task"))
            if isinstance(ref, str) and ref in index:
                if _unsafe(index, ref, seen):
                    return True
            elif "group" in item and _group_unsafe(index, item, seen):  # an inline group
                return True
    return False


def check_code_opt_in(tasks: list[str], allow_code: bool = False) -> None:
    """A one-line error when `tasks` execute generated code and neither opt-in (`allow_code`, i.e.
    eval.allow_code=true, or HF_ALLOW_CODE_EVAL=1) is given."""
    if code_allowed(allow_code):
        return
    code = code_tasks(tasks)
    if code:
        raise ObimError(
            f"{', '.join(code)} execute{'s' if len(code) == 1 else ''} model-generated code: opt in "
            "with eval.allow_code=true (or HF_ALLOW_CODE_EVAL=1 in the environment)"
        )


_announced: set[str] = set()  # what this process has said about code execution: "sandbox", and task names


def _stderr(text: str, warning: bool = False, logger: str = "") -> None:
    print(f"warning: {text}" if warning else text, file=sys.stderr, flush=True)


def where_code_runs(tasks: list[str]) -> tuple[bool, list[str]]:
    """(whether one of `tasks` runs generated code in obim's sandbox, the code tasks that run some outside it: lm-eval's
    own, scored through its code_eval)."""
    index, ours = task_manager().task_index, os.path.realpath(tasks_dir()) + os.sep
    sandboxed, outside = False, []
    for t in code_tasks(tasks):
        # per code-executing subtask: scored by one of obim's process_results (obim/bench/tasks/), in the sandbox
        in_sandbox = [
            os.path.realpath(str(c.get("process_results", ""))).startswith(ours)
            for c in _leaves(index, t, set())
            if c.get("unsafe_code")
        ]
        sandboxed |= any(in_sandbox)
        if not in_sandbox or not all(in_sandbox):
            outside.append(t)
    return sandboxed, outside


def announce_code_execution(tasks: list[str], say: Callable[..., None] = _stderr) -> None:
    """Before an evaluation that executes generated code, once per process: the layers of obim's code sandbox (obim's
    code tasks run in it), a warning when bubblewrap is missing there, and one naming lm-eval's own code tasks,
    which execute outside it (through lm-eval's code_eval). `say(text, warning, logger)`: the job's reporter."""
    from . import sandbox

    sandboxed, outside = where_code_runs(tasks)
    if sandboxed and "sandbox" not in _announced:
        _announced.add("sandbox")
        say(sandbox.describe(), logger="obim.bench.sandbox")
        if problem := sandbox.without_bwrap():
            say(problem, warning=True, logger="obim.bench.sandbox")
    if outside := [t for t in outside if t not in _announced]:
        _announced.update(outside)
        say(
            f"{', '.join(outside)} execute{'s' * (len(outside) == 1)} generated code through lm-eval's "
            "code_eval, outside obim's code sandbox",
            warning=True,
            logger="obim.bench.sandbox",
        )


def _leaves(index: dict, name: str, seen: set[str]):
    """The configs of the tasks `name` (a task, group or tag) runs."""
    entry = index.get(name)
    if entry is None or name in seen:
        return
    seen.add(name)
    if entry.kind.name == "TAG":
        for t in sorted(entry.tags):
            yield from _leaves(index, t, seen)
    elif entry.kind.name == "GROUP":
        members = (entry.cfg or {}).get("task") or []
        for item in members if isinstance(members, list) else [members]:
            ref = item.get("group", item.get("task")) if isinstance(item, dict) else item
            if isinstance(ref, str):
                yield from _leaves(index, ref, seen)
    else:
        yield entry.cfg or {}


def evaluate_model(model_dir: str | Path, tasks: list[str], **kwargs: Any) -> dict[str, float | None]:
    """{task: score in percent} of one model directory (measure_model's scores)."""
    return measure_model(model_dir, tasks, **kwargs)["scores"]


def measure_model(
    model_dir: str | Path,
    tasks: list[str],
    *,
    backend: str = "hf",
    batch_size: int | str = 32,
    limit: int | None = None,
    device: str = "cpu",
    model_args: dict[str, Any] | str | None = None,
    num_fewshot: dict[str, int] | None = None,
    outputs_dir: str | Path | None = None,
    allow_code: bool = False,
    say: Callable[..., None] = _stderr,
) -> dict[str, dict[str, Any]]:
    """One model directory through lm-eval's own model classes (loaded once): {"scores": {task: percent},
    "stderr": {task: percent points, None where lm-eval gave none}, "n": {task: items scored}}.

    `num_fewshot` sets a task's shots (others keep their YAML's). Judged tasks (AlpacaEval) score None unless a
    judge is configured; their outputs go to `outputs_dir`. `vllm` runs in a child process: vLLM spawns workers and
    keeps its memory until its process ends. Tasks that execute generated code (toy_humaneval, humaneval...) run
    only with `allow_code` or HF_ALLOW_CODE_EVAL=1 (a one-line error otherwise)."""
    if backend not in ("hf", "vllm"):
        raise ObimError(f"eval backend: expected hf or vllm, got {backend!r}")
    check_code_opt_in(tasks, allow_code)
    if code_allowed(allow_code):
        announce_code_execution(tasks, say)
    req = {
        "model_dir": str(model_dir),
        "tasks": list(tasks),
        "backend": backend,
        "batch_size": batch_size,
        "limit": limit,
        "device": device,
        "model_args": model_args,
        "num_fewshot": num_fewshot or {},
        "outputs_dir": str(outputs_dir) if outputs_dir else None,
        "allow_code": code_allowed(allow_code),
    }
    if backend == "vllm":
        return _evaluate_in_child(req)
    if model_args is None:
        req["model_args"] = {"dtype": "float32"}
    return _run(req)


def _run(r: dict) -> dict[str, dict[str, Any]]:
    import lm_eval
    from lm_eval.api.registry import get_model

    from .judge import JUDGED, judge

    opts = {"batch_size": r["batch_size"]}
    if r["backend"] == "hf":
        opts["device"] = r["device"]
    lm = get_model(r["backend"]).create_from_arg_string(model_args_string(r["model_dir"], r["model_args"]), opts)
    groups: dict[int | None, list[str]] = {}
    for t in r["tasks"]:
        groups.setdefault(r["num_fewshot"].get(t), []).append(t)
    scores: dict[str, float | None] = {}
    stderr: dict[str, float | None] = {}
    items: dict[str, int | None] = {}
    kept: dict[str, dict[str, dict[str, str | None]]] = {}
    allow = bool(r.get("allow_code"))
    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow:  # code_eval and obim's toy scorers read it; for this evaluation only
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        for shots, group in groups.items():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=group,
                num_fewshot=shots,
                batch_size=r["batch_size"],
                limit=r["limit"],
                task_manager=task_manager(),
                confirm_run_unsafe_code=allow,
                log_samples=True,  # kept (outputs_dir): jobs on the same items are compared item by item later
            )
            if r["outputs_dir"]:
                kept.update(write_samples(out, group, Path(r["outputs_dir"]), judged=JUDGED))
            for t in group:
                items[t] = task_items(out, t)
                if t in JUDGED:  # the judge's own standard error (a fitted, draws-as-half rate) is not read yet
                    scores[t] = judge(t, out["samples"][t], r["model_dir"], r["outputs_dir"])
                    stderr[t] = None
                else:
                    scores[t], stderr[t] = task_score(out, t), task_stderr(out, t)
    finally:
        if before is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = before
    return {
        "scores": {t: scores[t] for t in r["tasks"]},
        "stderr": {t: stderr[t] for t in r["tasks"]},
        "n": {t: items[t] for t in r["tasks"]},
        "samples": {t: kept[t] for t in r["tasks"] if t in kept},
    }


def leaf_tasks(out: dict, task: str) -> list[str]:
    """The tasks whose items make `task`'s score: itself, or a group's subtasks, recursively."""
    subtasks = (out.get("group_subtasks") or {}).get(task)
    if not subtasks:
        return [task]
    return [leaf for t in subtasks for leaf in leaf_tasks(out, t)]


def write_samples(out: dict, tasks: list[str], folder: Path, judged: tuple | set | dict = ()) -> dict[str, Any]:
    """lm-eval's per-sample records of each of `tasks` (its leaves: a group's subtasks), one JSONL file per leaf in
    `folder`/samples, ordered by filter then doc_id, so that two evaluations on the same items can be compared
    pairwise later. Returns {task: {leaf: {"file": path relative to folder, "metric": the primary metric's key
    ('exact_match,none'), None for a judged task: its per-item verdict is the judge's}}}."""
    from lm_eval.utils import handle_non_serializable

    samples = out.get("samples") or {}
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for t in tasks:
        entry = {}
        for leaf in leaf_tasks(out, t):
            if leaf not in samples:
                continue
            rel = f"samples/{leaf}.jsonl"
            recs = sorted(samples[leaf], key=lambda x: (str(x.get("filter")), x.get("doc_id", 0)))
            text = "".join(json.dumps(x, default=handle_non_serializable, ensure_ascii=False) + "\n" for x in recs)
            tmp = folder / f"{rel}.tmp"
            tmp.write_text(text)
            tmp.replace(folder / rel)
            metric = None if t in judged else _leaf_metric(out, leaf)
            entry[leaf] = {"file": rel, "metric": metric}
        if entry:
            index[t] = entry
    return index


def _leaf_metric(out: dict, leaf: str) -> str | None:
    try:
        return primary_metric(out["results"].get(leaf) or {})
    except KeyError:
        return None


def _evaluate_in_child(req: dict) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="obim-eval-") as tmp:
        path, res = Path(tmp) / "request.json", Path(tmp) / "scores.json"
        path.write_text(json.dumps({**req, "out": str(res)}))
        # the child opts in to code execution through req["allow_code"], not an inherited variable
        from obim.merging.determinism import unpinned_env

        env = {
            **unpinned_env(dict(os.environ)),  # vLLM's CPU backend: its own kernels (bf16 fails under the AVX2 pin)
            "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cuda" if _cuda() else "cpu"),
        }
        # its own process group: vLLM's engine and workers are its children, and the child leaves by os._exit
        # (below), so they would outlive it holding their memory; the group is ended when the child is done
        proc = subprocess.Popen(
            [sys.executable, "-m", "obim.bench.evaluation", str(path)], env=env, start_new_session=True
        )
        try:
            rc = proc.wait()
        finally:
            end_process_group(proc.pid)
        if rc != 0 or not res.is_file():
            raise ObimError(f"vllm evaluation of {req['model_dir']} failed (exit status {rc}; see above)")
        return json.loads(res.read_text())


def end_process_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM every process left in group `pgid`, SIGKILL what is still there after `grace_s`."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return  # nothing left
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return


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
