"""Scorers and loaders of the paper's custom lm-eval tasks (shipped with obim; obim.bench.evaluation.tasks_dir()
indexes them).

GSM8K and MATH are evaluated zero-shot with WizardMath's Alpaca-style chain-of-thought prompt; the answer is what
follows "The answer is:" in the completion. MATH answers are compared after a normalisation of LaTeX spellings
of the same value (\\dfrac and \\frac, units, "x = ", 0.5 and \\frac{1}{2}, ...), as the MATH paper's scorer does.
"""

from __future__ import annotations

import json
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
