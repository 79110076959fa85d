"""One thread budget per process (obim/merging/threads.py): where the CPU count comes from, how jobs share it, and
that a merge burns CPU on no more threads than the budget, with the same bytes whatever the budget."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from obim.merging import threads

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OBIM_NUM_THREADS",
    "OBIM_THREAD_BUDGET",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory) -> dict[str, list[dict]]:
    """A base and 3 fine-tunes large enough for every parallel path (2.1M-entry embeddings: two random chunks and
    many row blocks; 65K-entry projections: parallel selections), with saliency statistics; merge configs by method."""
    bench = load_script("bench_merge")
    root = tmp_path_factory.mktemp("mid")
    dirs = bench.make_models(root / "models", 3, hidden=256, layers=1, vocab=8192, inter=768)
    hdiags = bench.make_hdiags(root, dirs)
    return {m: bench.obim_config(m, dirs, hdiags) for m in ("ties", "dare", "della", "obim", "breadcrumbs", "pcb")}


def child_env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(kw)
    return env


def run_child(code: str, env: dict[str, str], *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ (a) one compute thread

BURN = r"""
import json, os, sys
from pathlib import Path
import torch
from obim import merge
from obim.merging import threads

def cpu_by_thread():
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            f = Path(f"/proc/self/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t] = int(f[11]) + int(f[12])  # utime + stime, clock ticks
    return out

cfgs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
merge(cfgs[0], out / "warm", progress=False)  # the pool and torch's threads exist from here on
before = cpu_by_thread()
for rep in range(2):
    for i, c in enumerate(cfgs):
        merge(c, out / f"{rep}-{i}", progress=False)
after = cpu_by_thread()
print(json.dumps({"burn": sorted((after[t] - before.get(t, 0) for t in after), reverse=True),
                  "torch": torch.get_num_threads(), "budget": getattr(threads, "budget", lambda: None)(),
                  "pool": getattr(threads, "pool_size", lambda: None)()}))
"""


def test_omp_num_threads_1_burns_cpu_on_one_thread(mid_models, tmp_path):
    """A process started with OMP_NUM_THREADS=1 merges on one thread in total: the threads alive after the merges
    (the main thread, obim's workers, torch's OpenMP team; the per-merge reader exits) that consumed CPU."""
    cfgs = [mid_models[m] for m in ("della", "ties", "dare", "breadcrumbs")]
    res = run_child(BURN, child_env(OMP_NUM_THREADS="1"), json.dumps(cfgs), str(tmp_path))
    total = sum(res["burn"])
    assert total >= 50, res  # ticks: enough work that every busy thread shows
    burning = [b for b in res["burn"] if b >= max(5, 0.05 * total)]
    assert len(burning) == 1, res
    assert res["torch"] == 1 and res["budget"] == 1 and res["pool"] == 0, res


# ---------------------------------------------------------------------------------- (b) where cores come from


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cores_available_honours_cgroup_v2_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "0::/user.slice/job\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 8  # no files: the affinity
    write(root / "user.slice/job/cpu.max", "max 100000\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 8  # "max": no quota
    write(root / "user.slice/job/cpu.max", "250000 100000\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 2  # 2.5 CPUs, rounded down
    assert threads.cores_available(affinity=1, cgroup_root=root, proc_cgroup=proc) == 1  # the affinity is lower
    write(root / "user.slice/cpu.max", "150000 100000\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 1  # an ancestor's quota counts
    write(root / "user.slice/cpu.max", "50000 100000\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 1  # half a CPU: at least one
    write(root / "cpu.max", "300000 100000\n")  # a container's own root (cgroup namespace: "0::/")
    write(proc, "0::/\n")
    assert threads.cores_available(affinity=8, cgroup_root=root, proc_cgroup=proc) == 3


def test_cores_available_honours_cgroup_v1_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    write(proc, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    d = root / "cpu,cpuacct/docker/abc"
    write(d / "cpu.cfs_quota_us", "-1\n")
    write(d / "cpu.cfs_period_us", "100000\n")
    assert threads.cores_available(affinity=4, cgroup_root=root, proc_cgroup=proc) == 4  # -1: no quota
    write(d / "cpu.cfs_quota_us", "300000\n")
    assert threads.cores_available(affinity=4, cgroup_root=root, proc_cgroup=proc) == 3
    assert threads.cores_available(affinity=2, cgroup_root=root, proc_cgroup=proc) == 2


def test_cores_available_defaults_to_this_process_affinity():
    mine = len(os.sched_getaffinity(0))
    assert threads.cores_available(cgroup_root="/nonexistent", proc_cgroup="/nonexistent") == mine
    assert 1 <= threads.cores_available() <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------- (c) jobs and the env


def test_budget_splits_cores_between_jobs():
    assert threads.budget_for(jobs=2, cores=2, environ={}) == 1
    assert threads.budget_for(jobs=1, cores=2, environ={}) == 2
    assert threads.budget_for(jobs=3, cores=2, environ={}) == 1  # at least one
    assert threads.budget_for(jobs=2, cores=16, environ={"OMP_NUM_THREADS": "4"}) == 4  # per process: not divided again
    assert threads.budget_for(jobs=1, cores=16, environ={"OMP_NUM_THREADS": "4"}) == 4
    assert threads.budget_for(jobs=1, cores=2, environ={"OMP_NUM_THREADS": "8"}) == 2  # only a lower one caps
    assert threads.budget_for(jobs=2, cores=2, environ={"OBIM_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}) == 3  # as is
    assert threads.budget_for(jobs=1, cores=2, environ={"OMP_NUM_THREADS": "junk", "OBIM_NUM_THREADS": "0"}) == 2
    assert threads.openmp_passive({"OMP_WAIT_POLICY": "Passive"}) and threads.openmp_passive({"GOMP_SPINCOUNT": "0"})
    assert not threads.openmp_passive({})
    assert not threads.openmp_passive({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "300000"})  # spin count wins


CONFIGURE = r"""
import json
import torch
from obim.merging import threads

threads.cores_available = lambda **kw: 2  # this machine as two CPUs, whatever it has
out = {"two_jobs": [threads.configure(jobs=2), threads.pool_size(), torch.get_num_threads()]}
pool = threads._pool
out["one_job"] = [threads.configure(), threads.pool_size(), torch.get_num_threads()]
pool = threads._pool
threads.configure()
out["same_pool"] = threads._pool is pool
out["mapped"] = threads.parallel_map(lambda x: x * x, range(5))
out["torch_after_pool"] = torch.get_num_threads()
print(json.dumps(out))
"""


@pytest.mark.parametrize("policy", ["passive", "spinning"])
def test_configure_jobs_2_on_2_cores_gives_budget_1(policy):
    env = child_env(**({"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {"GOMP_SPINCOUNT": "300000"}))
    res = run_child(CONFIGURE, env)
    assert res["two_jobs"] == [1, 0, 1]  # budget 1: no pool (inline), torch on one thread
    assert res["one_job"] == [2, 2, 2]  # budget 2: two workers, torch's team of two
    assert res["same_pool"] and res["mapped"] == [0, 1, 4, 9, 16]
    # once the pool works, torch keeps its team only where the team's idle threads sleep (a spinning one burns
    # a core beside the workers)
    assert res["torch_after_pool"] == (2 if policy == "passive" else 1)


def test_sweep_jobs_come_from_the_joblib_launcher(monkeypatch):
    monkeypatch.setenv("OBIM_THREAD_BUDGET", "0")  # importing the script then leaves this process's env alone
    sweep = load_script("sweep")
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert sweep.parallel_jobs(OmegaConf.create({"_target_": joblib, "n_jobs": 2})) == 2
    assert sweep.parallel_jobs(OmegaConf.create({"_target_": joblib, "n_jobs": -1})) == threads.cores_available()
    assert (
        sweep.parallel_jobs(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}))
        == 1
    )
    assert sweep.parallel_jobs(None) == 1


# ------------------------------------------------------------------------------ (d) same bytes, any budget

MERGE_ALL = r"""
import json, sys
from pathlib import Path
from obim import merge
from obim.merging import threads

cfgs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
for name, c in cfgs.items():
    merge(c, out / name, progress=False)
print(json.dumps({"budget": threads.budget(), "pool": threads.pool_size()}))
"""


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.glob("*.safetensors")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_bytes_with_budget_1_and_2(mid_models, tmp_path):
    for n in ("1", "2"):
        res = run_child(
            MERGE_ALL,
            child_env(OBIM_NUM_THREADS=n, OMP_WAIT_POLICY="PASSIVE"),
            json.dumps(mid_models),
            str(tmp_path / n),
        )
        assert res == {"budget": int(n), "pool": 0 if n == "1" else 2}
    for m in mid_models:
        assert digest(tmp_path / "1" / m) == digest(tmp_path / "2" / m), m
