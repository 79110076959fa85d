"""obim's Slurm launcher (obim.bench.slurm.launch/wait, hydra_plugins.obim) without a cluster: job states read from
sacct and squeue (with or without accounting), the cause of a job's death read from its log, and the wait that turns
a job Slurm ended without a result into a failed job of the sweep. tests/test_slurm.py runs it on a real cluster."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from obim.bench import slurm


def test_states_from_sacct_and_squeue_lines():
    text = "\n".join(
        [
            "41_0|COMPLETED",
            "41_1|CANCELLED by 0",  # sacct names who cancelled
            "41_[2-4,7%2]|PENDING",  # an array's pending tasks, collapsed
            "41_1.batch|CANCELLED",  # a step: not the job's own state
            "42|OUT_OF_MEMORY",
            "",
            "garbage",
        ]
    )
    assert slurm.parse_states(text) == {
        "41_0": "COMPLETED",
        "41_1": "CANCELLED",
        "41_2": "PENDING",
        "41_3": "PENDING",
        "41_4": "PENDING",
        "41_7": "PENDING",
        "42": "OUT_OF_MEMORY",
    }


def _runner(answers: dict[str, tuple[int, str, str]]):
    """A fake subprocess.run answering sacct/squeue with (returncode, stdout, stderr); records the commands."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        code, out, err = answers[cmd[0]]
        return subprocess.CompletedProcess(cmd, code, out, err)

    return run, calls


def test_without_accounting_the_controller_says_and_a_forgotten_job_is_gone():
    run, calls = _runner(
        {
            "sacct": (1, "", "Slurm accounting storage is disabled"),
            "squeue": (0, "7_0|RUNNING\n7_1|TIMEOUT\n", ""),
        }
    )
    assert slurm.job_states(["7_0", "7_1", "7_2"], run) == {"7_0": "RUNNING", "7_1": "TIMEOUT", "7_2": slurm.GONE}
    assert [c[0] for c in calls] == ["sacct", "squeue"]
    assert calls[1][-1] == "7"  # the array asked for once, its tasks listed one per line (-r)


def test_the_controller_is_newer_than_accounting_and_a_job_it_forgot_is_over():
    run, _ = _runner(
        {
            "sacct": (0, "7_0|RUNNING\n8|COMPLETED\n9|PREEMPTED\n", ""),  # slurmdbd lags behind the controller
            "squeue": (1, "", "slurm_load_jobs error: Invalid job id specified"),  # it knows none of them any more
        }
    )
    # accounting's final state where it has one; a run that will not come back (PREEMPTED, or a stale RUNNING) is GONE
    got = slurm.job_states(["7_0", "8", "9", "10"], run)
    assert got == {"7_0": slurm.GONE, "8": "COMPLETED", "9": slurm.GONE, "10": slurm.GONE}
    run, _ = _runner({"sacct": (0, "7_0|RUNNING\n9|PREEMPTED\n", ""), "squeue": (0, "7_0|PENDING\n9|PENDING\n", "")})
    assert slurm.job_states(["7_0", "9"], run) == {"7_0": "PENDING", "9": "PENDING"}  # requeued: still to run


def test_a_job_is_not_called_gone_when_the_controller_did_not_answer():
    def run(cmd, **kwargs):
        if cmd[0] == "squeue":  # a busy slurmctld
            raise subprocess.TimeoutExpired(cmd, 60)
        return subprocess.CompletedProcess(cmd, 0, "7_0|RUNNING\n8|COMPLETED\n", "")

    # accounting's final word holds; a job it has not recorded (yet) or records running is left unknown
    assert slurm.job_states(["7_0", "8", "9"], run) == {"8": "COMPLETED"}


