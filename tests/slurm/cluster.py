"""A real one-node Slurm cluster on this machine, for the tests that submit to Slurm: munged, MariaDB, slurmdbd,
slurmctld and slurmd started from the configuration beside this file (slurm.conf.in, slurmdbd.conf.in), every file
they write (keys, sockets, spool, logs, database, pid files) in one temporary state directory, never /etc; stopped by
PID at the end with nothing left running. Debian's packages are installed with apt-get when missing (as root).

Tests use the `slurm_cluster` fixture (tests/conftest.py); `python tests/slurm/cluster.py` starts one, times a few
jobs and stops it (the measured overheads)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
PACKAGES = ("slurm-wlm", "munge", "slurmdbd", "mariadb-server")
# programs each package brings: what is looked up to tell whether it is installed
PROGRAMS = {
    "slurm-wlm": ("slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr"),
    "munge": ("munged", "munge"),
    "slurmdbd": ("slurmdbd",),
    "mariadb-server": ("mariadbd", "mariadb-install-db", "mariadb"),
}
# daemons live in sbin, which a non-login shell's PATH may lack
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
PARTITION = "debug"
CLUSTER = "obim"
# every process of a cluster carries this variable (daemons, slurmstepd, jobs): what the final sweep looks for
MARKER = "OBIM_SLURM_STATE"
# unix socket paths are limited to 108 bytes: a state directory longer than this moves to a short one in /tmp
MAX_ROOT = 60
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

Probe = Callable[[], "bool | subprocess.CompletedProcess[str]"]


class ClusterError(RuntimeError):
    """The cluster did not start or a command on it failed; the message carries the daemons' log tails."""


def which(program: str) -> str | None:
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def missing_packages() -> list[str]:
    return [pkg for pkg, programs in PROGRAMS.items() if not all(which(p) for p in programs)]


def install(log: Callable[[str], None] = lambda s: None) -> str | None:
    """Installs the packages that are missing with apt-get; None once every one is there (and we are root), else
    one line saying why there can be no cluster (not root, no apt-get, apt-get failed)."""
    missing = missing_packages()
    if not missing:
        return None if os.geteuid() == 0 else "slurmd must run as root to start jobs, and the tests do not run as root"
    if os.geteuid() != 0:
        return f"{' '.join(missing)} not installed, and apt-get needs root"
    if not shutil.which("apt-get"):
        return f"{' '.join(missing)} not installed, and there is no apt-get here"
    log(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # waits for another apt (a concurrent test session) rather than failing on its lock
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *missing]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:  # stale package lists: update them once and try again
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], env=env, capture_output=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode or missing_packages():
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        return f"apt-get install {' '.join(missing)} failed ({last})"
    return None


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (held together so they differ): another cluster or a system Slurm may run."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In a daemon before exec: killed when the process that started it dies (pytest killed outright leaves no
    daemon behind; the fixture's own stop is the normal path)."""
    with contextlib.suppress(AttributeError):  # no prctl: not Linux
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return f"--- {path.name}: not written"
    return "\n".join([f"--- {path.name} (last {len(lines)} lines)", *lines])


# slurm.conf's accounting lines: slurmdbd (MariaDB behind it), or none at all (sacct then fails, as on clusters
# that keep no accounting)
ACCOUNTING = """AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
# not a password with slurmdbd: the munge socket for talking to it (AuthInfo does not apply there)
AccountingStoragePass=$munge_socket"""
NO_ACCOUNTING = "AccountingStorageType=accounting_storage/none"


