"""Datasets and scorers of the paper's dev tasks (the search's objective on the real models; see the experiments'
`dev_benchmarks`). A train slice starts past the first `skip` records of the permutation the saliency validation
draw uses (obim.bench.validation.draw_order over the split's records, in the order of the dataset's configs),
so no dev sample is a validation sample while a model draws at most `skip`
(obim.bench.dev.plan_dev checks it). They read the hub datasets; the rehearsal runs them on its offline mirror
(docs/rehearsal.md).
"""

from __future__ import annotations

from obim.bench.tasks.paper.utils import mbpp_fewshot_samples, process_gsm8k_cot, process_math_cot, process_mbpp
from obim.bench.validation import MATH_SUBJECTS, draw_order  # the same subjects and draw as the saliency sets

# the task YAMLs here name these as utils.<name> (lm-eval's !function)
__all__ = [
    "gsm8k_dev",
    "jcqa_dev",
    "math_dev",
    "mbpp_fewshot_samples",
    "process_gsm8k_cot",
    "process_math_cot",
    "process_mbpp",
]


def _past_validation(path: str, names: list, split: str, source: str, skip: int, seed: int, n: int):
    import datasets

    recs = []
    for name in names:
        recs += list(datasets.load_dataset(path, name, split=split))
    order = draw_order(len(recs), source, seed)
    return datasets.DatasetDict({"dev": datasets.Dataset.from_list([recs[i] for i in order[skip : skip + n]])})


def gsm8k_dev(skip: int = 1000, seed: int = 0, n: int = 500, **_):
    return _past_validation("openai/gsm8k", ["main"], "train", "gsm8k", skip, seed, n)


def math_dev(skip: int = 1000, seed: int = 0, n: int = 500, **_):
    return _past_validation("EleutherAI/hendrycks_math", MATH_SUBJECTS, "train", "math", skip, seed, n)


def jcqa_dev(skip: int = 1000, seed: int = 0, n: int = 500, **_):
    ds = _past_validation("Rakuten/JGLUE", ["JCommonsenseQA"], "train", "jp", skip, seed, n)
    return ds.map(lambda d: {"choices": [d[f"choice{i}"] for i in range(5)]})
