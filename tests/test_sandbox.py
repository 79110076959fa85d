"""The code sandbox (obim.bench.sandbox) and the opt-in to code execution. Each escape is written so that its benchmark
item would PASS if the escape worked: the toy scorer must score it failed, and the escape must have no effect."""

from __future__ import annotations

import functools
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from obim.bench import sandbox
from obim.bench.tasks import utils as task_utils
from obim.merging.errors import ObimError

MODES = ["bwrap", "plain"]
# an MBPP-style item: the completion is the whole function, its test wants f() == 1
DOC = {"test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f"}


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """Code execution opted in, and the scorer's sandbox with bubblewrap (where it works here) or without."""
    use_bwrap = request.param == "bwrap"
    if use_bwrap and not sandbox.isolation(True).startswith("bwrap"):
        pytest.skip(sandbox.without_bwrap())
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    monkeypatch.setattr(sandbox, "run", functools.partial(sandbox.run, bwrap=use_bwrap))
    return request.param


def score(body: str) -> float:
    """pass@1 of `def f(): <body>; return 1` through the toy MBPP scorer."""
    completion = "def f():\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines()) + "    return 1\n"
    return task_utils.process_mbpp(DOC, [completion])["pass@1"]


def alive(marker: str) -> list[int]:
    """Processes whose command line contains `marker`."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(d))
        except (OSError, ValueError):
            pass
    return pids


def test_correct_program_passes(mode):
    assert score("pass") == 1.0
    doc = {
        "prompt": 'def g(x):\n    """return x plus 4."""\n',
        "entry_point": "g",
        "test": "def check(candidate):\n    assert candidate(1) == 5\n    assert candidate(3) == 7\n",
    }
    assert task_utils.process_humaneval(doc, ["    return x+4\n"]) == {"pass@1": 1.0}
    assert task_utils.process_humaneval(doc, ["    return x+3\n"]) == {"pass@1": 0.0}
    # what benchmark code may do: the standard library, files in its own work dir, tempfile
    assert (
        score(
            "import collections, math, re, tempfile\nwith open('x.txt', 'w') as fh:\n    fh.write('ok')\n"
            "assert open('x.txt').read() == 'ok'\ntempfile.mkstemp()"
        )
        == 1.0
    )


@pytest.fixture
def shared():
    """A directory anyone may write to (as /tmp is), so that only the sandbox stands in the way."""
    d = Path(tempfile.mkdtemp(prefix="obim-test-shared-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def test_write_outside_work_dir(mode, tmp_path, shared):
    for target in [shared / "escape.txt", tmp_path / "escape.txt", f"/tmp/obim-escape-{uuid.uuid4().hex}"]:
        assert score(f"open({str(target)!r}, 'w').write('x')") == 0.0
        assert not os.path.exists(target)
    victim = shared / "victim"
    victim.write_text("keep")
    victim.chmod(0o666)
    assert score(f"import os\nos.remove({str(victim)!r})") == 0.0
    assert score(f"import os\nos.rename({str(victim)!r}, {str(victim)!r} + '2')") == 0.0
    assert score(f"open({str(victim)!r}, 'a').write('x')") == 0.0
    assert victim.read_text() == "keep"
    assert score(f"import os\nos.mkdir({str(shared / 'd')!r})") == 0.0
    # the audit hook holds its own builtins: replacing `next` does not blind its path checks
    rebind = "import builtins\nbuiltins.next = lambda g: ((), ())\nimport os\n"
    assert score(rebind + f"os.mkdir({str(shared / 'e')!r})") == 0.0
    assert sorted(p.name for p in shared.iterdir()) == ["victim"]


@pytest.mark.parametrize("how", ["posix_spawn", "popen", "double_fork"])
def test_no_process_survives(mode, how):
    marker = f"obim-survivor-{uuid.uuid4().hex}"
    cmd = ["/bin/sh", "-c", "sleep 30; true", marker]  # sh keeps the marker ($0) in its command line
    body = {
        "posix_spawn": f"import os\nos.posix_spawn('/bin/sh', {cmd!r}, {{}}, setsid=True)",
        "popen": f"import subprocess\nsubprocess.Popen({cmd!r}, start_new_session=True)",
        "double_fork": (
            f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sh', {cmd!r})\n    os.abort()"
        ),
    }[how]
    assert score(body) == 0.0
    assert alive(marker) == []


def test_memory_limit(mode):
    assert score("x = bytearray(10**10)") == 0.0


def test_fork_bomb(mode):
    # bounded (64 children that idle and exit), so that a broken sandbox cannot take the machine down
    assert (
        score("import os, time\nfor _ in range(64):\n    if os.fork() == 0:\n        time.sleep(2)\n        os.abort()")
        == 0.0
    )


def test_secrets_not_visible(mode, monkeypatch):
    monkeypatch.setenv("OBIM_TEST_SECRET", "s3cret")
    assert score("import os\nassert 'OBIM_TEST_SECRET' not in os.environ") == 1.0
    assert score("import os\nassert 's3cret' not in str(os.environ)") == 1.0
    # another process's environment through /proc (ours there is the one we started with: a child's has it)
    with subprocess.Popen(["sleep", "30"], env={"OBIM_TEST_SECRET": "s3cret"}) as other:
        try:
            assert score(f"assert b's3cret' in open('/proc/{other.pid}/environ', 'rb').read()") == 0.0
        finally:
            other.kill()


def test_no_signals_to_other_processes(mode):
    assert score(f"import os\nos.kill({os.getpid()}, 0)") == 0.0


def test_no_network(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        assert score(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()") == 0.0
        with pytest.raises(TimeoutError):
            server.accept()


def test_no_ctypes(mode):
    assert score("import ctypes\nctypes.CDLL(None)") == 0.0


def test_exit_is_not_a_pass(mode):
    assert score("import sys\nsys.exit(0)") == 0.0
    assert score("import os\nos._exit(0)") == 0.0


def test_infinite_loop_times_out_fast(mode):
    doc = {**DOC, "prompt": "def f():\n"}
    t0 = time.perf_counter()
    assert task_utils.run_tests(doc["prompt"], "    while True:\n        pass\n", doc, timeout=1.0) is False
    assert time.perf_counter() - t0 < 1.8
    assert sandbox.run("while True:\n    pass\n", 0.5).reason == "timed out after 0.5 s"


def test_child_installed_under_tmp(mode, monkeypatch):
    """The child (sandbox_child.py) runs by path: an install under /tmp, which bwrap replaces, must still find it."""
    d = Path(tempfile.mkdtemp(prefix="obim-test-install-", dir="/tmp"))
    try:
        child = d / "sandbox_child.py"
        shutil.copy(sandbox._CHILD, child)
        monkeypatch.setattr(sandbox, "_CHILD", str(child))
        assert score("pass") == 1.0
        assert score("import os\nos._exit(0)") == 0.0
    finally:
        shutil.rmtree(d)


def test_refused_without_opt_in(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ObimError, match=r"eval\.allow_code=true .*HF_ALLOW_CODE_EVAL=1"):
        score("pass")
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    with pytest.raises(ObimError):
        score("pass")


def test_isolation_reported():
    layers = sandbox.isolation().split("+")
    assert {"rlimits", "audit-hook", "pgroup"} <= set(layers)
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
        assert "nobody" in layers  # root drops to nobody (with the system's interpreter if ours is under /root)
    assert "bwrap" not in sandbox.isolation(False)


def test_code_tasks_and_opt_in(monkeypatch):
    from obim.bench.evaluation import check_code_opt_in, code_tasks, evaluate_model

    tasks = ["toy_humaneval", "toy_mbpp", "toy_gsm8k", "humaneval", "mbpp", "gsm8k", "toy_sft", "humaneval_infilling"]
    assert code_tasks(tasks) == ["toy_humaneval", "toy_mbpp", "humaneval", "mbpp", "toy_sft", "humaneval_infilling"]
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ObimError, match=r"^toy_humaneval execute.*eval\.allow_code=true.*HF_ALLOW_CODE_EVAL=1"):
        check_code_opt_in(["toy_gsm8k", "toy_humaneval"], False)
    check_code_opt_in(["toy_gsm8k", "toy_humaneval"], True)
    check_code_opt_in(["toy_gsm8k"], False)
    # refused before any model is loaded
    with pytest.raises(ObimError, match="toy_mbpp"):
        evaluate_model("/nonexistent", ["toy_mbpp"])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    check_code_opt_in(["toy_gsm8k", "toy_humaneval"], False)


@pytest.mark.parametrize("installed", [True, False])
def test_sweep_console_names_the_sandbox_layers_once(installed, tmp_path, monkeypatch):
    """A sweep's first evaluation of code prints the sandbox's layers once, and warns when bubblewrap is missing."""
    from obim.bench import evaluation, joblog
    from obim.bench.console import Live
    from obim.bench.joblog import events_dir, job_session

    if installed and not sandbox.isolation().startswith("bwrap"):
        pytest.skip(sandbox.without_bwrap())
    if not installed:
        monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it (the sandbox's children get their own PATH)
    sandbox._setup.cache_clear()
    monkeypatch.setattr(evaluation, "_announced", set())
    monkeypatch.setattr(joblog, "job_log_path", lambda job_dir: job_dir / "sweep.log")  # not pytest's log file
    inbox = events_dir(tmp_path)
    inbox.mkdir()
    out, err = io.StringIO(), io.StringIO()
    live = Live(tmp_path, None, verbose=False, out=out, err=err)
    try:
        for job in ("a", "b"):  # two quiet jobs of one sweep in this process: each evaluates code twice
            with job_session(tmp_path / job, job, [], tmp_path, verbose=False) as session:
                for _ in range(2):  # said before the model loads: a missing one is enough here
                    with pytest.raises(OSError, match="no-model"):
                        evaluation.evaluate_model(
                            tmp_path / "no-model",
                            ["toy_gsm8k", "toy_humaneval", "toy_mbpp"],
                            allow_code=True,
                            say=session.note,  # the job's reporter, as the pipeline hands it
                        )
        live.poll()
        expected = sandbox.describe()
    finally:
        sandbox._setup.cache_clear()  # the next tests probe this machine again
    lines = out.getvalue().splitlines()
    warned = err.getvalue().splitlines()
    assert lines == [expected] and lines[0].startswith("code sandbox: ") and "rlimits (" in lines[0]
    if installed:
        assert "bubblewrap (read-only filesystem, " in lines[0] and "no network" in lines[0]
        assert warned == []
    else:
        assert "bubblewrap" not in lines[0]
        assert len(warned) == 1 and warned[0].startswith(
            "warning: the code sandbox runs without bubblewrap (bwrap is not installed): no read-only filesystem, "
            "no network isolation; install it as root: apt-get install bubblewrap"
        ), warned
    assert "code sandbox: " in (tmp_path / "a" / "sweep.log").read_text()  # the job's log has it too


def test_code_outside_the_sandbox_is_named(monkeypatch, capsys):
    """lm-eval's own code tasks run through its code_eval: a warning names them instead (once)."""
    from obim.bench import evaluation

    monkeypatch.setattr(evaluation, "_announced", set())
    for _ in range(2):
        evaluation.announce_code_execution(["humaneval", "toy_gsm8k"])
    assert capsys.readouterr().err.splitlines() == [
        "warning: humaneval executes generated code through lm-eval's code_eval, outside obim's code sandbox"
    ]


def test_code_runs_only_when_opted_in(monkeypatch):
    """Every code task (toy and paper) asks the sandbox through run_opted_in: refused, naming the tasks, without
    HF_ALLOW_CODE_EVAL=1 (code_eval's own opt-in), whatever the program."""
    from obim.bench.sandbox import run_opted_in
    from obim.merging.errors import ObimError

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ObimError, match=r"^toy code tasks execute model-generated code: opt in with eval\.allow_code"):
        run_opted_in("pass", 3.0, "toy code tasks")
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    with pytest.raises(ObimError):
        run_opted_in("pass", 3.0, "x")
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert run_opted_in("assert 1 + 1 == 2", 3.0, "x") is True
    assert run_opted_in("assert 1 + 1 == 3", 3.0, "x") is False
