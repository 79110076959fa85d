"""Evaluation through lm-eval (every metric comes from lm_eval.simple_evaluate): the tasks shipped in obim/tasks
(the toy benchmarks; the paper's GSM8K/MATH prompts and AlpacaEval generation in obim/tasks/paper) and any task
lm-eval knows, with lm-eval's own `hf` or `vllm` model classes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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
# the hf evaluator's model_args when an evaluation gives none
HF_MODEL_ARGS: dict[str, Any] = {"dtype": "float32"}


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


@dataclass(frozen=True)
class InPlace:
    """A merge evaluated without writing it: its resolved config (what obim.merging.config.load_config reads), and
    the directories whose architecture and config (the base's) and tokenizer the merged model has. The evaluator
    is built from `arch_dir` once per process and each such merge is streamed into its weights
    (obim.merging.merge.MergeStream, one tensor at a time): `hf` copies them into the model, `vllm` reloads them
    through vLLM's in-place weight loading."""

    config: dict[str, Any]
    arch_dir: str
    tokenizer_dir: str
    merge_device: str = "cpu"


def evaluate_model(model_dir: str | Path, tasks: list[str], **kwargs: Any) -> dict[str, float | None]:
    """{task: score in percent} of one model directory (measure_model's scores)."""
    return measure_model(model_dir, tasks, **kwargs)["scores"]


def measure_model(
    model_dir: str | Path | InPlace,
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
    "stderr": {task: percent points, None where lm-eval gave none}, "n": {task: items scored}}. An `InPlace` merge
    is loaded into this process's evaluator of its architecture instead (one per process; for vllm one engine
    in a child kept for the next merge), and "load_s" says how long merging it into the weights took.

    `num_fewshot` sets a task's shots (others keep their YAML's). Judged tasks (AlpacaEval) score None unless a
    judge is configured; their outputs go to `outputs_dir`. `vllm` runs in a child process: vLLM spawns workers and
    keeps its memory until its process ends. Tasks that execute generated code (toy_humaneval, humaneval...) run
    only with `allow_code` or HF_ALLOW_CODE_EVAL=1 (a one-line error otherwise)."""
    if backend not in ("hf", "vllm"):
        raise ObimError(f"eval backend: expected hf or vllm, got {backend!r}")
    check_code_opt_in(tasks, allow_code)
    if code_allowed(allow_code):
        announce_code_execution(tasks, say)
    merge = model_dir if isinstance(model_dir, InPlace) else None
    req = {
        "model_dir": merge.arch_dir if merge else str(model_dir),
        "merge": dataclasses.asdict(merge) if merge else None,
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
    if not merge:  # an evaluator kept for merges holds the GPU a model directory's evaluation needs
        free_device(device)
    if backend == "vllm":
        return _engine_server(req).ask(req) if merge else _evaluate_in_child(req)
    if model_args is None:
        req["model_args"] = dict(HF_MODEL_ARGS)
    return _run(req)


def _engine_key(r: dict) -> str:
    """What an evaluator built for one merge can evaluate every other one with: the same backend, architecture
    directory, tokenizer, options and device."""
    m = r["merge"]
    return json.dumps(
        [r["backend"], m["arch_dir"], m["tokenizer_dir"], r["model_args"], r["batch_size"], r["device"]],
        sort_keys=True,
        default=str,
    )


_ENGINE: dict[str, Any] = {}  # this process's evaluator for in-place merges: at most one (a 13B model's memory)


def _lm(r: dict) -> Any:
    """lm-eval's model object: built from the model directory, or for an in-place merge this process's evaluator
    of its architecture (built on first use, replaced when another is needed) with the merge loaded into it."""
    from lm_eval.api.registry import get_model

    opts = {"batch_size": r["batch_size"]}
    if r["backend"] == "hf":
        opts["device"] = r["device"]
    m = r.get("merge")
    if not m:
        return get_model(r["backend"]).create_from_arg_string(model_args_string(r["model_dir"], r["model_args"]), opts)
    key = _engine_key(r)
    if key not in _ENGINE:
        _ENGINE.clear()
        args = model_args_string(m["arch_dir"], r["model_args"])
        if os.path.realpath(m["tokenizer_dir"]) != os.path.realpath(m["arch_dir"]):
            args += f",tokenizer={m['tokenizer_dir']}"
        _ENGINE[key] = get_model(r["backend"]).create_from_arg_string(args, opts)
    return _ENGINE[key]


def load_merge(lm: Any, backend: str, merge: dict[str, Any]) -> float:
    """Stream the merge `merge` (InPlace as a dict) into lm-eval's model object's weights; the seconds it took."""
    import time

    from obim.merging.merge import MergeStream

    t0 = time.perf_counter()
    with MergeStream(merge["config"], merge["merge_device"]) as stream:
        if backend == "hf":
            copy_in_place(lm.model, stream)
        else:  # vLLM's own loader (its names, fused and repacked layouts), then nothing cached from old weights
            lm.model.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(stream)})
            lm.model.reset_prefix_cache()
    return time.perf_counter() - t0


def copy_in_place(model: Any, stream: Any) -> None:
    """Copy each merged tensor into the transformers model's parameter of the same name. Every name must be one of
    the model's, and every parameter and persistent buffer set (a tied one through the tensor it shares), or a
    one-line error before anything is copied."""
    import torch

    state = model.state_dict()
    names = [p.name for p in stream.plans]
    where = f"the {type(model).__name__} evaluated in place (keep_merged=true evaluates it from disk)"
    for p in stream.plans:
        if p.name not in state:
            raise ObimError(f"tensor {p.name}: not a parameter of {where}")
        if tuple(state[p.name].shape) != tuple(p.out_shape):
            raise ObimError(f"tensor {p.name}: shape {tuple(p.out_shape)}, {where} has {tuple(state[p.name].shape)}")
    named, set_ptrs = set(names), {state[n].data_ptr() for n in names}
    unset = [k for k, v in state.items() if k not in named and v.data_ptr() not in set_ptrs]
    if unset:
        raise ObimError(f"tensor {unset[0]} of {where}: the merge has no tensor of that name")
    with torch.no_grad():
        for name, t in stream:
            state[name].copy_(t)


def _run(r: dict) -> dict[str, Any]:
    import lm_eval

    from .judge import JUDGED, judge

    lm = _lm(r)
    load_s = None
    if r.get("merge"):
        try:
            load_s = load_merge(lm, r["backend"], r["merge"])
        except BaseException as e:
            if r["backend"] != "vllm":  # hf: the next merge sets every parameter again
                raise
            # vLLM's layer-wise reload was left midway (layers on the meta device, partial buffers): this engine
            # would mix two merges' weights, so it is never used again
            _ENGINE.clear()
            raise SpoiledEngine(str(e) if isinstance(e, ObimError) else f"{type(e).__name__}: {e}") from e
    # the judge's generator name: an in-place merge's is its outputs folder's (the evaluation's key), not the base's
    named = f"merge-{Path(r['outputs_dir'] or 'merged').name}" if r.get("merge") else r["model_dir"]
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
                    scores[t] = judge(t, out["samples"][t], named, r["outputs_dir"])
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
        **({"load_s": round(load_s, 3)} if load_s is not None else {}),
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


def _child_env(in_process: bool = False) -> dict[str, str]:
    """The vLLM child's environment. `in_process`: vLLM's engine core in the child's own process (not a process of
    its own), so that a merge's tensors reach the model as an iterator, never pickled."""
    from obim.merging.determinism import unpinned_env

    env = {
        **unpinned_env(dict(os.environ)),  # vLLM's CPU backend: its own kernels (bf16 fails under the AVX2 pin)
        "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cuda" if _cuda() else "cpu"),
    }
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def _evaluate_in_child(req: dict) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="obim-eval-") as tmp:
        path, res = Path(tmp) / "request.json", Path(tmp) / "scores.json"
        path.write_text(json.dumps({**req, "out": str(res)}))
        # the child opts in to code execution through req["allow_code"], not an inherited variable
        # its own process group: vLLM's engine and workers are its children, and the child leaves by os._exit
        # (below), so they would outlive it holding their memory; the group is ended when the child is done
        proc = subprocess.Popen(
            [sys.executable, "-m", "obim.bench.evaluation", str(path)], env=_child_env(), start_new_session=True
        )
        try:
            rc = proc.wait()
        finally:
            end_process_group(proc.pid)
        if rc != 0 or not res.is_file():
            raise ObimError(f"vllm evaluation of {req['model_dir']} failed (exit status {rc}; see above)")
        return json.loads(res.read_text())


