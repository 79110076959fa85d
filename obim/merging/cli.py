"""Console scripts: obim-merge and obim-saliency (interfaces.md sections 1-3)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ObimError


def run_cli(prog: str, fn) -> int:
    from .staging import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            fn()
    except ObimError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (staging.Terminated): staged output is removed
        from .staging import Terminated

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

    return run_cli("obim-merge", go)


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
        from .texts import read_texts

        require("--device", args.device, device_check)
        texts = read_texts(args.data, args.size, args.text_field)
        hdiag, meta = compute_hdiag(args.model, texts, max_length=args.max_length, batch_size=args.batch_size,
                                    device=args.device, dtype=args.dtype, progress=not args.quiet,
                                    source=args.data)
        save_hdiag(hdiag, Path(args.out), meta)
        print(f"{len(hdiag)} linear layers, {meta['samples']} samples, {meta['tokens']} tokens, "
              f"{meta['seconds']} s -> {args.out}")

    return run_cli("obim-saliency", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(merge_main())
