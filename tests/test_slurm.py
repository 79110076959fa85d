"""The local Slurm cluster the tests start (tests/slurm/cluster.py): a job runs to COMPLETED in accounting, and a
cancelled one is killed and recorded CANCELLED within a bounded time. Needs root and apt-get (or the packages
installed): skipped with one line elsewhere."""

from __future__ import annotations

import json
import time

import pytest

from obim.bench.slurm import GONE

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
    each its own Slurm job, give the scores, the table and the W&B runs' results tables a local sweep gives (separate
    caches, the same zoo)."""
    from conftest import run_sweep, sweep_env

    c = slurm_cluster
    common = ["method=ta,ties,obim", "experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true"]
    common += ["progress=false"]  # W&B offline (sweep_env): each job's run logged on the node that ran it
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
        # each job's W&B run: its results table (scores of the merge and of each model), named by content hash
        media = "wandb/offline-run-*/files/media/**/*.json"
        logged = {job: {t.name: json.loads(t.read_text()) for t in (runs / job).glob(media)} for job in recs}
        out[where] = (recs, (results / "toy_sft" / "table1.md").read_text(), logged)
    (slurm, slurm_table, slurm_wandb), (local, local_table, local_wandb) = out["slurm"], out["local"]
    assert sorted(slurm) == sorted(local) and len(slurm) == 3
    for job, rec in slurm.items():
        assert rec["scores"] == local[job]["scores"], job
        assert {n: v["scores"] for n, v in rec["individual"].items()} == {
            n: v["scores"] for n, v in local[job]["individual"].items()
        }
    assert slurm_table == local_table
    assert all(len(tables) == 1 for tables in slurm_wandb.values()), slurm_wandb
    assert slurm_wandb == local_wandb
    # each job ran as a Slurm job, recorded in accounting
    done = c.run("sacct", "-X", "-n", "-P", "-o", "JobName,State").stdout.split()
    assert sum(line.endswith("|COMPLETED") for line in done) >= 3, done


# ------------------------------------------------------------------------------------------------- faults, caches
# (issue 25, items 3 and 4) Sweeps sent to the cluster by hydra/launcher=slurm (obim's launcher, obim/bench/slurm.py)
# while the test kills, starves or blocks their jobs. A job is blocked, where a test needs it to be, by holding the
# cache lock of an entry it needs (what another job computing it does), never by a hook in obim.

REQUEST = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4"]
TOY = ["experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true", "tracking=none", "progress=false"]


def start_sweep(c, args: list[str], zoo, cache, runs):
    """`experiments/sweep.py -m` sending its jobs to cluster `c`, started in the background."""
    import subprocess
    import sys

    from conftest import REPO, sweep_env

    argv = [sys.executable, str(REPO / "experiments" / "sweep.py"), "-m", "hydra/launcher=slurm"]
    argv += [f"hydra.launcher.partition={c.partition}", *REQUEST, "hydra.launcher.timeout_min=20", *TOY]
    argv += [f"hydra.sweep.dir={runs}", f"results_dir={runs.parent / (runs.name + '-results')}", *args]
    env = {**sweep_env(zoo, cache), **c.env}
    return subprocess.Popen(argv, cwd=runs.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def until(what: str, probe, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"no {what} after {timeout:.0f} s")


def queue(c) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} as the controller has them now."""
    out = c.run("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", check=False).stdout
    return {i: (s, r) for i, s, r in (line.split("|") for line in out.split())}


