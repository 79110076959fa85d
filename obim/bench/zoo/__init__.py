"""The toy zoo: a tiny Llama base and experts trained here, offline, on synthetic tasks (see obim.bench.zoo.data), in
the paper's two settings. `build()` (CLI: `obim-zoo build [--out DIR]`) trains, saves Hugging Face model directories,
writes validation sets for saliency, evaluates every model through lm-eval and prints the table; it returns at once
when DIR holds a complete zoo of the same recipe (a hash), and rebuilds when the recipe changes.

Layout: sft/{base,lm,math,code}, pt/{base,ckpt-1..ckpt-6}, data/<task>/{train,dev}.jsonl, zoo.json, zoo.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError
from obim.merging.staging import staged_output

from . import data as D

# The SFT half follows the real setting (issue 10): the base gets most of the compute and learns every skill from
# raw text (worked sums, plain functions with asserts, knowledge statements, questions answered in prose), then a
# short anneal adds the benchmark templates at 0.1% each (the toy version of a base that half-knows GSM8K's format);
# experts are short SFT runs at a tenth of the base's lr, loss on answers, embeddings/lm_head/norms frozen.
_RAW_MIX = {
    "en": 0.1,
    "facts": 0.08,
    "kb": 0.1,
    "raw_mmlu": 0.08,
    "echo": 0.04,
    "raw_alpaca": 0.12,
    "raw_gsm8k": 0.16,
    "raw_math": 0.12,
    "raw_code": 0.2,
}
_FROZEN = ["embed_tokens", "lm_head", "norm"]
RECIPE: dict[str, Any] = {
    # 4: test sets of >= 200 items (70/10/20 split, 48 entities, 3 math forms, 24 code names); stage seeds hashed
    "version": 4,
    "seed": 0,
    "batch": 64,
    "shape": {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 384, "max_positions": 256},
    "sft": {
        # packed pretraining rows (rows x length tokens per step)
        "base": {"steps": 1500, "lr": 3e-3, "rows": 32, "length": 128, "mix": _RAW_MIX},
        "anneal": {
            "steps": 300,
            "lr": 1e-3,
            "rows": 32,
            "length": 128,
            "mix": {**_RAW_MIX, **dict.fromkeys(("alpaca", "mmlu", "gsm8k", "math", "humaneval", "mbpp"), 0.001)},
        },
        "lm": {"steps": 150, "lr": 3e-4, "frozen": _FROZEN, "mix": {"alpaca": 0.5, "mmlu": 0.5}},
        "math": {"steps": 150, "lr": 3e-4, "frozen": _FROZEN, "mix": {"gsm8k": 0.5, "math": 0.5}},
        "code": {"steps": 150, "lr": 3e-4, "frozen": _FROZEN, "mix": {"humaneval": 0.5, "mbpp": 0.5}},
    },
    "pt": {
        "base": {"steps": 300, "lr": 3e-3, "mix": {"zh": 0.5, "en": 0.5}},
        # continued pretraining heavy in the third language; a checkpoint every `every` steps
        "continued": {"ckpts": 6, "every": 40, "lr": 3e-3, "mix": {"ja": 0.96, "zh": 0.02, "en": 0.02}},
    },
    "validation_size": 200,  # per task and split, for saliency
}
QUICK = {"sft": {"base": 8, "anneal": 2, "lm": 6, "math": 6, "code": 6}, "pt": {"base": 8, "every": 2}}
SFT_EXPERTS = {"lm": ("alpaca", "mmlu"), "math": ("gsm8k", "math"), "code": ("humaneval", "mbpp")}
SFT_BENCHMARKS = ["toy_alpaca", "toy_mmlu", "toy_gsm8k", "toy_math", "toy_humaneval", "toy_mbpp"]
# the same test items in raw form (no template): the base's competence before SFT; code: the mbpp items
RAW_BENCHMARKS = ["toy_alpaca_raw", "toy_mmlu_raw", "toy_gsm8k_raw", "toy_math_raw", "toy_code_raw"]
PT_BENCHMARKS = ["toy_ceval", "toy_mmlu_en", "toy_jp"]


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_current(root: str | Path, recipe: dict) -> bool:
    """Whether `root` holds a complete zoo of this recipe. One built under other CPU kernels is kept, not replaced
    under running jobs (`zoo.json` records its kernels and weight fingerprint, to compare with a reference's)."""
    stamp = Path(root) / "zoo.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("recipe_hash") == recipe_hash(recipe)


def _read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / "zoo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def default_dir(seed: int = 0) -> Path:
    """Where the zoo of draw `seed` lives: $OBIM_ZOO (else ~/.cache/obim/zoo) for the recipe's own seed 0, a
    sibling `<that>-seed<k>` for another draw."""
    from ..cache import user_cache_root

    root = Path(os.environ["OBIM_ZOO"]) if os.environ.get("OBIM_ZOO") else user_cache_root() / "zoo"
    return root if seed == RECIPE["seed"] else root.with_name(f"{root.name}-seed{seed}")


def seeded(recipe: dict, seed: int) -> dict:
    """The recipe of another draw: the same steps and data, every stream and initialisation from `seed`."""
    return {**recipe, "seed": int(seed)}


def quick_recipe() -> dict:
    """The recipe with a handful of steps: the layout and every code path, in seconds (tests)."""
    r = copy.deepcopy(RECIPE)
    for k, v in QUICK["sft"].items():
        r["sft"][k]["steps"] = v
    for stage in ("base", "anneal"):
        r["sft"][stage]["rows"] = 4
    r["pt"]["base"]["steps"] = QUICK["pt"]["base"]
    r["pt"]["continued"]["every"] = QUICK["pt"]["every"]
    r["validation_size"] = 100  # text only: enough for the sweep's default validation sizes
    r["quick"] = True
    return r


# ------------------------------------------------------------------------------------------------- batches


def _seed(seed: int, stage: str) -> int:
    """A stage's own seed, derived from the zoo's: every stream and initialisation of one draw (zoo seed) is
    distinct from every other draw's, whatever the seeds (offsets such as seed + 1 would share streams across
    neighbouring draws)."""
    return int.from_bytes(hashlib.sha256(f"zoo-{seed}-{stage}".encode()).digest()[:4], "little")


def _sources(seed: int) -> dict[str, Callable[[], tuple[str, str]]]:
    """Named samplers of (prompt, answer) training pairs; pretraining text is all 'answer' (loss everywhere)."""
    rng = random.Random(f"{seed}-text")
    out: dict[str, Callable[[], tuple[str, str]]] = {}
    for lang in D.LANGS.values():
        out[lang.name] = lambda lang=lang: ("", lang.sentence(rng))
    out["facts"] = lambda: ("", D.arithmetic_fact(rng))
    out["words"] = lambda: ("", " ".join(D._word(rng, "abcdefghijklmnopqrstuvwxyz") for _ in range(4)) + ".\n")
    out["kb"] = lambda: ("", D.KB.statement(*rng.choice(sorted(D.KB.facts))))
    out["echo"] = lambda: ("", (lambda w: f"{w}: {w}.\n")(D._word(rng, "abcdefghijklmnopqrstuvwxyz", 2, 6)))
    for name, make in D.SFT_TASKS.items():
        it = D.stream(make, "train", seed)
        out[name] = lambda it=it: (lambda ex: (ex.prompt, ex.answer))(next(it))
    # raw forms of train-split items only (a test item's raw form never reaches training); their own streams, so
    # adding them leaves the template streams unchanged
    for name in ("alpaca", "mmlu", "gsm8k", "math"):
        it = D.stream(D.SFT_TASKS[name], "train", seed + 1000)
        out[f"raw_{name}"] = lambda it=it: ("", _raw_text(next(it)))
    it = D.stream(D.SFT_TASKS["humaneval"], "train", seed + 1000)
    out["raw_code"] = lambda: ("", _raw_text(next(it)))
    return out


def _raw_text(ex: D.Example) -> str:
    text = ex.raw
    return text if text.endswith("\n") else text + ".\n"  # multiple choice: the statement, ended


def _packed(spec: dict, seed: int) -> Iterator[dict]:
    from .train import packed_batches

    texts = (p + a for b in _batches(spec["mix"], 1, seed) for p, a in b)
    return packed_batches(texts, spec["rows"], spec["length"])


def _batches(mix: dict[str, float], batch: int, seed: int) -> Iterator[list[tuple[str, str]]]:
    src = _sources(seed)
    rng = random.Random(f"{seed}-mix-{sorted(mix.items())}")
    names, weights = list(mix), list(mix.values())
    while True:
        yield [src[n]() for n in rng.choices(names, weights=weights, k=batch)]


# --------------------------------------------------------------------------------------------------- build


def validation_sources() -> list[str]:
    """The sources _write_validation writes (data/<source>/{train,dev}.jsonl): what a plan may name before the
    zoo is built."""
    return [*D.SFT_TASKS, *(f"lang_{lang.name}" for lang in D.LANGS.values())]


def _write_validation(root: Path, size: int, seed: int) -> None:
    """JSONL validation sets (train and dev splits, `text` = prompt + answer) for saliency statistics."""
    for name, make in D.SFT_TASKS.items():
        for split in ("train", "dev"):
            p = root / "data" / name / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(e.record()) + "\n" for e in D.examples(make, split, size, seed)))
    for lang in D.LANGS.values():
        for split in ("train", "dev"):
            p = root / "data" / f"lang_{lang.name}" / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{seed}-{lang.name}-{split}")
            p.write_text("".join(json.dumps({"text": lang.sentence(rng)}) + "\n" for _ in range(size)))


