"""Validation sets for the sweep: sources built from hub datasets (train/dev splits only), local dataset folders
or JSONL files, rendered in each model's prompt format; what a merge reads is plain text (obim.merging.texts)."""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError
from obim.merging.texts import read_jsonl

# ------------------------------------------------------------------------------- validation sets for the sweep
#
# A sweep names each model's validation set as {source: samples}; a source is a builder (how to turn a dataset's
# records into (instruction, response) pairs or plain text), where its records come from (a hub id, a local
# dataset folder shaped like the hub's, or a JSONL file) and the split to draw from. The text a model runs forward
# on is each pair rendered in that model's own prompt format.

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
PROMPT_FORMATS = {
    "plain": "{instruction}\n{response}",
    "alpaca": ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n{response}",
    # WizardMath's chain-of-thought prompt (also the custom GSM8K/MATH benchmarks' prompt)
    "alpaca_cot": ALPACA_HEADER
    + "### Instruction:\n{instruction}\n\n### Response: Let's think step by step. {response}",
    # WizardLM-13B-V1.2 (Vicuna's format)
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT: {response}"
    ),
}


def render(fmt: str, sample: str | tuple[str, str]) -> str:
    """A sample as the model saw such data in training: plain text stays as it is; a pair fills the format (a
    built-in name or a template with {instruction} and {response})."""
    if isinstance(sample, str):
        return sample
    template = PROMPT_FORMATS.get(fmt, fmt)
    return template.format(instruction=sample[0], response=sample[1])


def check_format(fmt: str, where: str) -> None:
    if fmt not in PROMPT_FORMATS and not ("{instruction}" in fmt and "{response}" in fmt):
        raise ObimError(
            f"{where}: unknown prompt format {fmt!r}: one of {', '.join(PROMPT_FORMATS)}, or a template "
            "with {instruction} and {response}"
        )


def _mmlu(r: dict) -> tuple[str, str]:
    opts = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"]))
    return f"{r['question'].strip()}\n{opts}", f"Answer: {'ABCD'[int(r['answer'])]}"


def _ceval(r: dict) -> tuple[str, str]:
    opts = "\n".join(f"{k}. {r[k]}" for k in "ABCD")
    return f"{r['question'].strip()}\n{opts}", f"答案：{r['answer']}"


def _gsm8k(r: dict) -> tuple[str, str]:
    steps, _, final = r["answer"].rpartition("####")
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()  # calculator annotations are not part of the reasoning
    return r["question"].strip(), f"{steps}\nThe answer is: {final.strip()}"


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in a MATH solution, braces balanced; `\\boxed 5`
    (no braces, as a few solutions write it) gives what follows up to `$` or the end."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("\\", 1)[1]
    rest = rest[len("boxed") :] if rest.startswith("boxed") else rest[len("fbox") :]
    if rest.startswith(" "):
        return rest[1:].split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for j, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:j]
    return None


def _math(r: dict) -> tuple[str, str]:
    answer = last_boxed(r["solution"])
    return r["problem"].strip(), r["solution"].strip() + (f"\nThe answer is: {answer}" if answer else "")


def _mbpp(r: dict) -> tuple[str, str]:
    tests = "\n".join(r["test_list"])
    return f"{r['text'].strip()} Your code should pass these tests:\n\n{tests}", r["code"].strip()


def _alpaca(r: dict) -> tuple[str, str]:
    inp = (r.get("input") or "").strip()
    return r["instruction"].strip() + (f"\n\n{inp}" if inp else ""), r["output"].strip()


def _jcommonsenseqa(r: dict) -> tuple[str, str]:
    choices = [r[f"choice{i}"] for i in range(5)]
    return r["question"].strip() + "\n" + "\n".join(f"- {c}" for c in choices), choices[int(r["label"])]


def _record(r: dict, field: str = "text") -> str | tuple[str, str]:
    """A JSONL/text record: rendered `text`, or an instruction/response pair (alpaca-style field names too)."""
    if field in r:
        return r[field]
    if "instruction" in r and ("response" in r or "output" in r):
        return _alpaca(
            {"instruction": r["instruction"], "input": r.get("input"), "output": r.get("response", r.get("output"))}
        )
    raise KeyError(field)


