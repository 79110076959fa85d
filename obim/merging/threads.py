"""One thread budget per process, shared by obim's worker pool and torch's intra-op threads.

numpy's selections, sorts and generators run single-threaded and release the GIL, so obim runs them on its own pool
(`parallel_map`); torch's elementwise ops run on torch's intra-op (OpenMP) team. Sized independently, both take
every core, and under contention (a busy neighbour, parallel sweep jobs) a 3 x 271M merge took 47-49 s instead of
4.2 s with OMP_NUM_THREADS=1. `configure(jobs)` (called by every entry point) sets the budget, `budget_for(jobs)`:

- the pool gets `budget` workers (none at 1: `parallel_map` runs inline), each running torch ops on one thread;
- the configuring (main) thread runs torch with `budget` threads. Where OpenMP's idle threads spin (libgomp's
  default: ~3 ms after every op; OMP_WAIT_POLICY=passive, which obim sets when it is imported before torch, makes
  them sleep at once), a spinning helper burns a core while the pool's workers run, so the thread that first
  hands work to the pool drops to one torch thread from then on (a process that never uses the pool, such as
  training or a saliency pass, keeps its team).

A caller of `parallel_map` waits for the pool, so the pool and torch never compute at once: at most `budget`
threads burn CPU. Without a `configure()` call the first `parallel_map` configures jobs=1. OBIM_THREAD_BUDGET=0
restores the behaviour before the budget (2 workers, torch's own defaults), for comparison.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_PREFIX = "obim-worker"
_LEGACY_POOL = 2  # the pool size before the budget (OBIM_THREAD_BUDGET=0)

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_budget: int | None = None  # None: not configured yet
_interop_set = False
_drop_torch_team = False  # set while OpenMP spins: the first thread to use the pool goes to one torch thread


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when OBIM_THREAD_BUDGET=0 (or off/false/no): the behaviour before the budget, for comparison."""
    env = os.environ if environ is None else environ
    return env.get("OBIM_THREAD_BUDGET", "1").strip().lower() not in {"0", "off", "false", "no"}


