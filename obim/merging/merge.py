"""The merge driver: config -> checks -> saliency statistics -> one tensor name at a time across all models -> a
Hugging Face model directory. Method-specific maths lives in the registered sparsifier/combiner; nothing here
knows about any particular method."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .architectures import is_vocab_tensor
from .checkpoint import TOKENIZER_FILES, Checkpoint, ShardedWriter, open_checkpoint, plan_shards
from .checks import device_check, require
from .config import MergeConfig, load_config, map_paths
from .context import TensorContext
from .errors import ObimError
from .staging import check_disjoint, check_output_dir, staged_output
from .statistics import InMemory, StatsFile, check_statistics, compute_statistics, open_statistics
from .texts import read_texts
from .threads import parallel_map
from .version import obim_version

# bump when the driver's output changes for the same config (streaming, vocab rows, dtypes, files written): cached
# merges of every method are keyed by it; a method's own change bumps the method's version instead
DRIVER_VERSION = 1
BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass
class MergeResult:
    out_dir: Path
    saliency_s: float
    merge_s: float
    tensors: int
    bytes_written: int
    hdiag_meta: dict[str, dict[str, str]] = field(default_factory=dict)


def block_index(name: str) -> int | None:
    m = BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_order(cfg: MergeConfig, name: str) -> list[int]:
    """IM order for one tensor: the fixed list, or the base order rotated left by the decoder-block index."""
    base = cfg.base_order()
    if cfg.order != "rotation":
        return base
    shift = (block_index(name) or 0) % len(base)
    return base[shift:] + base[:shift]


def _vocab_size(ckpt: Checkpoint) -> int | None:
    c = ckpt.config
    return c.get("vocab_size") or (c.get("text_config") or {}).get("vocab_size")


def _only_vocab_rows_differ(name: str, shapes: list[tuple[int, ...]], ckpts: list[Checkpoint]) -> bool:
    """True for an embedding / lm_head whose shapes differ only in rows, each model's rows being its vocab size."""
    same_cols = all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes)
    rows_are_vocab = all(_vocab_size(ck) in (None, s[0]) for ck, s in zip(ckpts, shapes, strict=True))
    return same_cols and rows_are_vocab and is_vocab_tensor(name, ckpts[0].architecture[0])


@dataclass
class TensorPlan:
    name: str
    out_dtype: torch.dtype
    out_shape: tuple[int, ...]
    shared_rows: int | None = None  # set for vocabulary tensors whose row counts differ
    n_blocks: int = 0  # the decoder blocks of the model (the tensor's block: block_index(name)); for depth rules