class SlurmCluster:
    """One node (this machine, as `slurmd -C` reports it) in one partition, `debug`, with accounting (slurmdbd)
    unless `accounting` is False. `env` is the environment for Slurm's clients (SLURM_CONF, PATH with sbin); `run`
    runs one in it."""

    def __init__(self, root: Path, log: Callable[[str], None] = lambda s: None, accounting: bool = True):
        root = Path(root).resolve()
        if len(str(root)) > MAX_ROOT:
            root = Path(tempfile.mkdtemp(prefix="obim-slurm-"))
        self.root, self.log, self.partition, self.cluster = root, log, PARTITION, CLUSTER
        self.accounting = accounting
        self.conf = root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.ports: dict[str, int] = {}
        self.node = ""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        # (a test run inside a Slurm job must not pass that job's settings on)
        self.env = {**env, "SLURM_CONF": str(self.conf), "PATH": f"{env.get('PATH', '')}:{SBIN}", MARKER: str(root)}

    # ---- commands

    def run(self, *args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in the cluster's environment (cwd: the state directory); raises ClusterError when it fails
        and `check`."""
        argv = [str(a) for a in args]
        p = subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise ClusterError(f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
        return p

    def sbatch(self, *args: str) -> str:
        """Submits a job (its output in jobs/<id>.out unless args say otherwise); returns its id."""
        out = self.run("sbatch", "--parsable", f"--output={self.root}/jobs/%j.out", *args).stdout
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state as accounting has it ('' until slurmdbd knows it): PENDING, RUNNING, COMPLETED,
        CANCELLED (sacct's 'CANCELLED by 0' shortened), FAILED, ...; without accounting, as the controller has it
        ('' once it has forgotten the job, MinJobAge after its end)."""
        if self.accounting:
            p = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", job, check=False)
        else:
            p = self.run("squeue", "-h", "-t", "all", "-o", "%T", "-j", job, check=False)
        return p.stdout.split()[0] if p.returncode == 0 and p.stdout.strip() else ""

    def wait_state(self, job: str, states: Iterable[str], timeout: float = 60, poll: float = 0.2) -> str:
        """Polls accounting until the job reaches one of `states`; returns it, or raises with the last state."""
        wanted, deadline, last = set(states), time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            last = self.state(job)
            if last in wanted:
                return last
            time.sleep(poll)
        raise ClusterError(f"job {job} not {'/'.join(sorted(wanted))} after {timeout:.0f} s (last: {last or 'none'})")

    def node_state(self) -> str:
        p = self.run("sinfo", "-h", "-N", "-p", self.partition, "-o", "%t", check=False)
        return p.stdout.strip() if p.returncode == 0 else ""

    def logs(self, n: int = 15) -> str:
        return "\n".join(tail(p, n) for p in sorted((self.root / "log").glob("*")))

    # ---- start

    def start(self, timeout: float = 120) -> SlurmCluster:
        """Starts every daemon and waits until the node is idle; on failure stops what it started and raises
        ClusterError with the daemons' log tails."""
        t0 = time.monotonic()
        for p in reap_orphans():
            self.log(f"killed, left by an earlier cluster: {p}")
        try:
            self._render()
            self._munge(timeout)
            if self.accounting:
                self._mariadb(timeout)
                self._slurmdbd(timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
            self._spawn("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node])
            self._until("the node idle in sinfo", lambda: self.node_state() == "idle", timeout)
        except BaseException as e:
            logs = self.logs()
            left = self.stop()
            if isinstance(e, ClusterError | subprocess.TimeoutExpired):
                raise ClusterError(f"the Slurm cluster in {self.root} did not start: {e}\n{logs}\n{left=}") from e
            raise
        self.timings["start_s"] = time.monotonic() - t0
        self.log(f"Slurm cluster up in {self.timings['start_s']:.1f} s ({self.root})")
        return self

    def _render(self) -> None:
        hw = subprocess.run([which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30)
        first = hw.stdout.splitlines()[0].split() if hw.stdout.strip() else []
        if hw.returncode or not first or not first[0].startswith("NodeName="):
            raise ClusterError(f"slurmd -C: {hw.stderr.strip() or hw.stdout.strip()}")
        self.node = first[0].split("=", 1)[1]
        for d in ("etc", "log", "run", "ctld", "slurmd", "munge", "mysql", "jobs"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        ctld, slurmd, dbd, mysql = free_ports(4)
        self.ports = {"slurmctld": ctld, "slurmd": slurmd, "slurmdbd": dbd, "mysql": mysql}
        self.db_password = secrets.token_hex(12)
        values = {
            "cluster": self.cluster,
            "partition": self.partition,
            "node": self.node,
            "hardware": " ".join(first[1:]),  # CPUs, sockets, cores, threads and RealMemory as detected
            "state": self.root,
            "munge_socket": self.root / "munge" / "munge.socket",
            "ctld_port": ctld,
            "slurmd_port": slurmd,
            "dbd_port": dbd,
            "mysql_port": mysql,
            "db_password": self.db_password,
        }
        values["accounting"] = string.Template(ACCOUNTING if self.accounting else NO_ACCOUNTING).substitute(values)
        for name in ("slurm.conf", "slurmdbd.conf"):
            text = string.Template((HERE / f"{name}.in").read_text()).substitute(values)
            (self.root / "etc" / name).write_text(text)
        (self.root / "etc" / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable one: it holds a password

    def _spawn(self, name: str, argv: list[str | Path]) -> subprocess.Popen:
        prog = which(str(argv[0])) or str(argv[0])
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            p = subprocess.Popen(
                [prog, *map(str, argv[1:])],
                env=self.env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = p
        self.log(f"started {name} (pid {p.pid})")
        return p

    def _until(self, what: str, ready: Probe, timeout: float) -> None:
        """Polls `ready` (a bool, or a command that exits 0) until it holds; raises with the last command's
        message, or at once when a daemon has exited."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            dead = [f"{n} exited {p.returncode}" for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} while waiting for {what}")
            got = ready()
            if isinstance(got, subprocess.CompletedProcess):
                last = (got.stderr or got.stdout).strip()
                got = got.returncode == 0
            if got:
                return
            time.sleep(0.2)
        raise ClusterError(f"no {what} after {timeout:.0f} s" + (f" (last: {last})" if last else ""))

    def _munge(self, timeout: float) -> None:
        d = self.root / "munge"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = d / "munge.socket"
        # --force: munged's checks of the directories above its files (a world-writable /tmp) are not ours to fix
        argv = ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}"]
        self._spawn("munged", [*argv, f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={d / 'seed'}"])
        self._until("munge socket", lambda: sock.exists() and self.run("munge", "-n", "-S", sock, check=False), timeout)

    def _mariadb(self, timeout: float) -> None:
        d = self.root / "mysql"
        sock = d / "mysqld.sock"
        # a small server: its own datadir and socket, TCP on 127.0.0.1 only (slurmdbd connects there)
        server = [
            "--no-defaults",
            f"--datadir={d / 'data'}",
            "--user=root",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--innodb-lock-wait-timeout=900",  # slurmdbd asks for it
        ]
        p = self.run("mariadb-install-db", *server, "--auth-root-authentication-method=normal", "--skip-test-db",
                     check=False, timeout=timeout)  # fmt: skip
        if p.returncode:
            raise ClusterError(f"mariadb-install-db exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                *server,
                f"--socket={sock}",
                f"--port={self.ports['mysql']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={d / 'mariadbd.pid'}",
                f"--log-error={self.root / 'log' / 'mariadbd.log'}",
            ],
        )
        client = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"]
        self._until("MariaDB", lambda: self.run(*client, "-e", "SELECT 1", check=False), timeout)
        user = "'slurm'@'127.0.0.1'"
        sql = (
            f"CREATE DATABASE slurm_acct_db; CREATE USER {user} IDENTIFIED BY '{self.db_password}'; "
            f"GRANT ALL ON slurm_acct_db.* TO {user};"
        )
        self.run(*client, "-e", sql)

    def _slurmdbd(self, timeout: float) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])  # reads slurmdbd.conf beside $SLURM_CONF
        # sacctmgr answers once slurmdbd has created its tables
        self._until("slurmdbd", lambda: self.run("sacctmgr", "-n", "-P", "list", "cluster", check=False), timeout)
        self.run("sacctmgr", "-i", "add", "cluster", self.cluster)

    # ---- stop

    def stop(self, grace: float = 10) -> list[str]:
        """Cancels every job, stops each daemon by PID (SIGTERM, SIGKILL after `grace` seconds), then kills any
        process still carrying this cluster's marker (a job or slurmstepd that outlived its daemons); returns
        those, as 'pid command', so a caller can fail on them. Safe to call twice."""
        t0 = time.monotonic()
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.2)
        # the schedulers first, then what they write to, munge last (each of them authenticates through it)
        for group in (("slurmd", "slurmctld"), ("slurmdbd",), ("mariadbd",), ("munged",)):
            procs = [self.procs[n] for n in group if n in self.procs and self.procs[n].poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        left = []
        for p in self._marked():
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())}")
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.root / "mysql" / "data", ignore_errors=True)  # ~100 MB; the logs stay
        self.timings["stop_s"] = time.monotonic() - t0
        return left

    def _marked(self) -> list[psutil.Process]:
        """Processes other than this one whose environment names this cluster."""
        return marked().get(str(self.root), [])

    def running(self) -> list[str]:
        """'pid command' of each process of this cluster still alive (daemons, slurmstepd, jobs)."""
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in self._marked()]


def marked() -> dict[str, list[psutil.Process]]:
    """Live processes other than this one that belong to a test cluster, by its state directory: those whose
    environment carries the marker, and slurmstepd (which clears its environment) writing to a cluster's slurmd
    log."""
    found: dict[str, list[psutil.Process]] = {}
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            root = p.environ().get(MARKER)
            if not root and p.name() == "slurmstepd":
                logs = [Path(f.path) for f in p.open_files() if f.path.endswith("/log/slurmd.log")]
                root = str(logs[0].parents[1]) if logs else None
            if root:
                found.setdefault(root, []).append(p)
        except psutil.Error:
            pass
    return found


def reap_orphans() -> list[str]:
    """Kills what a test session killed outright left behind: its daemons die with it, but a running job and its
    slurmstepd do not. A cluster with any daemon alive is another session's, left alone."""
    killed = []
    for root, procs in marked().items():
        with contextlib.suppress(psutil.Error):
            if any(p.name() in DAEMONS for p in procs):
                continue
        for p in procs:
            with contextlib.suppress(psutil.Error):
                killed.append(f"{p.pid} {' '.join(p.cmdline())} ({root})")
                p.kill()
    return killed


def cluster_session(
    root: Path, log: Callable[[str], None] = lambda s: None, accounting: bool = True
) -> Iterator[SlurmCluster]:
    """The body of the `slurm_cluster` fixture: installs what is missing (or skips with one line), starts the
    cluster in `root`, yields it and stops it, failing if anything of it was left running."""
    import pytest

    t0 = time.monotonic()
    why = install(log)
    if why:
        pytest.skip(f"no local Slurm cluster: {why}")
    cluster = SlurmCluster(root, log, accounting)
    cluster.timings["install_s"] = time.monotonic() - t0
    cluster.start()
    try:
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"processes of the Slurm cluster outlived its daemons (killed): {left}"


def sweep_overhead(cluster: SlurmCluster, work: Path, jobs: int = 3) -> None:
    """The toy sweep of `jobs` methods run twice each way, the basic launcher and Slurm, side by side: the first run
    builds the quick zoo and fills the caches, the second (every job's stages cached, its result.json moved away)
    is almost all launcher overhead; then each Slurm job's submit -> start -> end from accounting."""
    from datetime import datetime

    repo = HERE.parents[1]
    methods = ["ta", "ties", "obim", "dare", "della", "pcb"][:jobs]
    toy = [f"method={','.join(methods)}", "experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true"]
    toy += ["tracking=none", "progress=false"]
    slurm = ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.gpus_per_node=0"]
    slurm += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4"]
    env = {**cluster.env, "OBIM_ZOO": str(work / "zoo"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.update({"HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(repo)})
    for where, launcher in (("local", []), ("slurm", slurm)):
        runs = work / f"runs-{where}"
        for attempt in ("first (zoo, caches)", "cached stages"):
            for r in runs.glob("*/result.json"):
                r.unlink()  # the job runs again; its stages come from the cache
            argv = [sys.executable, str(repo / "experiments" / "sweep.py"), "-m", *launcher, *toy]
            argv += [f"hydra.sweep.dir={runs}", f"results_dir={work / 'results'}"]
            t = time.monotonic()
            p = subprocess.run(argv, env={**env, "OBIM_CACHE": str(work / f"cache-{where}")}, cwd=work,
                               capture_output=True, text=True)  # fmt: skip
            took = time.monotonic() - t
            status = "ok" if p.returncode == 0 else f"exit {p.returncode}: {p.stderr[-500:]}"
            print(f"{where:5s} {attempt:20s} {jobs} jobs in {took:6.1f} s ({took / jobs:.1f} s per job) {status}")
    array = {d.name.split("_")[0] for d in (work / "runs-slurm" / ".submitit").iterdir() if d.name[0].isdigit()}
    if cluster.accounting:
        fmt = ["-X", "-n", "-P", "-o", "JobID,Submit,Start,End", "-j", ",".join(sorted(array))]
        for line in cluster.run("sacct", *fmt).stdout.split():
            jid, *ts = line.split("|")
            sub, start, end = (datetime.fromisoformat(x) for x in ts)
            print(f"slurm job {jid}: submit -> start {(start - sub).total_seconds():.0f} s, "
                  f"start -> end {(end - start).total_seconds():.0f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Starts a cluster, times `echo hi` jobs from submission to COMPLETED in accounting (and, with --sweep, the toy
    sweep through Slurm against the basic launcher), stops it."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--jobs", type=int, default=5, help="jobs to time, one after the other")
    ap.add_argument("--root", type=Path, help="state directory (default: a new one in /tmp)")
    ap.add_argument("--sweep", type=int, default=0, metavar="N", help="also time a toy sweep of N jobs both ways")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    why = install(print)
    if why:
        print(f"no local Slurm cluster: {why}")
        return 1
    install_s = time.monotonic() - t0
    cluster = SlurmCluster(args.root or Path(tempfile.mkdtemp(prefix="obim-slurm-")), print).start()
    try:
        print(f"install/check {install_s:.1f} s, start {cluster.timings['start_s']:.1f} s")
        for _ in range(args.jobs):
            t = time.monotonic()
            job = cluster.sbatch("--wrap", "echo hi")
            cluster.wait_state(job, ["COMPLETED"], timeout=120, poll=0.05)
            print(f"job {job}: submitted to COMPLETED in accounting {time.monotonic() - t:.2f} s")
        if args.sweep:
            sweep_overhead(cluster, Path(tempfile.mkdtemp(prefix="obim-slurm-sweep-")), args.sweep)
    finally:
        left = cluster.stop()
        print(f"stopped in {cluster.timings['stop_s']:.1f} s; left running: {left or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