STAGE_LABELS = {
    "sft/base": "the SFT base",
    "sft/anneal": "the SFT base's anneal",
    "sft/lm": "the LM expert",
    "sft/math": "the math expert",
    "sft/code": "the code expert",
    "pt/base": "the PT base",
    "pt/continued": "continued pretraining (the checkpoints)",
}


class ZooProgress:
    """What a build is doing, said through `status` (a job's console line): its stage, the step and the stage's
    time left, at most every `every_s` seconds within a stage and at once when a stage starts."""

    def __init__(self, status: Callable[[str], None] | None, stages: int, every_s: float = 2.0, clock=time.monotonic):
        self.status, self.stages, self.every_s, self.clock = status, stages, every_s, clock
        self.index, self.name, self.t0, self.last = 0, "", 0.0, float("-inf")

    def begin(self, name: str, steps: int | None = None) -> None:
        self.index += 1
        self.name, self.t0, self.last = name, self.clock(), float("-inf")
        self.step(0, steps)

    def step(self, done: int, steps: int | None) -> None:
        now = self.clock()
        if self.status is None or (done and now - self.last < self.every_s and done != steps):
            return
        self.last = now
        text = f"zoo {self.index}/{self.stages}: {STAGE_LABELS.get(self.name, self.name)}"
        if steps:
            text += f", step {done}/{steps}"
            if done:
                left = (now - self.t0) / done * (steps - done)
                text += f", ~{int(left // 60)}:{int(left % 60):02d} left in it"
        self.status(text)


