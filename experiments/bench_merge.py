"""Merge benchmark: wall time and peak RSS of whole processes on synthetic Llama-shaped checkpoints.

Makes a base and N fine-tunes (default: hidden 1024, 16 layers, vocab 32000, bf16, ~271M parameters each), then
measures, each in its own process: the I/O floor (read every input tensor once, add, write one model), every
requested obim method through `obim-merge`, and mergekit's `ties` and `task_arithmetic` on the same inputs when a
`mergekit-yaml` executable is found (--mergekit, $MERGEKIT_YAML, beside this Python, or PATH). Methods that need
statistics other than hdiag (regmean, fisher) or two endpoints (slerp) are skipped, saying why.

    python experiments/bench_merge.py                       # all methods, the default shape
    python experiments/bench_merge.py --layers 32 --methods ties obim   # does peak RSS grow with depth?
    python experiments/bench_merge.py --busy --methods ties obim       # the thread budget under a busy neighbour

--busy: each method idle and beside a busy neighbour (one pure-Python spinning process per CPU, started before and
stopped after each timed run), for three thread settings: `old` (OBIM_THREAD_BUDGET=0: 2 workers beside torch's
own threads), `new, spinning` (the budget while OpenMP spins, as when torch is imported before obim) and `new,
passive` (the budget with OMP_WAIT_POLICY=PASSIVE, obim's setting). The floor runs with one thread
(OBIM_NUM_THREADS=1); every ratio is to the floor measured in the same state (idle or busy); medians of --reps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from obim.merging.checkpoint import ShardedWriter, open_checkpoint, plan_shards
from obim.merging.methods import METHODS
from obim.merging.saliency import load_hdiag, save_hdiag

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_tensors(hidden: int, layers: int, vocab: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def make_models(
    root: Path, n_models: int, hidden: int, layers: int, vocab: int, inter: int, device: str = "cpu"
) -> list[Path]:
    """Base + fine-tunes (base + N(0, 0.002) noise, rounded to bf16), safetensors shards of 2 GB; cached. The
    noise is drawn on `device` (a GPU draws a 7B model's in seconds; the bytes differ from the CPU's)."""
    names = ["base"] + [f"ft{i}" for i in range(1, n_models + 1)]
    dirs = [root / n for n in names]
    stamp = root / "shape.json"
    shape = {"hidden": hidden, "layers": layers, "vocab": vocab, "inter": inter, "models": n_models}
    if device != "cpu":
        shape["device"] = torch.device(device).type
    if stamp.exists() and json.loads(stamp.read_text()) == shape and all((d / "config.json").exists() for d in dirs):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    tensors = llama_tensors(hidden, layers, vocab, inter)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "head_dim": 64,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    entries = [(n, torch.bfloat16, s) for n, s in tensors]
    writers = []
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        writers.append(ShardedWriter(d, plan_shards(entries, 2_000_000_000)))
    g = torch.Generator(device).manual_seed(0)
    for name, s in tensors:
        base = torch.ones(s, device=device) if len(s) == 1 else torch.randn(s, generator=g, device=device) * 0.02
        writers[0].write(name, base.bfloat16().cpu())
        for w in writers[1:]:
            w.write(name, (base + torch.randn(s, generator=g, device=device) * 0.002).bfloat16().cpu())
    for w in writers:
        w.finish()
    stamp.write_text(json.dumps(shape))
    return dirs


def make_hdiags(root: Path, dirs: list[Path]) -> list[Path]:
    """Synthetic saliency statistics (positive random vectors) for each fine-tune: merge speed does not depend on
    where they came from."""
    out = []
    ck = open_checkpoint(str(dirs[0]))
    for i, d in enumerate(dirs[1:], 1):
        p = root / f"hdiag-{d.name}.safetensors"
        fingerprint = open_checkpoint(str(d)).fingerprint()
        if not p.exists() or load_hdiag(p)[1].get("model_fingerprint") != fingerprint:
            g = torch.Generator().manual_seed(100 + i)
            h = {
                n: torch.rand(info.shape[1], generator=g) + 0.01
                for n, info in ck.tensors.items()
                if n.endswith(tuple(f"{x}.weight" for x in LINEAR)) or n == "lm_head.weight"
            }
            save_hdiag(h, p, {"model": str(d), "data": "synthetic", "model_fingerprint": fingerprint})
        out.append(p)
    return out


def floor_job(dirs: list[str], out: str) -> None:
    """The I/O floor: read every input tensor once, add them, write one model."""
    from obim.merging.threads import configure

    configure()
    cks = [open_checkpoint(d) for d in dirs]
    names = sorted(cks[0].tensors.values(), key=lambda t: (str(t.file), t.offset))
    outp = Path(out)
    shutil.rmtree(outp, ignore_errors=True)
    outp.mkdir(parents=True)
    w = ShardedWriter(outp, plan_shards([(t.name, t.dtype, t.shape) for t in names], 5_000_000_000))
    for t in names:
        acc = cks[0].get(t.name)
        for ck in cks[1:]:
            acc = acc + ck.get(t.name)
        w.write(t.name, acc)
    w.finish()


def run_measured(cmd: list[str], env: dict | None = None, out: Path | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, exit status) of one child process, from its own rusage; `out` is removed
    first (each run writes a fresh directory)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace").strip()
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  FAILED ({code}): {' '.join(cmd)}\n  {err.splitlines()[-1] if err else ''}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024**2, code


def busy_neighbour(n: int) -> list[subprocess.Popen]:
    """n processes spinning in pure Python (one per CPU: every core busy), until stopped."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # running, not starting
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


