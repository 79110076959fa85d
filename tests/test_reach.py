"""The dry run checks that a job can read every input here: models (a local directory, a hub id in the offline
hub cache) and every dataset, config and split (validation sources, the lm-eval tasks' datasets), and names each
one it cannot read. The mirror here is written as the hub's own tools leave their caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose

CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import compose
from obim.bench.plan import plan_job
from obim.bench.reach import missing_inputs

inputs, missing = missing_inputs(plan_job(compose("experiment=llama2_13b_sft", "method=obim", "dry_run=true")))
alpaca = None
if not any(m.startswith("hub file tatsu-lab/alpaca_eval") for m in missing):  # the task's hook reads it from there
    from obim.bench.tasks.paper.utils import alpaca_eval_dataset

    f = {"repo": "tatsu-lab/alpaca_eval", "filename": "alpaca_eval.json", "repo_type": "dataset"}
    alpaca = len(alpaca_eval_dataset(hub_file=f)["eval"])
print(json.dumps({"inputs": [i.describe() for i in inputs], "missing": missing, "alpaca": alpaca}))
"""


def write_model(hub: Path, repo: str, src: Path, kind: str = "models") -> None:
    """A repo in the hub cache's layout: refs/main names a snapshot holding the repo's files."""
    snap = hub / f"{kind}--{repo.replace('/', '--')}" / "snapshots" / "mirror"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("mirror")


