"""Preflight of a sweep sent to Slurm (hydra/launcher=slurm): before anything is submitted, the partition exists,
some node of it can hold one job's CPU, memory and GPU request, and the folders the jobs share (caches, the sweep's
job directories, the results) sit on a filesystem the compute nodes see. One line per problem, then nothing is
submitted; sbatch would otherwise refuse jobs one by one after the launch has begun, each error shown only once
every job has ended."""

from __future__ import annotations

import contextlib
import logging
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


# ------------------------------------------------------------------------------------------------- the launcher

# Slurm job states after which the job will not run again (sacct/squeue spelling); any other state (PENDING,
# RUNNING, REQUEUED, COMPLETING, PREEMPTED, SUSPENDED, SPECIAL_EXIT (a held requeue), ...) means "wait" while the
# controller lists the job
ENDED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
)
GONE = "GONE"  # neither the controller nor accounting knows the job any more
WHY = {
    "CANCELLED": "cancelled (scancel, or an administrator)",
    "TIMEOUT": "killed at its time limit (hydra.launcher.timeout_min",
    "PREEMPTED": "preempted and not requeued",
    "OUT_OF_MEMORY": "killed for using more memory than it asked for (hydra.launcher.mem_gb)",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "past its deadline",
    "FAILED": "ended without a result (killed, or its process died)",
    "COMPLETED": "ended without writing its result",
    GONE: "ended without a result and is no longer known to Slurm (no accounting to say why)",
}