@dataclass(frozen=True)
class Builder:
    """How one kind of dataset becomes validation samples; `defaults` name the hub dataset (overridable) and
    `eval_splits` the splits its benchmark evaluates, which are never drawn from."""

    to_sample: Callable[[dict], str | tuple[str, str]]
    defaults: dict
    eval_splits: tuple[str, ...] = ("test",)
    fields: tuple[str, ...] = ()


MATH_SUBJECTS = [
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
]
CEVAL_SUBJECTS = [  # the 52 configs of ceval/ceval-exam (its dev split: 5 questions each)
    "accountant",
    "advanced_mathematics",
    "art_studies",
    "basic_medicine",
    "business_administration",
    "chinese_language_and_literature",
    "civil_servant",
    "clinical_medicine",
    "college_chemistry",
    "college_economics",
    "college_physics",
    "college_programming",
    "computer_architecture",
    "computer_network",
    "discrete_mathematics",
    "education_science",
    "electrical_engineer",
    "environmental_impact_assessment_engineer",
    "fire_engineer",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_chinese",
    "high_school_geography",
    "high_school_history",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_politics",
    "ideological_and_moral_cultivation",
    "law",
    "legal_professional",
    "logic",
    "mao_zedong_thought",
    "marxism",
    "metrology_engineer",
    "middle_school_biology",
    "middle_school_chemistry",
    "middle_school_geography",
    "middle_school_history",
    "middle_school_mathematics",
    "middle_school_physics",
    "middle_school_politics",
    "modern_chinese_history",
    "operating_system",
    "physician",
    "plant_protection",
    "probability_and_statistics",
    "professional_tour_guide",
    "sports_science",
    "tax_accountant",
    "teacher_qualification",
    "urban_and_rural_planner",
    "veterinary_medicine",
]
BUILDERS: dict[str, Builder] = {
    "alpaca": Builder(
        _alpaca, {"path": "tatsu-lab/alpaca", "split": "train"}, ("test", "eval"), ("instruction", "input", "output")
    ),
    "mmlu": Builder(
        _mmlu,
        {"path": "cais/mmlu", "name": "all", "split": "dev"},
        ("test", "validation"),
        ("question", "choices", "answer"),
    ),
    "ceval": Builder(
        _ceval,
        {"path": "ceval/ceval-exam", "name": CEVAL_SUBJECTS, "split": "dev"},
        ("test", "val"),
        ("question", "A", "B", "C", "D", "answer"),
    ),
    "gsm8k": Builder(
        _gsm8k, {"path": "openai/gsm8k", "name": "main", "split": "train"}, ("test",), ("question", "answer")
    ),
    "math": Builder(
        _math,
        {"path": "EleutherAI/hendrycks_math", "name": MATH_SUBJECTS, "split": "train"},
        ("test",),
        ("problem", "solution"),
    ),
    "mbpp": Builder(
        _mbpp,
        {"path": "google-research-datasets/mbpp", "name": "full", "split": "train"},
        ("test",),
        ("text", "code", "test_list"),
    ),
    "jcommonsenseqa": Builder(
        _jcommonsenseqa,
        {"path": "Rakuten/JGLUE", "name": "JCommonsenseQA", "split": "train"},
        ("test", "validation"),
        ("question", "choice0", "label"),
    ),
    # no split of their own: validation.split (train by default) unless the source names one
    "text": Builder(_record, {}),  # any dataset with a `text` field (pretraining corpora)
    "jsonl": Builder(_record, {}),  # a local JSONL file (`{split}` in its path is replaced)
}
SOURCE_KEYS = ("builder", "path", "name", "split", "field")