def finish(proc, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("accounting", [True, False], ids=["accounting", "no-accounting"])
def test_a_cancelled_job_fails_the_sweep_naming_it_and_a_rerun_reuses_the_rest(
    request, accounting, quick_zoo, tmp_path
):
    """scancel on one job of a running sweep: the sweep ends non-zero once the other job is done, naming the
    cancelled one, with or without accounting (submitit alone waits forever without it); run again, it reruns only
    the cancelled job."""
    import re

    c = request.getfixturevalue("slurm_cluster" if accounting else "slurm_cluster_no_accounting")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    proc = start_sweep(c, ["method=ta,ties"], quick_zoo, cache, runs)
    job = until("job 0 running", lambda: next((i for i, (s, _) in queue(c).items() if s == "RUNNING"
                                                and i.endswith("_0")), None), 120)  # fmt: skip
    time.sleep(2)  # its process started
    t0 = time.monotonic()
    c.run("scancel", job)
    code, out, err = finish(proc)
    print(f"accounting={accounting}: scancel to the sweep's exit {time.monotonic() - t0:.1f} s")
    assert code == 1, err[-3000:]
    pattern = rf"method=ta: sweep: error: Slurm job {job}: (CANCELLED|{GONE} \(CANCELLED\)): cancelled"
    assert re.search(pattern, err), err[-3000:]
    assert "(1 run, 1 failed)" in err
    assert [p.parent.name.split(",")[-1] for p in runs.glob("*/result.json")] == ["method=ties"]
    if accounting:
        code, out, err = finish(start_sweep(c, ["method=ta,ties"], quick_zoo, cache, runs))
        assert code == 0, err[-3000:]
        assert "(1 run, 1 cached)" in out, out[-2000:]


@pytest.mark.parametrize("accounting", [True, False], ids=["accounting", "no-accounting"])
def test_a_job_over_its_memory_fails_the_sweep_naming_the_cause(request, accounting, quick_zoo, tmp_path):
    """A job over its --mem is killed by Slurm (no cgroups here: recorded FAILED, or forgotten without accounting);
    the sweep ends at once, non-zero, saying it was memory."""
    import re

    c = request.getfixturevalue("slurm_cluster" if accounting else "slurm_cluster_no_accounting")
    t0 = time.monotonic()
    proc = start_sweep(
        c, ["method=ta", "hydra.launcher.mem_gb=null", "hydra.launcher.mem_per_cpu=300M"], quick_zoo,
        tmp_path / "cache", tmp_path / "runs",
    )  # fmt: skip
    code, _out, err = finish(proc)
    print(f"accounting={accounting}: memory kill, sweep over in {time.monotonic() - t0:.1f} s")
    assert code == 1, err[-3000:]
    states = "FAILED" if accounting else f"(FAILED|{GONE})"
    pattern = rf"Slurm job \d+: {states} \(OUT_OF_MEMORY\): killed for using more memory than it asked for"
    assert re.search(pattern, err), err[-3000:]


def test_a_job_at_its_time_limit_fails_the_sweep(slurm_cluster_no_accounting, quick_zoo, tmp_path):
    """A job still waiting at its time limit (on the zoo's lock, held here) with no requeue left: the sweep ends
    non-zero naming the time limit, with no accounting to ask."""
    from filelock import FileLock

    c = slurm_cluster_no_accounting
    with FileLock(str(quick_zoo.parent / f".{quick_zoo.name}.lock")):
        t0 = time.monotonic()
        proc = start_sweep(
            c, ["method=ta", "hydra.launcher.timeout_min=1", "hydra.launcher.max_num_timeout=0"], quick_zoo,
            tmp_path / "cache", tmp_path / "runs",
        )  # fmt: skip
        code, _out, err = finish(proc)
    print(f"time limit 60 s: sweep over in {time.monotonic() - t0:.1f} s")
    assert code == 1, err[-3000:]
    # submitit's time-limit signal came (early: its 120 s delay is over the limit) with no requeue left
    pattern = "method=ta: sweep: error: Slurm time limit reached (hydra.launcher.timeout_min) and the job not "
    pattern += "requeued: timed-out too many times (hydra.launcher.max_num_timeout)"
    assert pattern in err, err[-3000:]


def test_a_job_requeued_at_its_time_limit_resumes_from_its_finished_stages(slurm_cluster, quick_zoo, tmp_path):
    """OBIM's job computes the first expert's saliency statistics, then waits on the second's (its lock held here)
    until its time limit: submitit's checkpointing requeues it (max_num_timeout), and the rerun takes the first
    expert's statistics from the cache, computes the rest and ends the sweep with exit 0."""
    from conftest import compose
    from filelock import FileLock

    from obim.bench.plan import plan_job
    from obim.bench.stages import saliency_paths

    c = slurm_cluster
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    plan = plan_job(compose("method=obim", f"experiment.zoo={quick_zoo}", "experiment.zoo_recipe=quick",
                            f"cache_dir={cache}"))  # fmt: skip
    paths = saliency_paths(plan)
    first, second = list(paths)[:2]
    lock = FileLock(str(paths[second]) + ".lock")
    lock.acquire()
    try:
        # the time-limit signal comes 60 s before the limit, and up to 60 s earlier (Slurm's timer resolution)
        args = ["method=obim", "hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=60"]
        proc = start_sweep(c, [*args, "hydra.launcher.max_num_timeout=1"], quick_zoo, cache, runs)
        job = until("the job running", lambda: next((i for i, (s, _) in queue(c).items() if s == "RUNNING"), None), 120)
        until(f"{first}'s statistics", paths[first].exists, 120)
        stamp = paths[first].stat().st_mtime_ns
        t0 = time.monotonic()
        until("the job requeued", lambda: queue(c).get(job, ("", ""))[0] == "PENDING", 240, poll=0.5)
        print(f"requeued {time.monotonic() - t0:.0f} s after the first statistics")
    finally:
        lock.release()
    c.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # Slurm holds a requeued job ~2 min (BeginTime)
    code, _out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "this job is timed-out" in err  # submitit's checkpointing caught the time-limit signal
    (rec,) = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    assert rec["saliency"][first]["cached"] is True  # the first run's, reused
    assert all(not rec["saliency"][n]["cached"] for n in list(paths)[1:])
    assert paths[first].stat().st_mtime_ns == stamp
    c.wait_state(job, ["COMPLETED"], timeout=60)  # slurmdbd records the end a moment after the sweep sees it
    runs_of_job = c.run("sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job).stdout.split()
    assert runs_of_job[0].endswith("|REQUEUED") and runs_of_job[-1].endswith("|COMPLETED"), runs_of_job


def test_concurrent_jobs_compute_each_cache_entry_once(slurm_cluster, tmp_path):
    """Four Slurm jobs started together need one zoo (not built yet), the same three experts' saliency statistics,
    and two merges between them (OBIM and TIES+OBM, each evaluated at two limits): each is computed once, by one
    job, while the others wait on its lock and reuse it; every entry is complete and readable afterwards."""
    import re
    from datetime import datetime

    import torch
    from safetensors import safe_open

    c = slurm_cluster
    zoo, cache, runs = tmp_path / "zoo", tmp_path / "cache", tmp_path / "runs"
    # the merges written (keep_merged=true): two jobs of each merge share its cache entry
    args = ["method=obim,ties_obm", "eval.limit=2,3", "hydra.launcher.array_parallelism=4", "keep_merged=true"]
    code, _out, err = finish(start_sweep(c, args, zoo, cache, runs))
    assert code == 0, err[-3000:]
    recs = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    assert len(recs) == 4
    # ran at the same time: the array's tasks overlap in accounting
    tasks = sorted(p.name for p in (runs / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    for task in tasks:  # slurmdbd records each end a moment after the sweep has seen it
        c.wait_state(task, ["COMPLETED"], timeout=60)
    array = tasks[0].split("_")[0]
    lines = c.run("sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", array).stdout.split()
    spans = sorted(tuple(datetime.fromisoformat(t) for t in line.split("|")[1:]) for line in lines)
    assert len(spans) == 4, lines
    assert spans[1][0] < spans[0][1], spans
    for name in recs[0]["saliency"]:
        files = {r["saliency"][name]["hdiag"] for r in recs}
        assert len(files) == 1, files  # one zoo: every job's expert has the same fingerprint
        assert sum(not r["saliency"][name]["cached"] for r in recs) == 1, name
    for method in ("obim", "ties_obm"):
        mine = [r for r in recs if f"method={method}" in r["job"].split(",")]
        assert len(mine) == 2 and sum(not r["cached"]["merge"] for r in mine) == 1, method
    # every entry whole: no staging leftovers, statistics readable and finite, merges stamped
    assert not [p for p in cache.rglob("*") if ".obim-tmp-" in p.name or ".obim-old-" in p.name]
    hdiags = sorted((cache / "saliency").glob("*.safetensors"))
    assert len(hdiags) == 3
    for f in hdiags:
        with safe_open(str(f), framework="pt") as h:
            assert all(torch.isfinite(h.get_tensor(k)).all() for k in h.keys())  # noqa: SIM118
    merges = [d for d in (cache / "merges").iterdir() if d.is_dir()]
    assert len(merges) == 2 and all((d / "obim_merge.json").is_file() for d in merges)
