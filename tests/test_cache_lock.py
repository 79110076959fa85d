"""Cache locks where a filesystem refuses flock(2) (Lustre without -o flock, some FUSE mounts): filelock (4.x) falls
back by itself to a marker lock (docs/sweep.md, Cluster); jobs still exclude each other."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import time
import warnings
from pathlib import Path

import pytest

from obim.bench.cache import locked


def _add(path: str, n: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # filelock's "flock not supported ... falling back" notice
        for _ in range(n):
            with locked(path):
                f = Path(path)
                v = int(f.read_text()) if f.exists() else 0
                time.sleep(0.01)  # a window in which an unlocked writer would lose the other's update
                f.write_text(str(v + 1))


def test_jobs_exclude_each_other_where_flock_is_refused(monkeypatch, tmp_path):
    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)  # inherited by the forked processes
    counter = str(tmp_path / "counter")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add, args=(counter, 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert Path(counter).read_text() == "45"
    with pytest.raises(OSError, match="Function not implemented"), open(tmp_path / "probe", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the patch did refuse flock
