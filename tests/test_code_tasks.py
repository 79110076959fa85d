"""obim_humaneval and obim_mbpp (obim/bench/tasks/paper): lm-eval's humaneval and mbpp, scored by running each program
in obim's sandbox instead of evaluate's code_eval (a hub module lm-eval loads on import). They must stay the same
benchmark as lm-eval's (config, shots, filter, targets) and score as code_eval does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import yaml

from obim.bench.tasks.paper import utils as paper
from obim.merging.errors import ObimError

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
OURS = {"obim_humaneval": "humaneval", "obim_mbpp": "mbpp"}  # our task -> lm-eval's
# our hook functions -> lm-eval's (in its utils.py, which we may not import: it loads code_eval)
HOOKS = {"humaneval_predictions": "build_predictions", "mbpp_fewshot_samples": "list_fewshot_samples"}

ADD = {  # a HumanEval-style problem: the completion continues the prompt
    "prompt": 'def add(a, b):\n    """Return a plus b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
TRIPLE = {  # an MBPP-style problem: the completion is the whole function, tested by three asserts
    "text": "Write a function to triple a number.",
    "test_list": ["assert triple(1) == 3", "assert triple(0) == 0", "assert triple(-2) == -6"],
}


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def lm_eval_yaml(task: str) -> dict:
    """lm-eval's own task YAML, its `!function x.y` tags read as text (not executed: that would load code_eval)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((LM_EVAL_TASKS / task / f"{task}.yaml").read_text(), Loader=Loader)


def lm_eval_function(task: str, name: str):
    """One function of lm-eval's task utils.py, defined alone (its module-level code_eval load is not run)."""
    tree = ast.parse((LM_EVAL_TASKS / task / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), f"lm_eval/tasks/{task}/utils.py", "exec"), scope)
    return scope[name]


def target(task: str, doc: dict) -> str:
    """lm-eval's doc_to_target of the task, rendered for `doc`: the tests code_eval appends to each program."""
    from lm_eval.utils import apply_template

    return apply_template(lm_eval_yaml(task)["doc_to_target"], doc)


def humaneval(doc: dict, completions: list[str]) -> float:
    """pass@1 of the completions as obim_humaneval scores them: its filter, then its process_results."""
    return paper.process_humaneval(doc, paper.humaneval_predictions([completions], [doc]))["pass@1"]


def mbpp(doc: dict, completion: str) -> float:
    return paper.process_mbpp(doc, [completion])["pass@1"]


