"""What a job reads, and whether it can be read here: every model (a local directory, or a hub id in the offline
cache, or on the hub when online) and every dataset, config and split (the validation sources, the lm-eval tasks'
datasets). The dry run checks them all before any work and names every missing one (obim.bench.pipeline.dry_run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from obim.merging.errors import ObimError

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
    from huggingface_hub import constants  # the hub library's own reading of HF_HUB_OFFLINE

    return bool(constants.HF_HUB_OFFLINE)


def _under(path: str, root: str | None) -> bool:
    return bool(root) and Path(path).expanduser().resolve().is_relative_to(Path(str(root)).expanduser().resolve())


def job_inputs(plan: JobPlan) -> list[Input]:
    """Everything the job reads, in order: the models, each model's validation sources, each task's dataset splits.
    What the toy zoo writes when it is first built is not listed (the job builds it)."""
    from .evaluation import _leaves, task_manager, where_code_runs
    from .stages import input_paths

    zoo = plan.zoo if plan.zoo and not (Path(plan.zoo) / "zoo.json").is_file() else None
    out: list[Input] = []
    for name, path in input_paths(plan).items():
        if not _under(path, zoo):
            out.append(Input("model", path, None, None, "experiment.base" if name == "base" else f"model {name}"))
    seen: set[tuple] = set()
    for model, v in plan.validation.items():
        for source, spec in v.data.items():
            if not (spec["builder"] == "jsonl" and _under(spec["path"], zoo)):
                out += _source_inputs(spec, f"validation source {source} of {model}", seen)
    index = task_manager().task_index
    leaves = [(cfg, str(cfg.get("task", t))) for t in plan.tasks for cfg in _leaves(index, t, set())]
    for cfg, task in leaves:  # obim's tasks whose dataset hook reads one file of a hub repo
        f = (cfg.get("dataset_kwargs") or {}).get("hub_file")
        if isinstance(f, dict):
            out.append(Input("hub file", f"{f['repo']}:{f['filename']}", f.get("repo_type"), None, f"task {task}"))
    # lm-eval's own code tasks score through evaluate.load("code_eval"), a module evaluate fetches from the hub
    # unless it is in its modules cache
    if where_code_runs(list(plan.tasks))[1]:
        out.append(Input("metric", "evaluate-metric/code_eval", None, None, "lm-eval's code tasks"))
    for cfg, task in leaves:  # tasks that read a dataset by path (not those that build their own data: the toy's)
        if not cfg.get("dataset_path") or cfg.get("custom_dataset"):
            continue
        # the split scored (lm-eval: test, else validation) and the one its shots are drawn from
        scored = cfg.get("test_split") or cfg.get("validation_split")
        for split in dict.fromkeys(s for s in (scored, cfg.get("fewshot_split")) if s):
            key = (cfg["dataset_path"], cfg.get("dataset_name"), split)
            if key not in seen:
                seen.add(key)
                out.append(Input("dataset", cfg["dataset_path"], cfg.get("dataset_name"), split, f"task {task}"))
    return out


def dev_inputs(exp: dict, seen: set[tuple] | None = None) -> list[Input]:
    """The datasets the search's dev tasks read through their own hooks (tasks/paper_dev: a validation source's
    split past the saliency draw): each `dev_benchmarks` entry's source and split. Dev tasks that read a dataset by
    path (obim_mmlu_dev) are listed by job_inputs of a plan whose tasks are the dev tasks."""
    from .validation import BUILDERS

    seen = set() if seen is None else seen
    out = []
    for task, spec in (exp.get("dev_benchmarks") or {}).items():
        sources = exp.get("validation_sources") or {}
        if spec.get("source") not in sources:
            continue
        given = dict(sources[spec["source"]] or {})
        kind = given.get("builder", spec["source"])
        # the source's dataset with the dev task's split (an evaluated split of the source may be its dev data)
        defaults = BUILDERS[kind].defaults if kind in BUILDERS else {}
        src = {**defaults, **given, "split": spec["split"], "builder": kind}
        if kind == "jsonl":
            src["path"] = str(src["path"]).replace("{split}", str(spec["split"]))
        out += _source_inputs(src, f"dev task {task}", seen)
    return out


def _source_inputs(spec: dict, why: str, seen: set[tuple]) -> list[Input]:
    """A validation source's file, or its dataset's split in each of its configs (each once across `seen`)."""
    if spec["builder"] == "jsonl":
        return [Input("file", spec["path"], None, None, why)]
    out = []
    names = spec.get("name")
    for n in names if isinstance(names, list) else [names]:
        key = (spec["path"], n, spec["split"])
        if key not in seen:
            seen.add(key)
            out.append(Input("dataset", spec["path"], n, spec["split"], why))
    return out


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
    config = try_to_load_from_cache(repo, "config.json")
    if isinstance(config, str):
        return _weights_missing(Path(config).parent)
    if _offline():
        return "not in the offline hub cache (HF_HUB_OFFLINE=1)"
    try:
        from huggingface_hub import HfApi

        return None if HfApi().repo_exists(repo) else "not on the hub"
    except Exception as e:  # no network, a gated repo without a token...
        return f"not reachable on the hub ({type(e).__name__})"


def _weights_missing(snapshot: Path) -> str | None:
    """A cached model's snapshot without all of its weights (an interrupted download): the shards its index names,
    else any safetensors or pytorch_model*.bin file."""
    import json

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (snapshot / index).is_file():
            shards = sorted(set(json.loads((snapshot / index).read_text()).get("weight_map", {}).values()))
            gone = [f for f in shards if not (snapshot / f).is_file()]
            return f"incomplete in the hub cache: {', '.join(gone)} missing" if gone else None
    if any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin")):
        return None
    return "in the hub cache without weights (config.json only)"


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
    if _offline() or evaluate.config.HF_EVALUATE_OFFLINE:
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


def fetch(inp: Input) -> None:
    """Download one input into the HF caches (HF_HOME), as the job will read it: a model's files as the merge
    resolves them (weights, configs, tokenizer), a dataset's config and split into datasets' own cache (the only
    layout datasets reads offline), one file of a hub repo, an evaluate module. For a connected machine that
    prepares an offline cluster's HF_HOME (dry_run=fetch); local paths are left alone."""
    if inp.kind == "file" or Path(inp.ref).expanduser().exists():
        return
    if inp.kind == "model":
        from obim.merging.checkpoint import resolve_model_dir

        resolve_model_dir(inp.ref)
    elif inp.kind == "hub file":
        from huggingface_hub import hf_hub_download

        repo, filename = inp.ref.split(":", 1)
        hf_hub_download(repo, filename, repo_type=inp.name or "model")
    elif inp.kind == "metric":
        import evaluate

        evaluate.load(inp.ref.split("/")[-1])
    else:
        import datasets

        datasets.load_dataset(inp.ref, inp.name, split=inp.split)