def _expand(job_id: str) -> list[str]:
    """'123_[1-3,5%2]' (a pending array's tasks, as sacct and squeue print them) -> 123_1, 123_2, 123_3, 123_5."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_states(text: str) -> dict[str, str]:
    """'JobID|State' lines (sacct -P, squeue -o '%i|%T') -> {job id: state}; 'CANCELLED by 0' -> CANCELLED."""
    states = {}
    for line in text.splitlines():
        jid, _, state = line.strip().partition("|")
        if not jid or "." in jid or not state:  # job steps (123.batch) carry the step's state, not the job's
            continue
        for j in _expand(jid):
            states[j] = state.split()[0].upper()
    return states


def job_states(ids: list[str], run: Any = subprocess.run) -> dict[str, str]:
    """The state of each job Slurm can speak for now: the controller's (squeue, while it remembers the job:
    MinJobAge after its end) over accounting's (sacct, where there is any). A job the controller answered without
    listing is over: accounting's final state, else GONE (accounting's PREEMPTED or REQUEUED for it are a run that
    will not come back). A job is left out when the controller could not be asked (a busy or restarting slurmctld)."""
    arrays = ",".join(sorted({i.split("_")[0] for i in ids}))
    listed: dict[str, dict[str, str]] = {}
    for name, cmd in (
        ("sacct", ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", arrays]),
        ("squeue", ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", arrays]),
    ):
        try:
            p = run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if p.returncode == 0:
            listed[name] = parse_states(p.stdout)
        elif name == "squeue" and "invalid job id" in (p.stderr or "").lower():
            listed[name] = {}  # squeue refuses ids it no longer knows when it knows none of them
    acct, ctld = listed.get("sacct", {}), listed.get("squeue")
    out = {}
    for i in ids:
        if ctld is not None and i in ctld:
            out[i] = ctld[i]
        elif ctld is not None:
            out[i] = acct[i] if acct.get(i) in ENDED else GONE
        elif i in acct and acct[i] in ENDED:  # the controller unreachable: accounting's final word still holds
            out[i] = acct[i]
    return out


class Watch:
    """When to ask Slurm again: every `min_s` seconds at first, backing off to `max_s` as the sweep ages (a sweep of
    hours polls the scheduler once a minute; a job's death is noticed within `max_s`)."""

    def __init__(self, min_s: float = 5, max_s: float = 60) -> None:
        import time

        self.min_s, self.max_s, self.t0, self.last = min_s, max_s, time.monotonic(), float("-inf")

    def due(self) -> bool:
        import time

        now = time.monotonic()
        if now - self.last >= min(self.max_s, max(self.min_s, (now - self.t0) / 4)):
            self.last = now
            return True
        return False


# what slurmstepd writes to a killed job's stderr: the cause where the state alone does not say it (without cgroups
# a job over its memory is recorded FAILED, not OUT_OF_MEMORY)
LOG_CAUSES = (
    ("OUT_OF_MEMORY", re.compile(r"exceeded (job )?memory limit|oom[-_ ]kill", re.I)),
    ("TIMEOUT", re.compile(r"DUE TO TIME LIMIT")),
    ("PREEMPTED", re.compile(r"DUE TO PREEMPTION")),
    ("CANCELLED", re.compile(r"\*\*\* (JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ \*\*\*")),  # scancel: no "DUE TO"
)


def _cause(state: str, log: Path) -> str:
    """The job's state, made precise from its stderr where Slurm recorded only that it failed (or forgot it)."""
    if state not in ("FAILED", GONE, "CANCELLED"):
        return state
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return state
    # a requeued job appends to the same log: only its last run's lines say how that run ended
    text = re.split(r"DUE TO JOB REQUEUE[^\n]*\n", text)[-1][-20000:]
    return next((cause for cause, pattern in LOG_CAUSES if pattern.search(text)), state)


class SlurmTimeLimit(BaseException):
    """submitit's no-requeue error at a Slurm time limit, raised as a BaseException (as KeyboardInterrupt is): an
    `except Exception` in a library the job was running (a logging handler, an optional import) swallowed the
    UncompletedJobError once in CI, and the job ran on until Slurm killed it."""


@contextlib.contextmanager
def time_limit_not_swallowed() -> Any:
    """While the block runs in the main thread, submitit's time-limit handler (SIGUSR2, or SUBMITIT_PREEMPT_SIGNAL's)
    raises SlurmTimeLimit in place of its no-requeue UncompletedJobError (a requeue, its SystemExit, and any other
    error pass unchanged)."""
    import signal
    import threading

    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    prev = signal.getsignal(sig)
    if threading.current_thread() is not threading.main_thread() or not callable(prev):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            prev(signum, frame)
        except Exception as e:
            if job_error(e) is None:
                raise
            raise SlurmTimeLimit(str(e)) from e

    signal.signal(sig, handler)
    try:
        yield
    finally:
        signal.signal(sig, prev)


def job_error(exc: BaseException) -> str | None:
    """Inside a Slurm job, submitit's time-limit signal with no requeue left ends the job's code with an
    UncompletedJobError (a SlurmTimeLimit inside `time_limit_not_swallowed`): the one line that says so in obim's
    terms; None for any other exception."""
    text = str(exc)
    named = isinstance(exc, SlurmTimeLimit) or type(exc).__name__ == "UncompletedJobError"
    if not named or "Job not requeued because:" not in text:
        return None
    reason = text.split("Job not requeued because:", 1)[1].strip().splitlines()[0].rstrip(".")
    return (
        f"Slurm time limit reached (hydra.launcher.timeout_min) and the job not requeued: {reason} "
        "(hydra.launcher.max_num_timeout); a rerun of the sweep resumes from its finished stages"
    )


def lost_outcome(job: Any, state: str, overrides: list[str], name: str, requeues: int) -> dict[str, Any]:
    """The console's failed-job record (obim.bench.joblog) for a Slurm job that ended without a result."""
    log = Path(job.paths.stderr)
    cause = _cause(state, log)
    why = WHY.get(cause, f"ended in state {cause} without a result")
    if cause == "TIMEOUT":
        why += f", after up to {requeues} requeue{'s' * (requeues != 1)} through submitit's checkpointing)"
    from .joblog import failed_outcome

    error = f"Slurm job {job.job_id}: {state}{f' ({cause})' if cause != state else ''}: {why}"
    return failed_outcome(name, overrides, error, str(log), slurm_job=str(job.job_id))


def _exception_line(text: str) -> str:
    """The exception a traceback in submitit's error ends with ('ValueError: ...'), else its first line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?", ln)]
    return (raised or lines or ["failed"])[-1 if raised else 0]


def launch(launcher: Any, job_overrides: Any, initial_job_idx: int) -> list[Any]:
    """hydra_plugins.obim.SlurmLauncher.launch: submits one Slurm job per sweep job (an array) as
    hydra-submitit-launcher does, then waits on every job at once. A job that ends without a result (scancel, its
    memory or time limit, a dead node) is a failed job of the sweep, named on the console as soon as Slurm says so
    (within a minute), whether or not the cluster keeps accounting: submitit alone asks only sacct, and without it
    waits forever. Requeues (preemption; a time limit, up to max_num_timeout times) go through submitit's
    checkpointing, and a requeued job finds the stages it finished in the cache."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    config = launcher.config
    assert config is not None
    params = dict(launcher.params)
    requeues = int(params.pop("max_num_timeout", 0) or 0)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=requeues
    )
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, int(str(config.hydra.sweep.mode), 8))
    args = [
        (list(o), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}", Singleton.get_state())
        for i, o in enumerate(job_overrides)
    ]
    shown = [list(filter_overrides(list(o))) for o in job_overrides]
    log = logging.getLogger("hydra_plugins.obim")  # quiet unless verbose=true, as Hydra's launchers are
    log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
    for i, o in enumerate(shown):
        log.info(f"\t#{initial_job_idx + i} : {' '.join(o)}")
    jobs = executor.map_array(launcher, *zip(*args, strict=True))
    names = [job_name(config, list(o)) for o in job_overrides]
    return wait(jobs, names, shown, sweep_dir, requeues)