THREAD_SETTINGS = {  # --busy: name -> environment changes (None: removed)
    "old": {"OBIM_THREAD_BUDGET": "0", "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    # libgomp's default when OMP_WAIT_POLICY is unset (spin ~300k iterations), spelled out
    "new, spinning": {"OBIM_THREAD_BUDGET": None, "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"},
    "new, passive": {"OBIM_THREAD_BUDGET": None, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
}


def with_env(changes: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OBIM_NUM_THREADS", "OMP_NUM_THREADS")}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def busy_table(root: Path, dirs: list[Path], hdiags: list[Path], methods: list[str], reps: int, device: str) -> str:
    """Each method idle and beside a busy neighbour, in each thread setting; every idle run is followed by its busy
    twin, and settings alternate within each repetition (the machine's other load drifts)."""
    out = root / "out"
    n_busy = os.cpu_count() or 1
    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}

    def measure(key: str, cmd: list[str], env: dict) -> None:
        for state in ("idle", "busy"):
            procs = busy_neighbour(n_busy) if state == "busy" else []
            try:
                before = os.times()
                wall, _, code = run_measured(cmd, env, out)
                after = os.times()
            finally:
                stop(procs)
            if code != 0:
                raise SystemExit(f"{key} failed")
            cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            walls.setdefault((key, state), []).append(wall)
            cpus.setdefault((key, state), []).append(cpu)
            print(f"  {key:<32} {state}: {wall:6.1f} s wall, {cpu:6.1f} s CPU", flush=True)

    floor_key = "I/O floor (1 thread)"
    cfgs = {}
    for method in methods:
        cfgs[method] = root / f"{method}.yaml"
        cfgs[method].write_text(yaml.safe_dump(obim_config(method, dirs, hdiags)))
    for rep in range(reps):
        print(f"repetition {rep + 1} of {reps} (neighbour: {n_busy} spinning processes)", flush=True)
        measure(
            floor_key,
            [sys.executable, __file__, "--_floor", *map(str, dirs), str(out)],
            with_env({"OBIM_NUM_THREADS": "1"}),
        )
        for method in methods:
            names = list(THREAD_SETTINGS)
            for setting in names[rep % len(names) :] + names[: rep % len(names)]:
                cmd = [
                    sys.executable,
                    "-m",
                    "obim.merging.cli",
                    str(cfgs[method]),
                    str(out),
                    "--quiet",
                    "--device",
                    device,
                ]
                measure(f"obim {method}, {setting}", cmd, with_env(THREAD_SETTINGS[setting]))
    shutil.rmtree(out, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in walls.items()}
    mcpu = {k: statistics.median(v) for k, v in cpus.items()}
    lines = [
        "| what | idle (s) | idle x floor | busy (s) | busy x floor | busy/idle of x floor | CPU s idle / busy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = [floor_key] + [f"obim {m}, {s}" for m in methods for s in THREAD_SETTINGS]
    for k in keys:
        ri, rb = med[k, "idle"] / med[floor_key, "idle"], med[k, "busy"] / med[floor_key, "busy"]
        lines.append(
            f"| {k} | {med[k, 'idle']:.1f} | {ri:.2f} | {med[k, 'busy']:.1f} | {rb:.2f} | {rb / ri:.2f} "
            f"| {mcpu[k, 'idle']:.1f} / {mcpu[k, 'busy']:.1f} |"
        )
    return "\n".join(lines)


def skipped(method: str, n_models: int) -> str | None:
    """Why a method is not benchmarked on these inputs (None: it is): the statistics only hdiag are made here."""
    m = METHODS[method]
    if m.statistics not in (None, "hdiag"):
        return f"needs {m.statistics} statistics, which this benchmark does not make"
    if method == "slerp" and n_models != 1:
        return f"two endpoints only, {n_models} fine-tunes here"
    return None


def obim_config(method: str, dirs: list[Path], hdiags: list[Path]) -> dict:
    n = len(dirs) - 1
    models = []
    for d, h in zip(dirs[1:], hdiags, strict=True):
        m = {"name": d.name, "path": str(d)}
        if method in ("obim", "ties_im", "ties_obm"):
            m["retention"] = round(0.9 / n, 6) if method != "ties_obm" else 0.2
        if method in ("obim", "ties_obm"):
            m["hdiag"] = str(h)
        models.append(m)
    return {"method": method, "base_model": str(dirs[0]), "models": models, "order": "rotation", "seed": 0}


def mergekit_config(method: str, dirs: list[Path]) -> dict:
    params = {"weight": 1.0, **({"density": 0.2} if method == "ties" else {})}
    return {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "dtype": "bfloat16",
        "models": [{"model": str(d), "parameters": params} for d in dirs[1:]],
        **({"parameters": {"normalize": False}} if method == "ties" else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.environ.get("OBIM_BENCH_DIR", "/tmp/obim-bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--models", type=int, default=3, help="number of fine-tunes")
    ap.add_argument("--methods", nargs="*", help="default: all; with --busy, ties and obim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--mergekit",
        # beside this interpreter (a venv's, not on PATH unless activated), else on PATH
        default=os.environ.get("MERGEKIT_YAML")
        or next((str(p) for p in [Path(sys.executable).parent / "mergekit-yaml"] if p.is_file()), None)
        or shutil.which("mergekit-yaml"),
        help="mergekit-yaml executable (skipped when absent)",
    )
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument(
        "--busy",
        action="store_true",
        help="the thread budget: each method idle and beside a busy neighbour, old and new settings",
    )
    ap.add_argument("--reps", type=int, default=3, help="--busy: repetitions (medians are reported)")
    ap.add_argument("--_floor", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._floor:
        return floor_job(args._floor[:-1], args._floor[-1])

    root = Path(args.workdir)
    t0 = time.perf_counter()
    dirs = make_models(root / "models", args.models, args.hidden, args.layers, args.vocab, args.intermediate)
    hdiags = make_hdiags(root, dirs)
    n_params = sum(math.prod(t.shape) for t in open_checkpoint(str(dirs[0])).tensors.values())
    print(
        f"inputs: base + {args.models} fine-tunes, {n_params / 1e6:.0f}M parameters each, bf16 "
        f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); ready in {time.perf_counter() - t0:.0f} s"
    )
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    out = root / "out"
    if args.busy:
        table = busy_table(root, dirs, hdiags, args.methods or ["ties", "obim"], args.reps, args.device)
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return
    rows = []

    wall, rss, code = run_measured([sys.executable, __file__, "--_floor", *map(str, dirs), str(out)], out=out)
    floor = wall
    rows.append(("I/O floor (read all, add, write one)", wall, rss, code))
    for method in args.methods or sorted(METHODS):
        why = skipped(method, len(dirs) - 1)
        if why:
            print(f"  {method}: skipped ({why})")
            continue
        cfg_path = root / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(obim_config(method, dirs, hdiags)))
        cmd = [sys.executable, "-m", "obim.merging.cli", str(cfg_path), str(out), "--quiet", "--device", args.device]
        rows.append((f"obim {method}", *run_measured(cmd, out=out)))
    if args.mergekit and not args.no_mergekit:
        for method in ("task_arithmetic", "ties"):
            cfg_path = root / f"mergekit-{method}.yaml"
            cfg_path.write_text(yaml.safe_dump(mergekit_config(method, dirs)))
            cmd = [args.mergekit, str(cfg_path), str(out), "--allow-crimes", "--lazy-unpickle"]
            if args.device.startswith("cuda"):
                cmd.append("--cuda")
            rows.append((f"mergekit {method}", *run_measured(cmd, out=out)))
    shutil.rmtree(out, ignore_errors=True)

    lines = ["| what | wall (s) | x floor | peak RSS (GB) |", "|---|---:|---:|---:|"]
    for what, wall, rss, code in rows:
        status = "" if code == 0 else " (failed)"
        lines.append(f"| {what}{status} | {wall:.1f} | {wall / floor:.2f} | {rss:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
