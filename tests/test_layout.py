"""The merging library imports nothing from the benchmark harness: every module of obim.merging loads, and a merge
with OBM saliency runs through the package API, while obim.bench cannot be imported; nor does it load lm-eval,
Hydra, W&B or matplotlib. The models are built here, by the harness's tiny builder, before the blocked child runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import make_llama

CHILD = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys
    from pathlib import Path

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "obim.bench" or name.startswith("obim.bench."):
                raise ImportError(f"the merging library imported {name}")

    HARNESS_LIBS = ("lm_eval", "hydra", "wandb", "matplotlib")  # probed by transformers, never imported
    sys.meta_path.insert(0, Block())
    import obim
    import obim.merging
    for m in pkgutil.iter_modules(obim.merging.__path__):
        importlib.import_module(f"obim.merging.{m.name}")

    root = Path(sys.argv[1])
    base, experts = root / "base", [root / n for n in "ab"]
    cfg = {"method": "obim", "base_model": str(base), "seed": 0,
           "models": [{"name": p.name, "path": str(p), "retention": 0.5, "validation": {"data": str(root / "v.jsonl")}}
                      for p in experts]}
    res = obim.merge(cfg, root / "out", progress=False)
    assert (Path(res.out_dir) / "model.safetensors").is_file()
    print(sorted(m for m in sys.modules if m.startswith("obim.") or m.split(".")[0] in HARNESS_LIBS))
""")


def test_merging_library_imports_nothing_from_the_harness(tmp_path):
    base = make_llama(tmp_path / "base", 0, hidden=32, head_dim=16, layers=1)
    for i, n in enumerate("ab", 1):
        make_llama(tmp_path / n, i, base=base, hidden=32, head_dim=16, layers=1)
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "abc 12"}) + "\n")
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = eval(p.stdout.strip().splitlines()[-1])
    assert "obim.merging.merge" in loaded
    # no harness module or library
    assert [m for m in loaded if not m.startswith("obim.merging")] == []


def test_tasks_dir_stays_on_the_package():
    """spec/interfaces.md section 5: obim.tasks_dir() is the folder to give lm-eval's TaskManager (loaded from the
    harness on first use)."""
    from pathlib import Path

    import obim

    root = Path(obim.tasks_dir())
    assert (root / "toy_gsm8k.yaml").is_file() and (root / "paper" / "obim_gsm8k_cot.yaml").is_file()
