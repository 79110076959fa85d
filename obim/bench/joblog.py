"""A sweep job's output. Quiet (the default): everything the job's process writes, the libraries' logs and progress
bars (lm-eval, transformers, datasets, W&B) and its children's output (vLLM's process, git, code sandboxes), goes to
the job's log file in its job directory; warnings that point at a real problem are relayed to the console. With
`verbose=true` nothing is redirected. The job reports to the sweep's console (obim.bench.console.SweepConsole, in this
process or another: joblib workers, Slurm nodes) through small event files in the sweep directory."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

EVENTS = ".obim-console"  # under hydra.sweep.dir: the console's inbox for this sweep
# Warnings that say nothing about this sweep's results: lm-eval's hints repeated for every task of every model (a
# benchmark's num_fewshot is obim's own setting), datasets' notices that it reads its cache when offline (what
# HF_DATASETS_OFFLINE=1 asks for), and libraries' notices of their own API changes.
NOISE = (
    re.compile(r"Custom kwargs can be passed to `--metadata`"),
    re.compile(r"Overwriting default num_fewshot of \S+ from \S+ to \d+"),
    re.compile(r"Using the latest cached version of the dataset since .* \(offline mode is enabled\)"),
    re.compile(r"Found the latest cached dataset configuration "),
    re.compile(r"\b(Deprecation|PendingDeprecation|Future)Warning\b"),
    # submitit in a Slurm job being cancelled or requeued (SIGTERM/SIGCONT): the sweep names the job's fate itself
    re.compile(r"^Bypassing signal SIG(TERM|CONT)$"),
)
# Libraries that print through handlers of their own (transformers does not propagate to the root logger): their
# records are routed through the root logger during a quiet job, to the log file and the relay. (W&B logs to its
# own debug.log in the run directory.)
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub")

_seq = itertools.count()


def events_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / EVENTS


def emit(channel: Path | None, kind: str, **data: Any) -> None:
    """One event, written whole (a hidden temporary file renamed): the console only ever reads complete events.
    Best effort: a job never fails because its console went away."""
    if channel is None:
        return
    name = f"{time.time_ns():020d}-{os.getpid()}-{next(_seq):06d}-{kind}.json"
    try:
        tmp = channel / f".{name}"
        tmp.write_text(json.dumps({"kind": kind, "time": time.time(), **data}, default=str))
        os.replace(tmp, channel / name)
    except OSError:
        pass


def failed_outcome(name: str, overrides: list[str], error: str, log: str = "", **fields: Any) -> dict[str, Any]:
    """A failed job's record for the console, made outside the job's own session (it raised before reporting, or
    Slurm ended it): the fields JobSession.outcome gives, with no time measured."""
    record = {"status": "failed", "name": name, "overrides": overrides, "log": log, "seconds": 0, "error": error}
    return {**record, **fields}


def is_noise(text: str) -> bool:
    return any(p.search(text) for p in NOISE)


class Relay(logging.Handler):
    """Passes warnings and errors on to `send` (the console), each message once; library noise stays in the log."""

    def __init__(self, send: Callable[[dict], None]) -> None:
        super().__init__(logging.WARNING)
        self.send = send
        self.seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip()
            first = text.splitlines()[0] if text else ""
            key = (record.levelname, first)
            if not first or is_noise(text) or key in self.seen:
                return
            self.seen.add(key)
            self.send({"level": record.levelname.lower(), "logger": record.name, "text": first})
        except Exception:
            self.handleError(record)


def _is_console(h: logging.Handler) -> bool:
    return type(h) is logging.StreamHandler and getattr(h, "stream", None) in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


@contextmanager
def captured(log_path: Path, relay: logging.Handler | None) -> Iterator[None]:
    """While the block runs: file descriptors 1 and 2 point at `log_path` (so children inherit it too), the root
    logger's console handlers are replaced by `relay` and the library loggers propagate to the root, Python warnings
    are logged. Everything is put back afterwards, whatever happens."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    libs = {
        n: (lg.handlers[:], lg.propagate)
        for n in LIBRARY_LOGGERS
        if isinstance(lg := logging.root.manager.loggerDict.get(n), logging.Logger)
    }
    for s in (sys.stdout, sys.stderr):
        s.flush()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    saved_fds = [os.dup(1), os.dup(2)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if not any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_path.resolve() for h in saved_handlers
    ):
        own = logging.FileHandler(log_path)  # job logging that writes no file there: the log still gets the records
        own.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(own)
    root.handlers = [h for h in root.handlers if not _is_console(h)] + ([relay] if relay else [])
    root.setLevel(min(saved_level or logging.INFO, logging.INFO))
    for n in libs:
        lg = logging.getLogger(n)
        lg.handlers = [h for h in lg.handlers if not _is_console(h)]
        lg.propagate = True
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for s in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                s.flush()
        for h in root.handlers[:]:
            if h not in saved_handlers:
                root.removeHandler(h)
                if h is not relay:
                    h.close()
        root.handlers, root.level = saved_handlers, saved_level
        for n, (handlers, propagate) in libs.items():
            logging.getLogger(n).handlers, logging.getLogger(n).propagate = handlers, propagate
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)