def fetch_missing(plan: JobPlan) -> tuple[list[str], list[str]]:
    """Download every input of the job that cannot be read here (dry_run=fetch): see fetch_all."""
    return fetch_all(job_inputs(plan))


def fetch_all(inputs: list[Input]) -> tuple[list[str], list[str]]:
    """Download each of `inputs` (local paths aside) into the HF caches; returns the ones fetched and, for each that
    failed, one line with the reason. Every input is fetched, not only those a check calls missing: online, that
    check answers from the hub (a repo exists) rather than from the cache, and the downloaders skip what is cached.
    Refused offline: there is nothing to fetch from."""
    if _offline():
        raise ObimError("dry_run=fetch downloads from the hub: unset HF_HUB_OFFLINE (and HF_DATASETS_OFFLINE)")
    fetched, failed = [], []
    for inp in inputs:
        if inp.kind == "file" or Path(inp.ref).expanduser().exists():
            continue
        try:
            fetch(inp)
            fetched.append(inp.describe())
        except Exception as e:  # a gated repo without a token, no such dataset, no network: named, the rest go on
            from .estimate import why

            failed.append(f"{inp.describe()}: fetch failed ({why(e)})")
    return fetched, failed


def missing_inputs(plan: JobPlan) -> tuple[list[Input], list[str]]:
    """The job's inputs, and one line for each that cannot be read here."""
    inputs = job_inputs(plan)
    return inputs, [f"{i.describe()}: {why}" for i in inputs if (why := unreadable(i)) is not None]