def test_nothing_is_said_while_slurm_cannot_be_asked():
    run, _ = _runner(
        {
            "sacct": (1, "", "Slurm accounting storage is disabled"),
            "squeue": (1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
        }
    )
    assert slurm.job_states(["7_0"], run) == {}  # not GONE: a controller restart must not fail the sweep


def _job(tmp_path: Path, job_id: str, log: str = "") -> SimpleNamespace:
    d = tmp_path / job_id
    d.mkdir(parents=True)
    (d / "err").write_text(log)
    return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(stderr=d / "err", result_pickle=d / "result.pkl"))


@pytest.mark.parametrize(
    ("state", "log", "error"),
    [
        ("CANCELLED", "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-05 ***", "5: CANCELLED: cancelled"),
        (
            "FAILED",  # no cgroups: Slurm records an out-of-memory kill as FAILED
            "slurmstepd-n1: error: StepId=5.0 exceeded memory limit (418861056 > 314572800), being killed",
            "5: FAILED (OUT_OF_MEMORY): killed for using more memory than it asked for (hydra.launcher.mem_gb)",
        ),
        (
            slurm.GONE,
            "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-05T21:14:30 DUE TO TIME LIMIT ***",
            "5: GONE (TIMEOUT): killed at its time limit (hydra.launcher.timeout_min, after up to 3 requeues",
        ),
        (
            slurm.GONE,  # scancel, the controller has forgotten the job, no accounting: its log says
            "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-05T21:14:30 ***",
            "5: GONE (CANCELLED): cancelled",
        ),
        (slurm.GONE, "", "5: GONE: ended without a result and is no longer known to Slurm"),
        ("NODE_FAIL", "", "5: NODE_FAIL: its node failed"),
    ],
)
def test_a_lost_job_is_named_with_its_cause(tmp_path, state, log, error):
    o = slurm.lost_outcome(_job(tmp_path, "5", log), state, ["method=ta"], "method=ta", 3)
    assert o["status"] == "failed" and o["overrides"] == ["method=ta"] and o["name"] == "method=ta"
    assert o["error"].startswith(f"Slurm job {error}"), o["error"]
    assert o["log"] == str(tmp_path / "5" / "err") and o["slurm_job"] == "5"


def test_only_the_last_run_of_a_requeued_job_says_how_it_ended(tmp_path):
    """A requeued job appends to its log: the time limit of its first run is not the cause of its second's end."""
    log = "\n".join(
        [
            "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-05T21:16:03 DUE TO TIME LIMIT ***",
            "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-05T21:16:03 DUE TO JOB REQUEUE ***",
            "submitit INFO (2026-12-05 21:18:30,101) - Starting with JobEnvironment(job_id=5)",
            "",
        ]
    )
    o = slurm.lost_outcome(_job(tmp_path, "5", log), slurm.GONE, ["m"], "m", 3)
    assert o["error"].startswith("Slurm job 5: GONE: ended without a result"), o["error"]


def _returned(value: dict):
    from hydra.core.utils import JobReturn, JobStatus

    return JobReturn(overrides=["method=ta"], status=JobStatus.COMPLETED, _return_value=value)