def job_name(config: Any, overrides: list[str]) -> str:
    """The job's override_dirname, as Hydra computes it from the job config (what the console labels jobs by)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    c = config.hydra.job.config.override_dirname
    parsed = OverridesParser.create().parse_overrides(overrides)
    return get_overrides_dirname(parsed, list(c.exclude_keys), c.item_sep, c.kv_sep) or str(config.hydra.job.name)


def _has_result(job: Any) -> bool:
    """Whether the job's result file is there; the folder's attributes are refreshed first, as submitit does (an
    NFS client may answer from a stale directory cache)."""
    folder = Path(job.paths.result_pickle).parent
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)
    return Path(job.paths.result_pickle).exists()


def wait(
    jobs: list[Any],
    names: list[str],
    overrides: list[list[str]],
    sweep_dir: Path,
    requeues: int,
    grace_s: float = 10,
    completed_grace_s: float = 60,
    watch: Watch | None = None,
    sleep_s: float = 1,
) -> list[Any]:
    """Each job's JobReturn, in order, once every job has ended: its own, or a failed outcome for one that ended
    without a result (told to the console at once). Result files are looked for every `sleep_s`, Slurm asked when
    `watch` says. A job is failed only when Slurm, asked again `grace_s` after it first said the job had ended
    (`completed_grace_s` for COMPLETED: a shared filesystem may show the result late), says so still."""
    import time

    from hydra.core.utils import JobReturn, JobStatus

    from .joblog import emit, events_dir

    returns: list[Any] = [None] * len(jobs)
    pending = dict(enumerate(jobs))
    ended: dict[int, tuple[float, str]] = {}  # when Slurm said the job ended without its result, and how
    watch = watch or Watch()
    inbox = events_dir(sweep_dir)

    def lost(i: int, o: dict[str, Any]) -> None:
        returns[i] = JobReturn(overrides=overrides[i], status=JobStatus.COMPLETED, _return_value=o)
        emit(inbox if inbox.is_dir() else None, "end", outcome=o)
        del pending[i]

    while pending:
        now = time.monotonic()
        confirm = {
            i for i, (t, st) in ended.items() if now - t >= (completed_grace_s if st == "COMPLETED" else grace_s)
        }
        states = job_states([j.job_id for j in pending.values()]) if watch.due() or confirm else {}
        for i, job in list(pending.items()):
            if _has_result(job):
                try:
                    returns[i] = job.results()[0]
                    exc = returns[i]._return_value if returns[i].status == JobStatus.FAILED else None
                    if exc is not None and job_error(exc):
                        # submitit's time-limit signal landed before the job's own error handling began (it is
                        # sent at once when the limit is under its 120 s delay): the same line the job would print
                        from .joblog import failed_outcome

                        why = str(job_error(exc))
                        lost(i, failed_outcome(names[i], overrides[i], why, str(job.paths.stderr)))
                    else:
                        del pending[i]
                except Exception as e:  # raised outside the job's own error handling, or an unreadable result
                    o = lost_outcome(job, "FAILED", overrides[i], names[i], requeues)
                    lost(i, {**o, "error": f"Slurm job {job.job_id}: {_exception_line(str(e))}"})
                ended.pop(i, None)
                continue
            state = states.get(job.job_id, "")
            if state in (*ENDED, GONE):
                if i in confirm:
                    lost(i, lost_outcome(job, state, overrides[i], names[i], requeues))
                    ended.pop(i, None)
                else:
                    ended.setdefault(i, (now, state))
            elif state:  # running, pending, requeued: not over
                ended.pop(i, None)
            elif i in confirm:  # Slurm could not be asked: ask again a grace period later
                ended[i] = (now, ended[i][1])
        if pending:
            time.sleep(sleep_s)
    return returns
