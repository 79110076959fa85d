"""Staged output, without torch: a directory is written under a temporary name beside its destination and renamed
onto it when complete (an interrupted write leaves the destination as it was); a file is written the same way.
Used by the merge driver and, torch-free, by the harness's caches and reports."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import ObimError

OUTPUT_MARKER = "obim_merge.yaml"  # every merge output holds it: the proof that obim wrote a directory


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, `kill`), raised where the process was so that cleanup runs as on Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated in the main thread (unless someone else handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# flock's errors on a filesystem mounted without it (Lustre without flock or localflock, some FUSE mounts)
NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_log = logging.getLogger("obim")


def resolve_output(out: str | Path) -> Path:
    """OUT as written to: absolute, and through a symlink to its target (the link stays, pointing at the new
    output; staging beside the target keeps the final rename on one filesystem)."""
    out = Path(out).absolute()
    if len(out.name.encode()) > 255:
        raise ObimError(f"{out}: file name longer than 255 bytes")
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    return out


def check_output_dir(out: Path, overwrite: bool, marker: str = OUTPUT_MARKER) -> None:
    """OUT must be absent or empty; with `overwrite`, it may also be a directory obim wrote (it holds `marker`)."""
    out = resolve_output(out)
    if out.exists() and not out.is_dir():
        raise ObimError(f"{out}: exists and is not a directory")
    try:
        full = out.is_dir() and any(out.iterdir())
    except OSError as e:
        raise ObimError(f"{out}: cannot read the output directory ({e.strerror})") from None
    if full:
        if not overwrite:
            raise ObimError(f"{out}: output directory is not empty (pass --overwrite to replace an output of obim)")
        if not (out / marker).is_file():
            raise ObimError(
                f"{out}: --overwrite replaces only a directory obim wrote (it has no {marker}); "
                "remove it yourself or choose another output directory"
            )


def _id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of a path and each of its existing ancestors: the same directory reached another way (a
    bind mount, a second mount of one filesystem) has the same identity."""
    return {i for i in map(_id, (path, *path.parents)) if i is not None}


def check_disjoint(out: Path, inputs: dict[str, Path]) -> None:
    """OUT may not be, hold, or lie inside any input (a file or a directory), by real path and by inode:
    replacing OUT would destroy that input. Give every file actually read: a shard symlinked into OUT counts
    where its bytes are."""
    o = Path(os.path.realpath(out))
    o_id, o_above = _id(o), _ids(o.parent)
    for what, p in inputs.items():
        r = Path(os.path.realpath(p))
        r_id = _id(r)
        shown = p if str(p) == str(r) else f"{p} -> {r}"
        if o == r or (o_id is not None and o_id == r_id):
            raise ObimError(f"{out}: the output is {what} ({shown})")
        if o in r.parents or (o_id is not None and o_id in _ids(r)):
            raise ObimError(f"{out}: the output directory contains {what} ({shown})")
        if r in o.parents or (r_id is not None and r_id in o_above):
            raise ObimError(f"{out}: the output lies inside {what} ({shown})")


# -------------------------------------------------------------------------------- staging and its debris

_STAGING_RE = re.compile(
    r"^\.(?P<prefix>.+)\.obim-(?P<kind>tmp|old|lock|newlock)-"
    r"(?P<sid>(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)-[0-9a-f]{8})$"
)


def host_tag() -> str:
    """This host's name as it appears in staging names: a writer's staging is judged by (host, pid)."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "_"


def _prefix(name: str) -> str:
    """OUT's name as staging names carry it: long names are shortened with a hash, so that a staging name stays
    under the 255-byte limit of a file name."""
    if len(name.encode()) <= 100:
        return name
    short = name.encode()[:60].decode(errors="ignore")
    return f"{short}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _staging_names(out: Path, sid: str) -> tuple[Path, Path, Path, Path]:
    """(staging dir, trash dir for the replaced OUT, lock file, lock file before it is held) of one writer."""

    def name(kind: str) -> Path:
        return out.parent / f".{_prefix(out.name)}.obim-{kind}-{sid}"

    return name("tmp"), name("old"), name("lock"), name("newlock")


def _new_sid() -> str:
    return f"{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def _probe_lock(lock: Path) -> Iterator[str]:
    """The state of a writer's lock: 'held' (its writer runs), 'free' (it died; held by us for the block),
    'absent', or 'unsupported' (no flock on this filesystem)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield "absent"
        return
    except OSError:
        yield "held"  # unreadable: assume its writer lives
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "held"
            return
        except OSError as e:
            if e.errno in NO_FLOCK:
                yield "unsupported"
                return
            yield "held"
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except OSError:
            same = False
        yield "free" if same else "absent"
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with suppress(OSError):
            p.unlink()