def test_the_wait_returns_each_result_and_fails_a_job_slurm_ended(tmp_path, monkeypatch):
    """Job 1 wrote its result; job 2 Slurm cancelled: its failure goes to the console's inbox at once and comes back
    in its place; a job requeued after its time limit (TIMEOUT, then PENDING) is waited for, not failed."""
    from obim.bench.joblog import events_dir

    done, cancelled, requeued = (_job(tmp_path, j) for j in ("9_0", "9_1", "9_2"))
    ok = {"status": "done", "name": "method=ta"}
    done.results = lambda: [_returned(ok)]
    requeued.results = lambda: [_returned({**ok, "name": "method=dare"})]
    done.paths.result_pickle.write_bytes(b"")
    answers = iter(
        [
            {"9_1": "CANCELLED", "9_2": "TIMEOUT"},
            {"9_1": "CANCELLED", "9_2": "PENDING"},  # requeued by submitit's checkpointing
            {"9_1": "CANCELLED", "9_2": "RUNNING"},
        ]
    )

    def states(ids):
        ans = next(answers, None)
        if ans is None:  # the requeued job finishes
            requeued.paths.result_pickle.write_bytes(b"")
            ans = {"9_2": "COMPLETED"}
        return {i: ans.get(i, "COMPLETED") for i in ids}

    monkeypatch.setattr(slurm, "job_states", states)
    sweep = tmp_path / "sweep"
    events_dir(sweep).mkdir(parents=True)
    out = slurm.wait(
        [done, cancelled, requeued],
        ["method=ta", "method=ties", "method=dare"],
        [["method=ta"], ["method=ties"], ["method=dare"]],
        sweep,
        requeues=3,
        grace_s=0.05,
        completed_grace_s=0.05,
        watch=slurm.Watch(min_s=0, max_s=0),
        sleep_s=0.06,
    )
    assert out[0].return_value == ok
    assert out[2].return_value["name"] == "method=dare" and out[2].return_value["status"] == "done"
    lost = out[1].return_value
    assert lost["status"] == "failed" and lost["name"] == "method=ties"
    assert lost["error"].startswith("Slurm job 9_1: CANCELLED: cancelled")
    events = [json.loads(p.read_text()) for p in sorted(events_dir(sweep).glob("*.json"))]
    assert [(e["kind"], e["outcome"]["name"]) for e in events] == [("end", "method=ties")]


def _wait_one(tmp_path, monkeypatch, answers: list[str], result_at: int, **grace):
    """One job through slurm.wait with Slurm's answers in turn (one per poll, every loop), its result file written
    at poll `result_at`; returns (its return value, the polls made, the console events)."""
    from obim.bench.joblog import events_dir

    job = _job(tmp_path, "5")
    job.results = lambda: [_returned({"status": "done", "name": "m"})]
    polls = []

    def states(ids):
        polls.append(time.monotonic())
        if len(polls) >= result_at:
            job.paths.result_pickle.write_bytes(b"")
        return {"5": answers[min(len(polls), len(answers)) - 1]}

    monkeypatch.setattr(slurm, "job_states", states)
    sweep = tmp_path / "sweep"
    events_dir(sweep).mkdir(parents=True)
    grace.setdefault("watch", slurm.Watch(0, 0))
    (out,) = slurm.wait([job], ["m"], [["m"]], sweep, 0, sleep_s=0.02, **grace)
    return out.return_value, polls, list(events_dir(sweep).glob("*.json"))


def test_one_reading_that_a_job_ended_does_not_fail_it(tmp_path, monkeypatch):
    """Slurm once says GONE (a glitch), then RUNNING when asked again after the grace: the job is waited for (no
    regular poll here after the first: the second question is the confirmation's)."""
    once = slurm.Watch(min_s=100, max_s=100)
    value, polls, events = _wait_one(tmp_path, monkeypatch, [slurm.GONE, "RUNNING"], 2, grace_s=0.1, watch=once)
    assert value == {"status": "done", "name": "m"} and events == []
    assert polls[1] - polls[0] >= 0.1  # asked again only once the grace had passed, and it said RUNNING


def test_a_completed_job_gets_longer_for_its_result_to_show(tmp_path, monkeypatch):
    """COMPLETED with no result file yet (NFS shows it late): waited for completed_grace_s, not grace_s."""
    value, polls, _ = _wait_one(tmp_path, monkeypatch, ["COMPLETED"], 4, grace_s=0, completed_grace_s=0.3)
    assert value["status"] == "done"
    value, polls, events = _wait_one(
        tmp_path / "b", monkeypatch, ["COMPLETED"], 10**6, grace_s=0, completed_grace_s=0.3
    )
    assert value["error"] == "Slurm job 5: COMPLETED: ended without writing its result" and len(events) == 1
    assert polls[-1] - polls[0] >= 0.3


