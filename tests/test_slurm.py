"""The local Slurm cluster the tests start (tests/slurm/cluster.py): a job runs to COMPLETED in accounting, and a
cancelled one is killed and recorded CANCELLED within a bounded time. Needs root and apt-get (or the packages
installed): skipped with one line elsewhere."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_job_completes_and_accounting_records_it(slurm_cluster):
    c = slurm_cluster
    assert c.node_state() == "idle"
    t0 = time.monotonic()
    job = c.sbatch("--partition", c.partition, "--wrap", "echo hi")
    assert c.wait_state(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=60) == "COMPLETED"
    print(f"job {job}: submitted to COMPLETED in accounting in {time.monotonic() - t0:.1f} s")
    assert (c.root / "jobs" / f"{job}.out").read_text() == "hi\n"
    # the clients' environment alone reaches the cluster (what a sweep's subprocess is given)
    assert c.partition in c.run("sinfo", "-h", "-o", "%P").stdout


def test_a_cancelled_job_is_killed_and_recorded_cancelled(slurm_cluster):
    c = slurm_cluster
    job = c.sbatch("--wrap", "sleep 300")
    c.wait_state(job, ["RUNNING"], timeout=60)
    # the job's processes carry the cluster's marker: what the fixture's final sweep finds if a job outlives it
    deadline = time.monotonic() + 10
    while not any("sleep 300" in p for p in c.running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("sleep 300" in p for p in c.running()), c.running()
    t0 = time.monotonic()
    c.run("scancel", job)
    assert c.wait_state(job, ["CANCELLED", "COMPLETED", "FAILED"], timeout=30) == "CANCELLED"
    print(f"job {job}: scancel to CANCELLED in accounting in {time.monotonic() - t0:.1f} s")
    deadline = time.monotonic() + 15  # KillWait=2: SIGKILL follows SIGTERM after 2 s
    while any("sleep 300" in p for p in c.running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any("sleep 300" in p for p in c.running()), c.running()


def test_the_preflight_reads_the_real_cluster(slurm_cluster, tmp_path):
    """The sweep's Slurm preflight (obim/bench/slurm.py) against this cluster's own sinfo: the launcher's default
    request (1 GPU, 8 CPUs, 64 GB) is refused here, each problem named, nothing submitted; a request the node can
    hold goes on to submitit."""
    from conftest import run_sweep, sweep_env

    c = slurm_cluster
    node = c.run("sinfo", "-h", "-N", "-o", "%c|%m").stdout.split()[0].split("|")
    cpus, mem_mb = int(node[0]), int(node[1])
    env = {**sweep_env(tmp_path / "zoo", tmp_path / "cache"), **c.env}
    runs = tmp_path / "runs"
    proc = run_sweep(
        ["hydra/launcher=slurm", "method=ta", "dry_run=plan", f"hydra.sweep.dir={runs}", "hydra.launcher.mem_gb=4096"],
        env,
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    part = c.partition
    problems = [f"hydra.launcher.cpus_per_task: a job asks for 8 CPUs; the largest node of partition {part} has {cpus}"]
    problems = problems if cpus < 8 else []
    problems += [
        f"hydra.launcher.mem_gb: a job asks for 4194304 MB of memory; the largest node of partition {part} "
        f"has {mem_mb}",
        f"hydra.launcher.gpus_per_node: a job asks for 1 GPUs; the largest node of partition {part} has 0",
    ]
    assert proc.stderr.strip() == "sweep: error: hydra/launcher=slurm: nothing submitted: " + "; ".join(problems)
    assert c.run("squeue", "-h").stdout.strip() == ""  # nothing was submitted


def test_the_toy_sweep_through_slurm_equals_the_local_one(slurm_cluster, quick_zoo, tmp_path):
    """issue 25, item 2: three toy jobs (OBIM's saliency statistics among them) sent to Slurm by hydra/launcher=slurm,
    each its own Slurm job, give the scores and the table a local sweep gives (separate caches, the same zoo)."""
    import json

    from conftest import run_sweep, sweep_env

    c = slurm_cluster
    common = ["method=ta,ties,obim", "experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true"]
    common += ["tracking=none", "progress=false"]
    request = [f"hydra.launcher.partition={c.partition}", "hydra.launcher.gpus_per_node=0"]
    request += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=20"]
    out = {}
    for where, launcher in (("slurm", ["hydra/launcher=slurm", *request]), ("local", [])):
        env = {**sweep_env(quick_zoo, tmp_path / f"cache-{where}"), **(c.env if where == "slurm" else {})}
        runs, results = tmp_path / f"runs-{where}", tmp_path / f"results-{where}"
        args = [*launcher, *common, f"hydra.sweep.dir={runs}", f"results_dir={results}"]
        proc = run_sweep(args, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/result.json")}
        out[where] = (recs, (results / "toy_sft" / "table1.md").read_text())
    (slurm, slurm_table), (local, local_table) = out["slurm"], out["local"]
    assert sorted(slurm) == sorted(local) and len(slurm) == 3
    for job, rec in slurm.items():
        assert rec["scores"] == local[job]["scores"], job
        assert {n: v["scores"] for n, v in rec["individual"].items()} == {
            n: v["scores"] for n, v in local[job]["individual"].items()
        }
    assert slurm_table == local_table
    # each job ran as a Slurm job, recorded in accounting
    done = c.run("sacct", "-X", "-n", "-P", "-o", "JobName,State").stdout.split()
    assert sum(line.endswith("|COMPLETED") for line in done) >= 3, done
