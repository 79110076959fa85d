"""Tiny copies of every hub dataset the real experiments read (conf/experiment/llama2_13b_sft.yaml and
qwen2_7b_pt.yaml, every paper preset): their validation sources, the lm-eval benchmarks (mmlu, ceval-valid,
japanese_leaderboard, HumanEval and MBPP, obim's GSM8K/MATH/AlpacaEval tasks) and the search's dev tasks
(obim/bench/tasks/paper_dev). Each keeps the real hub id, config names, split names, column names and dtypes
(ClassLabel names included), with a few short generated records per split that look like the real ones (GSM8K
answers end in "#### n", MATH solutions have a \\boxed answer, MBPP and HumanEval code passes its own tests...).

    write_datasets(home)      # HF_HOME=home, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1: the presets read them

Sizes (`n_test`): by default (`n_test=None`) every evaluated split (the test / validation / val split a benchmark
scores, per config) holds exactly its real number of records (REAL_ROWS, each number with its source in
SIZE_SOURCES), so that counting the documents lm-eval reads from the mirror gives what a real run costs; the train
splits the search's dev tasks slice past the first DEV_SKIP records of the draw's permutation (GSM8K, MATH's seven
subjects, JCommonsenseQA) hold their real sizes too, so each dev task gets its real 500 records. The splits
validation sets draw from hold what the presets draw (the paper's Table 9 sizes: MMLU dev 57 x 5 = 285, C-Eval dev
52 x 5 = 260, JCommonsenseQA 218, 50 or 100 of the others; MBPP's train its real 374); splits nothing scores (few-shot
train splits, C-Eval's unlabelled test) stay small. The records stay short generated text: only their count is real.
The whole mirror is about 16 MB (83k records) and writes in about 3 s (the small one: 4 MB, 2 s).

    write_datasets(home, n_test=5)   # small: every evaluated split n_test records, each dev task n_test records

A small `n_test` (an int) keeps the old tiny mirror for tests: each evaluated split holds n_test records per config
and the dev tasks' train splits DEV_SKIP + n_test.
"""

# ruff: noqa: RUF001  (the Japanese and Chinese records use full-width punctuation, as the real ones do)
from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Features, List, Value

from obim.bench.validation import CEVAL_SUBJECTS, MATH_SUBJECTS

from .hubcache import RepoType, processed_dir, write_processed, write_repo

DEV_SKIP = 1000  # paper_dev's `skip` (the experiments' dev_benchmarks): the dev tasks start past it
N_TEST = 5  # the small mirror (n_test=N_TEST): records per evaluated split and per dev task
FEWSHOT = 8  # records of a train split only few-shot examples come from (lm-eval's 1-5 shots)

Record = dict[str, Any]
SizeFn = Callable[[str, int | None], dict[str, int]]  # (config, n_test) -> {split: records}


@dataclass(frozen=True)
class DatasetSpec:
    """One hub dataset: its configs, features, the split sizes for `n_test` (None: real), and how its records are
    made."""

    repo_id: str
    configs: tuple[str, ...]  # "default": a dataset without named configs
    features: Features | dict[str, Features]  # one for all configs, or one per config
    sizes: SizeFn  # (config, n_test) -> {split: records}; n_test None: the real sizes
    rows: Callable[[str, str, int, random.Random], list[Record]]  # (config, split, n, rng) -> records
    source: str = ""  # where the layout comes from, and what of it is a guess


@dataclass(frozen=True)
class HubFileSpec:
    """One file of a hub repo read through huggingface_hub (not datasets), e.g. AlpacaEval's JSON."""

    repo_id: str
    filename: str
    repo_type: RepoType
    content: Callable[[int | None], bytes]  # n_test (None: real size) -> the file's bytes


@dataclass
class Written:
    """What write_datasets wrote: a dataset config ({split: records}) or a hub file ({"records": n})."""

    kind: str  # "dataset" or "hub file"
    repo_id: str
    config: str | None  # dataset config; None for a hub file
    rows: dict[str, int]
    path: Path
    filename: str | None = None  # hub file only


# ------------------------------------------------------------------------------------------------ real sizes
# The real number of records of every split the mirror writes at its real size (n_test=None), per repo, config and
# split, each from the source SIZE_SOURCES names (dataset cards' dataset_info, the datasets' own READMEs, or the
# data itself). Splits not here (few-shot train splits, C-Eval's test, MMLU/C-Eval dev, Alpaca/CodeAlpaca train)
# keep the small sizes the specs give them.

