"""Console scripts: obim-merge and obim-saliency (interfaces.md sections 1-3)."""

from __future__ import annotations

import argparse
import json
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
    except OSError as e:  # one the checks did not foresee: still one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (staging.Terminated): staged output is removed
        from .staging import Terminated

        term = isinstance(e, Terminated)
        done = getattr(e, "completed", None)  # the signal came while the finished output was being renamed in
        print(
            f"{prog}: {'terminated' if term else 'interrupted'}; "
            + (f"after the output was complete ({done})" if done else "nothing was written"),
            file=sys.stderr,
        )
        return 143 if term else 130
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    from .threads import configure

    configure()
    from .methods import METHODS

    ap = argparse.ArgumentParser(
        prog="obim-merge",
        description="Merge fine-tuned models into their base with a registered method.",
        epilog="methods: " + ", ".join(sorted(METHODS)),
    )
    ap.add_argument("config", help="merge config YAML (see docs/cli.md)")
    ap.add_argument("out_dir", help="output model directory (written to a temporary directory, then renamed)")
    ap.add_argument("--device", default="cpu", help="where the per-tensor arithmetic runs: cpu or cuda[:N]")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    def go():
        from .merge import merge

        res = merge(args.config, args.out_dir, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
        print(
            f"merged {res.tensors} tensors ({res.bytes_written / 1e9:.2f} GB) in {res.merge_s:.1f} s "
            f"(saliency {res.saliency_s:.1f} s) -> {res.out_dir}"
        )

    return run_cli("obim-merge", go)


def saliency_main(argv: list[str] | None = None) -> int:
    from .threads import configure

    configure()
    ap = argparse.ArgumentParser(
        prog="obim-saliency",
        description="Compute a model's statistics on validation data for a data-aware merge: OBM's hdiag (mean x² per "
        "input feature of every nn.Linear; the default), RegMean's gram (each nn.Linear's mean input Gram matrix) or "
        "Fisher merging's fisher (the empirical diagonal Fisher of every parameter).",
    )
    ap.add_argument("model", help="model directory or hub id")
    ap.add_argument("out", help="output .safetensors file")
    ap.add_argument("--kind", default="hdiag", help="hdiag (obim, ties_obm), gram (regmean) or fisher (fisher)")
    ap.add_argument("--data", required=True, help="JSONL validation file (one sample per line)")
    ap.add_argument("--size", type=int, default=None, help="number of samples (default: all)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per sample (truncation)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="load dtype: float32, bfloat16, float16, auto (default: the model's)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def go():
        import os

        from .checkpoint import open_checkpoint, resolve_model_dir
        from .checks import device_check, one_of, require
        from .saliency import LOAD_DTYPES, describe_unrouted
        from .staging import check_disjoint
        from .statistics import (
            KINDS,
            InMemory,
            check_statistics,
            compute_statistics,
            is_statistics_file,
            save_statistics,
        )
        from .texts import read_texts

        # every refusal before the model runs: a bad option or OUT costs nothing
        if args.dtype is not None:
            require("--dtype", args.dtype, one_of(*LOAD_DTYPES))
        require("--device", args.device, device_check)
        require("--kind", args.kind, one_of(*KINDS))
        out = Path(args.out)
        model_dir = resolve_model_dir(args.model)
        # OUT on the weights, inside the model directory (a new *.safetensors would join its weights) or on --data;
        # each file read is named too, as a symlinked one (a hub snapshot's) lives elsewhere
        files = {f"the model's {f.name}": f for f in sorted(model_dir.iterdir()) if f.is_file()}
        check_disjoint(out, {"the model": model_dir, **files, "the validation data": Path(args.data)})
        if out.is_dir():
            raise ObimError(f"{out}: exists and is a directory; OUT is the statistics .safetensors file to write")
        if os.path.lexists(out) and not is_statistics_file(out):  # replace only what obim-saliency wrote
            raise ObimError(
                f"{out}: exists and is not a statistics file obim-saliency wrote; remove it yourself or "
                "choose another output file"
            )
        texts = read_texts(args.data, args.size, args.text_field)
        stats, meta = compute_statistics(
            args.kind,
            args.model,
            texts,
            max_length=args.max_length,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
            source=args.data,
        )
        # the check a merge runs on this file, now: a file the merge would refuse is not written
        check_statistics(InMemory(args.kind, stats, meta), open_checkpoint(str(model_dir)), f"{out} (not written)")
        unrouted = json.loads(meta.get("unrouted", "[]"))
        if unrouted:
            print(f"obim-saliency: warning: {describe_unrouted(unrouted)}", file=sys.stderr)
        lone = json.loads(meta.get("no_gradient", "[]"))
        if lone:
            shown = ", ".join(lone[:3]) + (f" and {len(lone) - 3} more" if len(lone) > 3 else "")
            print(
                f"obim-saliency: warning: {len(lone)} float tensors of the checkpoint are no parameter of the loaded "
                f"model (buffers, keys transformers ignores or renames): {shown}; a merge takes their weighted mean",
                file=sys.stderr,
            )
        save_statistics(stats, out, meta)  # atomic_write_file: an OSError there is already one line
        what = "parameters" if args.kind == "fisher" else "linear layers"
        shared = len(json.loads(meta.get("aliases", "{}")))  # stored once with the tensor they share
        print(
            f"{args.kind}: {len(stats) + shared} {what}, {meta['samples']} samples, {meta['tokens']} tokens, "
            f"{meta['seconds']} s -> {args.out}"
        )

    return run_cli("obim-saliency", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(merge_main())