def job_log_path(job_dir: Path) -> Path:
    """The job's log: Hydra's job log file (<job dir>/<job name>.log) when job logging has one."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return job_dir / "sweep.log"


class JobSession:
    """One job's link to the console: the stage it is in (and how long each took), its log, its outcome."""

    def __init__(self, job_dir: Path, name: str, overrides: list[str], channel: Path | None) -> None:
        self.job_dir, self.name, self.overrides, self.channel = job_dir, name, overrides, channel
        self.log = job_log_path(job_dir)
        self._console_fd = 2  # the terminal: fd 2 until a quiet job points it at the log
        self.t0 = time.monotonic()
        self.stages: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def _close_stage(self) -> float:
        now = time.monotonic()
        if self._stage:
            self.stages[self._stage[0]] = round(self.stages.get(self._stage[0], 0) + now - self._stage[1], 3)
        self._stage = None
        return now

    def status(self, text: str, stage: str | None = None) -> None:
        now = self._close_stage()
        self._stage = (stage, now) if stage else None
        logging.getLogger("obim.bench.sweep").info(text)
        emit(self.channel, "status", name=self.name, overrides=self.overrides, text=text, stage=stage)

    def warn(self, rec: dict) -> None:
        rec = {**rec, "log": str(self.log), "name": self.name}
        if self.channel is not None:
            emit(self.channel, "warning", **rec)
        else:  # no console process: straight to the terminal (fd 2 is the log file while the job runs)
            with os.fdopen(os.dup(self._console_fd), "w") as f:
                f.write(f"{rec['level']}: {rec['text']} ({rec['logger']}; {rec['log']})\n")

    def note(self, text: str, warning: bool = False, logger: str = "obim.bench.sweep") -> None:
        """A line about this process's set-up for the console (the sweep's console prints each text once), e.g. the
        code sandbox's layers; a warning is logged as one (a quiet job relays it)."""
        if warning:
            logging.getLogger(logger).warning(text)
            return
        logging.getLogger(logger).info(text)
        if self.channel is not None:
            emit(self.channel, "note", name=self.name, text=text)
        elif self._console_fd != 2:  # a quiet run without a console process: fd 2 is the log file
            with os.fdopen(os.dup(self._console_fd), "w") as f:
                f.write(text + "\n")

    def outcome(self, status: str, **fields: Any) -> dict[str, Any]:
        self._close_stage()
        return {
            "status": status,
            "name": self.name,
            "overrides": self.overrides,
            "log": str(self.log),
            "job_dir": str(self.job_dir),
            "seconds": round(time.monotonic() - self.t0, 3),
            "stages": self.stages,
            **fields,
        }

    def finished(self, result: dict | None) -> dict[str, Any]:
        """The outcome of run_job's return value: a plan (dry run), a skipped job's stored result, or a new one."""
        if result is None or result.get("dry_run"):
            r = result or {}
            return self.outcome("planned", summary=r.get("summary", ""))
        names = result["plan"]["benchmarks"]
        return self.outcome(
            "skipped" if result.get("skipped") else "done",
            experiment=result["plan"]["experiment"],
            avg=result.get("avg"),
            avg_stderr=result.get("avg_stderr"),
            scores={names.get(t, t): result["scores"][t] for t in result["plan"]["tasks"]},
            merge_s=result.get("merge_s"),
            eval_s=result.get("eval_s"),
            cached=result.get("cached") or {},
            wandb_dir=result.get("wandb_dir"),
        )

    def failed(self, exc: BaseException, error: str | None = None) -> dict[str, Any]:
        """The job's one-line error for the console (`error` where the caller knows it better, e.g. a Slurm time
        limit); the traceback (unless it is one of obim's own one-line errors) goes to the log, or to the terminal
        with verbose=true."""
        from obim.merging.errors import ObimError

        if error is not None:
            pass
        elif isinstance(exc, ObimError):
            error = str(exc)
        else:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
        error = (error.strip().splitlines() or [type(exc).__name__])[0]
        print(f"sweep: error: {error}", file=sys.stderr, flush=True)
        return self.outcome("failed", error=error)


@contextmanager
def job_session(
    job_dir: str | Path, name: str, overrides: list[str], sweep_dir: str | Path | None, verbose: bool
) -> Iterator[JobSession]:
    """Run a job's body inside this: quiet unless `verbose`; `sweep_dir` (a multirun) links it to the console."""
    channel = events_dir(sweep_dir) if sweep_dir is not None else None
    if channel is not None and not channel.is_dir():
        channel = None  # no console callback in this sweep
    s = JobSession(Path(job_dir), name, overrides, channel)
    if verbose:
        yield s
        return
    if "transformers" not in sys.modules:  # its logger, set up on import, must exist to be rerouted
        with suppress(ImportError):
            import transformers.utils.logging  # noqa: F401  (imported for its side effect: the logger exists)
    console_fd = os.dup(2)
    s._console_fd = console_fd
    try:
        with captured(s.log, Relay(s.warn)):
            yield s
    finally:
        os.close(console_fd)
