"""The sandbox's child: confines itself, then runs the program. Started by obim.bench.sandbox as a script,
`python -I -S -B sandbox_child.py WORK LIMITS UID`, never imported.

WORK is the work dir holding program.py, LIMITS `RLIMIT_X=n,...`, UID the uid/gid to drop to as root, or "-".
Standard library only, on any Python 3.8+ (the system's interpreter may run it): importing obim would load torch,
seconds per program and far more memory than the child's RLIMIT_AS.

Everything the audit hook uses is bound in closures up front: the program may rebind module attributes, builtins
and this module's globals, which must not change the hook's decisions, and the hook never calls an object the
program made (exact str/bytes/int only).
"""

import sys


def main(argv, SystemExit=SystemExit, RuntimeError=RuntimeError, exec=exec):
    """Drop root, set the limits, install the audit hook, run WORK/program.py. The builtins used once the program
    has run are bound as defaults: it may rebind them."""
    import posix
    import resource
    import stat

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
    sys.addaudithook(audit_hook(work, posix, stat))
    sys.argv = ["program.py"]
    try:
        # globals as evaluate's code_eval gives them (an empty dict: __name__ reads "builtins"), so an
        # `if __name__ == "__main__":` block in a completion is skipped there and here alike
        exec(code, {"__name__": "builtins", "__builtins__": __builtins__})
    except SystemExit:
        raise RuntimeError("the program called exit before its tests finished") from None


def audit_hook(work, posix, stat):
    """The hook: kills the process on an event the program may not cause. Its helpers are closures, not globals."""
    write, kill, getpid, getcwd, pstat = posix.write, posix.kill, posix.getpid, posix.getcwd, posix.stat
    isdir = stat.S_ISDIR
    str_, bytes_, int_, type_, OSError_, decode, next_ = str, bytes, int, type, OSError, bytes.decode, next
    BaseException_ = BaseException
    me = getpid()
    own_proc = frozenset(("self", "thread-self", str(me)))
    wflags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    dflags = posix.O_DIRECTORY | getattr(posix, "O_PATH", 0)
    deny = frozenset(  # concatenated groups: RUF005's unpacking reads worse
        # new processes and threads (RLIMIT_NPROC bounds them too; this names the refusal)
        ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")  # noqa: RUF005
        + ("subprocess.Popen", "pty.spawn", "os.startfile", "webbrowser.open", "_thread.start_new_thread")
        # other processes, links that would lead out of the work dir, file flags
        + ("os.killpg", "os.link", "os.symlink", "os.chflags", "os.lchflags")
        # reaching the hook's objects or frames, running code inside it, an interpreter without it
        + ("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile")
        + ("sys._current_frames", "sys._current_exceptions", "cpython.PyInterpreterState_New")
        # lifting the limits, loading native code
        + ("resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension", "sqlite3.load_extension")
    )
    deny_prefix = ("ctypes.", "socket.", "syslog.")
    deny_import = frozenset(
        ("_ctypes", "ctypes", "_posixsubprocess", "posix", "_xxsubinterpreters", "_testcapi", "_testinternalcapi")
    )
    # event -> (argument positions that are paths, positions that are dir_fds)
    # a tuple, not a dict: a traceback out of the hook could reach its closure, and must find nothing to clear
    paths = (
        ("os.remove", (0,), (1,)),
        ("os.rmdir", (0,), (1,)),
        ("os.mkdir", (0,), (2,)),
        ("os.rename", (0, 1), (2, 3)),
        ("os.chmod", (0,), (2,)),
        ("os.chown", (0,), (3,)),
        ("os.utime", (0,), (3,)),
        ("os.truncate", (0,), ()),
        ("os.setxattr", (0,), ()),
        ("os.removexattr", (0,), ()),
        ("shutil.chown", (0,), ()),
    )
    path_events = frozenset(e for e, _, _ in paths)

    def refuse(what):  # kill rather than raise: the program cannot catch it and go on
        try:  # noqa: SIM105 (contextlib is Python code the program may patch)
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
            if "/proc/" in n and "/proc/" in n[n.index("/proc/") + 5 :]:  # /proc/self/root/proc/<pid>/...
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
            where, fds = next_((w, f) for e, w, f in paths if e == event)
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


if __name__ == "__main__":
    main(sys.argv)
