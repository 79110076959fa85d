"""Console scripts: obim-merge and obim-saliency (interfaces.md sections 1-3)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ObimError


def _run(prog: str, fn) -> int:
    from .checkpoint import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            fn()
    except ObimError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (checkpoint.Terminated): staged output is removed
        from .checkpoint import Terminated

        term = isinstance(e, Terminated)
        print(f"{prog}: {'terminated' if term else 'interrupted'}; nothing was written", file=sys.stderr)
        return 143 if term else 130
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    from .threads import configure

    configure()
    from .methods import METHODS

    ap = argparse.ArgumentParser(
        prog="obim-merge", description="Merge fine-tuned models into their base with a registered method.",
        epilog="methods: " + ", ".join(sorted(METHODS)))
    ap.add_argument("config", help="merge config YAML (see README)")
    ap.add_argument("out_dir", help="output model directory (written to a temporary directory, then renamed)")
    ap.add_argument("--device", default="cpu", help="where the per-tensor arithmetic runs: cpu or cuda[:N]")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    def go():
        from .merge import merge

        res = merge(args.config, args.out_dir, device=args.device, overwrite=args.overwrite,
                    progress=not args.quiet)
        print(f"merged {res.tensors} tensors ({res.bytes_written / 1e9:.2f} GB) in {res.merge_s:.1f} s "
              f"(saliency {res.saliency_s:.1f} s) -> {res.out_dir}")

    return _run("obim-merge", go)


def saliency_main(argv: list[str] | None = None) -> int:
    from .threads import configure

    configure()
    ap = argparse.ArgumentParser(
        prog="obim-saliency",
        description="Compute OBM saliency statistics (the hdiag file: mean x² per input feature of every nn.Linear).")
    ap.add_argument("model", help="model directory or hub id")
    ap.add_argument("out", help="output .safetensors file")
    ap.add_argument("--data", required=True, help="JSONL validation file (one sample per line)")
    ap.add_argument("--size", type=int, default=None, help="number of samples (default: all)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per sample (truncation)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="load dtype: float32, bfloat16, float16 (default: the model's)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def go():
        from .checks import device_check, require
        from .saliency import compute_hdiag, save_hdiag
        from .validation import read_texts

        require("--device", args.device, device_check)
        texts = read_texts(args.data, args.size, args.text_field)
        hdiag, meta = compute_hdiag(args.model, texts, max_length=args.max_length, batch_size=args.batch_size,
                                    device=args.device, dtype=args.dtype, progress=not args.quiet,
                                    source=args.data)
        save_hdiag(hdiag, Path(args.out), meta)
        print(f"{len(hdiag)} linear layers, {meta['samples']} samples, {meta['tokens']} tokens, "
              f"{meta['seconds']} s -> {args.out}")

    return _run("obim-saliency", go)


def zoo_main(argv: list[str] | None = None) -> int:
    from .threads import configure

    configure()
    ap = argparse.ArgumentParser(prog="obim-zoo", description="The toy zoo: tiny models trained here, offline.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the zoo (or reuse it when built by the same recipe); prints its "
                                     "directory on the last line")
    b.add_argument("--out", default=None, help="zoo directory (default: $OBIM_ZOO, else ~/.cache/obim/zoo)")
    b.add_argument("--quick", action="store_true", help="a few training steps only: the layout in seconds")
    b.add_argument("--no-eval", action="store_true", help="skip the lm-eval table")
    b.add_argument("--table", default=None, help="also write the evaluation table (markdown) to this file")
    b.add_argument("--allow-code", action="store_true", help="score the code benchmarks, which execute "
                   "model-generated code in obim's sandbox (as HF_ALLOW_CODE_EVAL=1)")
    b.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def go():
        from .zoo import RECIPE, build, quick_recipe

        root = build(args.out, recipe=quick_recipe() if args.quick else RECIPE, evaluate=not args.no_eval,
                     allow_code=args.allow_code,
                     progress=not args.quiet)
        if args.table and (root / "zoo.md").exists():
            Path(args.table).parent.mkdir(parents=True, exist_ok=True)
            Path(args.table).write_text((root / "zoo.md").read_text())
        print(root)

    return _run("obim-zoo", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(merge_main())
