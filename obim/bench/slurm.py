"""Preflight of a sweep sent to Slurm (hydra/launcher=slurm): before anything is submitted, the partition exists,
some node of it can hold one job's CPU, memory and GPU request, and the folders the jobs share (caches, the sweep's
job directories, the results) sit on a filesystem the compute nodes see. One line per problem, then nothing is
submitted; sbatch would otherwise refuse jobs one by one after the launch has begun, each error shown only once
every job has ended."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError

SINFO_FORMAT = "%N|%P|%c|%m|%G|%t"  # node, partition (default marked *), CPUs, memory MB, generic resources, state
# filesystems every node of a cluster can mount; anything else (ext4, xfs, tmpfs, overlay...) is node-local
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "panfs", "wekafs")
DOWN = ("down", "drain", "drng", "fail", "maint", "boot", "futr", "inval", "unk", "npc")


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # the cluster's default partition
    cpus: int
    mem_mb: int
    gpus: int
    state: str


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES, e.g. 'gpu:a100:4(S:0-1),shard:8' -> 4; '(null)' -> 0."""
    n = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            n += int(m.group(1))
    return n


def parse_sinfo(text: str) -> list[Node]:
    """`sinfo -N -h -o SINFO_FORMAT`: one row per node and partition."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, part, cpus, mem, gres, state = line.strip().split("|")
        mem_mb = int(re.sub(r"\D.*", "", mem) or 0)  # "64000+" when nodes differ
        nodes.append(
            Node(
                name,
                part.rstrip("*"),
                part.endswith("*"),
                int(re.sub(r"\D.*", "", cpus) or 0),
                mem_mb,
                _gpus(gres),
                state.rstrip("*~#!%$@^-").lower(),
            )
        )
    return nodes


def _mount(path: Path, mounts: str) -> tuple[str, str]:
    """The mount point and filesystem type that hold `path` (the longest mount point above it in /proc/mounts)."""
    best = ("/", "unknown")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best[0]):
            best = (point, parts[2])
    return best


def check(launcher: dict[str, Any], nodes: list[Node], folders: dict[str, Path], mounts: str | None) -> list[str]:
    """Every problem with sending one job per sweep job with these launcher settings to this cluster."""
    problems = []
    part = launcher.get("partition")
    parts = sorted({n.partition for n in nodes})
    if part:
        chosen = [n for n in nodes if n.partition == part]
        if not chosen:
            return [f"hydra.launcher.partition: no partition {part!r} on this cluster ({', '.join(parts) or 'none'})"]
    else:
        chosen = [n for n in nodes if n.default]
        if not chosen:
            return [f"hydra.launcher.partition: the cluster has no default partition: name one of {', '.join(parts)}"]
        part = chosen[0].partition
    up = [n for n in chosen if not n.state.startswith(DOWN)]
    if not up:
        problems.append(f"partition {part}: every node is down or drained ({', '.join(n.name for n in chosen)})")
    cpus = int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1)
    mem_mb = float(launcher.get("mem_gb") or 0) * 1024
    gpus = int(launcher.get("gpus_per_node") or 0)
    for key, need, have, unit in (
        ("cpus_per_task", cpus, max((n.cpus for n in chosen), default=0), "CPUs"),
        ("mem_gb", mem_mb, max((n.mem_mb for n in chosen), default=0), "MB of memory"),
        ("gpus_per_node", gpus, max((n.gpus for n in chosen), default=0), "GPUs"),
    ):
        if need > have:
            problems.append(
                f"hydra.launcher.{key}: a job asks for {need:.0f} {unit}; the largest node of partition {part} has "
                f"{have:.0f}"
            )
    if len({n.name for n in nodes}) > 1:  # one node shares every local folder with itself
        for what, folder in folders.items():
            if mounts is None:
                problems.append(f"warning: {what} {folder}: cannot tell whether the compute nodes see it")
                continue
            point, fs = _mount(folder.resolve(), mounts)
            if not fs.startswith(SHARED_FS) and not fs.startswith("fuse."):
                problems.append(
                    f"{what} {folder}: on {fs} ({point}), a filesystem local to this machine: put it where every "
                    "node sees it (e.g. OBIM_CACHE=/shared/...)"
                )
    return problems


def preflight(config: Any) -> None:
    """Raise one error naming every problem (warnings are printed) before a Slurm sweep submits anything."""
    launcher = dict(config.hydra.launcher)
    if "slurm" not in str(launcher.get("_target_", "")).lower():
        return
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        raise ObimError(
            "hydra/launcher=slurm: `sinfo` not found: run the sweep where Slurm's commands are (a login node)"
        )
    proc = subprocess.run([sinfo, "-N", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ObimError(f"hydra/launcher=slurm: sinfo failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    folders = {
        "cache_dir": Path(str(config.cache_dir)),
        "hydra.sweep.dir": Path(str(config.hydra.sweep.dir)),
        "results_dir": Path(str(config.results_dir)),
    }
    mounts = Path("/proc/mounts").read_text() if os.path.exists("/proc/mounts") else None
    problems = check(launcher, parse_sinfo(proc.stdout), folders, mounts)
    for p in problems:
        if p.startswith("warning: "):
            print(p)
    errors = [p for p in problems if not p.startswith("warning: ")]
    if errors:
        raise ObimError("hydra/launcher=slurm: nothing submitted: " + "; ".join(errors))
