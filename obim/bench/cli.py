"""Console script of the harness: obim-zoo (the toy zoo). The merging library's scripts are in obim.merging.cli."""

from __future__ import annotations

import argparse
from pathlib import Path

from obim.merging.cli import run_cli


def zoo_main(argv: list[str] | None = None) -> int:
    from obim.merging.threads import configure

    configure()
    ap = argparse.ArgumentParser(prog="obim-zoo", description="The toy zoo: tiny models trained here, offline.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "build", help="build the zoo (or reuse it when built by the same recipe); prints its directory on the last line"
    )
    b.add_argument("--out", default=None, help="zoo directory (default: $OBIM_ZOO, else ~/.cache/obim/zoo)")
    b.add_argument("--quick", action="store_true", help="a few training steps only: the layout in seconds")
    b.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the zoo's draw (experiment.zoo_seed): another seed builds an independent zoo; its default directory is "
        "the default one with -seed<k> appended",
    )
    b.add_argument("--no-eval", action="store_true", help="skip the lm-eval table")
    b.add_argument("--table", default=None, help="also write the evaluation table (markdown) to this file")
    b.add_argument(
        "--allow-code",
        action="store_true",
        help="score the code benchmarks, which execute "
        "model-generated code in obim's sandbox (as HF_ALLOW_CODE_EVAL=1)",
    )
    b.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def go():
        from obim.merging.errors import ObimError

        from .zoo import RECIPE, build, default_dir, quick_recipe, seeded

        if args.seed < 0:
            raise ObimError(f"--seed: expected a non-negative integer, got {args.seed}")
        root = build(
            args.out or default_dir(args.seed),
            recipe=seeded(quick_recipe() if args.quick else RECIPE, args.seed),
            evaluate=not args.no_eval,
            allow_code=args.allow_code,
            progress=not args.quiet,
        )
        if args.table and (root / "zoo.md").exists():
            Path(args.table).parent.mkdir(parents=True, exist_ok=True)
            Path(args.table).write_text((root / "zoo.md").read_text())
        print(root)

    return run_cli("obim-zoo", go)