STALE_S = 600  # another host's staging unchanged this long (lock and files): its writer is gone, whatever flock says
LOCKLESS_GRACE_S = 60  # a lockless temporary file younger than this may be a live writer's in another pid namespace


def _age(p: Path) -> float:
    try:
        return time.time() - os.lstat(p).st_mtime
    except OSError:
        return 0.0


def _idle(lock: Path, items: list) -> float:
    """Seconds since a writer last changed its lock or anything in its staging (a merge writes its shards
    continuously). Read from the files rather than kept fresh by a heartbeat: a heartbeat thread or process
    beside a training run in the block changed the bytes the run produced (the toy zoo's, measured)."""
    newest = _age(lock)
    for _, p, _ in items:
        newest = min(newest, _age(p))
        if p.is_dir() and not p.is_symlink():
            for root, dirs, files in os.walk(p):
                newest = min([newest, *(_age(Path(root) / f) for f in (*dirs, *files))])
    return newest


def _dead(state: str, lock: Path, m: re.Match, items: list, here: str) -> bool:
    """Whether the writer of one staging group is gone. flock is trusted on this host; across hosts it may be
    local-only (NFS nolock or local_lock, Lustre localflock), so another host's staging must also have stopped
    changing. Without a lock (or without flock), this host's dead pid decides, once its files have stopped changing."""
    mine = (m["host"] or here) == here
    if state == "held":
        return False
    if state == "free":
        return mine or _idle(lock, items) > STALE_S
    if state == "unsupported" and _idle(lock, items) > STALE_S:
        return True
    if not mine or _pid_alive(int(m["pid"])):
        return False
    return state == "unsupported" or all(_age(p) > LOCKLESS_GRACE_S for _, p, _ in items)