def test_the_wait_names_the_exception_a_job_raised_outside_its_own_handling(tmp_path, monkeypatch):
    from submitit.core.utils import FailedJobError

    job = _job(tmp_path, "3")
    job.paths.result_pickle.write_bytes(b"")

    def results():
        raise FailedJobError(
            "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
            "last):\n  File \"x.py\", line 1\nomegaconf.errors.ConfigKeyError: Key 'nope' is not in struct\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)'"
        )

    job.results = results
    monkeypatch.setattr(slurm, "job_states", lambda ids: {})
    (out,) = slurm.wait([job], ["m"], [["m"]], tmp_path / "sweep", 0, watch=slurm.Watch(0, 0), sleep_s=0)
    assert out.return_value["error"] == "Slurm job 3: omegaconf.errors.ConfigKeyError: Key 'nope' is not in struct"


def test_a_time_limit_signal_before_the_jobs_own_handling_is_still_said_in_obims_terms(tmp_path, monkeypatch):
    """Under submitit's 120 s signal delay a short limit signals at once: the UncompletedJobError may land before the
    job's own try (while it imports), and comes back as a failed JobReturn; the sweep fails that job with the same
    line, without a traceback."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    job = _job(tmp_path, "4")
    job.paths.result_pickle.write_bytes(b"")
    exc = UncompletedJobError("Job not requeued because: timed-out too many times.")
    job.results = lambda: [JobReturn(overrides=["m"], status=JobStatus.FAILED, _return_value=exc)]
    monkeypatch.setattr(slurm, "job_states", lambda ids: {})
    (out,) = slurm.wait([job], ["m"], [["m"]], tmp_path / "sweep", 0, watch=slurm.Watch(0, 0), sleep_s=0)
    assert out.status == JobStatus.COMPLETED and out.return_value["status"] == "failed"
    assert out.return_value["error"] == slurm.job_error(exc) and "time limit reached" in out.return_value["error"]
    # another exception a job's return carries stays the sweeper's to raise
    other = [JobReturn(overrides=["m"], status=JobStatus.FAILED, _return_value=ValueError("x"))]
    job2 = _job(tmp_path, "5")
    job2.paths.result_pickle.write_bytes(b"")
    job2.results = lambda: other
    (out2,) = slurm.wait([job2], ["m"], [["m"]], tmp_path / "sweep", 0, watch=slurm.Watch(0, 0), sleep_s=0)
    assert out2.status == JobStatus.FAILED


def test_the_watch_backs_off_to_its_maximum(monkeypatch):
    import time

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = slurm.Watch(min_s=5, max_s=60)
    asked = []
    for t in range(0, 1200):
        now[0] = 1000.0 + t
        if w.due():
            asked.append(t)
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert asked[:3] == [0, 5, 10]  # at first every min_s
    assert max(gaps) == 60 and gaps[-1] == 60  # then at most max_s apart: a death is noticed within a minute


def test_the_launcher_is_a_hydra_plugin_the_slurm_config_names():
    """Hydra instantiates launchers only from hydra_plugins.*: the installed package maps ours there, and
    hydra/launcher=slurm selects it (with requeues on time limits)."""
    from conftest import REPO
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sweep", overrides=["hydra/launcher=slurm", "method=ta"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target == "hydra_plugins.obim.SlurmLauncher"
    assert target in {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert cfg.hydra.launcher.max_num_timeout == 3


def test_submitit_giving_up_on_a_time_limit_is_one_line_in_obims_terms():
    from submitit.core.utils import UncompletedJobError

    e = UncompletedJobError("Job not requeued because: timed-out too many times.")
    assert slurm.job_error(e) == (
        "Slurm time limit reached (hydra.launcher.timeout_min) and the job not requeued: timed-out too many times "
        "(hydra.launcher.max_num_timeout); a rerun of the sweep resumes from its finished stages"
    )
    assert slurm.job_error(UncompletedJobError("Job 4 has not produced any output")) is None
    assert slurm.job_error(ValueError("Job not requeued because: x")) is None


def test_the_launcher_submits_what_hydra_submitit_launcher_submits(tmp_path, monkeypatch):
    """The same executor, parameters and job arguments as hydra-submitit-launcher's own launch (a fake submitit
    executor records both): obim's launcher changes only the wait."""
    import submitit
    from conftest import REPO
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as Theirs
    from hydra_plugins.obim import SlurmLauncher as Ours
    from omegaconf import OmegaConf

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "+hydra.launcher.setup=[module load x]"]
    overrides += ["+hydra.launcher.additional_parameters={account: lab}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sweep", overrides=overrides, return_hydra_config=True)
    params = {k: v for k, v in OmegaConf.to_container(cfg.hydra.launcher, resolve=False).items() if k != "_target_"}
    params["submitit_folder"] = str(tmp_path / "sweep" / ".submitit" / "%j")
    recorded: list[list] = []

    class Executor:
        def __init__(self, **kwargs):
            recorded.append([("init", kwargs)])

        def update_parameters(self, **kwargs):
            recorded[-1].append(("update", kwargs))

        def map_array(self, fn, *args):
            recorded[-1].append(("map", [list(a)[:4] for a in args[:4]]))
            jobs = []
            for i in range(len(args[0])):
                job = _job(tmp_path / f"run{len(recorded)}", f"1_{i}")
                job.paths.result_pickle.write_bytes(b"")
                ret = JobReturn(overrides=args[0][i], status=JobStatus.COMPLETED, _return_value={"status": "done"})
                job.results = lambda ret=ret: [ret]
                jobs.append(job)
            return jobs

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    monkeypatch.setattr(slurm, "job_states", lambda ids: {})
    jobs = [["method=ta"], ["method=ties"]]
    for cls in (Theirs, Ours):
        launcher = cls(**params)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        returned = launcher.launch(jobs, initial_job_idx=0)
        assert [r.return_value for r in returned] == [{"status": "done"}] * 2
    theirs, ours = recorded
    assert ours == theirs
    init = dict(ours[0][1])
    assert init["cluster"] == "slurm" and init["slurm_max_num_timeout"] == 3
    assert dict(ours[1][1])["slurm_setup"] == ["module load x"]
    assert dict(ours[1][1])["slurm_additional_parameters"] == {"account": "lab"}


