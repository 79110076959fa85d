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
The child gets a minimal environment (no secrets) and runs with `python -I -S -B` (the standard library only).
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

# Runs in the child (any Python 3.8+, `-I -S -B`): drop root, limits, the audit hook, then the program. Everything
# the hook uses is bound in closures up front: the program may rebind module attributes and builtins, which must
# not change the hook's decisions, and the hook never calls an object the program made (exact str/bytes/int only).
_BOOT = r"""
import sys

def _boot(argv, BaseException=BaseException, SystemExit=SystemExit, RuntimeError=RuntimeError, exec=exec):
    import posix, resource, stat
    work, limits, uid = argv[1], argv[2], argv[3]
    if uid != "-":  # root: become nobody here (subprocess's user= would fork, not vfork, our big process)
        posix.setgroups([])
        posix.setgid(int(uid))
        posix.setuid(int(uid))
    for item in limits.split(","):
        name, value = item.split("=")
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    with open(work + "/program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    try:  # subprocess's fork_exec raises no audit event: disarmed, and re-imports refused
        import _posixsubprocess
        _posixsubprocess.fork_exec = None
    except ImportError:
        pass
    for name in ("_exit", "mkfifo", "mknod", "pidfd_open"):  # no audit events: _exit(0) would fake a pass
        for mod in (posix, sys.modules.get("os")):
            if mod is not None and hasattr(mod, name):
                delattr(mod, name)
    sys.addaudithook(_hook(work, posix, stat))
    sys.argv = ["program.py"]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise RuntimeError("the program called exit before its tests finished") from None


def _hook(work, posix, stat):
    write, kill, getpid, getcwd, pstat = posix.write, posix.kill, posix.getpid, posix.getcwd, posix.stat
    isdir = stat.S_ISDIR
    str_, bytes_, int_, type_, OSError_, decode = str, bytes, int, type, OSError, bytes.decode
    me = getpid()
    own_proc = frozenset(("self", "thread-self", str(me)))
    wflags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    dflags = posix.O_DIRECTORY | getattr(posix, "O_PATH", 0)
    deny = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "pty.spawn", "os.startfile", "os.killpg", "os.link", "os.symlink", "os.chflags", "os.lchflags",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "cpython.PyInterpreterState_New",
        "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension", "sqlite3.load_extension",
        "webbrowser.open", "_thread.start_new_thread"))
    deny_prefix = ("ctypes.", "socket.", "syslog.")
    deny_import = frozenset(("_ctypes", "ctypes", "_posixsubprocess", "posix", "_xxsubinterpreters",
                             "_testcapi", "_testinternalcapi"))
    # event -> (argument positions that are paths, positions that are dir_fds)
    # a tuple, not a dict: a traceback out of the hook could reach its closure, and must find nothing to clear
    paths = (("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.mkdir", (0,), (2,)),
             ("os.rename", (0, 1), (2, 3)), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)),
             ("os.utime", (0,), (3,)), ("os.truncate", (0,), ()), ("os.setxattr", (0,), ()),
             ("os.removexattr", (0,), ()), ("shutil.chown", (0,), ()))
    path_events = frozenset(e for e, _, _ in paths)
    BaseException_ = BaseException

    def refuse(what):  # kill rather than raise: the program cannot catch it and go on
        try:
            write(2, b"\nsandbox: refused " + what.encode("utf-8", "replace") + b"\n")
        except OSError_:
            pass  # its stderr is gone: it dies all the same
        while True:
            kill(me, 9)

    def norm(p):  # an absolute path without . or .. (no symlinks can appear in work: os.symlink is refused)
        t = type_(p)
        if t is bytes_:
            p = decode(p, "utf-8", "surrogateescape")
        elif t is not str_:
            return None
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        parts = []
        for c in p.split("/"):
            if c == "..":
                if parts:
                    parts.pop()
            elif c and c != ".":
                parts.append(c)
        return "/" + "/".join(parts)

    def inside(n):
        return n is not None and (n == work or n.startswith(work + "/"))

    def hook(event, args):
        try:
            check(event, args)
        except BaseException_:  # the check itself failed (no cwd, recursion limit): refuse, never let it through
            refuse("an event the sandbox could not check")

    def check(event, args):
        if type_(event) is not str_:
            return  # not an event of CPython's: the program's own sys.audit call
        if event in deny or event.startswith(deny_prefix):
            refuse(event)
        elif event == "open":
            path, mode, flags = args
            if type_(path) is int_:
                return  # an fd we already hold: its access mode was checked when it was opened
            n = norm(path)
            if n is None:
                refuse("open of a non-str path")
            if "/proc/" in n and "/proc/" in n[n.index("/proc/") + 5:]:  # /proc/self/root/proc/<pid>/...
                refuse("open " + n)
            if n.startswith("/proc/") and n.split("/")[2] not in own_proc:
                refuse("open " + n)
            writing = type_(flags) is int_ and flags & wflags
            if type_(mode) is str_:
                for c in "wax+":
                    if c in mode:
                        writing = True
            if writing and not inside(n) and n != "/dev/null":
                refuse("write " + n)
            if mode is None:  # os.open: no directory fds (its dir_fd argument is not in the event)
                if type_(flags) is not int_ or flags & dflags:
                    refuse("os.open of a directory " + n)
                try:
                    if isdir(pstat(n).st_mode):
                        refuse("os.open of a directory " + n)
                except OSError_:
                    pass
        elif event in path_events:
            where, fds = next((w, f) for e, w, f in paths if e == event)
            for i in fds:
                if args[i] is not None and (type_(args[i]) is not int_ or args[i] != -1):
                    refuse(event + " with dir_fd")
            for i in where:
                if event == "os.truncate" and type_(args[i]) is int_:
                    continue  # ftruncate needs an fd open for writing, checked at its open
                if not inside(norm(args[i])):
                    refuse(event + " " + str_(norm(args[i])))
        elif event == "os.kill":
            if type_(args[0]) is not int_ or args[0] != me:
                refuse("os.kill of another process")
        elif event == "import":
            if type_(args[0]) is not str_:
                refuse("import of a non-str name")
            if args[0] in deny_import:
                refuse("import " + args[0])
        elif event == "sqlite3.connect":
            db = norm(args[0])
            if not (db is not None and (args[0] in (":memory:", "", b":memory:", b"") or inside(db))):
                refuse("sqlite3.connect outside the work dir")

    return hook


_boot(sys.argv)
"""


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
    cmd = [s.python, "-I", "-S", "-B", "-c", _BOOT, work, _limits(timeout), "-" if s.uid is None else str(s.uid)]
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
