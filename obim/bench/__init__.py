"""The benchmark harness on top of obim.merging: sweep plans and job stages, content-addressed caches, validation
sets from datasets, lm-eval evaluation (toy and paper tasks), judging, tracking, tables and figures, the toy zoo."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config tree (the repository's conf/), shipped inside the package as obim/conf: found the same way
    from a source checkout, an editable install and a wheel."""
    return Path(__file__).resolve().parent.parent / "conf"
