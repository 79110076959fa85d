"""The sweep's console (obim/bench/console.py, obim/bench/joblog.py): quiet by default (the libraries' logs in each
job's log file), a line per job, the main table and the files at the end; verbose=true brings the logs back;
warnings of real problems reach the console once."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

from conftest import run_sweep, sweep_env

QUICK = ["experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true"]
JOB_LINE = re.compile(
    r"^\[(\d+)/(\d+)\] method=(\w+): avg (\S+) ± \d+\.\d \| alpaca_eval=\S+ mmlu=\S+ gsm8k=\S+ math=\S+ "
    r"humaneval=\S+ mbpp=\S+ \| merge \d+\.\d s.*, eval \d+\.\d s"
)


def _env(quick_zoo: Path, cache: Path) -> dict:
    return sweep_env(quick_zoo, cache)


def test_quiet_sweep_shows_job_lines_and_the_table_and_keeps_library_logs_in_job_dirs(quick_zoo, tmp_path):
    env = _env(quick_zoo, tmp_path / "cache")
    args = ["method=ta,obim", *QUICK, f"hydra.sweep.dir={tmp_path / 'runs'}", "results_dir=results"]
    p = run_sweep(args, env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + p.stderr
    # none of the libraries' logs or progress bars, nor Hydra's launch lines
    for noise in ("[lm_eval", "INFO", "Custom kwargs", "Loading weights", "generate_until", "[HYDRA]", "it/s]"):
        assert noise not in console, noise
    assert len(console.splitlines()) < 40, console

    # one line per job: its overrides, avg and every benchmark, merge and eval seconds
    jobs = {m.group(3): m for m in map(JOB_LINE.match, p.stdout.splitlines()) if m}
    assert set(jobs) == {"ta", "obim"} and {m.group(1) for m in jobs.values()} == {"1", "2"}
    for method, m in jobs.items():
        (job,) = (tmp_path / "runs").glob(f"*method={method}")
        r = json.loads((job / "result.json").read_text())
        assert m.group(4) == f"{r['avg']:.1f}"
        assert f"mmlu={r['scores']['toy_mmlu']:.1f}" in m.group(0)
        # the libraries' logs are in the job's log file instead
        log = (job / "sweep.log").read_text()
        assert "[lm_eval.evaluator][INFO]" in log and "Building contexts for toy_mmlu" in log
        assert "Running generate_until requests" in log  # lm-eval's progress bars (raw stderr) too

    # the end: Table 1 as text with the paper's numbers, every file written, the W&B runs and how to upload them
    obim = json.loads(next((tmp_path / "runs").glob("*method=obim")).joinpath("result.json").read_text())
    assert "Table 1: merging the SFT experts: ours ± se (paper); * best or not distinguishable" in p.stdout
    row = next(line for line in p.stdout.splitlines() if line.startswith("OBIM "))
    assert row.split()[-2:] == [f"{obim['avg']:.1f}±{obim['avg_stderr']:.1f}", "(45.2)"] or row.split()[-2:] == [
        f"*{obim['avg']:.1f}±{obim['avg_stderr']:.1f}",
        "(45.2)",
    ]
    written = sorted((tmp_path / "results" / "toy_sft").iterdir())
    assert written and all(f"  results/toy_sft/{f.name}\n" in p.stdout for f in written)
    sync = re.search(r"wandb sync (\S+)", p.stdout)
    assert sync and sync.group(1) == "runs/*/wandb/offline-run-*"
    assert len(list((tmp_path / "runs").glob("*/wandb/offline-run-*"))) == 3  # two jobs + the tables run
    assert p.stdout.splitlines()[-1].startswith("sweep: 2 jobs in ") and "(2 run)" in p.stdout

    # rerun with a third job that fails: the cached job counted at once, the failure's one line and its log, the
    # summary anyway, exit status 1
    args2 = [a if not a.startswith("method=") else "method=ta,ties" for a in args]
    q = run_sweep(args2, env, tmp_path, fail_after_merge=True)
    assert q.returncode == 1
    assert re.search(r"^\[1/2\] method=ta: avg .*; cached result", q.stdout, re.M)
    err = re.search(
        r"^\[2/2\] method=ties: sweep: error: RuntimeError: simulated failure after merge \(log: (.+?)\)",
        q.stderr,
        re.M,
    )
    assert err, q.stderr
    log = tmp_path / err.group(1)
    assert log.is_file() and "Traceback" in log.read_text()
    assert "Table 1: merging the SFT experts" in q.stdout and "(1 cached, 1 failed)" in q.stderr


def test_verbose_brings_the_library_logs_back(quick_zoo, tmp_path):
    env = _env(quick_zoo, tmp_path / "cache")
    p = run_sweep(
        [
            "method=ta",
            *QUICK,
            "eval.individual=false",
            "tracking=none",
            "verbose=true",
            f"hydra.sweep.dir={tmp_path / 'runs'}",
            "results_dir=results",
        ],
        env,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + p.stderr
    assert "[lm_eval.evaluator][INFO]" in console and "Running generate_until requests" in console
    assert re.search(r"^\[1/1\] method=ta: avg ", p.stdout, re.M)
    (job,) = (tmp_path / "runs").glob("*method=ta")
    assert "[lm_eval.evaluator][INFO]" in (job / "sweep.log").read_text()  # Hydra's job log keeps them too


def test_capture_sends_everything_to_the_log_and_real_warnings_to_the_console_once(tmp_path, capfd):
    import transformers.utils.logging as tlog

    from obim.bench.joblog import Relay, captured

    tlog.get_logger("transformers.modeling_utils")  # transformers' own handler (stderr, no propagation) exists
    relayed: list[dict] = []
    log = tmp_path / "job" / "sweep.log"
    root_before = logging.getLogger().handlers[:]
    propagate_before = logging.getLogger("transformers").propagate  # False or True by transformers version
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with captured(log, Relay(relayed.append)):
            os.write(1, b"raw fd 1\n")
            os.write(2, b"raw fd 2\n")
            print("printed", file=sys.__stdout__, flush=True)  # sys.stdout is pytest's own here
            subprocess.run(["sh", "-c", "echo from a child process"], check=True)
            logging.getLogger("lm_eval.evaluator").info("Building contexts for toy_x")
            for task in ("toy_a", "toy_b"):
                logging.getLogger("lm_eval.api.task").warning(
                    f"{task}: Custom kwargs can be passed to `--metadata` in console"
                )
            for _ in range(2):
                tlog.get_logger("transformers.modeling_utils").warning("Some weights of the model were not used")
            warnings.warn("an odd value", UserWarning, stacklevel=1)
            warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    os.write(1, b"after the job\n")
    out, err = capfd.readouterr()
    assert out == "after the job\n" and err == ""  # the terminal got nothing while the job ran
    text = log.read_text()
    for s in (
        "raw fd 1",
        "raw fd 2",
        "printed",
        "from a child process",
        "Building contexts for toy_x",
        "toy_b: Custom kwargs",
        "Some weights of the model were not used",
        "an old API",
    ):
        assert s in text, s
    assert [(r["level"], r["logger"]) for r in relayed] == [
        ("warning", "transformers.modeling_utils"),
        ("warning", "py.warnings"),
    ]
    assert "an odd value" in relayed[1]["text"]
    assert logging.getLogger().handlers == root_before
    assert logging.getLogger("transformers").propagate is propagate_before  # put back


def test_live_console_counts_cached_jobs_at_once_and_estimates_the_rest(tmp_path):
    from obim.bench.console import Live
    from obim.bench.joblog import emit, events_dir

    inbox = events_dir(tmp_path)
    inbox.mkdir()
    jobs = [[f"method={m}", "eval.limit=2"] for m in ("ta", "ties", "obim", "dare")]
    out, err = io.StringIO(), io.StringIO()
    live = Live(tmp_path, jobs, verbose=False, out=out, err=err)
    live.t0 = time.monotonic() - 100
    base = {
        "overrides": [],
        "log": "runs/x/sweep.log",
        "stages": {},
        "scores": {"mmlu": 50.0},
        "avg": 50.0,
        "merge_s": 0.1,
        "eval_s": 2.0,
        "cached": {"merge": False, "eval": False},
    }
    emit(inbox, "end", outcome={**base, "status": "skipped", "name": "a", "overrides": jobs[0], "seconds": 1.0})
    emit(inbox, "warning", level="warning", logger="x", text="weights not used", log="runs/b/sweep.log")
    emit(inbox, "warning", level="warning", logger="x", text="weights not used", log="runs/c/sweep.log")
    emit(
        inbox,
        "end",
        outcome={
            **base,
            "status": "done",
            "name": "b",
            "overrides": jobs[1],
            "seconds": 70.0,
            "stages": {"zoo": 60.0},
            "avg_stderr": 3.25,
        },
    )
    emit(
        inbox,
        "end",
        outcome={
            **base,
            "status": "failed",
            "name": "c",
            "overrides": jobs[2],
            "seconds": 1.0,
            "error": "RuntimeError: boom",
        },
    )
    live.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/4] method=ta: avg 50.0 | mmlu=50.0 | merge 0.1 s, eval 2.0 s; cached result")
    assert lines[1].startswith("[2/4] method=ties: avg 50.0 ± 3.2 | mmlu=50.0 | merge 0.1 s, eval 2.0 s")
    e = err.getvalue().splitlines()
    assert len(e) == 2 and e[0].startswith("warning: weights not used (x; more in runs/b/sweep.log)")
    assert e[1].startswith("[3/4] method=obim: sweep: error: RuntimeError: boom (log: runs/x/sweep.log)")
    # two jobs ran in ~100 s, 60 of them building the zoo and 1 on the cached job: ~19.5 s a job, one left
    assert abs(live.eta() - 19.5) < 2


def test_planned_jobs_and_the_main_table():
    from omegaconf import OmegaConf

    from obim.bench.console import main_table, planned_jobs, varying_keys
    from obim.bench.report.results import Table

    cfg = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"method": "ta,obim"},
                },
                "overrides": {"task": ["retention=0.2,0.3", "eval.limit=2"]},
            }
        }
    )
    jobs = planned_jobs(cfg)
    assert len(jobs) == 4 and sorted(varying_keys(jobs)) == ["method", "retention"]
    tables = [Table(n, n, ["avg"]) for n in ("table1", "table3", "table5", "grid")]
    pick = lambda *o: main_table(tables, [{"overrides": list(o)}]).name  # noqa: E731  (a one-line local helper)
    assert pick("method=ta") == "table1" and pick("method=obim", "validation.size=10") == "table5"
    assert pick("retention=0.2") == "grid" and pick("method.parameters.density=0.3") == "grid"


def test_expected_library_notices_are_noise_and_problems_are_not():
    """A rehearsal's offline run printed 132 of these per sweep: what offline mode and obim's own num_fewshot
    setting ask for, not problems. A real problem from the same libraries still reaches the console."""
    from obim.bench.joblog import is_noise

    for text in (
        "Overwriting default num_fewshot of mmlu_anatomy from None to 5",
        "Using the latest cached version of the dataset since tatsu-lab/alpaca couldn't be found on the Hugging Face "
        "Hub (offline mode is enabled).",
        "Found the latest cached dataset configuration 'all' at /m/datasets/cais___mmlu/all/0.0.0/7c25 (last "
        "modified on Sat Dec  5 18:14:24 2026).",
    ):
        assert is_noise(text), text
    for text in (
        "Couldn't find cache for cais/mmlu for config 'all'",
        "Some weights of LlamaForCausalLM were not initialized from the model checkpoint",
        "num_fewshot of mmlu is larger than the fewshot split",
    ):
        assert not is_noise(text), text


def test_zoo_status_lines_without_a_terminal_are_spaced(monkeypatch, tmp_path):
    """CI logs, nohup, Slurm: a zoo build's status as a line at each stage change and every 30 s within one, not
    at every update."""
    import io

    from obim.bench import console

    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    live = console.Live(tmp_path, None, verbose=False, out=out, err=io.StringIO())
    for t, text in [
        (100, "building the toy zoo (first use)"),
        (101, "zoo 1/8: the SFT base, step 0/1500"),
        (103, "zoo 1/8: the SFT base, step 10/1500, ~4:57 left in it"),
        (140, "zoo 1/8: the SFT base, step 130/1500, ~4:10 left in it"),
        (150, "zoo 1/8: the SFT base, step 170/1500, ~4:00 left in it"),
        (151, "zoo 2/8: the SFT base's anneal, step 0/300"),
    ]:
        now[0] = t
        live.handle({"kind": "status", "stage": "zoo", "text": text, "name": "job"})
    assert out.getvalue().splitlines() == [
        "job: building the toy zoo (first use)",
        "job: zoo 1/8: the SFT base, step 0/1500",
        "job: zoo 1/8: the SFT base, step 130/1500, ~4:10 left in it",
        "job: zoo 2/8: the SFT base's anneal, step 0/300",
    ]