# cais/mmlu, per subject: (test, validation); dev is MMLU_DEV (5) each. "all" is their concatenation.
# fmt: off
MMLU_ROWS: dict[str, tuple[int, int]] = {
    "abstract_algebra": (100, 11), "anatomy": (135, 14), "astronomy": (152, 16), "business_ethics": (100, 11),
    "clinical_knowledge": (265, 29), "college_biology": (144, 16), "college_chemistry": (100, 8),
    "college_computer_science": (100, 11), "college_mathematics": (100, 11), "college_medicine": (173, 22),
    "college_physics": (102, 11), "computer_security": (100, 11), "conceptual_physics": (235, 26),
    "econometrics": (114, 12), "electrical_engineering": (145, 16), "elementary_mathematics": (378, 41),
    "formal_logic": (126, 14), "global_facts": (100, 10), "high_school_biology": (310, 32),
    "high_school_chemistry": (203, 22), "high_school_computer_science": (100, 9),
    "high_school_european_history": (165, 18), "high_school_geography": (198, 22),
    "high_school_government_and_politics": (193, 21), "high_school_macroeconomics": (390, 43),
    "high_school_mathematics": (270, 29), "high_school_microeconomics": (238, 26), "high_school_physics": (151, 17),
    "high_school_psychology": (545, 60), "high_school_statistics": (216, 23), "high_school_us_history": (204, 22),
    "high_school_world_history": (237, 26), "human_aging": (223, 23), "human_sexuality": (131, 12),
    "international_law": (121, 13), "jurisprudence": (108, 11), "logical_fallacies": (163, 18),
    "machine_learning": (112, 11), "management": (103, 11), "marketing": (234, 25), "medical_genetics": (100, 11),
    "miscellaneous": (783, 86), "moral_disputes": (346, 38), "moral_scenarios": (895, 100), "nutrition": (306, 33),
    "philosophy": (311, 34), "prehistory": (324, 35), "professional_accounting": (282, 31),
    "professional_law": (1534, 170), "professional_medicine": (272, 31), "professional_psychology": (612, 69),
    "public_relations": (110, 12), "security_studies": (245, 27), "sociology": (201, 22),
    "us_foreign_policy": (100, 11), "virology": (166, 18), "world_religions": (171, 19),
}
# ceval/ceval-exam, per subject: val (the split ceval-valid scores)
CEVAL_VAL: dict[str, int] = {
    "accountant": 49, "advanced_mathematics": 19, "art_studies": 33, "basic_medicine": 19,
    "business_administration": 33, "chinese_language_and_literature": 23, "civil_servant": 47,
    "clinical_medicine": 22, "college_chemistry": 24, "college_economics": 55, "college_physics": 19,
    "college_programming": 37, "computer_architecture": 21, "computer_network": 19, "discrete_mathematics": 16,
    "education_science": 29, "electrical_engineer": 37, "environmental_impact_assessment_engineer": 31,
    "fire_engineer": 31, "high_school_biology": 19, "high_school_chemistry": 19, "high_school_chinese": 19,
    "high_school_geography": 19, "high_school_history": 20, "high_school_mathematics": 18, "high_school_physics": 19,
    "high_school_politics": 19, "ideological_and_moral_cultivation": 19, "law": 24, "legal_professional": 23,
    "logic": 22, "mao_zedong_thought": 24, "marxism": 19, "metrology_engineer": 24, "middle_school_biology": 21,
    "middle_school_chemistry": 20, "middle_school_geography": 12, "middle_school_history": 22,
    "middle_school_mathematics": 19, "middle_school_physics": 19, "middle_school_politics": 21,
    "modern_chinese_history": 23, "operating_system": 19, "physician": 49, "plant_protection": 22,
    "probability_and_statistics": 18, "professional_tour_guide": 29, "sports_science": 19, "tax_accountant": 49,
    "teacher_qualification": 44, "urban_and_rural_planner": 46, "veterinary_medicine": 23,
}
# EleutherAI/hendrycks_math, per subject: (train, test)
MATH_ROWS: dict[str, tuple[int, int]] = {
    "algebra": (1744, 1187), "counting_and_probability": (771, 474), "geometry": (870, 479),
    "intermediate_algebra": (1295, 903), "number_theory": (869, 540), "prealgebra": (1205, 871),
    "precalculus": (746, 546),
}
# fmt: on
REAL_ROWS: dict[str, dict[str, dict[str, int]]] = {
    "cais/mmlu": {
        "all": {"test": 14042, "validation": 1531},
        **{s: {"test": t, "validation": v} for s, (t, v) in MMLU_ROWS.items()},
    },
    "openai/gsm8k": {"main": {"train": 7473, "test": 1319}},
    "EleutherAI/hendrycks_math": {s: {"train": tr, "test": te} for s, (tr, te) in MATH_ROWS.items()},
    "google-research-datasets/mbpp": {"full": {"train": 374, "test": 500, "validation": 90, "prompt": 10}},
    "openai/openai_humaneval": {"openai_humaneval": {"test": 164}},
    "ceval/ceval-exam": {s: {"val": v} for s, v in CEVAL_VAL.items()},
    "Rakuten/JGLUE": {
        "JCommonsenseQA": {"train": 8939, "validation": 1119},
        "JNLI": {"validation": 2434},
        "JSQuAD": {"validation": 4442},
        "MARC-ja": {"validation": 5654},
    },
    "kumapo/JAQKET": {"v2.0": {"validation": 1164}},
    "juletxara/mgsm": {"ja": {"train": 8, "test": 250}},
    "mkshing/xlsum_ja": {"default": {"validation": 758, "test": 766}},
    "polm-stability/xwinograd-ja": {"default": {"test": 959}},
}
ALPACA_EVAL_ROWS = 805  # tatsu-lab/alpaca_eval's alpaca_eval.json (the AlpacaFarm evaluation set)
_HFD = "huggingface/datasets@d7dfbc83d68e87ba002c5eb2555f7a932e59038a"  # the last commit with the dataset scripts
_HFM = "https://huggingface.co/datasets/EleutherAI/hendrycks_math"
SIZE_SOURCES: dict[str, str] = {
    "cais/mmlu": f"subjects' test/validation: {_HFD}:datasets/hendrycks_test/dataset_infos.json (cais/mmlu's "
    "former name; its card's dataset_info gives the same, e.g. abstract_algebra 100/11, anatomy 135/14); all: "
    "the cais/mmlu card's dataset_info, test 14042, validation 1531, dev 285 "
    "(https://huggingface.co/datasets/cais/mmlu/commit/c30699e8356da336a370243923dbaf21066bb9fe) = the sums",
    "openai/gsm8k": f"{_HFD}:datasets/gsm8k/dataset_infos.json (main: train 7473, test 1319)",
    "EleutherAI/hendrycks_math": f"the card's dataset_info: {_HFM}/blob/0bd4da3ba883718272d0e821efdf10b63c2ed3bf/"
    "README.md (algebra, counting_and_probability, geometry) and the commits adding the others: "
    f"{_HFM}/commit/8c2e06ef95848dfa34ea37fe6823128774ad3e27 (intermediate_algebra), "
    f"{_HFM}/commit/5d415e1f7ef336df5075c88d72d7e588f839e066 (number_theory), "
    f"{_HFM}/commit/33229490b016455e76e3bdf1a14249ce207bf8b6 (prealgebra), "
    f"{_HFM}/commit/b8bd7a1bae8a4640f5fc2f663d6c73874b1505ea (precalculus); totals 7500/5000 as "
    f"{_HFD}:datasets/competition_math/dataset_infos.json",
    "google-research-datasets/mbpp": f"{_HFD}:datasets/mbpp/dataset_infos.json (full: train 374, test 500, "
    "validation 90, prompt 10)",
    "openai/openai_humaneval": f"{_HFD}:datasets/openai_humaneval/dataset_infos.json (test 164)",
    "ceval/ceval-exam": "the card's dataset_info, https://huggingface.co/datasets/ceval/ceval-exam/blob/main/README.md "
    "(val per subject; sum 1346 = C-Eval's val size, dev 260, test 12342); the same numbers in "
    "xinhuang0716/LLM_Assessment_Fubon:reliability/ceval/ceval-exam-zhtw/README.md; the split totals also in "
    "L1183325308/opencompass:docs/zh_cn/dataset.md",
    "Rakuten/JGLUE": "yahoojapan/JGLUE v1.1.0 (6791a5003e6deaa6fb2458bcb3aa1f58dc52ef33) README's table (Dev: MARC-ja "
    "5654, JNLI 2434, JSQuAD 4442, JCommonsenseQA 1119; Train: JCommonsenseQA 8939), the JNLI/JSQuAD/JCommonsenseQA "
    "numbers also counted in its datasets/*-v1.1/*.json; MARC-ja's count is the README's (Rakuten's copy builds it "
    "from a preprocessed parquet we could not count)",
    "kumapo/JAQKET": "kumapo/JAQKET-dataset:README.md (v2.0: train 2154, validation 1164)",
    "juletxara/mgsm": "google-research/url-nlp:mgsm/README.md (the same 250 problems per language); train: the 8 "
    "exemplars (juletxara/mgsm's card dataset_info, train 8, test 250)",
    "mkshing/xlsum_ja": "the card, https://huggingface.co/datasets/mkshing/xlsum_ja/commit/"
    "b02b5e36500f816754e48f7607eef4b8b4e80087 (train 4215, validation 758, test 766)",
    "polm-stability/xwinograd-ja": "the dataset viewer, https://huggingface.co/datasets/polm-stability/xwinograd-ja "
    "(test: 959 rows)",
    "tatsu-lab/alpaca_eval": "tatsu-lab/alpaca_eval:README.md (the AlpacaFarm evaluation set, 805 examples)",
}