def prefer_passive_openmp(environ: dict | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set, while torch (and its OpenMP runtime, which reads it once, when it loads)
    is not imported yet. Runs when this module is imported: the obim package imports it first; scripts that import
    torch before obim set it themselves (experiments/sweep.py)."""
    env = os.environ if environ is None else environ
    if "torch" not in sys.modules and enabled(env):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


prefer_passive_openmp()


def openmp_passive(environ: Mapping[str, str] | None = None) -> bool:
    """Whether OpenMP's idle threads sleep at once (GOMP_SPINCOUNT=0, else OMP_WAIT_POLICY=passive; KMP_BLOCKTIME=0
    for Intel's runtime), as far as the environment tells: it must have been so when torch was imported."""
    env = os.environ if environ is None else environ
    spin = env.get("GOMP_SPINCOUNT")
    if spin is not None and spin.strip():
        return spin.strip() == "0"
    return env.get("OMP_WAIT_POLICY", "").strip().lower() == "passive" or env.get("KMP_BLOCKTIME", "").strip() == "0"


def _positive_int(text: str | None) -> int | None:
    try:
        v = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (quota / period, in CPUs) of this process's cgroup and its ancestors; None when there
    is none. cgroup v2: cpu.max ("max 100000" = none); v1: cpu.cfs_quota_us (-1 = none) / cpu.cfs_period_us."""
    v2, v1 = [], []
    for line in (_read(proc_cgroup) or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and controllers == "":
            v2.append(rel)
        elif "cpu" in controllers.split(","):
            v1.append((controllers, rel))

    def ancestors(base: Path, rel: str) -> list[Path]:
        parts = [p for p in rel.strip().strip("/").split("/") if p and p != ".."]
        return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]

    quotas = []
    for d in {d for rel in (v2 or ["/"]) for d in ancestors(cgroup_root, rel)}:
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2 and _positive_int(fields[0]) and _positive_int(fields[1]):
            quotas.append(int(fields[0]) / int(fields[1]))
    mounts = {c for c, _ in v1} | {"cpu", "cpu,cpuacct"}
    for rel in {r for _, r in v1} or {"/"}:
        for d in {d for m in mounts for d in ancestors(cgroup_root / m, rel)}:
            quota = _positive_int(_read(d / "cpu.cfs_quota_us"))
            period = _positive_int(_read(d / "cpu.cfs_period_us"))
            if quota and period:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def cores_available(
    *,
    affinity: int | None = None,
    cgroup_root: str | Path = "/sys/fs/cgroup",
    proc_cgroup: str | Path = "/proc/self/cgroup",
) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota rounded down; at least 1.
    The arguments stand in for the real sources (tests)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    return max(1, min(affinity, int(quota)) if quota is not None else affinity)


def budget_for(jobs: int = 1, cores: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The thread budget of one of `jobs` processes sharing the machine: OBIM_NUM_THREADS when set (this process's
    budget, as is), else max(1, cores_available() // jobs), capped by OMP_NUM_THREADS when that is lower (a
    per-process count, not divided again: joblib's workers already get cores // n_jobs)."""
    env = os.environ if environ is None else environ
    fixed = _positive_int(env.get("OBIM_NUM_THREADS"))
    if fixed:
        return fixed
    n = max(1, (cores_available() if cores is None else cores) // max(1, int(jobs)))
    omp = _positive_int(env.get("OMP_NUM_THREADS"))
    return min(n, omp) if omp else n


def _worker_init() -> None:
    import torch

    torch.get_num_threads()  # torch's per-thread setting initialises now (from the process default) ...
    torch.set_num_threads(1)  # ... and this thread's stays 1


def configure(jobs: int = 1) -> int:
    """Set this process's thread budget for `jobs` processes sharing the machine (see the module doc); returns it.
    Cheap and idempotent; call it from the thread that runs the merge (an entry point's main thread)."""
    global _pool, _budget, _interop_set, _drop_torch_team
    legacy = not enabled()
    n = _LEGACY_POOL if legacy else budget_for(jobs)
    with _lock:
        if _budget == n:
            return n
        if _pool is not None:
            _pool.shutdown(wait=False)  # a map in flight finishes on it
        _pool = None
        if legacy:
            _pool = ThreadPoolExecutor(n, thread_name_prefix=_PREFIX)
            _budget = n
            return n
        import torch

        if n > 1:
            _pool = ThreadPoolExecutor(n, thread_name_prefix=_PREFIX, initializer=_worker_init)
            gate = threading.Barrier(n)  # every worker starts now, as a distinct thread
            list(_pool.map(lambda _: gate.wait(), range(n)))
        # after the workers' set_num_threads(1), which also became torch's default for threads started later
        torch.set_num_threads(n)
        _drop_torch_team = n > 1 and not openmp_passive()
        if not _interop_set:
            _interop_set = True
            with contextlib.suppress(RuntimeError):  # settable once, before any inter-op work: keep what is there
                torch.set_num_interop_threads(n)
        _budget = n
    return n


def budget() -> int:
    """This process's thread budget (configured with jobs=1 on first use)."""
    return _budget if _budget is not None else configure()


def pool_size() -> int:
    """Workers in obim's pool (0: parallel_map runs inline)."""
    budget()
    return _pool._max_workers if _pool is not None else 0


def _one_torch_thread() -> None:
    global _drop_torch_team
    import torch

    with _lock:
        if _drop_torch_team:
            _drop_torch_team = False
            torch.set_num_threads(1)


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """list(map(fn, items)) on the pool; inline when the budget is one thread or when called from a pool worker
    (nested use would deadlock)."""
    items = list(items)
    if len(items) < 2 or threading.current_thread().name.startswith(_PREFIX):
        return [fn(x) for x in items]
    if _budget is None:
        configure()
    pool = _pool
    if pool is not None:
        if _drop_torch_team:
            _one_torch_thread()
        try:
            futures = [pool.submit(fn, x) for x in items]
        except RuntimeError:  # shut down by a concurrent configure(): the rest runs here
            futures = []
        done = [f.result() for f in futures]
        return done + [fn(x) for x in items[len(done) :]]
    return [fn(x) for x in items]
