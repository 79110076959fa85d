"""The rehearsal's hub-layout mirror (obim/bench/rehearsal): the hub cache layout write_repo writes, the records of
every dataset the real experiments read, and that datasets, obim's validation draws and lm-eval load them offline
from a fresh HF_HOME (in subprocesses: datasets and huggingface_hub read HF_HOME when imported)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from obim.bench.rehearsal import data
from obim.bench.rehearsal.hubcache import blob_id, repo_folder, write_processed, write_repo
from obim.bench.validation import last_boxed, resolve_source

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("llama2_13b_sft", "qwen2_7b_pt")


def _run_offline(home: Path, code: str, timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter with HF_HOME=home, offline; it prints one JSON line last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # HF_HUB_CACHE etc. would win over HF_HOME
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    data.write_datasets(home, n_test=2)
    return home


# ------------------------------------------------------------------------------------------------ hub cache


def test_write_repo_layout(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(b"\0" * 100)
    (src / "sub" / "notes.txt").write_text("hello")
    hub = tmp_path / "hub"
    snap = write_repo(hub, "org/Model-X", src)
    folder = repo_folder(hub, "org/Model-X")
    assert folder.name == "models--org--Model-X"
    commit = (folder / "refs" / "main").read_bytes().decode()
    assert len(commit) == 40 and set(commit) <= set("0123456789abcdef") and snap.name == commit
    for rel in ("config.json", "model.safetensors", "sub/notes.txt"):
        link = snap / rel
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.read_bytes() == (src / rel).read_bytes()
    # blob names: sha256 for LFS files, git's blob sha1 for the others
    assert os.path.basename(os.readlink(snap / "model.safetensors")) == hashlib.sha256(b"\0" * 100).hexdigest()
    assert blob_id(src / "config.json") == hashlib.sha1(b'blob 8\0{"a": 1}').hexdigest()
    assert os.path.basename(os.readlink(snap / "config.json")) == blob_id(src / "config.json")

    assert write_repo(hub, "org/Model-X", src) == snap  # same contents, same commit: idempotent
    (src / "config.json").write_text('{"a": 2}')
    snap2 = write_repo(hub, "org/Model-X", src)
    assert snap2 != snap and (folder / "refs" / "main").read_text() == snap2.name
    (src / "sub" / "notes.txt").unlink()
    snap3 = write_repo(hub, "org/Model-X", src, commit="ab" * 20)
    assert not (snap3 / "sub").exists()  # a file gone from the source is gone from the snapshot

    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache("org/Model-X", "config.json", cache_dir=hub) == str(snap3 / "config.json")
    with pytest.raises(ValueError, match="40 lowercase hex"):
        write_repo(hub, "org/Model-X", src, commit="main")


def test_write_processed_is_deterministic(tmp_path):
    feats = data.GSM8K_FEATURES
    rows = data.records("openai/gsm8k", "main", "test", 3)
    d1 = write_processed(tmp_path, "openai/gsm8k", "main", {"test": rows}, feats)
    assert d1.relative_to(tmp_path).parts[:4] == ("datasets", "openai___gsm8k", "main", "0.0.0")
    info = json.loads((d1 / "dataset_info.json").read_text())
    assert info["config_name"] == "main" and info["splits"]["test"]["num_examples"] == 3
    before = {p.name: p.read_bytes() for p in d1.iterdir()}
    d2 = write_processed(tmp_path, "openai/gsm8k", "main", {"test": rows}, feats)
    assert d2 == d1 and {p.name: p.read_bytes() for p in d2.iterdir()} == before
    assert not any(p.name.startswith(".") for p in (tmp_path / "datasets").iterdir())  # no staging left behind


# ---------------------------------------------------------------------------------------------------- records


def _rows(path: str, name: str | None, split: str, n_test: int | None = None) -> int:
    spec = data.SPECS[path]
    return spec.sizes(name or "default", n_test).get(split, 0)


def _source_rows(spec: dict, n_test: int | None = None) -> int:
    names = spec.get("name")
    return sum(_rows(spec["path"], n, spec["split"], n_test) for n in (names if isinstance(names, list) else [names]))


@pytest.mark.parametrize("n_test", [None, data.N_TEST], ids=["real", "small"])
def test_sizes_cover_the_presets(n_test):
    """Every validation draw of the experiments (Table 9 sizes, Tables 4 and 5's math-model sets) and every dev
    task's skip fit in the mirror's splits, real-sized or small."""
    table5 = yaml.safe_load((ROOT / "conf/paper/table5.yaml").read_text())["hydra"]["sweeper"]["params"]
    math_sets = []  # (sources, size) of Tables 4 and 5's math-model sets; Table 5 varies the size of `math`
    for name in ("math", "code", "math_code"):
        v = yaml.safe_load((ROOT / "conf/validation" / f"{name}.yaml").read_text())
        sizes = str(table5["validation.size"]).split(",") if name == table5["validation"] else [v["size"]]
        math_sets.append((v["source"], max(int(s) for s in sizes)))
    for exp in EXPERIMENTS:
        cfg = yaml.safe_load((ROOT / "conf/experiment" / f"{exp}.yaml").read_text())
        sources = cfg["validation_sources"]
        draws: dict[str, int] = {}
        models = cfg.get("models") or {"checkpoint": cfg["checkpoint"]}
        for m in models.values():
            for src, n in m["validation"].items():
                draws[src] = max(draws.get(src, 0), n)
        if exp == "llama2_13b_sft":  # Tables 4 and 5 draw the math model's set from these sources
            for srcs, size in math_sets:
                for src in srcs:
                    draws[src] = max(draws.get(src, 0), math.ceil(size / len(srcs)))
        for src, n in draws.items():
            spec = resolve_source(src, sources[src], "train", src)
            assert _source_rows(spec, n_test) >= n, (exp, src, _source_rows(spec, n_test), n)
        for task, dev in cfg["dev_benchmarks"].items():
            spec = resolve_source(dev["source"], sources[dev["source"]], dev["split"], task)
            rows = _source_rows(spec, n_test)
            if "skip" in dev:  # a dev task reads the split past the validation draw's first `skip` records
                assert rows > dev["skip"] >= draws[dev["source"]], (task, rows)
                if n_test is None:  # real sizes: the dev task gets all its n records
                    assert rows - dev["skip"] >= dev.get("n", 500), (task, rows)
            else:
                assert _rows(spec["path"], spec.get("name"), dev["split"], n_test) > 0, task
    assert _rows("cais/mmlu", "all", "dev", n_test) == 285
    assert _source_rows(resolve_source("ceval", None, "dev", ""), n_test) == 260


# Hand-copied from the sources data.SIZE_SOURCES names (dataset cards' dataset_info, READMEs): what a real run reads
REAL_EXPECTED = {
    ("openai/gsm8k", "main", "test"): 1319,
    ("openai/gsm8k", "main", "train"): 7473,
    ("openai/openai_humaneval", "openai_humaneval", "test"): 164,
    ("google-research-datasets/mbpp", "full", "test"): 500,
    ("google-research-datasets/mbpp", "full", "validation"): 90,
    ("google-research-datasets/mbpp", "full", "prompt"): 10,
    ("google-research-datasets/mbpp", "full", "train"): 374,
    ("cais/mmlu", "all", "test"): 14042,
    ("cais/mmlu", "all", "validation"): 1531,
    ("cais/mmlu", "all", "dev"): 285,
    ("cais/mmlu", "abstract_algebra", "test"): 100,
    ("cais/mmlu", "abstract_algebra", "validation"): 11,
    ("cais/mmlu", "professional_law", "test"): 1534,
    ("cais/mmlu", "high_school_psychology", "validation"): 60,
    ("ceval/ceval-exam", "accountant", "val"): 49,
    ("ceval/ceval-exam", "middle_school_geography", "val"): 12,
    ("ceval/ceval-exam", "veterinary_medicine", "val"): 23,
    ("EleutherAI/hendrycks_math", "algebra", "test"): 1187,
    ("EleutherAI/hendrycks_math", "algebra", "train"): 1744,
    ("EleutherAI/hendrycks_math", "precalculus", "test"): 546,
    ("Rakuten/JGLUE", "JCommonsenseQA", "validation"): 1119,
    ("Rakuten/JGLUE", "JCommonsenseQA", "train"): 8939,
    ("Rakuten/JGLUE", "JNLI", "validation"): 2434,
    ("Rakuten/JGLUE", "JSQuAD", "validation"): 4442,
    ("Rakuten/JGLUE", "MARC-ja", "validation"): 5654,
    ("kumapo/JAQKET", "v2.0", "validation"): 1164,
    ("juletxara/mgsm", "ja", "test"): 250,
    ("mkshing/xlsum_ja", "default", "validation"): 758,
    ("mkshing/xlsum_ja", "default", "test"): 766,
    ("polm-stability/xwinograd-ja", "default", "test"): 959,
}


def test_real_sizes():
    """By default every evaluated split (and each dev task's train split) has its real size, each with a source;
    n_test keeps the small mirror."""
    for (repo, config, split), n in REAL_EXPECTED.items():
        assert _rows(repo, config, split) == n, (repo, config, split)
    for repo, configs in data.REAL_ROWS.items():  # the table and the specs agree, and every number has a source
        assert repo in data.SIZE_SOURCES and set(configs) <= set(data.SPECS[repo].configs), repo
        for config, splits in configs.items():
            for split, n in splits.items():
                assert _rows(repo, config, split) == n == data.real_rows(repo, config, split), (repo, config, split)
                if split not in ("train", "prompt"):  # the evaluated ones: n_test each in the small mirror
                    small = 3 * len(data.MMLU_SUBJECTS) if (repo, config) == ("cais/mmlu", "all") else 3
                    assert _rows(repo, config, split, 3) == small, (repo, config, split)
    assert list(data.MMLU_ROWS) == data.MMLU_SUBJECTS and len(data.MMLU_SUBJECTS) == 57
    assert list(data.CEVAL_VAL) == list(data.CEVAL_SUBJECTS) and sum(data.CEVAL_VAL.values()) == 1346
    assert [sum(x) for x in zip(*data.MATH_ROWS.values(), strict=True)] == [7500, 5000]
    assert list(data.MATH_ROWS) == data.MATH_SUBJECTS
    for split in ("test", "validation"):  # "all" is the subjects' concatenation
        assert sum(_rows("cais/mmlu", s, split) for s in data.MMLU_SUBJECTS) == _rows("cais/mmlu", "all", split)
    assert len(json.loads(data.HUB_FILES["tatsu-lab/alpaca_eval"].content(None))) == data.ALPACA_EVAL_ROWS == 805
    assert "tatsu-lab/alpaca_eval" in data.SIZE_SOURCES
    assert len(data.records("cais/mmlu", "all", "validation")) == 1531
    assert data.records("cais/mmlu", "all", "test", 2)[:2] == data.records("cais/mmlu", "abstract_algebra", "test", 2)


def test_write_datasets_sizes(tmp_path):
    only = ["openai/openai_humaneval", "tatsu-lab/alpaca_eval"]
    real = {w.repo_id: w.rows for w in data.write_datasets(tmp_path / "real", only=only)}
    assert real == {"openai/openai_humaneval": {"test": 164}, "tatsu-lab/alpaca_eval": {"records": 805}}
    small = {w.repo_id: w.rows for w in data.write_datasets(tmp_path / "small", n_test=data.N_TEST, only=only)}
    assert small == {"openai/openai_humaneval": {"test": 5}, "tatsu-lab/alpaca_eval": {"records": 5}}
    with pytest.raises(ValueError, match="n_test"):
        data.write_datasets(tmp_path / "bad", n_test=0)


def test_records_look_real():
    from obim.bench.tasks.paper.utils import gsm8k_gold

    for repo, spec in data.SPECS.items():
        for config in spec.configs:
            for split in spec.sizes(config, 3):
                assert data.records(repo, config, split, 3) == data.records(repo, config, split, 3)  # deterministic
    for r in data.records("openai/gsm8k", "main", "train")[:50]:
        assert r["answer"].splitlines()[-1].startswith("#### ") and gsm8k_gold(r["answer"]) >= 0
    for subject in data.MATH_SUBJECTS:
        assert all(last_boxed(r["solution"]) for r in data.records("EleutherAI/hendrycks_math", subject, "test"))
    mmlu_all = data.records("cais/mmlu", "all", "dev")
    assert mmlu_all[:5] == data.records("cais/mmlu", "abstract_algebra", "dev")  # "all": the subjects in order
    for split in ("train", "test", "validation", "prompt"):
        for r in data.records("google-research-datasets/mbpp", "full", split)[:8]:
            assert len(r["test_list"]) == 3
            exec(r["code"] + "\n" + "\n".join(r["test_list"]), {})  # the gold code passes its asserts
    for r in data.records("openai/openai_humaneval", "openai_humaneval", "test"):
        exec(r["prompt"] + r["canonical_solution"] + r["test"] + f"\ncheck({r['entry_point']})", {})
    for r in data.records("Rakuten/JGLUE", "JSQuAD", "validation"):
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start:].startswith(text) and " [SEP] " in r["context"]
    for r in data.records("Rakuten/JGLUE", "JCommonsenseQA", "validation"):
        assert 0 <= r["label"] < 5 and len({r[f"choice{i}"] for i in range(5)}) == 5
    for r in data.records("juletxara/mgsm", "ja", "train"):
        assert r["question"].startswith("問題：") and str(r["answer_number"]) in r["answer"]
    for r in data.records("ceval/ceval-exam", "law", "dev"):
        assert r["answer"] in "ABCD" and r["answer"] and r["explanation"]
    assert {r["answer"] for r in data.records("polm-stability/xwinograd-ja", "default", "test", 20)} == {"1", "2"}
    evals = json.loads(data.HUB_FILES["tatsu-lab/alpaca_eval"].content(4))
    assert len(evals) == 4 and set(evals[0]) == {"instruction", "output", "generator", "dataset"}


# ------------------------------------------------------------------------------------------- offline, fresh HF_HOME


def test_loads_offline(mirror):
    """load_dataset gives every split of one config of each dataset with its features (a dataset without named
    configs by its id alone), the validation builders draw the presets' sizes, and the AlpacaEval file resolves."""
    got = _run_offline(
        mirror,
        """
        import json
        import datasets
        from huggingface_hub import hf_hub_download
        from obim.bench.rehearsal.data import SPECS, features_of
        from obim.bench.validation import load_samples, resolve_source

        datasets.logging.set_verbosity_error()
        out = {"loads": 0, "bad": []}
        for repo, spec in SPECS.items():
            for config in {spec.configs[0], spec.configs[-1]}:
                for split, n in spec.sizes(config, 2).items():
                    ds = datasets.load_dataset(repo, None if config == "default" else config, split=split)
                    out["loads"] += 1
                    if ds.features != features_of(spec, config) or len(ds) != n:
                        out["bad"].append([repo, config, split, len(ds), n])
        # mmlu and ceval draw from their dev splits (the builders' defaults), the others from train
        draws = {"alpaca": 50, "mmlu": 285, "gsm8k": 50, "math": 100, "mbpp": 100, "ceval": 260,
                 "jcommonsenseqa": 218}
        out["draws"] = {s: len(load_samples(s, resolve_source(s, None, "train", s), n, 0)) for s, n in draws.items()}
        path = hf_hub_download("tatsu-lab/alpaca_eval", "alpaca_eval.json", repo_type="dataset")
        out["alpaca_eval"] = len(json.load(open(path)))
        print(json.dumps(out))
        """,
    )
    assert got["bad"] == [] and got["loads"] > 30
    assert got["draws"] == {"alpaca": 50, "mmlu": 285, "gsm8k": 50, "math": 100, "mbpp": 100, "ceval": 260,
                            "jcommonsenseqa": 218}  # fmt: skip
    assert got["alpaca_eval"] == 2


# every benchmark the presets evaluate, and the search's dev tasks (groups: lm-eval runs their leaf tasks)
BENCHMARKS = ["mmlu", "ceval-valid", "japanese_leaderboard", "obim_gsm8k_cot", "obim_math_cot", "obim_alpaca_eval",
              "obim_humaneval", "obim_mbpp", "obim_paper_dev"]  # fmt: skip

EACH_LEAF = """
import json
import datasets
from lm_eval.tasks import get_task_dict
from obim.bench.evaluation import task_manager

datasets.logging.set_verbosity_error()


def leaves(d):
    for k, v in d.items():
        yield from leaves(v) if isinstance(v, dict) else [(k, v)]


def docs_of(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


tm = task_manager()
out = {}
for name in NAMES:
    for leaf, task in leaves(get_task_dict([name], tm)):
BODY
print(json.dumps(out))
"""


def _each_leaf(home: Path, body: str) -> dict:
    """Build every leaf task of BENCHMARKS with lm-eval from the mirror in `home` (offline, obim's task manager) and
    run `body` on each: code with `name` (the benchmark), `leaf`, `task` and docs_of(task) in scope that sets
    out[leaf]. Returns out."""
    body = textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
    return _run_offline(home, EACH_LEAF.replace("NAMES", json.dumps(BENCHMARKS)).replace("BODY", body))


@pytest.mark.slow
def test_lm_eval_tasks_build_offline(mirror):
    """lm-eval builds every task the presets evaluate, and the search's dev tasks, from the mirror alone, and
    renders each leaf task's first prompt (few-shot examples included where the preset asks for them)."""
    got = _each_leaf(
        mirror,
        """
        shots = {"mmlu": 5, "ceval-valid": 5}
        if name in shots:
            task.set_config(key="num_fewshot", value=shots[name])
        docs = docs_of(task)
        task.build_all_requests(limit=1, rank=0, world_size=1)
        out[leaf] = [len(docs), task.doc_to_text(docs[0]), task.instances[0].args[0]]
        """,
    )
    assert len([t for t in got if t.startswith("mmlu_")]) == 57
    assert len([t for t in got if t.startswith("ceval-valid_")]) == 52
    assert len([t for t in got if t.startswith("ja_leaderboard_")]) == 8
    for t in ("obim_gsm8k_cot", "obim_alpaca_eval", "obim_humaneval", "obim_mbpp", "obim_math_cot_algebra"):
        assert got[t][0] == 2 and got[t][1], t
    for t in ("obim_gsm8k_cot_dev", "obim_math_cot_dev", "obim_jcqa_dev", "obim_mbpp_dev", "obim_mmlu_dev"):
        assert got[t][0] >= 2 and got[t][1], t  # the dev tasks find their records past the skip
    assert got["mmlu_anatomy"][2].count("Answer:") == 6  # 5 shots from dev + the question
    assert got["ceval-valid_law"][2].count("答案：") == 6
    assert "文脈：" in got["ja_leaderboard_jsquad"][1] and got["ja_leaderboard_mgsm"][1]
    # MBPP's dev task prompts as obim_mbpp does: the same 3 shots, each code closed by [DONE], then its own problem
    dev, test = got["obim_mbpp_dev"][2], got["obim_mbpp"][2]
    assert dev.count("[DONE]") == 3 and dev.count("[BEGIN]\n") == 4
    assert dev[: dev.rindex("You are an expert")] == test[: test.rindex("You are an expert")]


@pytest.mark.slow
def test_lm_eval_counts_real_documents(tmp_path):
    """On the real-sized mirror (write_datasets' default) lm-eval reads as many documents of each task the presets
    evaluate, and of each dev task, as the mirror writes for it (a dev task: its n records past the skip): the
    documents the dry run's cost estimate counts. The expected numbers are the mirror's sizes (data's tables, the rest
    written out here), so this checks that lm-eval counts the rows the mirror writes; it cannot catch a wrong number
    in REAL_ROWS (test_real_sizes checks those against their sources)."""
    data.write_datasets(tmp_path)
    got = _each_leaf(tmp_path, "out[leaf] = len(docs_of(task))")
    expected = {f"mmlu_{s}": test for s, (test, _) in data.MMLU_ROWS.items()}
    expected |= {f"ceval-valid_{s}": n for s, n in data.CEVAL_VAL.items()}
    expected |= {f"obim_math_cot_{s}": test for s, (_, test) in data.MATH_ROWS.items()}
    expected |= {
        "ja_leaderboard_jaqket_v2": 1164, "ja_leaderboard_jcommonsenseqa": 1119, "ja_leaderboard_jnli": 2434,
        "ja_leaderboard_jsquad": 4442, "ja_leaderboard_marc_ja": 5654, "ja_leaderboard_mgsm": 250,
        "ja_leaderboard_xlsum": 766, "ja_leaderboard_xwinograd": 959,  # xlsum: lm-eval scores its test split
        "obim_gsm8k_cot": 1319, "obim_alpaca_eval": 805, "obim_humaneval": 164, "obim_mbpp": 500,
        "obim_gsm8k_cot_dev": 500, "obim_math_cot_dev": 500, "obim_jcqa_dev": 500, "obim_mbpp_dev": 90,
        "obim_mmlu_dev": 1531,
    }  # fmt: skip
    assert got == expected
    assert sum(got.values()) == 14042 + 1346 + 5000 + 16788 + 1319 + 805 + 164 + 500 + 500 * 3 + 90 + 1531