def write_dataset(home: Path, repo: str, config: str, splits: dict[str, dict]) -> None:
    """One config of a dataset in datasets' own processed cache (what load_dataset leaves), real column names."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    name = repo.split("/")[1]
    d = home / "datasets" / f"{repo.split('/')[0]}___{name}" / config / "0.0.0" / ("0" * 16)
    d.mkdir(parents=True)
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")})
    info = datasets.SplitDict(dataset_name=name)
    for split, cols in splits.items():
        with ArrowWriter(features=features, path=str(d / f"{name}-{split}.arrow")) as w:
            w.write_table(datasets.Dataset.from_dict(cols, features=features).data.table)
            n, size = w.finalize()
        info.add(datasets.SplitInfo(name=split, num_bytes=size, num_examples=n, dataset_name=name))
    datasets.DatasetInfo(
        features=features, builder_name="parquet", dataset_name=name, config_name=config, version="0.0.0", splits=info
    ).write_to_directory(str(d))


def missing_with(home: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO / "tests")], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # indexes lm-eval's bundled tasks
def test_every_unreadable_input_is_named(tmp_path):
    from conftest import make_llama

    home = tmp_path / "hf"
    empty = missing_with(home)
    assert len(empty["missing"]) == len(empty["inputs"]) > 100  # nothing here: 4 models, validation sets, benchmarks
    for what in (
        "model meta-llama/Llama-2-13b-hf [experiment.base]: not in the offline hub cache (HF_HUB_OFFLINE=1)",
        "model layoric/llama-2-13b-code-alpaca [model code]: not in the offline hub cache (HF_HUB_OFFLINE=1)",
        "dataset tatsu-lab/alpaca split train [validation source alpaca of lm]: not in the offline datasets cache",
        "dataset openai/gsm8k (main) split test [task obim_gsm8k_cot]: not in the offline datasets cache",
        "dataset cais/mmlu (anatomy) split dev [task mmlu_anatomy]: not in the offline datasets cache",
        "dataset openai/openai_humaneval split test [task obim_humaneval]: not in the offline datasets cache",
    ):
        assert what in empty["missing"], what
    # its code tasks (obim_humaneval, obim_mbpp) score in obim's sandbox: no code_eval module to fetch
    assert not [i for i in empty["inputs"] if i.startswith("metric ")]

    write_model(home / "hub", "meta-llama/Llama-2-13b-hf", make_llama(tmp_path / "base", 0))
    write_dataset(home, "openai/gsm8k", "main", {"train": {"question": ["1+1?"], "answer": ["#### 2"]}})
    alpaca = tmp_path / "alpaca"
    alpaca.mkdir()
    (alpaca / "alpaca_eval.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 3))
    write_model(home / "hub", "tatsu-lab/alpaca_eval", alpaca, kind="datasets")
    mirrored = missing_with(home)
    assert mirrored["inputs"] == empty["inputs"]

    def inputs(lines: list[str]) -> set[str]:
        return {line.split(": ")[0] for line in lines}

    assert inputs(empty["missing"]) - inputs(mirrored["missing"]) == {
        "model meta-llama/Llama-2-13b-hf [experiment.base]",
        "dataset openai/gsm8k (main) split train [validation source gsm8k of math]",
        "hub file tatsu-lab/alpaca_eval:alpaca_eval.json (dataset) [task obim_alpaca_eval]",
    }
    assert empty["alpaca"] is None and mirrored["alpaca"] == 3  # the file the dry run found is the one the task reads
    # the test split the benchmark scores is not in the mirror: named as such
    assert (
        "dataset openai/gsm8k (main) split test [task obim_gsm8k_cot]: no split test (it has train)"
        in (mirrored["missing"])
    )


def test_the_toy_zoo_inputs_are_built_not_missing(tmp_path):
    """A toy experiment's models and validation files are written by the zoo on the first job: nothing is missing
    before it is built; once it claims to be built, its files must be there."""
    from obim.bench.plan import plan_job
    from obim.bench.reach import missing_inputs

    zoo = tmp_path / "zoo"
    plan = plan_job(compose("method=obim", f"experiment.zoo={zoo}", "dry_run=true"))
    inputs, missing = missing_inputs(plan)
    assert (inputs, missing) == ([], [])
    zoo.mkdir()
    (zoo / "zoo.json").write_text("{}")  # built, but its files are gone
    inputs, missing = missing_inputs(plan)
    assert len(inputs) == 4 + 5 and len(missing) == len(inputs)  # 4 models, 5 validation files (the toy's own tasks
    assert "model " + str(zoo / "sft" / "base") + " [experiment.base]: no such directory" in missing  # need none)


def test_dry_run_modes_are_checked():
    from obim.bench.plan import plan_job
    from obim.merging.errors import ObimError

    with pytest.raises(ObimError, match=r"^dry_run: expected false, true .* or fetch \(download .*, got 'maybe'"):
        plan_job(compose("method=ta", "dry_run=maybe"))
    assert plan_job(compose("method=ta", "dry_run=plan")).runtime.dry_run == "plan"
    assert plan_job(compose("method=ta", "dry_run=fetch")).runtime.dry_run == "fetch"
    assert plan_job(compose("method=ta", "dry_run=true")).runtime.dry_run is True


def test_fetch_downloads_each_kind_of_input_as_the_job_reads_it(monkeypatch, tmp_path):
    """dry_run=fetch (preparing an offline cluster's HF_HOME): a model as the merge resolves it, a dataset's config
    and split with load_dataset (datasets' own cache, the one it reads offline), one hub file, an evaluate module;
    a local path is left alone."""
    import datasets
    import evaluate
    import huggingface_hub

    import obim.merging.checkpoint as ck
    from obim.bench.reach import Input, fetch

    calls = []
    monkeypatch.setattr(ck, "resolve_model_dir", lambda ref: calls.append(("model", ref)))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(("dataset", a, k)))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(("file", a, k)))
    monkeypatch.setattr(evaluate, "load", lambda name: calls.append(("metric", name)))
    fetch(Input("model", "org/model", None, None, "experiment.base"))
    fetch(Input("dataset", "cais/mmlu", "all", "dev", "validation source mmlu"))
    fetch(Input("hub file", "tatsu-lab/alpaca_eval:alpaca_eval.json", "dataset", None, "task obim_alpaca_eval"))
    fetch(Input("metric", "evaluate-metric/code_eval", None, None, "lm-eval's code tasks"))
    fetch(Input("model", str(tmp_path), None, None, "model lm"))  # local: nothing to fetch
    fetch(Input("file", str(tmp_path / "v.jsonl"), None, None, "validation source x"))
    assert calls == [
        ("model", "org/model"),
        ("dataset", ("cais/mmlu", "all"), {"split": "dev"}),
        ("file", ("tatsu-lab/alpaca_eval", "alpaca_eval.json"), {"repo_type": "dataset"}),
        ("metric", "code_eval"),
    ]


def test_fetch_fetches_every_hub_input_and_names_each_failure(monkeypatch, tmp_path):
    """Online, the readability check answers from the hub (the repo exists), not from the cache: fetch downloads
    every hub input whatever it says (the downloaders skip what is cached); local paths are left alone; what fails
    to download is named, the rest go on; offline, fetch is refused."""
    import obim.bench.reach as reach
    from obim.bench.reach import Input, fetch_missing
    from obim.merging.errors import ObimError

    inputs = [
        Input("model", "org/on-the-hub", None, None, "experiment.base"),
        Input("model", "org/gated", None, None, "model lm"),
        Input("dataset", "org/data", "main", "train", "validation source gsm8k of math"),
        Input("model", str(tmp_path), None, None, "model code"),
    ]
    fetched = []

    def fake_fetch(inp):
        if inp.ref == "org/gated":
            raise OSError("401 Client Error: gated repo\nmore detail")
        fetched.append(inp.ref)

    monkeypatch.setattr(reach, "job_inputs", lambda plan: inputs)
    monkeypatch.setattr(reach, "unreadable", lambda inp: None)  # online: everything "exists" on the hub
    monkeypatch.setattr(reach, "fetch", fake_fetch)
    monkeypatch.setattr(reach, "_offline", lambda: False)
    done, failed = fetch_missing(None)
    assert fetched == ["org/on-the-hub", "org/data"]
    assert done == [
        "model org/on-the-hub [experiment.base]",
        "dataset org/data (main) split train [validation source gsm8k of math]",
    ]
    assert failed == ["model org/gated [model lm]: fetch failed (OSError: 401 Client Error: gated repo)"]
    monkeypatch.setattr(reach, "_offline", lambda: True)
    with pytest.raises(ObimError, match="dry_run=fetch downloads from the hub: unset HF_HUB_OFFLINE"):
        fetch_missing(None)


def test_a_cached_model_without_all_its_weights_is_missing(tmp_path):
    """An interrupted download leaves config.json without (all) the shards: the dry run says which are missing."""
    import json

    from obim.bench.reach import _weights_missing

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    assert _weights_missing(snap) == "in the hub cache without weights (config.json only)"
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (snap / shards["a"]).write_bytes(b"x")
    assert _weights_missing(snap) == "incomplete in the hub cache: model-00002-of-00002.safetensors missing"
    (snap / shards["b"]).write_bytes(b"x")
    assert _weights_missing(snap) is None
    (snap / "model.safetensors.index.json").unlink()
    assert _weights_missing(snap) is None  # unindexed: any weights file