def test_pass_at_k_estimator():
    assert paper.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert paper.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert paper.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert paper.pass_at_k(5, 0, 1) == 0.0 and paper.pass_at_k(5, 0, 3) == 0.0
    assert paper.pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of k holds a pass
    assert paper.pass_at_k(1, 1, 1) == 1.0 and paper.pass_at_k(1, 0, 1) == 0.0
    for bad in ((3, 4, 1), (3, 1, 4), (3, 1, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            paper.pass_at_k(*bad)


def test_targets_are_lm_evals():
    """The tests the scorers append are lm-eval's doc_to_target (what its code_eval gets as references)."""
    assert paper.humaneval_target(ADD) == target("humaneval", ADD) == f"{ADD['test']}\ncheck(add)"
    assert paper.mbpp_target(TRIPLE) == target("mbpp", TRIPLE) == "\n".join(TRIPLE["test_list"])
    docs = [ADD, {**ADD, "prompt": "def f():\n"}]
    resps = [["    return a + b\n", "    return a - b\n"], ["    return 1\n"]]
    assert paper.humaneval_predictions(resps, docs) == lm_eval_function("humaneval", "build_predictions")(resps, docs)
    assert paper.mbpp_fewshot_samples() == lm_eval_function("mbpp", "list_fewshot_samples")()


def test_scorers_run_the_programs(allow_code):
    assert humaneval(ADD, ["    return a + b\n"]) == 1.0
    assert humaneval(ADD, ["    return a * b\n"]) == 0.0
    assert humaneval(ADD, ["    return a + b\n", "    return a * b\n"]) == 0.5  # one of two samples passes
    assert mbpp(TRIPLE, "def triple(x):\n    return 3 * x\n") == 1.0
    assert mbpp(TRIPLE, "def triple(x):\n    return x + 2\n") == 0.0  # passes triple(1) only
    # code_eval runs a program with __name__ reading "builtins": a completion's main block is skipped there
    main_block = "def triple(x):\n    return 3 * x\n\nif __name__ == '__main__':\n    raise SystemExit(input())\n"
    assert mbpp(TRIPLE, main_block) == 1.0


def test_scorers_need_the_opt_in(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ObimError, match=r"opt in with eval\.allow_code=true"):
        mbpp(TRIPLE, "def triple(x):\n    return 3 * x\n")


@pytest.mark.slow  # indexes lm-eval's bundled tasks (TaskManager)
def test_tasks_are_lm_evals_but_for_the_metric():
    """Indexed by lm-eval's TaskManager from obim's tasks dir; every field equals lm-eval's task's (hooks compared
    by name here, by behaviour in test_targets_are_lm_evals) but the metric; code tasks, run in the sandbox."""
    from obim.bench.evaluation import code_tasks, task_manager, tasks_dir, where_code_runs

    index = task_manager().task_index
    utils = os.path.join(tasks_dir(), "paper", "utils.")
    for ours, theirs in OURS.items():
        mine, lm = dict(index[ours].cfg), dict(index[theirs].cfg)
        assert mine.pop("task") == ours and lm.pop("task") == theirs and mine.pop("tag") == "obim_paper"
        assert mine.pop("process_results") == utils + f"process_{theirs}"
        assert mine.pop("metric_list") == [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}]
        [metric] = lm.pop("metric_list")
        assert (metric["aggregation"], metric["higher_is_better"], metric.get("k", [1])) == ("mean", True, [1])

        def hooks(cfg: dict, prefix: str, names: dict) -> str:
            """The config as text, each !function path replaced by lm-eval's name for it."""
            text = json.dumps(cfg, sort_keys=True)
            for name, lm_name in names.items():
                text = text.replace(json.dumps(prefix + name), json.dumps(lm_name))
            return text

        lm_utils = str(LM_EVAL_TASKS / theirs / "utils.")
        assert hooks(mine, utils, HOOKS) == hooks(lm, lm_utils, {v: v for v in HOOKS.values()})
    tasks = [*OURS, "obim_mbpp_dev"]
    assert code_tasks(tasks) == tasks  # unsafe_code: the opt-in applies
    assert where_code_runs(tasks) == (True, [])  # in obim's sandbox: code_eval is not needed


# code_eval's pass@1 for each problem (candidate programs, reference), in a child: evaluate reads HF_HOME on import,
# and code_eval must come from the local modules cache, never the hub
CODE_EVAL = """
import json, sys
try:
    import evaluate
    code_eval = evaluate.load("code_eval")
except Exception as e:
    print(json.dumps({"skip": f"evaluate.load('code_eval') offline: {type(e).__name__}: {e}"[:400]}))
    sys.exit()
problems = json.load(sys.stdin)
scores = [code_eval.compute(references=[r], predictions=[c], k=[1])[0]["pass@1"] for c, r in problems]
print(json.dumps({"pass@1": scores}))
"""


@pytest.mark.slow  # ~25 programs in each scorer, two of them 3 s timeouts
def test_agrees_with_code_eval(allow_code):
    """The same completions score the same pass@1 in obim's sandbox as in evaluate's code_eval, where code_eval is in
    the local modules cache (HF_HOME/modules); skipped otherwise."""
    add = ["    return a + b\n", "    return b + a\n", "    return a * b\n", "    return a +\n"]
    add += ["    raise ValueError\n", "    import sys\n    sys.exit(0)\n", "    return sum([a, b])\n"]
    add.append("    while True:\n        pass\n")  # past the 3 s limit
    div = {  # a test that only one of the candidates' behaviours passes: exceptions expected
        "prompt": 'def safe_div(a, b):\n    """a / b, or None when b is 0."""\n',
        "test": "def check(candidate):\n    assert candidate(4, 2) == 2\n    assert candidate(1, 0) is None\n",
        "entry_point": "safe_div",
    }
    he = [(ADD, [c]) for c in add] + [(ADD, add[:3])]
    he.append((div, ["    return a / b\n", "    return a / b if b else None\n"]))
    triples = ["    return 3 * x\n", "    return x * 3\n", "    return x + 2\n", "    return 3 *\n", "    exit()\n"]
    triples += ["    return int(str(3 * x))\n", "    while True:\n        pass\n"]
    mb = [(TRIPLE, "def triple(x):\n" + c) for c in triples]
    mb.append((TRIPLE, "import math\ndef triple(x):\n    return math.prod([3, x])\n"))
    problems = [(paper.humaneval_predictions([c], [d])[0], target("humaneval", d)) for d, c in he]
    problems += [([c], target("mbpp", d)) for d, c in mb]
    env = {**os.environ, "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_ALLOW_CODE_EVAL": "1"}
    p = subprocess.run(
        [sys.executable, "-c", CODE_EVAL],
        input=json.dumps(problems),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    if "skip" in theirs:
        pytest.skip(theirs["skip"])
    ours = [humaneval(d, c) for d, c in he] + [mbpp(d, c) for d, c in mb]
    assert ours == pytest.approx(theirs["pass@1"])
    assert 0 < sum(ours) < len(ours) and 0 < ours[len(add)] < 1  # passes, failures and a fraction: a real comparison