class SpoiledEngine(ObimError):
    """A merge failed while it was being loaded into a vLLM engine: the engine holds a mix of weights and ends."""


class EngineServer:
    """A child process keeping one vLLM engine for in-place merges (one architecture, tokenizer and options):
    each request (a JSON line on its stdin) streams a merge into the engine's weights and evaluates it; the reply
    comes back as one JSON line on a pipe of its own (vLLM writes on stdout and stderr). Its process group is
    ended by `close()`, or when this process exits."""

    def __init__(self, key: str) -> None:
        self.key = key
        rfd, wfd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "obim.bench.evaluation", "--serve", str(wfd)],
            stdin=subprocess.PIPE,
            env=_child_env(in_process=True),
            start_new_session=True,
            pass_fds=(wfd,),
            text=True,
        )
        os.close(wfd)
        self.replies = os.fdopen(rfd)

    def ask(self, req: dict) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({**req, "log": _log_file()}) + "\n")
            self.proc.stdin.flush()
            line = self.replies.readline()
        except (BrokenPipeError, OSError):
            line = ""
        except BaseException:  # interrupted with a reply pending: the next request would read this one's
            self.close()
            raise
        if not line:  # the child ended: its error is on the console above
            self.close()
            raise ObimError(
                f"vllm evaluation of a merge of {req['model_dir']} failed (exit status {self.proc.returncode}; "
                "see above)"
            )
        reply = json.loads(line)
        if reply.get("spoiled"):  # the child ends: the next merge gets a new engine
            self.close()
        if "error" in reply:
            raise ObimError(reply["error"])
        return reply

    def close(self, grace_s: float = 10.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the server's loop ends
        with contextlib.suppress(subprocess.TimeoutExpired):  # reaped first: a zombie still counts in its group
            self.proc.wait(timeout=grace_s)
        end_process_group(self.proc.pid, grace_s)  # what it left (vLLM's workers), or the server itself
        self.proc.wait()
        self.replies.close()
        if _SERVER.get("server") is self:
            _SERVER.clear()


_SERVER: dict[str, EngineServer] = {}  # this process's vLLM engine server, at most one
_AT_EXIT: list[Any] = []


def _close_server() -> None:
    if "server" in _SERVER:
        _SERVER["server"].close()


def free_device(device: str) -> None:
    """Before this process computes on `device`: a GPU's in-place evaluators (the vLLM engine's child, which holds
    `gpu_memory_utilization` of it; the hf model) are ended, and built again by the next evaluation. A CPU keeps
    them (memory there is not reserved)."""
    if not device.startswith("cuda") or not (_ENGINE or _SERVER):
        return
    _close_server()
    _ENGINE.clear()
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _engine_server(req: dict) -> EngineServer:
    """The engine server for `req`'s architecture and options: the running one, or a new one (the old one ended:
    one engine's memory at a time)."""
    import atexit

    key = _engine_key(req)
    server = _SERVER.get("server")
    if server is not None and (server.key != key or server.proc.poll() is not None):
        server.close()
        server = None
    if server is None:
        if not _AT_EXIT:
            _AT_EXIT.append(atexit.register(_close_server))
        server = _SERVER["server"] = EngineServer(key)
    return server


def _log_file() -> str | None:
    """The regular file this process's stderr goes to (a sweep job's log), if it is one."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def _serve(fd: int) -> None:
    """The engine server's loop (EngineServer): one request per line of stdin until it closes."""
    os.set_inheritable(fd, False)  # a program it starts (code_eval) must not hold the parent's EOF back
    os.set_inheritable(0, False)
    replies = os.fdopen(fd, "w")
    for line in sys.stdin:
        r = json.loads(line)
        if r.get("log"):  # the requesting job's log (a sweep's jobs each have one), not the first job's
            sys.stdout.flush()
            sys.stderr.flush()
            fd = os.open(r["log"], os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        try:
            reply: dict[str, Any] = _run(r)
        except ObimError as e:
            reply = {"error": str(e), "spoiled": isinstance(e, SpoiledEngine)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if reply.get("spoiled"):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's exit-time teardown can abort (SIGABRT) on CPU


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
    if sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]))
    else:
        _child_main(sys.argv[1])
