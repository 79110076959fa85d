"""What a sweep prints: a progress bar over its jobs, one line per finished job (before the first that executes
generated code, once, the code sandbox's layers), and at the end the sweep's main table, the files written and where the
W&B runs are. `SweepConsole` is the Hydra callback (conf/sweep.yaml) that does it; jobs report to it through event files
(obim.bench.joblog), so it works whether Hydra runs them in this process (the basic launcher), in joblib workers or on
Slurm nodes. The libraries' logs stay in each job's log file unless `verbose=true`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from hydra.experimental.callback import Callback

from obim.merging.errors import ObimError

from .joblog import captured, emit, events_dir, failed_outcome

if TYPE_CHECKING:  # the report is loaded only when a sweep ends
    from .report.results import Table

HYDRA_LOGGERS = ("hydra", "hydra_plugins")  # the launchers' "Launching N jobs" / "#k : overrides" lines


def planned_jobs(config: Any) -> list[list[str]] | None:
    """The sweep's jobs (each a list of overrides) as Hydra's basic sweeper will expand them; None for another
    sweeper or what cannot be expanded here."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return [list(j) for j in BasicSweeper.split_arguments(parsed, None)[0]]
    except Exception:
        return None


def varying_keys(jobs: list[list[str]]) -> list[str]:
    """The override keys whose value differs between jobs: what tells one job's line from another's (a lone job:
    its method and sweep axes)."""
    if len(jobs) == 1:
        from .plan import axis_of

        return [o.partition("=")[0] for o in jobs[0] if o.partition("=")[0] == "method" or axis_of(o)]
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    return [
        k for k, vs in values.items() if len(vs) > 1 or any(k not in {o.partition("=")[0] for o in j} for j in jobs)
    ]


