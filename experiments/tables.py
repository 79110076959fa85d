"""Write the paper's tables from sweep results: `python experiments/tables.py [EXPERIMENT ...]`.

Reads every result.json under multirun/<experiment>/ and writes outputs/tables/<experiment>/<table>.md|csv (in the
paper's layout, the paper's numbers beside ours), a PNG plot beside each axis table (<table>.png; figure3.png when
the number of merged models was swept), and jobs.md (every job with its costs). The sweep runs this itself when it
ends. `--replot DIR` redraws the plots in DIR from its tables' CSV files alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from obim.bench.report.write import write_tables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*", help="experiment names (default: every folder under --runs)")
    ap.add_argument("--runs", default="multirun", help="sweep root (hydra.sweep.dir's parent)")
    ap.add_argument("--out", default="outputs/tables", help="tables root (results: the committed reference tables)")
    ap.add_argument("--replot", metavar="DIR", help="redraw the axis plots in DIR from its <table>.csv files")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="these are the reference results: also record their zoo draws and spread in obim/bench/zoo/reference.json",
    )
    args = ap.parse_args(argv)
    if args.replot:
        from obim.bench.report.plots import replot

        for p in replot(Path(args.replot)):
            print(p)
        return 0
    runs = Path(args.runs)
    names = args.experiments or sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if not names:
        print(f"tables: error: no results under {runs}", file=sys.stderr)
        return 1
    from obim.merging.errors import ObimError

    failed = False
    for name in names:
        try:
            written = write_tables(runs / name, Path(args.out) / name, reference=args.reference)
        except ObimError as e:  # one line; the other experiments' tables are still written
            print(f"tables: error: {e}", file=sys.stderr)
            failed = True
            continue
        if not written:
            print(f"tables: {runs / name}: no result.json found", file=sys.stderr)
        for p in written:
            print(p)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
