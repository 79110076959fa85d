"""Make the committed reference results: `python experiments/reference.py [--draws 0,1,2] [--search]`.

Runs every toy sweep of the paper's tables over the zoo draws (each draw's zoo built on first use), then writes the
tables, claims and plots into results/<experiment>/ with `experiments/tables.py --reference` (which records the
draws' fingerprints and spread in obim/bench/zoo/reference.json) and each draw's zoo report into
results/toy/zoo.md. Its zoos and caches live under --root (default outputs/reference), apart from a user's own;
the sweeps' job folders under <root>/multirun. Hours of CPU on a laptop: the README says how long it took here.
`--search` adds the search's tuned Table 1 on each draw: Table 1's methods and those beyond the paper (the 14 of
`+paper=table1_plus`), 20 trials each per draw; its untuned column is table1_plus's (the same draws).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = [  # (experiment, the sweep's own overrides): the default sweep, then each paper preset's toy form
    ("toy_sft", []),
    ("toy_sft", ["+paper=table1"]),  # Breadcrumbs (the others are the default sweep's jobs, reused)
    ("toy_sft", ["+paper=table4"]),
    ("toy_sft", ["+paper=table5"]),
    ("toy_sft", ["+paper=table6"]),
    ("toy_sft", ["+paper=table1_plus"]),  # the methods beyond the paper (Table 1's own jobs reused)
    ("toy_pt", []),
    ("toy_pt", ["+paper=table2"]),  # Breadcrumbs
    ("toy_pt", ["+paper=table11"]),
]


def tuned_methods() -> list[str]:
    """The tuned table's methods, the same budget each: `+paper=table1_plus`'s (Table 1's and those beyond it)."""
    import yaml

    conf = yaml.safe_load((REPO / "conf" / "paper" / "table1_plus.yaml").read_text())
    return str(conf["hydra"]["sweeper"]["params"]["method"]).split(",")


def run(cmd: list[str], env: dict[str, str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", default="0,1,2", help="zoo seeds, comma-separated (at least 3 for the reference)")
    ap.add_argument("--root", default="outputs/reference", help="the reference's zoos, caches and job folders")
    ap.add_argument("--out", default="results", help="where the tables go (results: the committed reference)")
    ap.add_argument("--search", action="store_true", help="also the search's tuned Table 1 on each draw")
    args = ap.parse_args(argv)
    draws = [int(d) for d in args.draws.split(",")]
    root = (REPO / args.root).resolve()
    env = {
        **os.environ,
        "OBIM_ZOO": str(root / "zoo"),
        "OBIM_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "HF_ALLOW_CODE_EVAL": "1",
    }
    py, seeds = sys.executable, f"experiment.zoo_seed={args.draws}"
    timings: list[tuple[str, float]] = []
    for experiment, extra in SWEEPS:
        cmd = [py, "experiments/sweep.py", "-m", *extra, f"experiment={experiment}", seeds, "progress=false"]
        cmd += [f"hydra.sweep.dir={root / 'multirun' / experiment}", f"results_dir={root / 'tables'}"]
        timings.append((" ".join([experiment, *extra]), run(cmd, env)))
    if args.search:
        for d in draws:
            cmd = [py, "experiments/search.py", f"experiment.zoo_seed={d}", f"results_dir={root / 'search' / str(d)}"]
            cmd += [f"search.dir={root / 'search' / str(d) / 'study'}", f"search.methods=[{','.join(tuned_methods())}]"]
            timings.append((f"search, draw {d}", run(cmd, env)))
    cmd = [py, "experiments/tables.py", "--reference", "--runs", str(root / "multirun"), "--out", args.out]
    run(cmd, env)
    if args.search:  # after the untuned tables: their averages are the tuned table's `untuned avg`
        sys.path.insert(0, str(REPO))
        from obim.bench.report.search_report import tuned_over_draws

        dirs = [root / "search" / str(d) / "study" for d in draws]
        for p in tuned_over_draws(dirs, REPO / args.out / "toy_sft", ("table1_plus.csv",)):
            print(p)
    zoo_md = [
        "# The toy zoo's draws",
        "",
        "Each draw's build report (`obim-zoo build --seed K`): the models' scores, the experts' gains, and what the "
        "mergeability probes keep.",
    ]
    for d in draws:
        z = root / ("zoo" if d == 0 else f"zoo-seed{d}")
        zoo_md += ["", f"## Draw {d}", "", (z / "zoo.md").read_text().strip()]
    (REPO / args.out / "toy").mkdir(parents=True, exist_ok=True)
    (REPO / args.out / "toy" / "zoo.md").write_text("\n".join(zoo_md) + "\n")
    print("\n".join(f"{name}: {s / 60:.1f} min" for name, s in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
