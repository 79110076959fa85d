"""Scorers and loaders of the paper's custom lm-eval tasks (shipped with obim; obim.bench.evaluation.tasks_dir()
indexes them).

GSM8K and MATH are evaluated zero-shot with WizardMath's Alpaca-style chain-of-thought prompt; the answer is what
follows "The answer is:" in the completion. MATH answers are compared after a normalisation of LaTeX spellings
of the same value (\\dfrac and \\frac, units, "x = ", 0.5 and \\frac{1}{2}, ...), as the MATH paper's scorer does.

HumanEval and MBPP are lm-eval's own tasks, scored here: lm-eval's scorer loads evaluate's code_eval, a hub module,
when its utils module is imported, so they could not run offline. Each program runs in obim.bench.sandbox, as
code_eval runs it (candidate + "\\n" + the task's target, 3 s), and pass@k is code_eval's estimator.
"""

from __future__ import annotations

import json
import math
import re

from obim.bench.validation import last_boxed  # the validation builder reads MATH's gold answers the same way

ANSWER = re.compile(r"The answer is:?", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def after_answer(completion: str) -> str | None:
    """The text after the last 'The answer is:' marker (None when the model gave none)."""
    parts = ANSWER.split(completion)
    return parts[-1].strip() if len(parts) > 1 else None


def _number(text: str) -> float | None:
    m = NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def extract_gsm8k_cot(completion: str) -> float | None:
    """The first number after the answer marker."""
    seg = after_answer(completion)
    return None if seg is None else _number(seg)


def gsm8k_gold(answer: str) -> float:
    return float(answer.rpartition("####")[2].strip().replace(",", ""))


def process_gsm8k_cot(doc, results):
    got = extract_gsm8k_cot(results[0])
    return {"exact_match": float(got is not None and abs(got - gsm8k_gold(doc["answer"])) < 1e-6)}


# ------------------------------------------------------------------------------------------------------ MATH


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p.startswith("{") or len(p) < 2:
            out += p
            continue
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_math(s: str) -> str:
    """One spelling for equivalent MATH answers."""
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    for unit in ("\\text{ ", "\\mbox{ "):  # units are written after a space: "5\\text{ cm}^2" -> "5"
        if unit in s and s.split(unit)[0].strip():
            s = s.split(unit)[0]
    s = re.sub(r"\\(?:text|textbf|mbox)\{(.*?)\}", r"\1", s)
    s = s.rstrip(".").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    lhs = s.split("=")
    if len(lhs) == 2 and len(lhs[0].strip()) <= 2:  # "x = 5" -> "5"
        s = lhs[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def extract_math_cot(completion: str) -> str | None:
    seg = after_answer(completion)
    if seg is None:
        return None
    return normalize_math(seg.split("\n")[0] if last_boxed(seg) is None else seg)


def process_math_cot(doc, results):
    got = extract_math_cot(results[0])
    gold = last_boxed(doc["solution"])
    return {"exact_match": float(bool(got) and gold is not None and got == normalize_math(gold))}


# ------------------------------------------------------------------------------------------------ AlpacaEval


def alpaca_eval_dataset(hub_file: dict, **_):
    """AlpacaEval's 805 instructions: the hub file the task's YAML names (`dataset_kwargs.hub_file`)."""
    import datasets
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(hub_file["repo"], hub_file["filename"], repo_type=hub_file.get("repo_type", "model"))
    with open(path) as f:
        records = json.load(f)
    return datasets.DatasetDict({"eval": datasets.Dataset.from_list(records)})


def process_alpaca_eval(doc, results):
    """The output's length in words: the score itself needs a judge (obim.bench.judge), run on the logged outputs."""
    return {"output_words": float(len(results[0].split()))}


# ------------------------------------------------------------------------------------------------ HumanEval, MBPP

CODE_TIMEOUT = 3.0  # seconds per program: code_eval's default


def pass_at_k(n: int, c: int, k: int) -> float:
    """One problem's unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as code_eval's
    estimate_pass_at_k does (a product, no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def passes(program: str, timeout: float = CODE_TIMEOUT) -> bool:
    """Whether the program exits normally within `timeout`, run in obim's sandbox; only when code execution was
    opted in (as code_eval, which refuses without HF_ALLOW_CODE_EVAL=1)."""
    from obim.bench.sandbox import run_opted_in

    return run_opted_in(program, timeout, "obim's code tasks")


def code_pass_at_1(candidates: list[str], reference: str) -> float:
    """pass@1 of one problem: each candidate program followed by its tests, as code_eval joins them."""
    return pass_at_k(len(candidates), sum(passes(c + "\n" + reference) for c in candidates), 1)


def _candidates(results) -> list[str]:
    # humaneval's filter gives each doc its list of programs (one per repeat); take_first gives mbpp one string
    got = results[0]
    return [got] if isinstance(got, str) else list(got)


def humaneval_target(doc) -> str:
    """The task's doc_to_target, "{{test}}\\ncheck({{entry_point}})": the tests code_eval appends."""
    return f"{doc['test']}\ncheck({doc['entry_point']})"


def humaneval_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval filter (utils.build_predictions): the program is the prompt + the completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def process_humaneval(doc, results):
    return {"pass@1": code_pass_at_1(_candidates(results), humaneval_target(doc))}


def mbpp_target(doc) -> str:
    """The task's doc_to_target for a test doc: its first three asserts, one per line."""
    return "\n".join(doc["test_list"][:3])


def process_mbpp(doc, results):
    return {"pass@1": code_pass_at_1(_candidates(results), mbpp_target(doc))}


def mbpp_fewshot_samples() -> list[dict]:
    """lm-eval's mbpp shots (utils.list_fewshot_samples): train task ids 2, 3 and 4, as data (importing lm-eval's
    module would load code_eval)."""
    return [
        {
            "task_id": 2,
            "text": "Write a function to find the similar elements from the given two tuple lists.",
            "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
            "  return (res) ",
            "test_list": [
                "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
            ],
            "is_fewshot": True,
        },
        {
            "task_id": 3,
            "text": "Write a python function to identify non-prime numbers.",
            "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n"
            "    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n"
            "            result = True\r\n    return result",
            "test_list": [
                "assert is_not_prime(2) == False",
                "assert is_not_prime(10) == True",
                "assert is_not_prime(35) == True",
            ],
            "is_fewshot": True,
        },
        {
            "task_id": 4,
            "text": "Write a function to find the largest integers from a given list of numbers using heap queue "
            "algorithm.",
            "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
            "  return largest_nums",
            "test_list": [
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
            ],
            "is_fewshot": True,
        },
    ]