def clock(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def rel(p: str | Path) -> str:
    """A path as short as it can be written from here."""
    p = Path(p)
    for a, b in ((p.absolute(), Path.cwd()), (p.resolve(), Path.cwd().resolve())):
        if a.is_relative_to(b):
            return str(a.relative_to(b))
    return str(p)


def _num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def job_line(o: dict, label: str) -> str:
    """One finished job: its overrides, avg, each benchmark, merge and eval seconds, whether it came from the cache;
    or its one-line error and its log."""
    if o["status"] == "failed":
        return f"{label}: sweep: error: {o['error']} (log: {rel(o['log'])})"
    if o["status"] == "planned":
        return f"{label}: plan {o.get('summary', '')}"
    scores = " ".join(f"{k}={_num(v)}" for k, v in (o.get("scores") or {}).items())
    c = o.get("cached") or {}
    if o["status"] == "skipped":
        timing = f"merge {_num(o.get('merge_s'))} s, eval {_num(o.get('eval_s'))} s; cached result"
    else:
        timing = (
            f"merge {_num(o.get('merge_s'))} s{' (cached)' if c.get('merge') else ''}, "
            f"eval {_num(o.get('eval_s'))} s{' (cached)' if c.get('eval') else ''}"
        )
    se = o.get("avg_stderr")
    return f"{label}: avg {_num(o.get('avg'))}{'' if se is None else f' ± {se:.1f}'} | {scores} | {timing}"


def text_table(t: Table) -> str:
    """A Table (obim.bench.report.results) as aligned plain text: each cell ours ± its standard error (the paper's),
    one decimal, `*` on the best of a column and the rows not distinguishable from it."""
    head = [t.lead, *t.columns]
    body = []
    for label, ours, paper in t.rows:
        cells = [label]
        for i, c in enumerate(t.columns):
            p = paper[i] if paper is not None and i < len(paper) else None
            v, se = ours.get(c), (t.se.get(label) or {}).get(c)
            mark = "*" if v is not None and label in t.top.get(c, ()) else ""
            err = f"±{se:.1f}" if v is not None and se is not None else ""
            cells.append(mark + _num(v) + err + (f" ({p:.1f})" if p is not None else ""))
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    paper = any(p is not None for _, _, p in t.rows)
    errors = any(v is not None for row in t.se.values() for v in row.values())
    draws = " (mean over zoo draws)" if t.multi_draw else ""
    title = f"{t.title}: ours{draws}{' ± se' if errors else ''}{' (paper)' if paper else ''}"
    if t.top:
        title += "; * best or not distinguishable from it (paired bootstrap, 95%)"
    return "\n".join([title, fmt(head), *map(fmt, body)])


def main_table(tables: list[Table], jobs: list[dict]) -> Table | None:
    """The table this sweep's jobs are about: the table of the axis they vary, else the setting's main table."""
    from .plan import axis_of

    by_name = {t.name: t for t in tables}
    keys = {o.partition("=")[0].lstrip("+~") for j in jobs for o in j.get("overrides", [])}
    axes = {axis_of(o) for j in jobs for o in j.get("overrides", [])} - {None}
    want = (
        ["table11"]
        if "n_models" in axes
        else ["table6"]
        if "order" in axes
        else (["table5"] if "validation.size" in keys else ["table4"])
        if "validation" in axes
        else ["grid"]
        if axes & {"retention", "method"}
        else ["table1", "table2", "table3"]
    )
    return next((by_name[n] for n in want if n in by_name), tables[0] if tables else None)


ZOO_EVERY_S = 30.0  # a zoo build's status line, without a terminal: at most this often within one stage


class Live:
    """The console in the sweep's main process: reads the jobs' events, keeps the bar, prints the job lines."""

    def __init__(
        self,
        sweep_dir: Path,
        jobs: list[list[str]] | None,
        verbose: bool,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        # duplicates of the terminal's descriptors: jobs in this process point 1 and 2 at their log files
        self._own_out, self._own_err = out is None, err is None
        self.out = out or os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = err or os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self.tty = self.err.isatty() and not verbose  # a redrawn bar only where nothing else writes
        self.inbox = events_dir(sweep_dir)
        self.total = len(jobs) if jobs else None
        self.keys = varying_keys(jobs) if jobs else None
        self.t0 = time.monotonic()
        self.done: list[dict] = []
        self.now: dict[str, str] = {}  # running job -> what it is doing
        self.warned: set[tuple[str, str]] = set()
        self.noted: set[str] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = ""
        self._zoo_said: dict[str, tuple[str, float]] = {}  # job -> (the zoo stage last said, when)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="obim-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.poll()
        self._clear()

    def label(self, o: dict) -> str:
        if self.keys is None:
            return o.get("name") or "job"
        shown = [x for x in o.get("overrides", []) if x.partition("=")[0] in self.keys]
        return " ".join(shown) or o.get("name") or "job"

    def poll(self) -> None:
        with self._lock:
            try:
                names = sorted(n for n in os.listdir(self.inbox) if n.endswith(".json") and not n.startswith("."))
            except OSError:
                names = []
            for n in names:
                if n in self._seen:
                    continue
                self._seen.add(n)
                try:
                    ev = json.loads((self.inbox / n).read_text())
                except (OSError, ValueError):
                    continue
                self.handle(ev)
            if self.tty:
                self._draw()

    def handle(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind in ("start", "status"):
            self.now[self.label(ev)] = ev.get("text", "starting")
            if ev.get("stage") == "zoo" and not self.tty:  # minutes without a job line: say why, now and then
                self._zoo_line(self.label(ev), str(ev["text"]))
        elif kind == "note":  # set-up every job reports (the code sandbox's layers): once per sweep
            if ev.get("text") not in self.noted:
                self.noted.add(ev.get("text"))
                self.print(str(ev.get("text")))
        elif kind == "warning":
            key = (ev.get("level", ""), ev.get("text", ""))
            if key not in self.warned:
                self.warned.add(key)
                self.print(
                    f"{ev.get('level', 'warning')}: {ev.get('text')} ({ev.get('logger')}; more in "
                    f"{rel(ev.get('log', ''))})",
                    err=True,
                )
        elif kind == "end":
            o = ev["outcome"]
            self.now.pop(self.label(o), None)
            self.done.append(o)
            head = f"[{len(self.done)}/{self.total}]" if self.total else f"[{len(self.done)}]"
            tail = "" if self.tty else self._progress(short=True)
            self.print(f"{head} {job_line(o, self.label(o))}{tail}", err=o["status"] == "failed")

    def _zoo_line(self, label: str, text: str, every_s: float = ZOO_EVERY_S) -> None:
        """Without a redrawn bar (CI logs, nohup, Slurm): a zoo build's status as a line when its stage changes
        (the text before the first comma) and every `every_s` seconds within one."""
        stage, now = text.split(",")[0], time.monotonic()
        last = self._zoo_said.get(label)
        if last is None or last[0] != stage or now - last[1] >= every_s:
            self._zoo_said[label] = (stage, now)
            self.print(f"{label}: {text}")

    def eta(self) -> float | None:
        """Seconds left: the time per job so far (jobs that ran, the zoo build and cached jobs left out) times the
        jobs left. Cached jobs count at once."""
        ran = [o for o in self.done if o["status"] in ("done", "failed")]
        if not self.total or not ran:
            return None
        spent = (
            time.monotonic()
            - self.t0
            - sum(o["seconds"] for o in self.done if o["status"] == "skipped")
            - sum((o.get("stages") or {}).get("zoo", 0) for o in self.done)
        )
        return max(0.0, spent / len(ran) * (self.total - len(self.done)))

    def _progress(self, short: bool = False) -> str:
        eta = self.eta()
        left = "" if eta is None or len(self.done) == self.total else f", ~{clock(eta)} left"
        return (
            f"  ({clock(time.monotonic() - self.t0)}{left})"
            if short
            else f"{clock(time.monotonic() - self.t0)} elapsed{left}"
        )

    def _draw(self) -> None:
        n, total = len(self.done), self.total
        width = shutil.get_terminal_size((100, 20)).columns - 1
        bar = ""
        if total:
            filled = int(20 * n / total)
            bar = "[" + "#" * filled + "." * (20 - filled) + f"] {n}/{total} jobs, "
        doing = "; ".join(f"{k}: {v}" for k, v in self.now.items())
        text = f"{bar}{self._progress()}" + (f" | {doing}" if doing else "")
        text = text[:width]
        if text != self._bar:
            self.err.write("\r" + text + "\x1b[K")
            self.err.flush()
            self._bar = text

    def _clear(self) -> None:
        if self.tty and self._bar:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._bar = ""

    def close(self) -> None:
        for f, own in ((self.out, self._own_out), (self.err, self._own_err)):
            f.close() if own else f.flush()  # our duplicates of the terminal's descriptors

    def print(self, line: str, err: bool = False) -> None:
        self._clear()
        (self.err if err else self.out).write(line + "\n")
        (self.err if err else self.out).flush()


def _outcome(job_return: Any) -> dict:
    from hydra.core.utils import JobStatus

    if job_return.status == JobStatus.COMPLETED and isinstance(job_return._return_value, dict):
        return job_return._return_value
    from .slurm import job_error

    exc = job_return._return_value
    name, overrides = str(job_return.task_name or ""), list(job_return.overrides or [])
    return failed_outcome(name, overrides, job_error(exc) or f"{type(exc).__name__}: {exc}".splitlines()[0])


class SweepConsole(Callback):
    """Hydra callback (hydra.callbacks.console in conf/sweep.yaml): the sweep's console, then its tables."""

    def __init__(self) -> None:
        self.live: Live | None = None
        self.failed = False

    def __getstate__(self) -> dict:  # launchers pickle callbacks into their workers: the console stays here
        return {"live": None, "failed": False}

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from .slurm import preflight

        try:  # hydra/launcher=slurm: every problem named before anything is submitted
            preflight(config)
        except ObimError as e:  # Hydra turns a callback's exception into a warning and launches anyway
            print(f"sweep: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        verbose = bool(config.get("verbose"))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        inbox = events_dir(sweep_dir)
        shutil.rmtree(inbox, ignore_errors=True)  # a crashed sweep's leftovers (the console's own files)
        inbox.mkdir(parents=True, exist_ok=True)
        self._levels = {n: logging.getLogger(n).level for n in HYDRA_LOGGERS}
        if not verbose:
            for n in HYDRA_LOGGERS:
                logging.getLogger(n).setLevel(logging.WARNING)
        jobs = planned_jobs(config)
        self.live = Live(sweep_dir, jobs, verbose)
        n = f"{len(jobs)} job{'s' * (len(jobs) != 1)}" if jobs else "jobs"
        logs = "" if verbose else "; library logs in each job's log file (verbose=true shows them here)"
        self.live.print(f"sweep {config.experiment.name}: {n} -> {rel(sweep_dir)}{logs}")
        self.live.start()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            inbox = events_dir(str(config.hydra.sweep.dir))
            emit(
                inbox if inbox.is_dir() else None,
                "start",
                name=config.hydra.job.override_dirname or config.hydra.job.name,
                overrides=list(config.hydra.overrides.task),
            )

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        o = _outcome(job_return)
        inbox = events_dir(str(config.hydra.sweep.dir))
        if HydraConfig.get().mode == RunMode.MULTIRUN and inbox.is_dir():
            emit(inbox, "end", outcome=o)
            return
        self.failed = o["status"] == "failed"  # a single run: no bar, the line straight out
        print(job_line(o, o.get("name") or "job"), file=sys.stderr if self.failed else sys.stdout, flush=True)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        if self.failed:
            raise SystemExit(1)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        live = self.live
        if live is None:
            return
        live.stop()
        for n, level in getattr(self, "_levels", {}).items():
            logging.getLogger(n).setLevel(level)
        failed = any(o["status"] == "failed" for o in live.done)
        try:
            try:
                if not config.get("dry_run"):
                    self._tables(config, live)
                else:
                    for line in dry_run_total(live.done):
                        live.print(line)
            except Exception as e:  # Hydra would turn it into a warning and exit 0
                what = "the dry run's total" if config.get("dry_run") else "the tables"
                live.print(f"sweep: error: {what}: {type(e).__name__}: {e}", err=True)
                failed = True
            try:  # the jobs' counts and W&B runs, whatever became of the tables
                self._summary(config, live)
            except Exception as e:
                live.print(f"sweep: error: the summary: {type(e).__name__}: {e}", err=True)
                failed = True
        finally:
            shutil.rmtree(live.inbox, ignore_errors=True)
            live.close()
        if failed:
            raise SystemExit(1)

    def _tables(self, config: Any, live: Live) -> None:
        from .report.write import log_report, write_report
        from .tracking import tables_run

        sweep_dir = Path(str(config.hydra.sweep.dir))
        out = Path(str(config.results_dir)) / str(config.experiment.name)
        report = write_report(sweep_dir, out)  # the files, once, whatever W&B does next
        if report is None:
            return
        tracking = _plain(config.get("tracking") or {})
        if any(o["status"] == "done" for o in live.done) and tracking.get("backend") == "wandb":
            summary = sweep_dir / "_summary"  # the W&B run of the tables and plots, and its log
            try:
                with captured(summary / "summary.log", None), tables_run(tracking, summary, "tables"):
                    log_report(report)  # what was written, as written
            except Exception as e:
                live.print(
                    f"warning: the tables' W&B run failed ({type(e).__name__}: {e}; {rel(summary / 'summary.log')})",
                    err=True,
                )
        t = main_table(report.tables, live.done)
        if t is not None:
            live.print("\n" + text_table(t))
        from .report.reference import against_reference, load_reference

        for line in against_reference(str(config.experiment.name), report.tables, report.results, load_reference()):
            live.print(line)
        live.print("\ntables and figures:")
        for p in report.files:
            live.print(f"  {rel(p)}")

    def _summary(self, config: Any, live: Live) -> None:
        done = live.done
        runs = sorted({str(Path(o["wandb_dir"])) for o in done if o.get("wandb_dir") and o["status"] == "done"})
        sweep_dir = rel(Path(str(config.hydra.sweep.dir)))
        if runs:
            offline = [r for r in runs if Path(r).name.startswith("offline-")]
            project = (config.get("tracking") or {}).get("project") or "obim"
            if offline:
                live.print(
                    f"W&B: {len(offline)} offline run{'s' * (len(offline) != 1)} of this sweep under "
                    f"{sweep_dir}/<job>/wandb/; upload them (and the tables run) with:\n  "
                    f"{_wandb_cli()} sync {sweep_dir}/*/wandb/offline-run-*"
                )
            if len(offline) < len(runs):
                live.print(f"W&B: {len(runs) - len(offline)} runs synced online to project {project}")
        count = {s: sum(o["status"] == s for o in done) for s in ("done", "skipped", "planned", "failed")}
        words = {"done": "run", "skipped": "cached", "planned": "planned", "failed": "failed"}
        parts = [f"{n} {words[s]}" for s, n in count.items() if n] or ["none finished"]
        # (a Slurm job that died without a result points at submitit's log instead, outside its job folder)
        log = next((Path(o["log"]).name for o in done if o.get("log") and not o.get("slurm_job")), "sweep.log")
        line = (
            f"sweep: {len(done)} job{'s' * (len(done) != 1)} in {clock(time.monotonic() - live.t0)} "
            f"({', '.join(parts)}); job logs: {sweep_dir}/<job>/{log}"
        )
        live.print(line, err=bool(count["failed"]))


def dry_run_total(done: list[dict]) -> list[str]:
    """What a real run of the planned jobs will cost (obim.bench.estimate.sweep_total over each job's plan.json
    "cost"; what jobs share counted once), as lines: merges, saliency, evaluations, then a table per benchmark."""
    from .estimate import count, sweep_total

    costs = []
    for o in done:
        if o["status"] == "planned" and o.get("job_dir"):
            with open(Path(o["job_dir"]) / "plan.json") as f:
                cost = json.load(f).get("cost")
            if cost is not None:
                costs.append(cost)
    if not costs:
        return []
    t = sweep_total(costs)
    read = all(c["read"] for c in costs)

    n = t["jobs"]
    failed = sum(o["status"] == "failed" for o in done)  # inputs missing: not estimated
    lines = [
        f"\ncost of a real run of {'these' if n != 1 else 'this'} {n} job{'s' * (n != 1)} "
        "(the work planned; what the caches hold not subtracted"
        + (f"; {failed} failed job{'s' * (failed != 1)} not counted):" if failed else "):"),
        f"  merges: {t['merges']}",
    ]
    if t["saliency_runs"]:
        tokens = f", {count(t['saliency_tokens'])} tokens" if read else ""
        why = f"; tokens unknown here: {t['saliency_why']}" if read and t["saliency_why"] else ""
        lines.append(
            f"  saliency: {t['saliency_runs']} models' statistics (each once), {count(t['saliency_samples'])} samples "
            f"in {count(t['saliency_batches'])} forward batches{tokens}{why}"
        )
    ind = t["individual_evaluations"]
    merged = t["evaluations"] - ind
    lines.append(
        f"  evaluations: {t['evaluations']} ({merged} merged model{'s' * (merged != 1)}"
        + (f", {ind} individual model{'s' * (ind != 1)} once each)" if ind else ")")
    )
    if not read:
        lines.append("  prompts and tokens: counted by dry_run=true (dry_run=plan reads nothing)")
        return lines
    head = ["benchmark", "task", "type", "evaluations", "docs", "prompts", "max generated tokens"]
    rows = [
        [b["column"], task, str(b["type"] or "?"), str(b["evaluations"])]
        + [count(b[k]) for k in ("docs", "prompts", "max_gen_tokens")]
        for task, b in t["benchmarks"].items()
    ]
    rows.append(["total", "", "", str(t["evaluations"]), "", count(t["prompts"]), count(t["max_gen_tokens"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:  # text left, numbers right
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines += [f"  {task}: unknown here, {b['why']}" for task, b in t["benchmarks"].items() if b["why"]]
    return lines


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _wandb_cli() -> str:
    """`wandb` when the one on PATH is this environment's, else this environment's own."""
    mine = Path(sys.executable).parent / "wandb"
    found = shutil.which("wandb")
    return "wandb" if (found and Path(found).resolve() == mine.resolve()) or not mine.exists() else rel(mine)
