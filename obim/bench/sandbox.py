"""Run untrusted Python (a benchmark's model-generated code plus its unit tests) in a separate, confined process.

`run(program, timeout)` passes when the program exits normally within the time limit. Layers, each used where
this machine allows it (`isolation()` names the active ones, `describe()` says them in words for the console, and
`without_bwrap()` why bubblewrap is not among them):
- `bwrap` (bubblewrap, when installed and working): read-only /, private /tmp, /dev and /proc, no network, own
  pid/ipc/uts namespaces; only the work dir is writable; dies with its parent;
- `nobody`: when we run as root, the child drops to nobody (uid/gid 65534, no groups) before the program runs, so
  file permissions and RLIMIT_NPROC apply to it (with an interpreter nobody may run: ours may live under /root,
  then the system's python3 is used);
- `rlimits`: CPU seconds, 1 GiB address space, 16 MiB file size, no new processes or threads, no core dumps;
- `audit-hook`: before the program runs, an audit hook (which cannot be removed) kills it on process creation,
  signals to other processes, ctypes, sockets, and any write, rename, removal or mode change outside its work
  dir (and on reads of other processes' /proc entries);
- `pgroup`: its own session; at the end (timeout or not) the whole process group is SIGKILLed and the work dir
  (a fresh temporary directory) removed.
The child (obim/bench/sandbox_child.py, run by path) gets a minimal environment (no secrets) and runs with
`python -I -S -B` (the standard library only).
The audit hook is defense in depth, not a boundary on its own (CPython can be subverted from inside); the OS
layers (bwrap, nobody, rlimits) are what bound the damage. A program can still forge its own verdict (exit 0
without running its tests by abusing interpreter internals): scores are only as honest as the model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

MEMORY = 1 << 30  # RLIMIT_AS
FILE_SIZE = 16 << 20  # RLIMIT_FSIZE
NOBODY = 65534
NOT_INSTALLED = "bwrap is not installed"

# The child program (drop root, limits, the audit hook, then the program), run by path: as `-m obim.bench...` it
# would import obim, and with it torch. Resolved, so that bwrap can bind it where /tmp or /dev would hide it.
_CHILD = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py"))


class Result(NamedTuple):
    passed: bool
    reason: str  # "passed", "timed out after 3 s", "refused os.posix_spawn", the last line of the traceback...


class _Setup(NamedTuple):
    python: str
    uid: int | None  # the program runs as this uid/gid (root drops to nobody)
    gid: int | None
    bwrap: str | None
    no_bwrap: str | None = None  # why bubblewrap is not used, when it was wanted

    def isolation(self) -> str:
        return "+".join(
            ([] if self.bwrap is None else ["bwrap"])
            + ([] if self.uid is None else ["nobody"])
            + ["rlimits", "audit-hook", "pgroup"]
        )

    def describe(self) -> str:
        layers = (
            []
            if self.bwrap is None
            else [
                "bubblewrap (read-only filesystem, private /tmp, /dev and /proc, no network, "
                "own pid/ipc/uts namespaces)"
            ]
        )
        layers += [] if self.uid is None else ["runs as nobody"]
        layers += [
            f"rlimits (CPU time, {MEMORY >> 30} GiB memory, {FILE_SIZE >> 20} MiB files, no new processes)",
            "audit hook",
            "own process group, killed at the timeout",
        ]
        return "code sandbox: " + ", ".join(layers)


def run(program: str, timeout: float = 3.0, *, bwrap: bool = True) -> Result:
    """Run `program` (Python source) confined, with a wall-clock `timeout` in seconds. `bwrap=False` skips
    bubblewrap even where it works (the tests exercise both)."""
    return _run(_setup(bwrap), program, timeout)


def run_opted_in(program: str, timeout: float, who: str) -> bool:
    """Whether `program` exits normally within `timeout`, confined; refused, naming `who` (the tasks that ask), unless
    code execution was opted in (HF_ALLOW_CODE_EVAL=1, as evaluate's code_eval asks)."""
    import os

    from obim.merging.errors import ObimError

    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        raise ObimError(
            f"{who} execute model-generated code: opt in with eval.allow_code=true "
            "(or HF_ALLOW_CODE_EVAL=1 in the environment)"
        )
    return run(program, timeout).passed


def isolation(bwrap: bool = True) -> str:
    """The layers `run` uses on this machine, e.g. 'bwrap+nobody+rlimits+audit-hook+pgroup'."""
    return _setup(bwrap).isolation()


def describe() -> str:
    """One line for the console: the layers `run` applies here, in words."""
    return _setup(True).describe()


def without_bwrap() -> str | None:
    """None when `run` uses bubblewrap here; else one line: why not, and what that leaves out."""
    why = _setup(True).no_bwrap
    if why is None:
        return None
    fix = (
        "install it as root: apt-get install bubblewrap, or make install-sandbox"
        if why == NOT_INSTALLED
        else "bwrap needs to create namespaces (a container may forbid it)"
        if os.geteuid() == 0
        else "bwrap needs unprivileged user namespaces, or root"
    )
    return f"the code sandbox runs without bubblewrap ({why}): no read-only filesystem, no network isolation; {fix}"


def _limits(timeout: float) -> str:
    cpu = math.ceil(timeout) + 1  # the wall clock decides; this only stops a spinning orphan
    return f"RLIMIT_CPU={cpu},RLIMIT_AS={MEMORY},RLIMIT_FSIZE={FILE_SIZE},RLIMIT_NPROC=1,RLIMIT_CORE=0,RLIMIT_NOFILE=64"


def _argv(s: _Setup, work: str, timeout: float) -> list[str]:
    cmd = [s.python, "-I", "-S", "-B", _CHILD, work, _limits(timeout), "-" if s.uid is None else str(s.uid)]
    if s.bwrap is None:
        return cmd
    if s.uid is None:  # unprivileged bwrap needs a user namespace
        unshare = ["--unshare-all"]
    else:  # root: no user namespace (its root would still own root's files); the boot code drops to nobody
        unshare = [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
        ]
    return [
        s.bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--bind",
        work,
        work,
        "--ro-bind",  # an install under /tmp (a fresh venv) is hidden by the tmpfs above
        _CHILD,
        _CHILD,
        "--chdir",
        work,
        *unshare,
        "--die-with-parent",
        "--new-session",
        "--",
        *cmd,
    ]


def _run(s: _Setup, program: str, timeout: float) -> Result:
    with (
        tempfile.TemporaryDirectory(prefix="obim-sandbox-", ignore_cleanup_errors=True) as tmp,
        tempfile.TemporaryFile() as err,
    ):
        work = os.path.realpath(tmp)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if s.uid is not None:
            os.chown(work, s.uid, s.gid)
        # minimal environment: nothing of ours (tokens, keys) reaches the program
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        proc = subprocess.Popen(
            _argv(s, work, timeout),
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            timed_out = not _exited(proc, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever it left in its process group goes too
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
        lines = [x.strip() for x in err.read().decode("utf-8", "replace").splitlines() if x.strip()]
    if proc.returncode == 0 and not timed_out:
        return Result(True, "passed")
    refused = [x for x in lines if x.startswith("sandbox: refused ")]
    if refused:
        return Result(False, refused[-1][len("sandbox: ") :][:200])
    if timed_out:
        return Result(False, f"timed out after {timeout:g} s")
    if lines:
        return Result(False, lines[-1][:200])
    if proc.returncode < 0:
        return Result(False, f"killed by {signal.Signals(-proc.returncode).name}")
    return Result(False, f"exit status {proc.returncode}")


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process to end, at most `timeout` seconds. A pidfd wakes us the moment it ends; Popen.wait's
    polling (sleeps doubling to 50 ms) would add up to its runtime again to every program."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


_PROBE = """import collections, json, math, os, re, tempfile  # pure-Python modules too: the stdlib is readable
with open("probe.txt", "w") as f:
    f.write("ok")
assert open("probe.txt").read() == "ok" and math.sqrt(4) == 2
"""


def _try(s: _Setup) -> Result:
    try:
        return _run(s, _PROBE + ("assert os.getuid() != 0\n" if s.uid is not None else ""), 10.0)
    except OSError as e:
        return Result(False, f"{type(e).__name__}: {e}")


def _works(s: _Setup) -> bool:
    return _try(s).passed


@functools.cache
def _setup(bwrap: bool) -> _Setup:
    """Which interpreter and layers work here, tried once per process."""
    python, uid = os.path.realpath(sys.executable), None
    if os.geteuid() == 0:
        # nobody must be able to run the interpreter (ours may live under /root): else try the system's
        seen = []
        for p in (python, getattr(sys, "_base_executable", None), "/usr/bin/python3", "/usr/local/bin/python3"):
            p = p and os.path.realpath(p)
            if p and p not in seen and os.access(p, os.X_OK):
                seen.append(p)
                if _works(_Setup(p, NOBODY, NOBODY, None)):
                    python, uid = p, NOBODY
                    break
    gid = None if uid is None else NOBODY
    if not bwrap:
        return _Setup(python, uid, gid, None)
    exe = shutil.which("bwrap")
    if exe is None:
        return _Setup(python, uid, gid, None, NOT_INSTALLED)
    tried = _try(trial := _Setup(python, uid, gid, exe))
    if tried.passed:
        return trial
    return _Setup(python, uid, gid, None, f"bwrap fails here: {tried.reason}")