def plan_merge(cfg: MergeConfig, base: Checkpoint, models: list[Checkpoint]) -> list[TensorPlan]:
    """Check that the models can be merged and list the output tensors, in the base's storage order."""
    names = cfg.names
    for m, ck in zip(cfg.models, models, strict=True):
        if ck.architecture != base.architecture:
            raise ObimError(
                f"model '{m.name}' ({ck.dir}) is {ck.architecture[1] or ck.architecture[0]}, the base "
                f"({base.dir}) is {base.architecture[1] or base.architecture[0]}: architectures differ"
            )
        missing = [n for n in base.tensors if n not in ck.tensors]
        if missing:
            raise ObimError(
                f"tensor {missing[0]} is missing in model '{m.name}' ({ck.dir})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        extra = [n for n in ck.tensors if n not in base.tensors]
        if extra:
            raise ObimError(f"tensor {extra[0]} of model '{m.name}' ({ck.dir}) is not in the base ({base.dir})")
    tok_ck = base if cfg.tokenizer_source == "base" else models[names.index(cfg.tokenizer_source)]
    out_dtype_override = getattr(torch, cfg.dtype) if cfg.dtype else None
    plans = []
    for info in sorted(base.tensors.values(), key=lambda t: (str(t.file), t.offset)):
        for m, ck in zip(cfg.models, models, strict=True):
            dt = ck.tensors[info.name].dtype
            if dt.is_floating_point != info.dtype.is_floating_point or (not dt.is_floating_point and dt != info.dtype):
                raise ObimError(
                    f"tensor {info.name}: model '{m.name}' ({ck.dir}) stores it as {_dt(dt)}, the base "
                    f"as {_dt(info.dtype)}: integer (quantized?) and float weights cannot be merged"
                )
        shapes = [info.shape] + [ck.tensors[info.name].shape for ck in models]
        shared = None
        shape = info.shape
        if len(set(shapes)) > 1:
            if not _only_vocab_rows_differ(info.name, shapes, [base, *models]):
                desc = ", ".join(f"{n}: {list(s)}" for n, s in zip(["base", *names], shapes, strict=True))
                raise ObimError(
                    f"tensor {info.name}: shapes differ ({desc}); only the vocabulary rows of the "
                    "embeddings and lm_head may differ"
                )
            shared = min(s[0] for s in shapes)
            shape = tok_ck.tensors[info.name].shape
        floating = info.dtype.is_floating_point
        dtype = out_dtype_override if (floating and out_dtype_override) else info.dtype
        plans.append(TensorPlan(info.name, dtype, tuple(shape), shared))
    blocks = [b for b in map(block_index, base.tensors) if b is not None]
    n_blocks = max(blocks) + 1 if blocks else 0
    if cfg.method.combiner.needs_blocks and n_blocks < 2:
        raise ObimError(
            f"method {cfg.method.name} scales by depth, but the base ({base.dir}) has {n_blocks} decoder block(s) "
            "in its tensor names (layers.N, h.N, blocks.N): it needs two or more"
        )
    return [replace(p, n_blocks=n_blocks) for p in plans]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prepare_statistics(
    cfg: MergeConfig, models: list[Checkpoint], device: str, progress: bool
) -> tuple[list[StatsFile | InMemory | None], dict[str, dict[str, str]]]:
    """Open (and check) or compute each model's statistics of the kind the method merges with. Files are read a
    tensor at a time during the merge; statistics computed here (from `validation:`) are held in memory."""
    kind = cfg.method.statistics
    out: list[StatsFile | InMemory | None] = [None] * len(models)
    meta: dict[str, dict[str, str]] = {}
    if kind is None:
        return out, meta
    for i, (spec, ck) in enumerate(zip(cfg.models, models, strict=True)):
        if kind in spec.statistics:
            out[i] = open_statistics(spec.statistics[kind], kind, ck)
        else:
            v = spec.validation
            if v is None:  # load_config rejects this, but a MergeConfig built in code skips its checks
                raise ObimError(
                    f"model '{spec.name}': {cfg.method.name} needs {kind} statistics (a file or validation)"
                )
            texts = read_texts(v.data, v.size, v.text_field)
            stats, meta[spec.name] = compute_statistics(
                kind,
                str(ck.dir),
                texts,
                max_length=v.max_length,
                batch_size=v.batch_size,
                device=device,
                dtype=v.dtype,
                progress=progress,
                source=v.data,
            )
            mem = InMemory(kind, stats, meta[spec.name])
            check_statistics(mem, ck, f"statistics computed from {v.data}")
            out[i] = mem
    return out, meta


def _extra_rows(out: torch.Tensor, shared: int, sources: list[torch.Tensor]) -> None:
    """Rows past the shared ones: the mean of the models that have them (the tokenizer source always does)."""
    stops = sorted({min(s.shape[0], out.shape[0]) for s in sources if s.shape[0] > shared})
    start = shared
    for stop in stops:
        have = [s[start:stop].float() for s in sources if s.shape[0] >= stop]
        out[start:stop] = torch.stack(have).mean(0).to(out.device)
        start = stop


def _keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the OS: each fresh mmap'd tensor pays a
    page fault per 4 KiB, which made elementwise passes 3-5x slower (measured on 32M-entry tensors)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def merge_tensor(
    cfg: MergeConfig,
    plan: TensorPlan,
    tensors: list[torch.Tensor],
    stats: list[Any],
    device: torch.device,
) -> torch.Tensor:
    """Merge one tensor. `tensors` = [base, model 1, ...] as read; the list is consumed (emptied) so that each
    input is freed as soon as its task vector exists. `stats`: per model, None or its statistics (anything with
    `.get(tensor name)`: a StatsFile, a dict)."""
    base_t = tensors[0]
    if not base_t.is_floating_point():
        tensors.clear()
        return base_t
    rows = plan.shared_rows
    extra_sources = list(tensors) if rows is not None else []  # rows only some models have
    b, finite = _float32_minus(base_t if rows is None else base_t[:rows], None, device)
    if not finite:
        raise ObimError(f"tensor {plan.name}: the base model has NaN or Inf entries")
    deltas = []
    for spec in cfg.models:
        t = tensors.pop(1)
        d, finite = _float32_minus(t if rows is None else t[:rows], b, device)
        del t
        if not finite:
            raise ObimError(f"tensor {plan.name}: task vector of model '{spec.name}' has NaN or Inf entries")
        deltas.append(d)
    tensors.clear()
    method = cfg.method
    base_f32 = b if method.combiner.uses_base else None
    del b  # the base is re-read from its (smaller) stored dtype at the end (kept only for a combiner that needs it)
    ctx = TensorContext(
        name=plan.name,
        models=cfg.names,
        params=[m.params for m in cfg.models],
        seed=cfg.seed,
        order=tensor_order(cfg, plan.name),
        stats=[_stat_rows(h.get(plan.name), rows, method.statistics) if h is not None else None for h in stats],
        device=device,
        base=base_f32,
        block=block_index(plan.name),
        n_blocks=plan.n_blocks,
    )
    if method.combiner.uses_task_sum:  # before the sparsifier, which may trim the deltas in place
        ctx.task_sum_l1 = float(torch.linalg.vector_norm(_sum_of(deltas), ord=1, dtype=torch.float64))
    sparse = method.sparsifier(deltas, ctx)
    del deltas
    merged = method.combiner(sparse, ctx)
    del sparse, base_f32
    ctx.base = None
    lam = ctx.param("lambda")
    if lam != 1:  # (x·1 is x, -0.0 included: a pass saved)
        merged.mul_(lam)
    merged.add_((base_t[:rows] if rows is not None else base_t).to(device))
    if rows is not None:
        full = torch.empty(plan.out_shape, dtype=torch.float32, device=device)
        full[:rows] = merged
        _extra_rows(full, rows, extra_sources)
        merged = full
    return merged.to(plan.out_dtype).cpu()


_FUSED_MIN = 1 << 16  # entries from which a tensor's task vector takes the fused kernel (numba loads on use)
_FUSED_CHUNK = 1 << 18


def _float32_minus(t: torch.Tensor, base: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(t as float32 on device, minus base when given; whether every entry of that is finite). A CPU bf16 or
    float32 tensor takes one fused pass on the pool (kernels.widen_minus), where the torch ops took three
    (convert, subtract, the sum that finds a NaN or Inf); the same bytes."""
    fused = (
        _kernels_ready.is_set()  # (numba costs ~0.8 s to load: used here only once a method's selection loaded it)
        and device.type == "cpu"
        and t.dtype in (torch.bfloat16, torch.float32)
        and t.numel() >= _FUSED_MIN
        and t.is_contiguous()
        and (base is None or base.is_contiguous())
    )
    if not fused:
        d = t.to(device, torch.float32)
        if base is not None:
            d -= base
        # a sum is NaN/Inf when any entry is (10x cheaper than isfinite); confirmed before blaming the model
        return d, bool(torch.isfinite(d.sum())) or bool(torch.isfinite(d).all())
    from . import kernels

    src = t.view(-1).view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.view(-1).numpy()
    sub = base.view(-1).numpy() if base is not None else np.empty(0, np.float32)
    out = torch.empty(t.shape, dtype=torch.float32)
    flat = out.view(-1).numpy()
    kernel = kernels.widen_minus if t.dtype == torch.bfloat16 else kernels.copy_minus

    def work(s: int) -> bool:
        e = s + _FUSED_CHUNK
        return bool(kernel(src[s:e], sub[s:e] if sub.size else sub, flat[s:e]))

    return out, all(parallel_map(work, range(0, flat.size, _FUSED_CHUNK)))


_kernels_ready = threading.Event()
_warming: set[int] = set()  # the model counts whose kernels were loaded, or are being loaded


def warm_kernels(n_models: int) -> None:
    """Load numba and the merge's kernels on a thread of their own (~0.8 s), while the first tensors are read
    (once per process and model count)."""
    if n_models in _warming:
        return
    _warming.add(n_models)

    def run() -> None:
        try:
            from . import kernels

            kernels.warm(n_models)
            _kernels_ready.set()
        except Exception:
            pass

    # (not a daemon: a process ending while numba compiles waits for it rather than stopping it inside LLVM)
    threading.Thread(target=run, name="obim-warm").start()


def _stat_rows(t: torch.Tensor | None, rows: int | None, kind: str | None) -> torch.Tensor | None:
    """Per-entry statistics (Fisher's) of a vocabulary tensor whose rows differ: the shared rows, as the deltas."""
    return t[:rows] if t is not None and rows is not None and kind == "fisher" else t


def _sum_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


def _write_aux(
    tmp: Path, cfg: MergeConfig, base: Checkpoint, models: list[Checkpoint], plans: list[TensorPlan]
) -> None:
    tok_ck = base if cfg.tokenizer_source == "base" else models[cfg.names.index(cfg.tokenizer_source)]
    config = dict(base.config)
    vocab_rows = [p.out_shape[0] for p in plans if p.shared_rows is not None]
    if vocab_rows and "vocab_size" in config:
        config["vocab_size"] = vocab_rows[0]
    if cfg.dtype:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = cfg.dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = base.dir / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, tmp / "generation_config.json")
    for fname in TOKENIZER_FILES:
        if (tok_ck.dir / fname).exists():
            shutil.copyfile(tok_ck.dir / fname, tmp / fname)
    resolved = resolved_config(cfg)
    text = f"# written by obim {obim_version()}: the resolved merge config (local paths made absolute)\n"
    text += yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False)
    (tmp / "obim_merge.yaml").write_text(text)
    from .card import model_card

    (tmp / "README.md").write_text(model_card(cfg, resolved))  # the Hub's model card


def _local(p: str) -> str:
    """A local path made absolute (the recorded config then reruns from any directory); a hub id as it is."""
    q = Path(p).expanduser()
    return str(q.absolute()) if os.path.lexists(q) else p


def _absolute_paths(d: dict[str, Any]) -> dict[str, Any]:
    return map_paths(d, _local)


def resolved_config(cfg: MergeConfig) -> dict[str, Any]:
    """The resolved config with local paths made absolute: what obim_merge.yaml records, loadable from any
    directory (load_config) to the same merge."""
    return _absolute_paths(cfg.to_dict())


def _rel(f: Path, d: Path) -> str:
    return str(f.relative_to(d)) if f.is_relative_to(d) else str(f)


def _inputs(cfg: MergeConfig, config: Any, base: Checkpoint, models: list[Checkpoint]) -> dict[str, Path]:
    """Every file or folder the merge reads: OUT may not be, hold or lie in any of them (check_disjoint). The
    files are listed one by one: a shard may be a symlink to somewhere else."""
    out: dict[str, Path] = {"the base model": base.dir}
    out.update({f"file {_rel(f, base.dir)} of the base model": f for f in base.files()})
    for spec, ck in zip(cfg.models, models, strict=True):
        out[f"model '{spec.name}'"] = ck.dir
        out.update({f"file {_rel(f, ck.dir)} of model '{spec.name}'": f for f in ck.files()})
        for kind, f in spec.statistics.items():
            out[f"the {kind} file of '{spec.name}'"] = Path(f)
        if spec.validation is not None:
            out[f"the validation data of '{spec.name}'"] = Path(spec.validation.data)
    if isinstance(config, (str, Path)):
        out["the merge config"] = Path(config)
    return out


class MergeStream:
    """A merge's tensors one name at a time, `(name, merged tensor)` in the planned order, never the whole model in
    memory: what `merge` writes, and what an evaluator loads in place (obim.bench.evaluation) without writing it.
    Opening reads the inputs' headers and plans every tensor (shapes, dtypes, vocabulary rows) before anything is
    computed; `prepare()` then loads or computes the statistics. Close it (or use it as a context manager) to
    release the inputs."""

    def __init__(self, config: Any, device: str = "cpu") -> None:
        self.cfg = config if isinstance(config, MergeConfig) else load_config(config)
        self.device = torch.device(require("--device", device, device_check))
        self.base = open_checkpoint(self.cfg.base_model)
        self.models = [open_checkpoint(m.path) for m in self.cfg.models]
        try:
            self.plans = plan_merge(self.cfg, self.base, self.models)
        except BaseException:
            self.close()
            raise
        self.stats: list[Any] | None = None
        self.hdiag_meta: dict[str, dict[str, str]] = {}
        self.saliency_s = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(torch.empty((), dtype=p.out_dtype).element_size() * _numel(p.out_shape) for p in self.plans)

    def prepare(self, progress: bool = False) -> MergeStream:
        """The statistics the method merges with (read and checked, or computed from validation data)."""
        if self.stats is None:
            largest = max((_numel(p.out_shape) for p in self.plans), default=0)
            if self.device.type == "cpu" and largest >= _FUSED_MIN and self.cfg.method.uses_kernels:
                warm_kernels(len(self.cfg.models))  # beside the statistics' loading, and the first reads
            _keep_freed_memory()
            t0 = time.perf_counter()
            self.stats, self.hdiag_meta = prepare_statistics(self.cfg, self.models, str(self.device), progress)
            self.saliency_s = time.perf_counter() - t0
        return self

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        stats = self.prepare().stats
        assert stats is not None
        plans, base, models = self.plans, self.base, self.models

        def read(p: TensorPlan) -> list[torch.Tensor]:
            return [base.get(p.name), *(ck.get(p.name) for ck in models)]

        # Prefetch the next tensor while merging this one, unless both are large: two of those in flight would
        # raise the peak memory, which the largest tensors set.
        largest = max((_numel(p.out_shape) for p in plans), default=0)

        def prefetch(j: int) -> bool:
            return j < len(plans) and not (
                4 * _numel(plans[j].out_shape) >= largest and 4 * _numel(plans[j - 1].out_shape) >= largest
            )

        with ThreadPoolExecutor(1, thread_name_prefix="obim-read") as pool:
            pending = pool.submit(read, plans[0]) if plans else None
            try:
                for j, p in enumerate(plans):
                    tensors = pending.result() if pending is not None else read(p)
                    pending = pool.submit(read, plans[j + 1]) if prefetch(j + 1) else None
                    yield p.name, merge_tensor(self.cfg, p, tensors, stats, self.device)
            finally:
                if pending is not None:
                    pending.cancel()

    def close(self) -> None:
        for ck in (self.base, *self.models):
            ck.release()

    def __enter__(self) -> MergeStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def merge(
    config: Any, out_dir: str | Path, *, device: str = "cpu", overwrite: bool = False, progress: bool = True
) -> MergeResult:
    """Merge per `config` (a YAML path, a dict, a DictConfig or a MergeConfig) into the model directory out_dir."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    with MergeStream(config, device) as stream:
        cfg, base, models, plans = stream.cfg, stream.base, stream.models, stream.plans
        inputs = _inputs(cfg, config, base, models)
        check_disjoint(out, inputs)
        check_output_dir(out, overwrite)
        stream.prepare(progress)

        t1 = time.perf_counter()
        shards = plan_shards([(p.name, p.out_dtype, p.out_shape) for p in plans], cfg.shard_size)
        total = stream.total_bytes
        with staged_output(out, overwrite, keep=tuple(inputs.values())) as tmp:
            writer = ShardedWriter(tmp, shards)
            # each tensor is written on a thread of its own while the next one merges (one write in flight: the
            # peak memory grows by one merged tensor at most)
            pending: Future | None = None
            try:
                bar = tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"merge {cfg.method.name}", disable=not progress
                )
                with ThreadPoolExecutor(1, thread_name_prefix="obim-write") as write_pool:
                    for (name, merged), p in zip(stream, plans, strict=True):
                        if pending is not None:
                            pending.result()
                        pending = write_pool.submit(writer.write, name, merged)
                        bar.update(_numel(p.out_shape) * torch.empty((), dtype=p.out_dtype).element_size())
                    if pending is not None:
                        pending.result()
                bar.close()
                writer.finish()
            except BaseException:
                if pending is not None:
                    wait([pending])  # the write in flight ends before its file closes
                writer.abort()
                raise
            _write_aux(tmp, cfg, base, models, plans)
    return MergeResult(out, stream.saliency_s, time.perf_counter() - t1, len(plans), total, stream.hdiag_meta)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
