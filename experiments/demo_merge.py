"""The main job until the sweep lands: the whole merge path on tiny local models, offline, in about a minute.

Makes a tiny Llama base and three 'fine-tunes' (seeded noise on the base), computes OBM saliency statistics from a
small validation file, merges them with OBIM and every baseline through the same Python API the sweep will call,
checks that each merged model loads and generates with transformers, and prints a table.

    python experiments/demo_merge.py [--workdir DIR] [--methods obim ties ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from obim import METHODS, merge
from obim.bench.zoo.tiny import make_llama

TEXTS = [
    "what is 2+3? 5",
    "the cat sat on the mat.",
    "def f(x): return x*2",
    "12*3=36 #### 36",
    "hello world, this is a sample",
    "7-4=3",
    "a, b, c.",
    "def g(): return 1",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/obim-demo")
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    base = make_llama(root / "models" / "base", 0, hidden=128, head_dim=64, layers=4)
    experts = {
        n: make_llama(root / "models" / n, i, base=base, hidden=128, head_dim=64, layers=4)
        for i, n in enumerate(["lm", "math", "code"], 1)
    }
    val = root / "validation.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    print(f"made base + {len(experts)} fine-tunes in {time.perf_counter() - t0:.1f} s under {root / 'models'}")

    retention = {"lm": 0.4, "math": 0.45, "code": 0.1}  # the paper's Table 8 setting
    rows = []
    for method in args.methods:
        config = {
            "method": method,
            "base_model": str(base),
            "order": ["lm", "math", "code"],
            "seed": 0,
            "models": [
                {
                    "name": n,
                    "path": str(p),
                    "retention": retention[n],
                    "validation": {"data": str(val), "batch_size": 4},
                }
                for n, p in experts.items()
            ],
        }
        res = merge(config, root / "merged" / method, progress=False)
        model = AutoModelForCausalLM.from_pretrained(res.out_dir)
        tok = AutoTokenizer.from_pretrained(res.out_dir)
        ids = tok("2+2=", return_tensors="pt").input_ids
        text = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0][ids.shape[1] :])
        rows.append((method, res.saliency_s, res.merge_s, text))
    print("\n| method | saliency (s) | merge (s) | greedy continuation of '2+2=' (random weights) |")
    print("|---|---:|---:|---|")
    for method, sal, mer, text in rows:
        print(f"| {method} | {sal:.2f} | {mer:.2f} | {text!r} |")
    print(
        f"\n{len(rows)} merged models under {root / 'merged'}, each loads and generates with transformers; "
        f"total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