def real_rows(repo_id: str, config: str, split: str) -> int:
    """The real number of records of one split (REAL_ROWS; KeyError for splits the mirror keeps small)."""
    return REAL_ROWS[repo_id][config][split]


def _n(repo_id: str, config: str, split: str, n_test: int | None) -> int:
    """An evaluated split's size: n_test in the small mirror, else its real size."""
    return real_rows(repo_id, config, split) if n_test is None else n_test


def _dev_train(repo_id: str, config: str, n_test: int | None) -> int:
    """A train split a dev task slices past the first DEV_SKIP records: its real size, or DEV_SKIP + n_test."""
    return real_rows(repo_id, config, "train") if n_test is None else DEV_SKIP + n_test


def _rng(*parts: object) -> random.Random:
    return random.Random("|".join(map(str, parts)))  # str seeds hash the same in every process


def _fixed(repo_id: str, **sizes: int) -> SizeFn:
    """Split sizes where `0` marks an evaluated split (its real size, or n_test in the small mirror)."""
    return lambda config, n: {s: (k or _n(repo_id, config, s, n)) for s, k in sizes.items()}


def _numeric_choices(rng: random.Random, answer: int, k: int = 4) -> tuple[list[str], int]:
    """k distinct numbers, one of them the answer; returns them as strings and the answer's index."""
    opts = {answer}
    while len(opts) < k:
        opts.add(answer + rng.choice([-1, 1]) * rng.randint(1, 9))
    ordered = sorted(opts)
    rng.shuffle(ordered)
    return [str(o) for o in ordered], ordered.index(answer)


# --------------------------------------------------------------------------------------------------- English

ALPACA_FEATURES = Features(
    {k: Value("string") for k in ("instruction", "input", "output", "text")}
)  # tatsu-lab/alpaca: `text` is the record in Alpaca's prompt
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
WORDS = ["river", "garden", "library", "window", "mountain", "lantern", "harbor", "violin", "orchard", "compass"]
TOPICS = ["Spanish", "the guitar", "chess", "photography", "cooking", "Python", "gardening", "painting"]


def _alpaca_text(ins: str, inp: str, out: str) -> str:
    if inp:
        return f"{ALPACA_HEADER_INPUT}\n\n### Instruction:\n{ins}\n\n### Input:\n{inp}\n\n### Response:\n{out}"
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{ins}\n\n### Response:\n{out}"


def _alpaca_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        w, t = rng.choice(WORDS), rng.choice(TOPICS)
        kind = i % 3
        if kind == 0:
            ins, inp, res = f'Write a sentence that uses the word "{w}".', "", f"We walked to the {w} at sunset."
        elif kind == 1:
            ins, inp = "Summarize the following text in one sentence.", f"The {w} was built in {1800 + i}. It is old."
            res = f"The {w} dates from {1800 + i}."
        else:
            ins, inp = f"Give {2 + i % 3} tips for learning {t}.", ""
            res = f"1. Practise {t} daily.\n2. Ask for feedback."
        out.append({"instruction": ins, "input": inp, "output": res, "text": _alpaca_text(ins, inp, res)})
    return out


CODE_ALPACA_FEATURES = Features({k: Value("string") for k in ("instruction", "input", "output")})


def _code_alpaca_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        k = rng.randint(2, 99)
        if i % 2:
            out.append(
                {
                    "instruction": "Write a Python function that returns the largest number in the given list.",
                    "input": str([rng.randint(0, 50) for _ in range(4)]),
                    "output": "def largest(nums):\n    return max(nums)",
                }
            )
        else:
            out.append(
                {
                    "instruction": f"Create a function that adds {k} to a number.",
                    "input": "",
                    "output": f"def add_{k}(x):\n    return x + {k}",
                }
            )
    return out


