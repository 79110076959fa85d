"""What a job reads, and whether it can be read here: every model (a local directory, or a hub id in the offline
cache, or on the hub when online) and every dataset, config and split (the validation sources, the lm-eval tasks'
datasets). The dry run checks them all before any work and names every missing one (obim.bench.pipeline.dry_run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import JobPlan


@dataclass(frozen=True)
class Input:
    kind: str  # "model", "dataset", "file", "hub file" (repo:filename) or "metric" (an evaluate module)
    ref: str  # a path or a hub id
    name: str | None  # a dataset's config
    split: str | None
    why: str  # what reads it, e.g. "experiment.models.math", "validation source gsm8k", "task mmlu_anatomy"

    def describe(self) -> str:
        what = self.ref + (f" ({self.name})" if self.name else "") + (f" split {self.split}" if self.split else "")
        return f"{self.kind} {what} [{self.why}]"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _under(path: str, root: str | None) -> bool:
    return bool(root) and Path(path).expanduser().resolve().is_relative_to(Path(str(root)).expanduser().resolve())


def job_inputs(plan: JobPlan) -> list[Input]:
    """Everything the job reads, in order: the models, each model's validation sources, each task's dataset splits.
    What the toy zoo writes when it is first built is not listed (the job builds it)."""
    from .stages import input_paths

    zoo = plan.zoo if plan.zoo and not (Path(plan.zoo) / "zoo.json").is_file() else None
    out: list[Input] = []
    for name, path in input_paths(plan).items():
        if not _under(path, zoo):
            out.append(Input("model", path, None, None, "experiment.base" if name == "base" else f"model {name}"))
    seen: set[tuple] = set()
    for model, v in plan.validation.items():
        for source, spec in v.data.items():
            why = f"validation source {source} of {model}"
            if spec["builder"] == "jsonl":
                if not _under(spec["path"], zoo):
                    out.append(Input("file", spec["path"], None, None, why))
                continue
            names = spec.get("name")
            for n in names if isinstance(names, list) else [names]:
                key = (spec["path"], n, spec["split"])
                if key not in seen:
                    seen.add(key)
                    out.append(Input("dataset", spec["path"], n, spec["split"], why))
    for cfg, task in _hub_files(list(plan.tasks)):
        f = cfg["dataset_kwargs"]["hub_file"]
        out.append(Input("hub file", f"{f['repo']}:{f['filename']}", f.get("repo_type"), None, f"task {task}"))
    if _uses_code_eval(list(plan.tasks)):
        out.append(Input("metric", "evaluate-metric/code_eval", None, None, "lm-eval's code tasks"))
    for cfg, task in _task_datasets(list(plan.tasks)):
        # the split scored (lm-eval: test, else validation) and the one its shots are drawn from
        scored = cfg.get("test_split") or cfg.get("validation_split")
        for split in dict.fromkeys(s for s in (scored, cfg.get("fewshot_split")) if s):
            key = (cfg["dataset_path"], cfg.get("dataset_name"), split)
            if key not in seen:
                seen.add(key)
                out.append(Input("dataset", cfg["dataset_path"], cfg.get("dataset_name"), split, f"task {task}"))
    return out


def _task_datasets(tasks: list[str]) -> list[tuple[dict[str, Any], str]]:
    """(config, task name) of each task the benchmarks run that reads a dataset by path (tasks that build their own
    data, obim's toy tasks, are not listed)."""
    from .evaluation import _leaves, task_manager

    index = task_manager().task_index
    out = []
    for t in tasks:
        for cfg in _leaves(index, t, set()):
            if cfg.get("dataset_path") and not cfg.get("custom_dataset"):
                out.append((cfg, str(cfg.get("task", t))))
    return out


def _hub_files(tasks: list[str]) -> list[tuple[dict[str, Any], str]]:
    """obim's own tasks that read one file of a hub repo through their dataset hook (`dataset_kwargs.hub_file`)."""
    from .evaluation import _leaves, task_manager

    index = task_manager().task_index
    return [
        (cfg, str(cfg.get("task", t)))
        for t in tasks
        for cfg in _leaves(index, t, set())
        if isinstance((cfg.get("dataset_kwargs") or {}).get("hub_file"), dict)
    ]


def _uses_code_eval(tasks: list[str]) -> bool:
    """Whether a task executes generated code outside obim's sandbox: lm-eval's own code tasks score through
    `evaluate.load("code_eval")`, a module evaluate fetches from the hub unless it is in its modules cache."""
    from .evaluation import _leaves, code_tasks, task_manager, tasks_dir

    index, ours = task_manager().task_index, os.path.realpath(tasks_dir()) + os.sep
    return any(
        not os.path.realpath(str(c.get("process_results", ""))).startswith(ours)
        for t in code_tasks(tasks)
        for c in _leaves(index, t, set())
        if c.get("unsafe_code")
    )


def unreadable(inp: Input) -> str | None:
    """Why `inp` cannot be read here (None: it can)."""
    if inp.kind == "file":
        return None if Path(inp.ref).is_file() else "no such file"
    if inp.kind == "hub file":
        return _hub_file_missing(inp.ref, inp.name or "model")
    if inp.kind == "metric":
        return _metric_missing(inp.ref)
    local = Path(inp.ref).expanduser()
    if local.exists():
        if inp.kind == "model" and not (local / "config.json").is_file():
            return "a directory without config.json"
        return None
    if inp.kind == "model":
        return _model_missing(inp.ref)
    return _dataset_missing(inp.ref, inp.name, inp.split)


def _model_missing(repo: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    from obim.merging.checkpoint import looks_like_hub_id

    if not looks_like_hub_id(repo):
        return "no such directory"
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    if _offline():
        return "not in the offline hub cache (HF_HUB_OFFLINE=1)"
    try:
        from huggingface_hub import HfApi

        return None if HfApi().repo_exists(repo) else "not on the hub"
    except Exception as e:  # no network, a gated repo without a token...
        return f"not reachable on the hub ({type(e).__name__})"


def _hub_file_missing(ref: str, repo_type: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, filename = ref.split(":", 1)
    if isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str):
        return None
    if _offline():
        return "not in the offline hub cache (HF_HUB_OFFLINE=1)"
    try:
        from huggingface_hub import HfApi

        return None if HfApi().file_exists(repo, filename, repo_type=repo_type) else "not on the hub"
    except Exception as e:
        return f"not reachable on the hub ({type(e).__name__})"


def _metric_missing(name: str) -> str | None:
    """An evaluate module (code_eval): in evaluate's modules cache, or fetched from the hub when online."""
    import evaluate.config

    cache = Path(evaluate.config.HF_MODULES_CACHE) / "evaluate_modules" / "metrics" / name.replace("/", "--")
    if any(cache.glob(f"*/{name.split('/')[-1]}.py")):
        return None
    offline = _offline() or os.environ.get("HF_EVALUATE_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if offline:
        return f"not in evaluate's modules cache ({cache})"
    try:
        from huggingface_hub import HfApi

        return None if HfApi().repo_exists(name, repo_type="space") else "not on the hub"
    except Exception as e:
        return f"not reachable on the hub ({type(e).__name__})"


def _dataset_missing(path: str, name: str | None, split: str | None) -> str | None:
    import datasets

    try:
        builder = datasets.load_dataset_builder(path, name)
    except Exception as e:  # offline and not cached, unknown dataset or config, no network
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return "not in the offline datasets cache" if _offline() else f"not loadable ({msg[:160]})"
    splits = builder.info.splits
    if split and splits and split not in splits:
        return f"no split {split} (it has {', '.join(splits)})"
    return None


def missing_inputs(plan: JobPlan) -> tuple[list[Input], list[str]]:
    """The job's inputs, and one line for each that cannot be read here."""
    inputs = job_inputs(plan)
    return inputs, [f"{i.describe()}: {why}" for i in inputs if (why := unreadable(i)) is not None]
