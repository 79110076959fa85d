"""Checkpoint I/O: lazy readers for Hugging Face model directories and a streaming sharded writer.

Readers open headers only; `Checkpoint.get(name)` reads one tensor into fresh memory, so a merge holds a few
tensors per model at a time. safetensors files are read with one positioned read per tensor (an mmap would keep
every page it touched resident while the file stays open); `.bin` shards are opened lazily with
`torch.load(mmap=True, weights_only=True)`, one shard per model at a time.

The writer plans shards from names, shapes and dtypes known up front, writes each file's safetensors header first
and then each tensor's bytes as they arrive: safetensors' own `save_file` needs a whole shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, overload

import torch

from .errors import ObimError
from .safeio import check_regular, open_regular, parse_json, read_json_file

# safetensors dtype codes <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}

# Files of a model directory that describe its tokenizer (copied from `tokenizer_source`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
)
# Files besides the weights and their index/config that a merge copies into its output.
AUX_FILES = ("generation_config.json", *TOKENIZER_FILES)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset in a safetensors file (unused for .bin)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Parse and validate a safetensors header against the file before any tensor is read, as the safetensors
    library does: a known dtype and non-negative shape per tensor, byte ranges that match the shapes and tile
    the data section exactly (contiguous, non-overlapping, ending at the end of the file)."""
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ObimError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8 or hlen > 100_000_000:
            raise ObimError(f"{path}: corrupt or truncated safetensors file (header length {hlen}, file {size} bytes)")
        header = parse_json(f.read(hlen), f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise ObimError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ObimError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    infos: dict[str, TensorInfo] = {}
    data_start = 8 + hlen
    spans = []
    for name, h in header.items():
        try:
            dtype = ST_DTYPES[h["dtype"]]
            shape, offsets = h["shape"], h["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
                raise TypeError
            if not all(type(x) is int for x in (*shape, *offsets)):
                raise TypeError
        except (KeyError, TypeError):
            raise ObimError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if any(d < 0 for d in shape):
            raise ObimError(f"{path}: tensor {name} has a negative dimension in its shape {shape}")
        begin, end = offsets
        info = TensorInfo(name, dtype, tuple(shape), path, data_start + begin)
        if begin < 0 or end - begin != info.nbytes:
            raise ObimError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {h['dtype']}")
        spans.append((begin, end, name))
        infos[name] = info
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise ObimError(f"{path}: tensor {name}'s data_offsets [{begin}, {end}] {what} (corrupt header)")
        pos = end
    if data_start + pos > size:
        raise ObimError(f"{path}: truncated safetensors file ({size} bytes, its header needs {data_start + pos})")
    if data_start + pos < size:
        raise ObimError(
            f"{path}: {size - data_start - pos} bytes after the last tensor (corrupt or not a safetensors file)"
        )
    return meta, infos


def _bin_compressed(path: Path) -> bool:
    """True for a zip-format torch checkpoint with compressed tensor storage: mmap would read the compressed
    bytes as tensor data, so it must be read without mmap."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


class Checkpoint:
    """A Hugging Face model directory opened lazily: names, shapes and dtypes now, tensor data on demand."""

    def __init__(self, spec: str, directory: Path):
        self.spec = spec
        self.dir = directory
        self.config = self._read_json("config.json", required=True)
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_file: Path | None = None
        self._bin_state: dict | None = None
        st_files = sorted(directory.glob("*.safetensors"))
        bin_files = sorted(p for p in directory.glob("*.bin") if re.match(r"pytorch_model.*\.bin$", p.name))
        if st_files:
            self.format = "safetensors"
            files = self._index_files("model.safetensors.index.json") or st_files
            for f in files:
                if not os.path.lexists(f):
                    raise ObimError(f"{f}: shard named in model.safetensors.index.json is missing")
                _, infos = read_safetensors_header(f)
                self._add(infos.values())
        elif bin_files:
            self.format = "bin"
            files = self._index_files("pytorch_model.bin.index.json") or bin_files
            for f in files:
                state = self._load_bin(f)
                self._add(TensorInfo(k, v.dtype, tuple(v.shape), f) for k, v in state.items())
                del state
        else:
            raise ObimError(f"{directory}: no *.safetensors or pytorch_model*.bin weights (model '{spec}')")
        for n in AUX_FILES:  # copied into a merge's output later: a FIFO or device would hang it there
            if os.path.lexists(directory / n):
                check_regular(directory / n, n)

    def _add(self, infos) -> None:
        for info in infos:
            if info.name in self.tensors:
                raise ObimError(f"{info.file}: tensor {info.name} also stored in {self.tensors[info.name].file}")
            self.tensors[info.name] = info

    @overload
    def _read_json(self, name: str, required: Literal[True]) -> dict: ...
    @overload
    def _read_json(self, name: str, required: bool = False) -> dict | None: ...
    def _read_json(self, name: str, required: bool = False) -> dict | None:
        p = self.dir / name
        if not os.path.lexists(p):
            if required:
                raise ObimError(f"{p}: missing (model '{self.spec}' is not a Hugging Face model directory)")
            return None
        out = read_json_file(p, name)
        if not isinstance(out, dict):
            raise ObimError(f"{p}: expected a JSON object, got a {type(out).__name__}")
        return out

    def _index_files(self, name: str) -> list[Path]:
        """The shards an index names ([] without an index); each must be a file name inside the directory."""
        index = self._read_json(name)
        if index is None:
            return []
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(f, str) for f in wm.values()):
            raise ObimError(f"{self.dir / name}: expected a non-empty `weight_map` of tensor name -> shard file")
        bad = [f for f in wm.values() if Path(f).name != f]
        if bad:
            raise ObimError(f"{self.dir / name}: shard {bad[0]!r} is not a file name in {self.dir}")
        return sorted({self.dir / f for f in wm.values()})

    @staticmethod
    def _load_bin(path: Path) -> dict:
        check_regular(path, "PyTorch checkpoint")
        try:
            try:
                if _bin_compressed(path):  # read whole: mmap would take compressed bytes for tensor data
                    raise RuntimeError("mmap: compressed")
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
        except Exception as e:  # torch raises many types for corrupt pickles/zips
            raise ObimError(
                f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})".splitlines()[0]
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ObimError(f"{path}: not a state dict of tensors")
        return state

    def files(self) -> list[Path]:
        """Every file of the directory a merge or saliency pass reads: weights, indexes, configs, tokenizer."""
        names = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", *AUX_FILES}
        out = {t.file for t in self.tensors.values()}
        out |= {self.dir / n for n in names if os.path.lexists(self.dir / n)}
        return sorted(out)

    @property
    def architecture(self) -> tuple[str, tuple[str, ...]]:
        return str(self.config.get("model_type")), tuple(self.config.get("architectures") or ())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory that owns its data (nothing stays mapped afterwards)."""
        info = self.tensors[name]
        if self.format == "safetensors":
            out = torch.empty(info.shape, dtype=info.dtype)
            buf = out.view(-1).view(torch.uint8).numpy().data if out.numel() else memoryview(bytearray())
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.offset)
                got = f.readinto(buf)
            if got != info.nbytes:
                raise ObimError(f"{info.file}: truncated while reading tensor {name}")
            return out
        # one mmap'd .bin shard per model at a time (_bin_state is None only while _bin_file is)
        if self._bin_file != info.file or self._bin_state is None:
            self._bin_state = None
            self._bin_state = self._load_bin(info.file)
            self._bin_file = info.file
        return self._bin_state[name].clone()

    def fingerprint(self) -> str:
        """These weights, wherever and however sharded they are stored: each tensor's name, dtype and shape and three
        1 KiB samples of its bytes (start, middle, end). ~3 KiB read per tensor; a fine-tune changes every sample
        of each tensor it trained, so an hdiag file made for another model of the same shape does not match."""
        samples: dict[str, bytes] = {}
        for info in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.offset, t.name)):
            n = info.nbytes
            c = min(1024, n)
            starts = sorted({0, (n - c) // 2, n - c})
            if self.format == "safetensors":
                with open(info.file, "rb", buffering=0) as f:
                    parts = []
                    for st in starts:
                        f.seek(info.offset + st)
                        parts.append(f.read(c))
                samples[info.name] = b"".join(parts)
            else:
                if self._bin_file != info.file or self._bin_state is None:
                    self._bin_state, self._bin_file = self._load_bin(info.file), info.file
                raw = self._bin_state[info.name].contiguous().view(-1).view(torch.uint8) if n else torch.empty(0)
                samples[info.name] = b"".join(raw[st : st + c].numpy().tobytes() for st in starts)
        self.release()
        h = hashlib.sha256()
        for name in sorted(samples):
            info = self.tensors[name]
            h.update(json.dumps([name, ST_CODES.get(info.dtype, str(info.dtype)), list(info.shape)]).encode())
            h.update(samples[name])
        return h.hexdigest()[:32]

    @property
    def n_params(self) -> int:
        """Parameters stored (every tensor's element count), read from the headers."""
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def release(self) -> None:
        self._bin_state, self._bin_file = None, None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name`, not a path: what resolve_model_dir fetches from the hub when no such directory exists."""
    return bool(spec) and not spec.startswith((".", "/", "~")) and spec.count("/") <= 1


def resolve_model_dir(spec: str) -> Path:
    """A local model directory, or a hub id fetched (weights, configs, tokenizer) into the HF cache."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ObimError(f"{spec}: is a file, expected a model directory or a hub id")
    if not looks_like_hub_id(spec):
        raise ObimError(f"{spec}: model directory not found")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        d = Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=_offline()))
        if not any(d.glob("*.safetensors")):
            d = Path(
                snapshot_download(spec, allow_patterns=[*patterns, "pytorch_model*.bin"], local_files_only=_offline())
            )
        return d
    except Exception as e:
        if _offline():
            raise ObimError(
                f"model '{spec}': not a local directory, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
            ) from None
        raise ObimError(
            f"model '{spec}': not a local directory and not downloadable from the hub ({type(e).__name__})"
        ) from None


def open_checkpoint(spec: str) -> Checkpoint:
    return Checkpoint(spec, resolve_model_dir(spec))


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class Shard:
    file: str
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[Shard]:
    """Greedy packing in visiting order, HF file names; one tensor larger than the limit gets its own shard."""
    groups: list[list] = [[]]
    size = 0
    for name, dtype, shape in entries:
        nbytes = TensorInfo(name, dtype, shape, Path()).nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, shape))
        size += nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Writes planned safetensors shards tensor by tensor, in plan order, holding nothing but the current tensor."""

    def __init__(self, directory: Path, shards: list[Shard], metadata: dict[str, str] | None = None):
        self.dir = directory
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(si, name, dtype, shape) for si, s in enumerate(shards) for name, dtype, shape in s.tensors]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def _open(self, si: int) -> None:
        self._close()
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for name, dtype, shape in self.shards[si].tensors:
            nbytes = TensorInfo(name, dtype, shape, Path()).nbytes
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
        # open across write() calls, one shard at a time; closed when the shard is full or by close()
        self._file = open(self.dir / self.shards[si].file, "wb")  # noqa: SIM115  (see above)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, want, dtype, shape = self._queue[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if si != self._shard:
            self._open(si)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            assert self._file is not None  # _open(si) ran for this shard
            self._file.write(t.view(-1).view(torch.uint8).numpy().data)
        self._pos += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self._queue)} tensors")
        self._close()
        if len(self.shards) > 1:
            weight_map = {name: s.file for s in self.shards for name, _, _ in s.tensors}
            total = sum(TensorInfo(n, d, sh, Path()).nbytes for s in self.shards for n, d, sh in s.tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close()