GSM8K_FEATURES = Features({"question": Value("string"), "answer": Value("string")})
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Mark", "Albert", "Ken", "Alexis", "Tina", "Carla", "John"]
ITEMS = ["clips", "apples", "pages", "marbles", "cookies", "stickers", "pencils", "eggs"]


def _gsm8k_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(10, 99), rng.randint(2, 12)
        if i % 2:
            c = rng.randint(1, a)
            s = a + b
            q = f"{name} had {a} {item}. She got {b} more and then gave {c} to a friend. How many {item} does she have?"
            ans = (
                f"After getting more, {name} had {a} + {b} = <<{a}+{b}={s}>>{s} {item}.\n"
                f"After giving some away, she had {s} - {c} = <<{s}-{c}={s - c}>>{s - c} {item}.\n#### {s - c}"
            )
        else:
            q = f"{name} earns ${a} an hour babysitting. How much does she earn in {b} hours?"
            ans = f"{name} earns {a} * {b} = <<{a}*{b}={a * b}>>{a * b} dollars.\n#### {a * b}"
        out.append({"question": q, "answer": ans})
    return out


MATH_FEATURES = Features({k: Value("string") for k in ("problem", "level", "type", "solution")})
MATH_TYPES = {
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
}
COSINES = {0: "1", 60: "\\frac{1}{2}", 90: "0", 180: "-1", 120: "-\\frac{1}{2}"}


def _math_problem(subject: str, rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 30), rng.randint(31, 90)
    if subject == "algebra":
        return (
            f"If $x + {a} = {b}$, what is the value of $x$?",
            f"Subtracting {a} gives $x = {b} - {a} = \\boxed{{{b - a}}}$.",
        )
    if subject == "counting_and_probability":
        m, k = rng.randint(5, 9), 2
        c = math.comb(m, k)
        return (
            f"In how many ways can {k} books be chosen from {m} different books?",
            f"The number of ways is $\\binom{{{m}}}{{{k}}} = \\boxed{{{c}}}$.",
        )
    if subject == "geometry":
        return (
            f"A rectangle has length ${a}$ cm and width ${b}$ cm. What is its area, in square centimeters?",
            f"The area is ${a} \\cdot {b} = \\boxed{{{a * b}}}$ square centimeters.",
        )
    if subject == "intermediate_algebra":
        return (
            f"Find the sum of the roots of $x^2 - {a + b}x + {a * b} = 0$.",
            f"The roots are ${a}$ and ${b}$, so by Vieta's formulas their sum is $\\boxed{{{a + b}}}$.",
        )
    if subject == "number_theory":
        q, r = divmod(b, a)
        return (
            f"What is the remainder when ${b}$ is divided by ${a}$?",
            f"Since ${b} = {a} \\cdot {q} + {r}$, the remainder is $\\boxed{{{r}}}$.",
        )
    if subject == "prealgebra":
        return f"Compute $\\frac{{{a * b}}}{{{b}}}$.", f"We have $\\frac{{{a * b}}}{{{b}}} = \\boxed{{{a}}}$."
    deg = rng.choice(sorted(COSINES))
    return f"Compute $\\cos {deg}^\\circ$.", f"From the unit circle, $\\cos {deg}^\\circ = \\boxed{{{COSINES[deg]}}}$."


