"""Staged output, without torch: a directory is written under a temporary name beside its destination and renamed
onto it when complete (an interrupted write leaves the destination as it was); a file is written the same way.
Used by the merge driver and, torch-free, by the harness's caches and reports."""

from __future__ import annotations

import fcntl
import glob
import os
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ObimError

OUTPUT_MARKER = "obim_merge.yaml"  # every merge output holds it: the proof that obim wrote a directory


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, `kill`), raised where the process was so that cleanup runs as on Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated in the main thread (unless someone else handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_output_dir(out: Path, overwrite: bool, marker: str = OUTPUT_MARKER) -> None:
    """OUT must be absent or empty; with `overwrite`, it may also be a directory obim wrote (it holds `marker`)."""
    if out.exists() and not out.is_dir():
        raise ObimError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ObimError(f"{out}: output directory is not empty (pass --overwrite to replace an output of obim)")
        if not (out / marker).is_file():
            raise ObimError(f"{out}: --overwrite replaces only a directory obim wrote (it has no {marker}); "
                            "remove it yourself or choose another output directory")


def check_disjoint(out: Path, inputs: dict[str, Path]) -> None:
    """OUT may not be, hold, or lie inside any input: replacing it would destroy that input."""
    o = Path(os.path.realpath(out))
    for what, p in inputs.items():
        r = Path(os.path.realpath(p))
        if o == r:
            raise ObimError(f"{out}: the output directory is {what} ({p})")
        if o in r.parents:
            raise ObimError(f"{out}: the output directory contains {what} ({p})")
        if r in o.parents:
            raise ObimError(f"{out}: the output directory lies inside {what} ({p})")


def _staging_names(out: Path, sid: str) -> tuple[Path, Path, Path]:
    """(staging dir, trash dir for the replaced OUT, lock file) of one writer of OUT."""
    return tuple(out.parent / f".{out.name}.obim-{kind}-{sid}" for kind in ("tmp", "old", "lock"))


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove what writers of OUT that died (kill -9, a node lost) left beside it. A live writer holds an flock
    on its lock file, so a lock that can be taken marks a dead one; dirs without a lock file (the writer died
    before making it) go when the pid in their name is not running here."""
    removed = []
    for p in sorted(out.parent.glob(glob.escape(f".{out.name}.obim-") + "*-*")):
        kind, _, sid = p.name[len(out.name) + 2:].partition("-")[2].partition("-")
        if kind != "lock" and not (kind in ("tmp", "old") and p.is_dir()):
            continue
        tmp, old, lock = _staging_names(out, sid)
        if kind == "lock":
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its writer is alive
            else:
                for d in (tmp, old):
                    if d.exists():
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(d)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif not lock.exists():
            pid = sid.split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_output(out: Path, overwrite: bool, marker: str = OUTPUT_MARKER) -> Iterator[Path]:
    """Yield a temporary directory beside OUT; rename it to OUT only when the block completes. SIGTERM cleans up
    as Ctrl-C does, and what killed writers left is removed first."""
    out = Path(out).absolute()
    check_output_dir(out, overwrite, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    tmp, trash, lock = _staging_names(out, f"{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with sigterm_as_interrupt():
            tmp.mkdir()
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _swap_in(tmp, out, trash)
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _swap_in(tmp: Path, out: Path, trash: Path) -> None:
    """Rename the finished output onto OUT with SIGINT/SIGTERM held off, so no signal lands between the two renames
    (which would leave OUT missing); if the second rename fails, the previous OUT goes back."""
    mask = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        if out.exists():
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash, out)
                raise
        else:
            os.replace(tmp, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_file(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.obim-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with sigterm_as_interrupt():
            write(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