def resolve_source(source: str, spec: dict | None, split: str, where: str) -> dict[str, Any]:
    """A source's full spec: builder defaults filled in, the split checked (never an evaluated split)."""
    spec = dict(spec or {})
    unknown = set(spec) - set(SOURCE_KEYS)
    if unknown:
        raise ObimError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(SOURCE_KEYS)}")
    kind = spec.get("builder", source)
    if kind not in BUILDERS:
        raise ObimError(f"{where}.builder: unknown builder {kind!r}; one of {', '.join(BUILDERS)}")
    b = BUILDERS[kind]
    out = {"builder": kind, **b.defaults, **{k: v for k, v in spec.items() if v is not None}}
    out.setdefault("split", split)
    if not out.get("path"):
        raise ObimError(f"{where}.path: builder '{kind}' needs a dataset (hub id, local folder or JSONL file)")
    if kind == "jsonl":
        out["path"] = str(out["path"]).replace("{split}", str(out["split"]))
    if out["split"] in b.eval_splits:
        raise ObimError(
            f"{where}.split: '{out['split']}' is a split the benchmarks evaluate "
            f"({', '.join(b.eval_splits)}); validation data comes from train/dev splits only"
        )
    return out


def _load_records(spec: dict) -> list[dict]:
    if spec["builder"] == "jsonl":
        return [rec for _, rec in read_jsonl(spec["path"])]
    import datasets

    names = spec.get("name")
    recs = []
    local = Path(spec["path"]).exists()
    for name in names if isinstance(names, list) else [names]:
        try:
            if local:  # datasets caches a local folder by its name and config alone: a stale copy must not win
                with tempfile.TemporaryDirectory(prefix="obim-ds-") as tmp:
                    ds = datasets.load_dataset(
                        spec["path"], name, split=spec["split"], cache_dir=tmp, keep_in_memory=True
                    )
            else:
                ds = datasets.load_dataset(spec["path"], name, split=spec["split"])
        except Exception as e:  # offline, unknown dataset or split: one line naming the source
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ObimError(
                f"validation source {spec['path']}" + (f" ({name})" if name else "") + f" split {spec['split']}: {msg}"
            ) from None
        recs += list(ds)
    return recs


def draw_order(n_records: int, source: str, seed: int) -> list[int]:
    """The permutation a validation draw from a dataset takes its samples in (the first n of it), keyed by the
    source's name and the seed. The search's dev tasks on the same split start past its first `skip` entries
    (tasks/paper_dev/utils.py), so this one function keeps the two disjoint."""
    order = list(range(n_records))
    random.Random(f"{seed}-{source}").shuffle(order)
    return order


def load_samples(source: str, spec: dict, n: int, seed: int) -> list[str | tuple[str, str]]:
    """`n` samples of one source. JSONL files give their first n records (already shuffled when written); a dataset
    gives the first n of a permutation fixed by the seed, so smaller sets are subsets of larger ones (Table 5)."""
    recs = _load_records(spec)
    if len(recs) < n:
        raise ObimError(
            f"{spec['path']}: validation source '{source}' has {len(recs)} samples in split "
            f"'{spec['split']}', {n} requested"
        )
    if spec["builder"] != "jsonl":
        recs = [recs[i] for i in draw_order(len(recs), source, seed)]
    b = BUILDERS[spec["builder"]]
    out = []
    for i, r in enumerate(recs[:n]):
        try:
            out.append(b.to_sample(r, spec["field"]) if "field" in spec else b.to_sample(r))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ObimError(
                f"{spec['path']}: record {i} of split '{spec['split']}' lacks what builder "
                f"'{spec['builder']}' reads ({', '.join(b.fields) or 'text'}): {e}"
            ) from None
    return out


_BUILT: dict[str, list[str]] = {}


def build_texts(v: dict) -> list[str]:
    """The texts of one model's validation set (a sweep plan's `validation[model]`): every source's samples, in
    order, rendered in the model's prompt format. Hub sources are read once per process (a multirun's jobs share
    them); local files every time (they may change between jobs)."""
    key = json.dumps([v["sources"], v["data"], v["format"], v["seed"]], sort_keys=True)
    if key in _BUILT:
        return list(_BUILT[key])
    texts = []
    for source, n in v["sources"].items():
        texts += [render(v["format"], s) for s in load_samples(source, v["data"][source], n, v["seed"])]
    if not any(Path(str(d["path"])).exists() for d in v["data"].values()):
        _BUILT[key] = list(texts)
    return texts
