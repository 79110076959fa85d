"""Shared fixtures: tiny Llama models made with transformers, with a character-level tokenizer; the sweep run as a
user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from obim.bench.zoo.tiny import make_llama, make_tokenizer  # noqa: F401  (tests import them from here)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three 'fine-tunes' of it, as safetensors model directories."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_llama(root / "base", 0)
    out = {"base": base}
    for i, name in enumerate(["lm", "math", "code"], 1):
        out[name] = make_llama(root / name, i, base=base)
    return out


@pytest.fixture(scope="session")
def val_jsonl(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("val") / "val.jsonl"
    lines = [
        "what is 2+3? 5",
        "the cat sat on the mat.",
        "a",
        "def f(x): return x*2",
        "12*3=36 #### 36",
        "hello world, this is a longer sample to check padding",
    ]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return p


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """A test that uses the quick zoo builds it (once per session, ~15 s): it is slow, marked or not."""
    for item in items:
        if "quick_zoo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory) -> Path:
    """The toy zoo with a handful of training steps (layout and every code path; not its quality)."""
    from obim.bench.zoo import build, quick_recipe

    return build(
        tmp_path_factory.mktemp("toyzoo") / "zoo",
        recipe=quick_recipe(),
        evaluate=False,
        progress=False,
        log=lambda s: None,
    )


REPO = Path(__file__).resolve().parents[1]


# The real obim-merge CLI (its signal handling included) with a pause after each tensor written, injected here
# rather than through a hook in the library: argv is PAUSE CONFIG OUT --quiet.
PAUSED_MERGE = """
import sys, time
from obim.merging.checkpoint import ShardedWriter
from obim.merging.cli import merge_main
from obim.merging.merge import ShardedWriter as used

assert used is ShardedWriter  # the writer the merge uses, or the pause would never happen
pause, write = float(sys.argv[1]), ShardedWriter.write

def paused_write(self, name, tensor):
    write(self, name, tensor)
    time.sleep(pause)

ShardedWriter.write = paused_write
sys.exit(merge_main(sys.argv[2:]))
"""


def start_merge(c: dict, out: Path, tmp_path: Path, name: str = "c", pause: float = 0.5) -> subprocess.Popen:
    """obim-merge in a subprocess, pausing `pause` seconds after each tensor: a merge to kill or race midway."""
    import yaml

    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(c))
    return subprocess.Popen(
        [sys.executable, "-c", PAUSED_MERGE, str(pause), str(tmp_path / f"{name}.yaml"), str(out), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_mid_merge(proc: subprocess.Popen, out: Path) -> Path:
    """The staging dir once its first shard is being written (the merge paused after its first tensor)."""
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        found = [p for p in out.parent.glob(f".{out.name}.obim-tmp-*") if (p / "model.safetensors").exists()]
        if found:
            return found[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("the merge never reached its first tensor")


def sweep_env(zoo: Path, cache: Path) -> dict[str, str]:
    """The environment a sweep or search subprocess runs in: this zoo and cache, offline, this checkout first."""
    return {
        **os.environ,
        "OBIM_ZOO": str(zoo),
        "OBIM_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


# The sweep with its merge stage failing after it ran (the resume tests): patched in the sweep's own process, so
# production code carries no fault hook. The basic launcher runs the jobs in that process.
FAIL_AFTER_MERGE = """
import runpy, sys
import obim.bench.pipeline as pipeline

merge_stage = pipeline.merge_stage


def merge_then_fail(*args, **kwargs):
    merge_stage(*args, **kwargs)
    raise RuntimeError("simulated failure after merge")


pipeline.merge_stage = merge_then_fail
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_sweep(args: list[str], env: dict, cwd: Path, fail_after_merge: bool = False) -> subprocess.CompletedProcess:
    """`python experiments/sweep.py -m ARGS` in a subprocess, as a user runs it (fail_after_merge: every job's merge
    stage raises once it has run)."""
    pre = ["-c", FAIL_AFTER_MERGE] if fail_after_merge else []
    return subprocess.run(
        [sys.executable, *pre, str(REPO / "experiments" / "sweep.py"), "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def compose(*overrides: str, allow_code: bool = True):
    """The sweep's composed config for these overrides, as a Hydra job sees it; opted in to code execution (the
    toy and paper code benchmarks) unless `allow_code` is False."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import obim.bench.plan  # noqa: F401  (registers the ${obim:...} resolver)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose("sweep", overrides=[*overrides, *(["eval.allow_code=true"] if allow_code else [])])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd) on this machine, started once
    per session and stopped by PID at its end (tests/slurm/cluster.py): `.env` for Slurm's clients, `.partition`,
    `.run(...)`, `.sbatch(...)`, `.wait_state(...)`. Its packages are installed with apt-get where missing; where they
    cannot be, the tests that use it skip with one line."""
    from slurm.cluster import cluster_session

    yield from cluster_session(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="session")
def slurm_cluster_no_accounting(tmp_path_factory):
    """The same one-node cluster without accounting (AccountingStorageType=accounting_storage/none: no MariaDB, no
    slurmdbd, sacct fails), as many clusters run; it can run beside `slurm_cluster`."""
    from slurm.cluster import cluster_session

    yield from cluster_session(tmp_path_factory.mktemp("slurm-noacct"), accounting=False)