def test_a_time_limit_signal_is_not_swallowed_by_a_librarys_except_exception():
    """submitit's handler raising its no-requeue UncompletedJobError inside code that catches Exception (a logging
    handler, an optional import): inside time_limit_not_swallowed it passes through as a SlurmTimeLimit, said in
    obim's terms; any other error from the handler passes unchanged, and the handler is restored afterwards."""
    import signal

    from submitit.core.utils import UncompletedJobError

    def submitits(signum, frame):  # what checkpoint_and_try_requeue raises with no requeue left
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    def library_code() -> str:
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)  # the handler runs here
            return "slept"
        except Exception:  # the library swallowing the error is the point
            return "swallowed"

    old = signal.signal(signal.SIGUSR2, submitits)
    try:
        assert library_code() == "swallowed"  # the failure seen in CI: the job ran on to its kill
        with pytest.raises(slurm.SlurmTimeLimit) as caught, slurm.time_limit_not_swallowed():
            library_code()
        assert slurm.job_error(caught.value) == slurm.job_error(UncompletedJobError(str(caught.value)))
        assert "time limit reached" in str(slurm.job_error(caught.value))
        assert signal.getsignal(signal.SIGUSR2) is submitits

        def other(signum, frame):
            raise UncompletedJobError("Job 4 has not produced any output")

        signal.signal(signal.SIGUSR2, other)
        with slurm.time_limit_not_swallowed():
            assert library_code() == "swallowed"  # not a time limit: as it was
    finally:
        signal.signal(signal.SIGUSR2, old)