def _math_rows(config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        problem, solution = _math_problem(config, rng)
        level = f"Level {1 + i % 5}"
        out.append({"problem": problem, "level": level, "type": MATH_TYPES[config], "solution": solution})
    return out


MMLU_SUBJECTS = list(MMLU_ROWS)  # cais/mmlu's 57 subject configs (its "all" config: them in this order)
MMLU_FEATURES = Features(
    {
        "question": Value("string"),
        "subject": Value("string"),
        "choices": List(Value("string")),
        "answer": ClassLabel(names=["A", "B", "C", "D"]),
    }
)
MMLU_DEV = 5  # cais/mmlu's dev split: 5 questions per subject (the 5-shot examples)


def _mmlu_sizes(config: str, n: int | None) -> dict[str, int]:
    if config == "all":
        return {s: sum(_mmlu_sizes(sub, n)[s] for sub in MMLU_SUBJECTS) for s in ("test", "validation", "dev")}
    return {"test": _n("cais/mmlu", config, "test", n), "validation": _n("cais/mmlu", config, "validation", n),
            "dev": MMLU_DEV}  # fmt: skip


def _mmlu_parts(split: str, n: int | None) -> list[int]:
    """The subjects' records in "all"'s `split` of n records: their real sizes when n is None or their sum, else n
    split evenly (the small mirror's n_test per subject)."""
    real = [MMLU_DEV if split == "dev" else real_rows("cais/mmlu", s, split) for s in MMLU_SUBJECTS]
    if n is None or n == sum(real):
        return real
    if n % len(MMLU_SUBJECTS):
        raise ValueError(f"cais/mmlu all/{split}: {n} records are neither the real {sum(real)} nor 57 x n_test")
    return [n // len(MMLU_SUBJECTS)] * len(MMLU_SUBJECTS)


def _mmlu_rows(config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    if config == "all":  # the subjects' records, the same ones, one after the other
        parts = zip(MMLU_SUBJECTS, _mmlu_parts(split, n), strict=True)
        return [r for s, k in parts for r in _mmlu_rows(s, split, k, _rng("cais/mmlu", s, split))]
    topic = config.replace("_", " ")
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices, answer = _numeric_choices(rng, a + b)
        q = f"{topic.capitalize()}, exercise {i + 1}: what is the total of {a} and {b}?"
        out.append({"question": q, "subject": config, "choices": choices, "answer": answer})
    return out


MBPP_FEATURES = Features(
    {
        "task_id": Value("int32"),
        "text": Value("string"),
        "code": Value("string"),
        "test_list": List(Value("string")),
        "test_setup_code": Value("string"),
        "challenge_test_list": List(Value("string")),
    }
)
# the real task ids: prompt 1-10, test 11-510, validation 511-600, train 601-974
MBPP_FIRST_ID = {"prompt": 1, "test": 11, "validation": 511, "train": 601}
MBPP_TRAIN = 120  # the small mirror's train (Table 4 draws 100 from it); the real one has 374


def _mbpp_sizes(config: str, n: int | None) -> dict[str, int]:
    train = max(real_rows("google-research-datasets/mbpp", config, "train"), MBPP_TRAIN) if n is None else MBPP_TRAIN
    ev = {s: _n("google-research-datasets/mbpp", config, s, n) for s in ("test", "validation")}
    return {"train": train, **ev, "prompt": real_rows("google-research-datasets/mbpp", config, "prompt")}


def _mbpp_problem(tid: int, k: int) -> tuple[str, str, list[str]]:
    kind = tid % 4
    if kind == 0:
        f = f"add_k_{tid}"
        return (
            f"Write a function to add {k} to a given number.",
            f"def {f}(n):\r\n  return n + {k}",
            [f"assert {f}({x}) == {x + k}" for x in (1, 5, 10)],
        )
    if kind == 1:
        f = f"max_of_list_{tid}"
        lists = [[k, 1, 2], [3, k + 4, 0], [k, k, k + 1]]
        return (
            "Write a python function to find the largest element in a list.",
            f"def {f}(lst):\r\n  return max(lst)",
            [f"assert {f}({lst}) == {max(lst)}" for lst in lists],
        )
    if kind == 2:
        f = f"reverse_string_{tid}"
        words = ["python", "program", f"word{k}"]
        return (
            "Write a function to reverse a given string.",
            f"def {f}(s):\r\n  return s[::-1]",
            [f"assert {f}({w!r}) == {w[::-1]!r}" for w in words],
        )
    f = f"count_multiples_{tid}"
    return (
        f"Write a function to count the numbers from 1 to n that are divisible by {k % 7 + 2}.",
        f"def {f}(n):\r\n  return n // {k % 7 + 2}",
        [f"assert {f}({x}) == {x // (k % 7 + 2)}" for x in (10, 25, 100)],
    )


def _mbpp_rows(_config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for tid in range(MBPP_FIRST_ID[split], MBPP_FIRST_ID[split] + n):
        text, code, tests = _mbpp_problem(tid, rng.randint(2, 40))
        out.append(
            {"task_id": tid, "text": text, "code": code, "test_list": tests, "test_setup_code": "",
             "challenge_test_list": []}
        )  # fmt: skip
    return out


HUMANEVAL_FEATURES = Features(
    {k: Value("string") for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
)


def _humaneval_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        k = rng.randint(1, 9)
        name = f"add_then_scale_{i}"
        prompt = (
            "from typing import List\n\n\n"
            f"def {name}(numbers: List[int]) -> int:\n"
            f'    """ Return the sum of the numbers times {k}.\n'
            f"    >>> {name}([1, 2, 3])\n    {6 * k}\n"
            f"    >>> {name}([])\n    0\n"
            '    """\n'
        )
        test = (
            "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\n"
            "def check(candidate):\n"
            f"    assert candidate([1, 2, 3]) == {6 * k}\n"
            "    assert candidate([]) == 0\n"
            f"    assert candidate([5]) == {5 * k}\n"
        )
        out.append(
            {"task_id": f"HumanEval/{i}", "prompt": prompt, "canonical_solution": f"    return sum(numbers) * {k}\n",
             "test": test, "entry_point": name}
        )  # fmt: skip
    return out


ALPACA_EVAL_DATASETS = ["helpful_base", "koala", "oasst", "selfinstruct", "vicuna"]


def _alpaca_eval_json(n: int | None) -> bytes:
    """tatsu-lab/alpaca_eval's alpaca_eval.json: a JSON list of {instruction, output, generator, dataset}; n records
    (None: the real 805)."""
    n = ALPACA_EVAL_ROWS if n is None else n
    rng = _rng("tatsu-lab/alpaca_eval", "alpaca_eval.json")
    recs = []
    for i in range(n):
        t = rng.choice(TOPICS)
        recs.append(
            {
                "instruction": f"What are {2 + i % 4} good ways to get better at {t}?",
                "output": f"Some ways to get better at {t}:\n1. Practise a little every day.\n2. Find a mentor.",
                "generator": "text_davinci_003",
                "dataset": ALPACA_EVAL_DATASETS[i % len(ALPACA_EVAL_DATASETS)],
            }
        )
    return json.dumps(recs, ensure_ascii=False, indent=4).encode()


# --------------------------------------------------------------------------------------------------- Chinese

CEVAL_FEATURES = Features(
    {"id": Value("int32"), **{k: Value("string") for k in ("question", "A", "B", "C", "D", "answer", "explanation")}}
)
CEVAL_DEV = 5  # ceval/ceval-exam's dev split: 5 questions per subject, with explanations (the 5-shot examples)


def _ceval_rows(config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices, answer = _numeric_choices(rng, a + b)
        letter = "ABCD"[answer]
        rec = {
            "id": i,
            "question": f"（{config}）第{i + 1}题：{a}加{b}等于多少？",
            **dict(zip("ABCD", choices, strict=True)),
        }
        if split == "test":  # C-Eval does not publish its test labels
            rec.update(answer="", explanation="")
        elif split == "dev":
            rec.update(answer=letter, explanation=f"1. {a}加{b}等于{a + b}。\n2. 所以答案是{letter}。")
        else:
            rec.update(answer=letter, explanation="")
        out.append(rec)
    return out


# -------------------------------------------------------------------------------------------------- Japanese

JGLUE_CONFIGS = ("JCommonsenseQA", "JNLI", "JSQuAD", "MARC-ja")  # the ones the leaderboard reads (JSTS is not)
JGLUE_FEATURES = {  # Rakuten/JGLUE, as the JGLUE loading script defines them
    "JCommonsenseQA": Features(
        {
            "q_id": Value("int64"),
            "question": Value("string"),
            **{f"choice{i}": Value("string") for i in range(5)},
            "label": ClassLabel(names=[f"choice{i}" for i in range(5)]),
        }
    ),
    "JNLI": Features(
        {
            "sentence_pair_id": Value("string"),
            "yjcaptions_id": Value("string"),
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=["entailment", "contradiction", "neutral"]),
        }
    ),
    "JSQuAD": Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
            "is_impossible": Value("bool"),
        }
    ),
    "MARC-ja": Features(
        {
            "sentence": Value("string"),
            "label": ClassLabel(names=["positive", "negative", "neutral"]),
            "review_id": Value("string"),
        }
    ),
}
JCQA_ITEMS = [  # question, answer, distractors
    ("冬に着る温かい服は？", "セーター", ["水着", "サンダル", "麦わら帽子", "日傘"]),
    ("海が陸地に入り込んでいる所を何と言う？", "湾", ["山", "川", "森", "丘"]),
    ("国と国の境目は？", "国境", ["国会", "隣人", "道路", "校庭"]),
    ("火を起こすと出てくるものは？", "煙", ["雪", "氷", "虹", "霧雨"]),
    ("本を借りる場所は？", "図書館", ["郵便局", "銀行", "駅", "病院"]),
    ("雨の日にさすものは？", "傘", ["靴", "鉛筆", "時計", "財布"]),
    ("朝に食べる食事は？", "朝ごはん", ["夕食", "夜食", "おやつ", "昼ごはん"]),
    ("手紙を出すときに貼るものは？", "切手", ["写真", "付箋", "名札", "地図"]),
]
JNLI_SCENES = [
    ("男性", "公園", "走って", "歩いて"),
    ("女の子", "台所", "料理をして", "寝て"),
    ("犬", "芝生の上", "遊んで", "座って"),
    ("少年", "海辺", "泳いで", "本を読んで"),
]
JSQUAD_FACTS = [  # title, sentence, question, answer (the answer occurs in the sentence)
    ("富士山", "富士山は静岡県と山梨県にまたがる日本最高峰の山である。", "日本で最も高い山は何ですか？", "富士山"),
    ("新幹線", "新幹線は1964年に東京と新大阪の間で開業した。", "新幹線が開業したのは何年ですか？", "1964年"),
    ("梅雨", "梅雨は主に6月から7月にかけて続く雨の季節である。", "梅雨は主に何月から始まりますか？", "6月"),
    ("琵琶湖", "琵琶湖は滋賀県にある日本最大の湖である。", "琵琶湖はどこにありますか？", "滋賀県"),
    ("法隆寺", "法隆寺は奈良県にある世界最古の木造建築群である。", "法隆寺はどこにありますか？", "奈良県"),
    ("将棋", "将棋は二人で行う盤上遊戯で、駒は40枚ある。", "将棋の駒は何枚ありますか？", "40枚"),
    ("桜", "桜は春に咲く花で、日本の国花の一つとされる。", "桜はどの季節に咲きますか？", "春"),
    (
        "北海道",
        "北海道は日本の最北にある島で、札幌市が道庁所在地である。",
        "北海道の道庁所在地はどこですか？",
        "札幌市",
    ),
]
MARC_REVIEWS = {
    0: ["とても使いやすくて満足しています。", "期待以上の品質でした。", "音がきれいで気に入りました。"],
    1: ["すぐに壊れてしまいました。残念です。", "説明と違う商品が届きました。", "サイズが合わず使えませんでした。"],
}


def _jglue_sizes(config: str, n: int | None) -> dict[str, int]:
    # JCommonsenseQA train: the jp validation draw (218) and the dev task past the first DEV_SKIP of it
    train = _dev_train("Rakuten/JGLUE", config, n) if config == "JCommonsenseQA" else FEWSHOT
    return {"train": train, "validation": _n("Rakuten/JGLUE", config, "validation", n)}


def _jglue_rows(config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    out: list[Record] = []
    for i in range(n):
        if config == "JCommonsenseQA":
            q, ans, wrong = JCQA_ITEMS[i % len(JCQA_ITEMS)]
            if i >= len(JCQA_ITEMS):  # numbered variants: each record its own question
                q = f"{q}（問{i + 1}）"
            choices = [ans, *rng.sample(wrong, 4)]
            rng.shuffle(choices)
            opts = {f"choice{j}": c for j, c in enumerate(choices)}
            out.append({"q_id": i, "question": q, **opts, "label": choices.index(ans)})
        elif config == "JNLI":
            who, where, act, other = JNLI_SCENES[i % len(JNLI_SCENES)]
            label = rng.randrange(3)
            s2 = [f"{who}が{act}いる。", f"{who}が{where}で{other}いる。", f"{who}が{where}で友達と{act}いる。"][label]
            cap = [rng.randint(10000, 99999) for _ in range(3)]
            out.append(
                {"sentence_pair_id": str(i), "yjcaptions_id": "-".join(map(str, cap)),
                 "sentence1": f"{who}が{where}で{act}いる。", "sentence2": s2, "label": label}
            )  # fmt: skip
        elif config == "JSQuAD":
            title, sent, q, ans = JSQUAD_FACTS[i % len(JSQUAD_FACTS)]
            context = f"{title} [SEP] {sent}"
            out.append(
                {"id": f"a{rng.randint(10**9, 10**10 - 1)}p0q{i % 3}", "title": title, "context": context,
                 "question": q, "answers": {"text": [ans], "answer_start": [context.index(ans)]},
                 "is_impossible": False}
            )  # fmt: skip
        else:  # MARC-ja: positive and negative reviews only (the leaderboard's two choices)
            label = i % 2
            rid = "R" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(13))
            out.append({"sentence": rng.choice(MARC_REVIEWS[label]), "label": label, "review_id": rid})
    return out


JAQKET_FEATURES = Features(  # kumapo/JAQKET v2.0: answers and ctxs are sequences of dicts (stored as dicts of lists)
    {
        "qid": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        "ctxs": {
            "id": List(Value("string")),
            "title": List(Value("string")),
            "text": List(Value("string")),
            "score": List(Value("float32")),
            "has_answer": List(Value("bool")),
        },
    }
)


def _jaqket_rows(_config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        title, sent, q, ans = JSQUAD_FACTS[i % len(JSQUAD_FACTS)]
        others = [f for f in JSQUAD_FACTS if f[0] != title]
        ctx = [(title, sent, True)] + [(t, s, False) for t, s, _, _ in rng.sample(others, 3)]
        ctx.append((title, f"{title}については多くの資料がある。", False))
        out.append(
            {
                "qid": f"QA20{'CAPR' if split == 'train' else 'QBIK'}-{i:04d}",
                "question": f"クイズ：{q}",
                "answers": {"text": [ans], "answer_start": [-1]},  # -1: the loading script's placeholder
                "ctxs": {
                    "id": [str(rng.randint(10**6, 10**7)) for _ in ctx],
                    "title": [t for t, _, _ in ctx],
                    "text": [s for _, s, _ in ctx],
                    "score": [round(80.0 - 2.5 * j, 2) for j in range(len(ctx))],
                    "has_answer": [h for _, _, h in ctx],
                },
            }
        )
    return out


MGSM_FEATURES = Features(
    {
        "question": Value("string"),
        "answer": Value("string"),
        "answer_number": Value("int32"),
        "equation_solution": Value("string"),
    }
)
MGSM_TRAIN = 8  # juletxara/mgsm's train split: the 8 worked exemplars


def _mgsm_rows(_config: str, split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for _ in range(n):
        name = rng.choice(["太郎", "花子", "健太", "美咲"])
        a, b = rng.randint(3, 40), rng.randint(2, 20)
        q = f"{name}さんはりんごを{a}個持っています。{b}個もらいました。りんごは全部で何個ですか？"
        if split == "train":  # worked exemplars; the test split has only the question and the number
            out.append(
                {"question": f"問題：{q}", "answer_number": a + b, "equation_solution": f"{a} + {b} = {a + b}",
                 "answer": f"ステップごとの答え：{name}さんは{a}個持っていて、{b}個もらいました。"
                 f"{a} + {b} = {a + b}。答えは{a + b}です。"}
            )  # fmt: skip
        else:
            out.append({"question": q, "answer": None, "answer_number": a + b, "equation_solution": None})
    return out


XLSUM_FEATURES = Features({k: Value("string") for k in ("id", "url", "title", "summary", "text")})
XLSUM_TOPICS = [("台風", "九州に上陸し、交通機関に大きな影響が出た"), ("選挙", "投票率が前回を上回った"),
                ("経済", "円相場が大きく動いた"), ("科学", "新しい探査機の打ち上げに成功した")]  # fmt: skip


def _xlsum_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        topic, event = XLSUM_TOPICS[i % len(XLSUM_TOPICS)]
        aid = f"{rng.choice(['world', 'japan', 'science'])}-{rng.randint(10**7, 10**8 - 1)}"
        out.append(
            {"id": aid, "url": f"https://www.bbc.com/japanese/{aid}", "title": f"{topic}、{event}",
             "summary": f"{topic}について、{event}。", "text": f"{topic}に関するニュースです。{event}。"
             f"関係者によると、状況は{i + 1}日ほど続く見通しだ。専門家は今後も注意が必要だと話している。"}
        )  # fmt: skip
    return out


XWINOGRAD_FEATURES = Features({"sentence1": Value("string"), "sentence2": Value("string"), "answer": Value("string")})
XWINOGRAD_PAIRS = [  # (thing, container): the sentence where the thing does not fit because it is too big is right
    ("トロフィー", "スーツケース"), ("ピアノ", "エレベーター"), ("ソファ", "ドア"), ("本棚", "車"),
]  # fmt: skip


def _xwinograd_rows(_config: str, _split: str, n: int, rng: random.Random) -> list[Record]:
    out = []
    for i in range(n):
        thing, box = XWINOGRAD_PAIRS[i % len(XWINOGRAD_PAIRS)]
        right = f"{thing}は{box}に入らなかった。{thing}が大きすぎたからだ。"
        wrong = f"{thing}は{box}に入らなかった。{box}が大きすぎたからだ。"
        first = rng.random() < 0.5
        s1, s2 = (right, wrong) if first else (wrong, right)
        out.append({"sentence1": s1, "sentence2": s2, "answer": "1" if first else "2"})
    return out


# ----------------------------------------------------------------------------------------------------- specs


def _math_sizes(config: str, n: int | None) -> dict[str, int]:
    # the dev task reads the seven subjects' train splits together past the first DEV_SKIP of their permutation
    if n is None:
        return dict(REAL_ROWS["EleutherAI/hendrycks_math"][config])
    return {"train": math.ceil((DEV_SKIP + n) / len(MATH_SUBJECTS)), "test": n}


def _gsm8k_sizes(config: str, n: int | None) -> dict[str, int]:
    return {"train": _dev_train("openai/gsm8k", config, n), "test": _n("openai/gsm8k", config, "test", n)}


_SPECS = [
    DatasetSpec(
        "tatsu-lab/alpaca", ("default",), ALPACA_FEATURES, _fixed("tatsu-lab/alpaca", train=100), _alpaca_rows,
        source="dataset card (parquet, no named config)",
    ),
    DatasetSpec(
        "sahil2801/CodeAlpaca-20k", ("default",), CODE_ALPACA_FEATURES,
        _fixed("sahil2801/CodeAlpaca-20k", train=100), _code_alpaca_rows,
        source="its JSON file's fields (no dataset card features)",
    ),
    DatasetSpec(
        "cais/mmlu", ("all", *MMLU_SUBJECTS), MMLU_FEATURES, _mmlu_sizes, _mmlu_rows,
        source="dataset card; auxiliary_train (config and split) left out: nothing reads it",
    ),
    DatasetSpec(
        "openai/gsm8k", ("main",), GSM8K_FEATURES, _gsm8k_sizes, _gsm8k_rows,
        source="dataset card; the socratic config left out: nothing reads it",
    ),
    DatasetSpec(
        "EleutherAI/hendrycks_math", tuple(MATH_SUBJECTS), MATH_FEATURES, _math_sizes, _math_rows,
        source="dataset card",
    ),
    DatasetSpec(
        "google-research-datasets/mbpp", ("full",), MBPP_FEATURES, _mbpp_sizes, _mbpp_rows,
        source="dataset card; the sanitized config left out: nothing reads it",
    ),
    DatasetSpec(
        "openai/openai_humaneval", ("openai_humaneval",), HUMANEVAL_FEATURES,
        _fixed("openai/openai_humaneval", test=0), _humaneval_rows,
        source="dataset card (its one config is named openai_humaneval)",
    ),
    DatasetSpec(
        "ceval/ceval-exam", tuple(CEVAL_SUBJECTS), CEVAL_FEATURES,
        _fixed("ceval/ceval-exam", test=N_TEST, val=0, dev=CEVAL_DEV), _ceval_rows,
        source="dataset card; test (unlabelled, nothing scores it) kept at N_TEST records",
    ),
    DatasetSpec(
        "Rakuten/JGLUE", JGLUE_CONFIGS, JGLUE_FEATURES, _jglue_sizes, _jglue_rows,
        source="the JGLUE loading script's features (shunk031/JGLUE); guessed: that Rakuten's copy keeps them, "
        "MARC-ja's three label names included; JSTS left out",
    ),
    DatasetSpec(
        "kumapo/JAQKET", ("v2.0",), JAQKET_FEATURES, _fixed("kumapo/JAQKET", train=FEWSHOT, validation=0),
        _jaqket_rows,
        source="its loading script (v2.0 features); v1.0 left out",
    ),
    DatasetSpec(
        "juletxara/mgsm", ("ja",), MGSM_FEATURES, _fixed("juletxara/mgsm", train=MGSM_TRAIN, test=0), _mgsm_rows,
        source="its loading script; the other languages left out",
    ),
    DatasetSpec(
        "mkshing/xlsum_ja", ("default",), XLSUM_FEATURES,
        _fixed("mkshing/xlsum_ja", train=FEWSHOT, validation=0, test=0), _xlsum_rows,
        source="guessed from XL-Sum's fields (id, url, title, summary, text) and lm-eval's task",
    ),
    DatasetSpec(
        "polm-stability/xwinograd-ja", ("default",), XWINOGRAD_FEATURES,
        _fixed("polm-stability/xwinograd-ja", test=0), _xwinograd_rows,
        source="guessed from lm-eval's task (sentence1, sentence2, answer '1'/'2' as a string: int(answer) - 1)",
    ),
]  # fmt: skip
SPECS: dict[str, DatasetSpec] = {s.repo_id: s for s in _SPECS}
HUB_FILES: dict[str, HubFileSpec] = {
    "tatsu-lab/alpaca_eval": HubFileSpec("tatsu-lab/alpaca_eval", "alpaca_eval.json", "dataset", _alpaca_eval_json)
}


def features_of(spec: DatasetSpec, config: str) -> Features:
    """A config's features (JGLUE's differ per config)."""
    return spec.features if isinstance(spec.features, Features) else spec.features[config]


def records(repo_id: str, config: str, split: str, n_test: int | None = None) -> list[Record]:
    """The records write_datasets writes for one split (deterministic); n_test as write_datasets'."""
    spec = SPECS[repo_id]
    n = spec.sizes(config, n_test)[split]
    return spec.rows(config, split, n, _rng(repo_id, config, split))


def write_datasets(home: str | Path, n_test: int | None = None, only: Collection[str] | None = None) -> list[Written]:
    """Write every dataset (and hub file) the real experiments read into `home` (an HF_HOME): each config of
    SPECS into datasets' processed cache, each of HUB_FILES into the hub cache. `only`: those repo ids alone.
    n_test None (the default): every evaluated split at its real size (REAL_ROWS); an int (e.g. N_TEST): the small
    mirror, n_test records per evaluated split. Returns what was written, in order. Deterministic; rewriting
    replaces each config whole."""
    if n_test is not None and n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    unknown = set(only or ()) - set(SPECS) - set(HUB_FILES)
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(sorted(unknown))}; known: {', '.join([*SPECS, *HUB_FILES])}")
    home = Path(home)
    out: list[Written] = []
    for repo_id, spec in SPECS.items():
        if only is not None and repo_id not in only:
            continue
        for config in spec.configs:
            splits = {s: records(repo_id, config, s, n_test) for s in spec.sizes(config, n_test)}
            path = write_processed(home, repo_id, config, splits, features_of(spec, config))
            out.append(Written("dataset", repo_id, config, {s: len(r) for s, r in splits.items()}, path))
    for repo_id, f in HUB_FILES.items():
        if only is not None and repo_id not in only:
            continue
        data = f.content(n_test)
        with tempfile.TemporaryDirectory(prefix="obim-hubfile-") as tmp:
            (Path(tmp) / f.filename).write_bytes(data)
            snap = write_repo(home / "hub", repo_id, tmp, f.repo_type)
        out.append(
            Written("hub file", repo_id, None, {"records": len(json.loads(data))}, snap / f.filename, f.filename)
        )
    return out


__all__ = [
    "ALPACA_EVAL_ROWS",
    "DEV_SKIP",
    "HUB_FILES",
    "N_TEST",
    "REAL_ROWS",
    "SIZE_SOURCES",
    "SPECS",
    "DatasetSpec",
    "HubFileSpec",
    "Written",
    "features_of",
    "processed_dir",
    "real_rows",
    "records",
    "write_datasets",
]
