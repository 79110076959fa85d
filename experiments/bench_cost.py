"""The paper's Table 10 on this machine: OBIM's saliency time (per sample and in all) and merge time on synthetic
Llama-shaped models (random weights: the cost does not depend on what the weights learned).

Makes a base and N fine-tunes of the given shape (experiments/bench_merge.py's generator, bf16 safetensors), runs
every fine-tune forward over `--samples` validation texts of `--length` tokens to collect its saliency statistics,
then merges them with OBIM, each step timed; prints our row beside the paper's.

    python experiments/bench_cost.py --shape llama2-7b --models 2 --device cuda --workdir /scratch/obim-cost
    python experiments/bench_cost.py --shape small               # CPU: a 16-layer, hidden-1024 model
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # hidden, layers, vocab, intermediate
    "small": (1024, 16, 32000, 2816),
    "llama2-7b": (4096, 32, 32000, 11008),
    "llama2-13b": (5120, 40, 32000, 13824),
}


def texts(n: int, length: int, seed: int = 0) -> list[str]:
    """Validation texts of `length` characters (the models' character tokenizer: one token each, plus <s>)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "is", "and", "7", "42", "code", "def"]
    out = []
    for _ in range(n):
        s = ""
        while len(s) < length:
            s += rng.choice(words) + " "
        out.append(s[: length - 1])
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from bench_merge import make_models

    from obim.bench.report.costs import cost_table
    from obim.bench.zoo.tiny import make_tokenizer
    from obim.merging.checkpoint import open_checkpoint
    from obim.merging.merge import merge
    from obim.merging.saliency import compute_hdiag, save_hdiag

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--models", type=int, default=2, help="fine-tunes merged")
    ap.add_argument("--samples", type=int, default=50, help="validation samples per model")
    ap.add_argument("--length", type=int, default=256, help="tokens per sample")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default="bench-tmp/cost")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models (reused by the next run)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    hidden, layers, vocab, inter = SHAPES[args.shape]
    layers = args.layers or layers
    root = Path(args.workdir)
    t0 = time.perf_counter()
    dirs = make_models(root / "models", args.models, hidden, layers, vocab, inter, device=args.device)
    for d in dirs:
        if not (d / "tokenizer.json").exists():
            make_tokenizer().save_pretrained(d)
    make_s = time.perf_counter() - t0
    params = open_checkpoint(str(dirs[0])).n_params
    print(f"{len(dirs)} models of {params / 1e9:.2f}B parameters ({args.shape}, {layers} layers) in {make_s:.0f} s")

    val = texts(args.samples, args.length)
    hd, sal_s = [], 0.0
    for d in dirs[1:]:
        t = time.perf_counter()
        h, meta = compute_hdiag(
            str(d),
            val,
            max_length=args.length + 1,
            batch_size=args.batch_size,
            device=args.device,
            progress=False,
            dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        )  # CPU bf16 is slow
        load_s = time.perf_counter() - t - float(meta["seconds"])
        p = root / f"hdiag-{d.name}.safetensors"
        save_hdiag(h, p, meta)
        hd.append(p)
        sal_s += float(meta["seconds"])
        print(
            f"saliency {d.name}: {meta['seconds']} s forward ({meta['seconds_per_sample']} s/sample, "
            f"{meta['tokens']} tokens), {load_s:.1f} s loading"
        )
    cfg = {
        "method": "obim",
        "base_model": str(dirs[0]),
        "order": "rotation",
        "seed": 0,
        "models": [
            {"name": d.name, "path": str(d), "retention": round(0.9 / args.models, 6), "hdiag": str(p)}
            for d, p in zip(dirs[1:], hd, strict=True)
        ],
    }
    out = root / "merged"
    shutil.rmtree(out, ignore_errors=True)
    res = merge(cfg, out, device=args.device, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    cost = {
        "models": args.models,
        "params_b": round(params / 1e9, 3),
        "gpus": gpus,
        "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
        "hessian_s_per_sample": round(sal_s / (args.samples * args.models), 5),
        "saliency_s": round(sal_s, 3),
        "merge_s": round(res.merge_s, 3),
        "samples": args.samples,
        "length": args.length,
    }
    print("\n" + cost_table([("ours", cost)]))
    print(f"(samples of {args.length} tokens; the paper does not state its samples' length)")
    if args.json:
        Path(args.json).write_text(json.dumps(cost, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
