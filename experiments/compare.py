"""Compare two evaluations of a sweep item by item: `python experiments/compare.py RUNS A B`.

RUNS is a sweep folder (multirun/toy_sft); A and B name a method (the latest job of the main setting that ran it:
obim, ties), a job (its folder or name: 3), or a model the jobs evaluated on their own (base, math; math@3 from job
3). Prints each benchmark's scores, A - B and its paired-bootstrap interval over the items both evaluated, and the
average's; `*` marks an interval that excludes 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from obim.bench.report import compare, paired
    from obim.merging.errors import ObimError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a sweep folder (its result.json files, searched recursively)")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--resamples", type=int, default=paired.RESAMPLES, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=paired.SEED)
    ap.add_argument("--level", type=float, default=paired.LEVEL, help="the interval's coverage, in (0, 1)")
    args = ap.parse_args(argv)
    if args.resamples < 100:
        ap.error(f"--resamples: at least 100, got {args.resamples}")
    if not 0 < args.level < 1:
        ap.error(f"--level: in (0, 1), got {args.level}")
    try:
        print(compare.main(args.runs, args.a, args.b, args.resamples, args.seed, args.level))
    except ObimError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