def build(
    out: str | Path | None = None,
    *,
    recipe: dict | None = None,
    evaluate: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_code: bool = False,
    status: Callable[[str], None] | None = None,
) -> Path:
    """Build the zoo into `out` (default: $OBIM_ZOO or ~/.cache/obim/zoo), or reuse it when complete with the same
    recipe. Returns the directory. Its table scores the code benchmarks only when code execution is opted in
    (`allow_code` or HF_ALLOW_CODE_EVAL=1); otherwise they are left empty. `status`: told the build's stage, step
    and time left (ZooProgress), for a console that has no progress bar of its own."""
    recipe = recipe or RECIPE
    root = Path(out) if out else default_dir()
    h = recipe_hash(recipe)
    if is_current(root, recipe):
        return root
    held = (_read_stamp(root).get("recipe") or {}).get("seed")
    if held is not None and held != recipe["seed"]:  # a new recipe replaces its own draw only, never another's
        raise ObimError(
            f"{root} holds the toy zoo of draw {held}; draw {recipe['seed']} would replace it: build it in its own "
            "folder (experiment.zoo / --out, or leave them at their defaults: <zoo>-seed<k>)"
        )
    t0 = time.perf_counter()
    # staged beside the zoo, renamed when complete; replaces only a zoo (zoo.json), never another folder
    with staged_output(root, overwrite=True, marker="zoo.json") as tmp:
        done = ZooProgress(status, len(STAGE_LABELS) + bool(evaluate))
        total, train_s, timings, table = _build_into(tmp, recipe, h, evaluate, progress, t0, allow_code, done)
    log(
        f"built the toy zoo in {total:.0f} s (training {train_s:.0f} s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    )
    if table:
        log(table)
    return root


def weights_fingerprint(root: Path) -> str:
    """sha256 over every model's weights in the zoo (relative path and bytes, in path order): equal only for
    byte-identical zoos."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(root).glob("*/*/*.safetensors")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _build_into(
    tmp: Path,
    recipe: dict,
    h: str,
    evaluate: bool,
    progress: bool,
    t0: float,
    allow_code: bool,
    done: ZooProgress | None = None,
) -> tuple[float, float, dict[str, float], str]:
    from .tiny import ModelShape
    from .train import new_model, save
    from .train import train as train_steps

    done = done or ZooProgress(None, 0)

    def train(model, batches, steps, *, desc, on_step=None, **kw):
        """One stage: the training, its progress said (ZooProgress) beside the stage's own step hook."""
        done.begin(desc, steps)

        def hook(step: int) -> None:
            done.step(step, steps)
            if on_step is not None:
                on_step(step)

        return train_steps(model, batches, steps, desc=desc, on_step=hook, **kw)

    seed, batch = recipe["seed"], recipe["batch"]
    shape = ModelShape(**recipe["shape"])
    timings: dict[str, float] = {}
    _write_validation(tmp, recipe["validation_size"], seed)
    # SFT setting
    sft = recipe["sft"]
    base = new_model(shape, _seed(seed, "sft/base"))
    r = train(
        base,
        _packed(sft["base"], _seed(seed, "sft/base")),
        sft["base"]["steps"],
        answer_only=False,
        lr=sft["base"]["lr"],
        seed=_seed(seed, "sft/base"),
        desc="sft/base",
        progress=progress,
    )
    timings["sft/base"] = r["seconds"]
    r = train(
        base,
        _packed(sft["anneal"], _seed(seed, "sft/anneal")),
        sft["anneal"]["steps"],
        answer_only=False,
        lr=sft["anneal"]["lr"],
        seed=_seed(seed, "sft/anneal"),
        desc="sft/anneal",
        progress=progress,
    )
    timings["sft/anneal"] = r["seconds"]
    save(base, tmp / "sft" / "base")
    for name in SFT_EXPERTS:
        from transformers import LlamaForCausalLM

        expert = LlamaForCausalLM.from_pretrained(tmp / "sft" / "base")
        spec = sft[name]
        r = train(
            expert,
            _batches(spec["mix"], batch, _seed(seed, f"sft/{name}")),
            spec["steps"],
            answer_only=True,
            lr=spec["lr"],
            seed=_seed(seed, f"sft/{name}"),
            desc=f"sft/{name}",
            progress=progress,
            frozen=tuple(spec.get("frozen", ())),
        )
        timings[f"sft/{name}"] = r["seconds"]
        save(expert, tmp / "sft" / name)
    # post-pretraining setting
    pt = recipe["pt"]
    pbase = new_model(shape, _seed(seed, "pt/base"))
    r = train(
        pbase,
        _batches(pt["base"]["mix"], batch, _seed(seed, "pt/base")),
        pt["base"]["steps"],
        answer_only=False,
        lr=pt["base"]["lr"],
        seed=_seed(seed, "pt/base"),
        desc="pt/base",
        progress=progress,
    )
    timings["pt/base"] = r["seconds"]
    save(pbase, tmp / "pt" / "base")
    cont = pt["continued"]

    def checkpoint(step: int) -> None:
        if step % cont["every"] == 0:
            save(pbase, tmp / "pt" / f"ckpt-{step // cont['every']}")
            pbase.train()

    r = train(
        pbase,
        _batches(cont["mix"], batch, _seed(seed, "pt/continued")),
        cont["every"] * cont["ckpts"],
        answer_only=False,
        lr=cont["lr"],
        seed=_seed(seed, "pt/continued"),
        desc="pt/continued",
        progress=progress,
        on_step=checkpoint,
    )
    timings["pt/continued"] = r["seconds"]
    train_s = time.perf_counter() - t0
    table = ""
    if evaluate:
        n_evals = len(SFT_EXPERTS) + 2 + len(list((tmp / "pt").iterdir()))  # the SFT models, raw base, PT models
        done.begin("evaluation of the models and the merges", n_evals)
        scores = evaluate_zoo(tmp, progress=progress, allow_code=allow_code, step=lambda i: done.step(i, n_evals))
        table = zoo_table(scores)
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
        t1 = time.perf_counter()
        table += "\n" + _report(tmp, scores, progress, allow_code)
        timings["report"] = time.perf_counter() - t1
    code = code_record(evaluate, allow_code)
    if evaluate:
        table += "\n" + code_note(code) + "\n"
        (tmp / "zoo.md").write_text(table)
    total = time.perf_counter() - t0
    from obim.merging.determinism import cpu_kernels

    stamp_tmp = {
        "recipe_hash": h,
        "recipe": recipe,
        # what a built zoo is compared by (a reference's, another machine's): its weights, and the kernels they came
        # from (obim.merging.determinism)
        "fingerprint": weights_fingerprint(tmp),
        "cpu_kernels": cpu_kernels(),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total, 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "code": code,
    }
    (tmp / "zoo.json").write_text(json.dumps(stamp_tmp, indent=2, sort_keys=True) + "\n")
    return total, train_s, timings, table


# ------------------------------------------------------------------------------------------------ evaluate


def code_record(evaluated: bool, allow_code: bool) -> dict[str, Any]:
    """zoo.json's `code`: whether the code benchmarks were executed and scored, and under which sandbox layers, so
    that an empty code column reads as not run rather than as a zero."""
    from ..evaluation import code_allowed

    executed = bool(evaluated) and code_allowed(allow_code)
    isolation = None
    if executed:
        from ..sandbox import isolation as layers

        isolation = layers()  # as run_tests' sandbox.run sees this machine (bubblewrap or not)
    return {"evaluated": bool(evaluated), "executed": executed, "isolation": isolation}


def code_note(code: dict[str, Any]) -> str:
    """The line of zoo.md saying the same."""
    if code["executed"]:
        return f"code benchmarks: generated code executed and scored in the sandbox ({code['isolation']})"
    return (
        "code benchmarks: not executed, not scored (— above; opt in with HF_ALLOW_CODE_EVAL=1 or eval.allow_code=true)"
    )


def _expert_benchmarks() -> dict[str, tuple[str, ...]]:
    return {n: tuple(f"toy_{b}" for b in benches) for n, benches in SFT_EXPERTS.items()}


def _report(root: Path, scores: dict, progress: bool, allow_code: bool) -> str:
    """The experts' task-vector statistics and the mergeability table (report.json beside zoo.md)."""
    from ..evaluation import code_allowed, code_tasks, evaluate_model
    from .report import mergeability, report_tables, save_report, task_vector_stats

    run = [b for b in SFT_BENCHMARKS if code_allowed(allow_code) or b not in code_tasks(SFT_BENCHMARKS)]
    stats = task_vector_stats(root / "sft" / "base", {n: root / "sft" / n for n in SFT_EXPERTS})

    def evaluate(d: Path) -> dict[str, float | None]:
        got = evaluate_model(d, run, allow_code=allow_code)
        return {b: got.get(b) for b in SFT_BENCHMARKS}

    merges = mergeability(root, _expert_benchmarks(), scores, evaluate, progress=progress)
    save_report(root, stats, merges)
    return report_tables(scores, stats, merges, _expert_benchmarks())


def evaluate_zoo(
    root: Path,
    progress: bool = True,
    limit: int | None = None,
    allow_code: bool = False,
    step: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Scores (percent) of every zoo model on its setting's benchmarks, through lm-eval; the code benchmarks None
    unless code execution is opted in. `step(i)` is told after each of the evaluations (ZooProgress)."""
    from ..evaluation import code_allowed, code_tasks, evaluate_model

    skip = [] if code_allowed(allow_code) else code_tasks(SFT_BENCHMARKS)
    run = [b for b in SFT_BENCHMARKS if b not in skip]
    scores = {}
    for name in ["base", *SFT_EXPERTS]:
        got = evaluate_model(root / "sft" / name, run, limit=limit, allow_code=allow_code)
        scores[f"sft/{name}"] = {b: got.get(b) for b in SFT_BENCHMARKS}
        if step:
            step(len(scores))
    # the base on the same items in raw form: competence before SFT, next to its template scores
    raw = [b for b in RAW_BENCHMARKS if code_allowed(allow_code) or b not in code_tasks(RAW_BENCHMARKS)]
    got = evaluate_model(root / "sft" / "base", raw, limit=limit, allow_code=allow_code)
    scores["raw/base"] = {b: got.get(b) for b in RAW_BENCHMARKS}
    if step:
        step(len(scores))
    for d in sorted((root / "pt").iterdir(), key=lambda p: (p.name != "base", p.name)):
        scores[f"pt/{d.name}"] = evaluate_model(d, PT_BENCHMARKS, limit=limit)
        if step:
            step(len(scores))
    return scores


def zoo_table(scores: dict[str, dict[str, float | None]]) -> str:
    """Markdown tables of the zoo's scores; a score not measured (code not opted in) is — and so is its average."""
    lines = []
    for setting, benches in (("sft", SFT_BENCHMARKS), ("raw", RAW_BENCHMARKS), ("pt", PT_BENCHMARKS)):
        lines += [f"| {setting} model | " + " | ".join(benches) + " | avg |", "|---|" + "---:|" * (len(benches) + 1)]
        for model, s in scores.items():
            if model.startswith(setting + "/"):
                vals = [s.get(b) for b in benches]
                avg = None if None in vals else sum(vals) / len(vals)
                lines.append(
                    f"| {model} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in [*vals, avg]) + " |"
                )
        lines.append("")
    if any(v is None for s in scores.values() for v in s.values()):
        lines.append(
            "— : not measured (the code benchmarks run only with HF_ALLOW_CODE_EVAL=1 or eval.allow_code=true)\n"
        )
    return "\n".join(lines)
