"""The Slurm preflight (obim.bench.slurm): a sweep's launcher request checked against `sinfo`'s nodes and the
shared folders checked against /proc/mounts before anything is submitted; here on sinfo output and mount tables
written by hand (the local cluster's tests run it for real)."""

from __future__ import annotations

from pathlib import Path

from obim.bench.slurm import check, parse_sinfo

SINFO = """\
gpu01|gpu|64|515000|gpu:a100:8(S:0-1)|idle
gpu02|gpu|64|515000|gpu:a100:8(S:0-1)|drain*
cpu01|cpu*|32|128000|(null)|mixed
cpu02|cpu*|32|256000|(null)|alloc
"""
MOUNTS = """\
overlay / overlay rw 0 0
/dev/nvme0n1p1 /tmp ext4 rw 0 0
fs1:/export /shared nfs4 rw 0 0
lustre@o2ib:/scratch /scratch lustre rw 0 0
"""
SHARED = {"cache_dir": Path("/shared/obim/cache"), "hydra.sweep.dir": Path("/scratch/me/multirun")}


def test_parse_sinfo():
    nodes = parse_sinfo(SINFO)
    assert [(n.name, n.partition, n.default, n.cpus, n.mem_mb, n.gpus, n.state) for n in nodes] == [
        ("gpu01", "gpu", False, 64, 515000, 8, "idle"),
        ("gpu02", "gpu", False, 64, 515000, 8, "drain"),
        ("cpu01", "cpu", True, 32, 128000, 0, "mixed"),
        ("cpu02", "cpu", True, 32, 256000, 0, "alloc"),
    ]


def test_a_request_that_fits_passes():
    launcher = {"partition": "gpu", "cpus_per_task": 8, "tasks_per_node": 1, "mem_gb": 64, "gpus_per_node": 1}
    assert check(launcher, parse_sinfo(SINFO), SHARED, MOUNTS) == []
    # the default partition (cpu*) when none is named; the largest node counts (256000 MB)
    assert check({"cpus_per_task": 4, "mem_gb": 200, "gpus_per_node": 0}, parse_sinfo(SINFO), SHARED, MOUNTS) == []


def test_every_problem_is_named_in_its_line():
    launcher = {"partition": "cpu", "cpus_per_task": 48, "mem_gb": 300, "gpus_per_node": 1}
    folders = {**SHARED, "results_dir": Path("/tmp/results")}
    assert check(launcher, parse_sinfo(SINFO), folders, MOUNTS) == [
        "hydra.launcher.cpus_per_task: a job asks for 48 CPUs; the largest node of partition cpu has 32",
        "hydra.launcher.mem_gb: a job asks for 307200 MB of memory; the largest node of partition cpu has 256000",
        "hydra.launcher.gpus_per_node: a job asks for 1 GPUs; the largest node of partition cpu has 0",
        "results_dir /tmp/results: on ext4 (/tmp), a filesystem local to this machine: put it where every node sees "
        "it (e.g. OBIM_CACHE=/shared/...)",
    ]
    assert check({"partition": "nope"}, parse_sinfo(SINFO), SHARED, MOUNTS) == [
        "hydra.launcher.partition: no partition 'nope' on this cluster (cpu, gpu)"
    ]


def test_down_partitions_and_unknown_mounts():
    sinfo = "n1|p*|8|1000|(null)|down*\nn2|p*|8|1000|(null)|drain\n"
    assert check({"mem_gb": 0}, parse_sinfo(sinfo), SHARED, MOUNTS) == [
        "partition p: every node is down or drained (n1, n2)"
    ]
    assert check({"partition": "gpu", "gpus_per_node": 1}, parse_sinfo(SINFO), SHARED, None) == [
        "warning: cache_dir /shared/obim/cache: cannot tell whether the compute nodes see it",
        "warning: hydra.sweep.dir /scratch/me/multirun: cannot tell whether the compute nodes see it",
    ]


def test_one_node_shares_its_local_disks_with_itself():
    sinfo = "localhost|debug*|2|24000|(null)|idle\n"
    assert check({"cpus_per_task": 2, "mem_gb": 4}, parse_sinfo(sinfo), {"cache_dir": Path("/tmp/c")}, MOUNTS) == []


def test_a_slurm_sweep_that_cannot_fit_submits_nothing(tmp_path):
    """Through the sweep as a user runs it, with a `sinfo` that reports a 2-CPU, 4 GB node: the launcher's default
    request (8 CPUs, 64 GB, 1 GPU) is refused before anything is submitted (no job directory, no submitit folder),
    every problem in the one error line, exit status 2 (Hydra only warns when a callback raises)."""
    import os
    import stat

    from conftest import run_sweep, sweep_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sinfo = bin_dir / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'localhost|debug*|2|4000|(null)|idle'\n")
    sinfo.chmod(sinfo.stat().st_mode | stat.S_IEXEC)
    env = sweep_env(tmp_path / "zoo", tmp_path / "cache")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    runs = tmp_path / "runs"
    proc = run_sweep(
        ["hydra/launcher=slurm", "method=ta,obim", "dry_run=plan", f"hydra.sweep.dir={runs}"], env, tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err == [
        "sweep: error: hydra/launcher=slurm: nothing submitted: "
        "hydra.launcher.cpus_per_task: a job asks for 8 CPUs; the largest node of partition debug has 2; "
        "hydra.launcher.mem_gb: a job asks for 65536 MB of memory; the largest node of partition debug has 4000; "
        "hydra.launcher.gpus_per_node: a job asks for 1 GPUs; the largest node of partition debug has 0"
    ]
    assert not runs.exists() or not any(p.name.startswith("method=") or p.name == ".submitit" for p in runs.iterdir())
    ok = run_sweep(
        [
            "hydra/launcher=slurm",
            "method=ta",
            "dry_run=plan",
            f"hydra.sweep.dir={runs}",
            "hydra.launcher.cpus_per_task=2",
            "hydra.launcher.mem_gb=3",
            "hydra.launcher.gpus_per_node=0",
        ],
        env,
        tmp_path,
    )
    assert "nothing submitted" not in ok.stderr  # it fits: on to submitit (which then needs a real Slurm)