def clean_stale_staging(folder: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove what dead writers left in `folder` (staging and trash directories, temporary files, locks), for any
    output there, not only the one about to be written (see _dead for who counts as dead). A writer killed between
    its two final renames left OUT missing and the previous output in its trash: that goes back to OUT. Entries
    that are or hold a path in `keep` (this command's inputs) are left alone."""
    folder = Path(folder)
    groups: dict[tuple[str, str], list[tuple[str, Path, re.Match]]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    kept = [Path(os.path.realpath(k)) for k in keep]
    for name in names:
        m = _STAGING_RE.match(name)
        p = folder / name
        if m:
            groups.setdefault((m["prefix"], m["sid"]), []).append((m["kind"], p, m))
    removed = []
    here = host_tag()
    for (prefix, sid), items in sorted(groups.items()):
        if any(k == p or p in k.parents for _, p, _ in items for k in kept):
            continue
        lock = folder / f".{prefix}.obim-lock-{sid}"
        with _probe_lock(lock) as state:
            if not _dead(state, lock, items[0][2], items, here):
                continue
            _restore_trash(folder, prefix, lock, items)
            for _, p, _ in sorted(items, key=lambda x: x[0] == "lock"):  # the lock last
                if os.path.lexists(p):
                    _remove(p)
                    removed.append(p)
    return removed


def _restore_trash(folder: Path, prefix: str, lock: Path, items: list) -> None:
    """A dead writer's trash is the previous OUT when OUT is missing (killed between the two renames): put it back.
    The lock file holds OUT's name (the prefix may be shortened)."""
    old = [p for kind, p, _ in items if kind == "old"]
    if not old:
        return
    try:
        name = lock.read_text().strip() or prefix
    except OSError:
        name = prefix
    out = folder / name
    if "/" not in name and not os.path.lexists(out):
        try:
            os.rename(old[0], out)
            _log.warning(
                "%s: restored the previous output from %s (its writer died while swapping it)", out, old[0].name
            )
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _take_lock(newlock: Path, lock: Path, out_name: str) -> int:
    """Create this writer's lock already held: made under a temporary name, flocked, then renamed, so no other
    writer ever sees it unheld (and takes it for a dead writer's). Without flock on this filesystem, the lock
    only names the writer (see _dead)."""
    fd = os.open(newlock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, out_name.encode())  # for a cleaner that must put a dead writer's trash back
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            _warn_no_flock(newlock.parent, e)
        os.rename(newlock, lock)
    except BaseException:
        os.close(fd)
        newlock.unlink(missing_ok=True)
        raise
    return fd


_warned: set[str] = set()


def _warn_no_flock(folder: Path, e: OSError) -> None:
    if str(folder) not in _warned:
        _warned.add(str(folder))
        _log.warning(
            "%s: the filesystem has no flock (%s); a dead writer's staging is known only by 10 minutes "
            "without change, or on this host by its pid",
            folder,
            e.strerror,
        )


@contextmanager
def staged_output(
    out: Path, overwrite: bool, marker: str = OUTPUT_MARKER, keep: tuple[Path, ...] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside OUT; rename it to OUT only when the block completes. SIGTERM cleans up
    as Ctrl-C does, and what dead writers left in OUT's folder is removed first (never a path in `keep`, the
    inputs). OUT is claimed at the rename: if another writer completed OUT meanwhile, this output is discarded
    with an error (unless `overwrite`)."""
    out = resolve_output(out)
    check_output_dir(out, overwrite, marker)
    tmp, trash, lock, newlock = _staging_names(out, _new_sid())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(out.parent, keep)
        fd = _take_lock(newlock, lock, out.name)
    except OSError as e:
        raise ObimError(f"{out}: cannot write beside the output ({e.strerror}: {e.filename or out.parent})") from None
    try:
        with sigterm_as_interrupt():
            try:
                tmp.mkdir()
                yield tmp
                _swap_in(tmp, out, trash, overwrite, marker)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ObimError(
                    f"{out}: stopped by an I/O error ({e.strerror}: {e.filename or tmp}); nothing was written"
                ) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


class _Deferred:
    """SIGINT/SIGTERM held while the block runs and delivered after it. Python runs signal handlers in the main
    thread whichever thread the kernel picked (torch's workers included), so swapping the handlers there covers
    every thread, which pthread_sigmask alone does not. Off the main thread no handler can interrupt us."""

    def __enter__(self):
        self.got: list[int] = []
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, lambda signum, frame: self.got.append(signum))
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if self.got and exc[0] is None:
            signal.raise_signal(self.got[0])  # now, through the handler that was in place
        return False


def _swap_in(tmp: Path, out: Path, trash: Path, overwrite: bool, marker: str) -> None:
    """Rename the finished output onto OUT with SIGINT/SIGTERM deferred, so no signal lands between the two renames
    (which would leave OUT missing); if the second rename fails, the previous OUT goes back. A directory is
    renamed onto an existing one only when that one is empty, so OUT filled by another writer since the start
    makes the rename fail, and OUT is checked again: replaced only with `overwrite` and when obim wrote it."""
    try:
        _swap_loop(tmp, out, trash, overwrite, marker)
    except KeyboardInterrupt as e:  # only a deferred signal, delivered once OUT was in place
        # KeyboardInterrupt declares no such attribute; cli reads it back with getattr
        setattr(e, "completed", out)  # noqa: B010
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _swap_loop(tmp: Path, out: Path, trash: Path, overwrite: bool, marker: str) -> None:
    with _Deferred():
        for _ in range(8):
            try:
                check_output_dir(out, overwrite, marker)
            except ObimError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ObimError(
                    f"{e} (another writer completed it while this one ran; this output was discarded)"
                ) from None
            moved = False
            # without overwrite OUT is never moved aside: filled since the check, it makes the rename below fail
            if overwrite and out.is_dir() and any(out.iterdir()):
                try:
                    os.rename(out, trash)
                    moved = True
                except FileNotFoundError:
                    continue
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    if moved:
                        os.rename(trash, out)
                    raise
                if moved:  # another overwriting writer got in between: its output is replaced too
                    shutil.rmtree(trash, ignore_errors=True)
                continue
            break
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ObimError(f"{out}: other writers kept replacing the output; this output was discarded")


def atomic_write_file(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result onto path (dead writers' temporary files in its folder go
    first)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ObimError(f"{path}: cannot create its folder ({e.strerror})") from None
    clean_stale_staging(path.parent)
    tmp = path.parent / f".{_prefix(path.name)}.obim-tmp-{_new_sid()}"
    try:
        with sigterm_as_interrupt():
            try:
                write(tmp)
                os.replace(tmp, path)
            except OSError as e:
                raise ObimError(
                    f"{path}: writing failed ({e.strerror}: {e.filename or tmp}); nothing was written"
                ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
