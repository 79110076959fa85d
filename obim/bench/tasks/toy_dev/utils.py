"""The toy dev tasks' dataset and scorers: the same generators and scorers as the toy test tasks (../utils.py), drawn
from the `dev` split (obim.bench.zoo.data splits every example 70/10/20 train/dev/test by a hash of its prompt).

They live in a folder of their own beside the test tasks; the evaluation cache keys each task by its own files
(obim.bench.evaluation.tasks_digest).
"""

from __future__ import annotations

from obim.bench.tasks.utils import EVAL_SEED, process_gsm8k, process_math, process_mbpp

# the task YAMLs here name these scorers as utils.<name> (lm-eval's !function)
__all__ = ["process_gsm8k", "process_math", "process_mbpp", "toy_dev_dataset"]


def toy_dev_dataset(task: str, n: int = 50, **_):
    """A DatasetDict with the `dev` split of a toy task (lm-eval's custom_dataset hook)."""
    import datasets

    from obim.bench.zoo import data

    make = data.SFT_TASKS[task] if task in data.SFT_TASKS else data.LANGS[task].cloze
    records = [ex.record() for ex in data.examples(make, "dev", n, EVAL_SEED)]
    return datasets.DatasetDict({"dev": datasets.Dataset.from_list(records)})
