"""Write an offline Hugging Face home (HF_HOME) without the network, in the layouts the libraries read offline.

`write_repo`: the files of a hub repo (a model, or one file of a dataset repo) in huggingface_hub's cache:

    <hub_dir>/<models|datasets>--<org>--<name>/refs/main                  the commit: 40 hex, no newline
                                              /blobs/<sha256 | git sha1>  each file's bytes, once
                                              /snapshots/<commit>/<path>  relative symlink to its blob

`write_processed`: one config of a hub dataset in datasets' processed cache, the only layout `datasets` (5.x) loads
with HF_DATASETS_OFFLINE=1 (a dataset *repo* in the hub cache is not read offline):

    <home>/datasets/<org>___<snake name>/<config>/0.0.0/<hash>/dataset_info.json
                                                              /<snake name>-<split>.arrow   (Arrow IPC stream)

Both are deterministic (same input, same bytes and names) and idempotent, and replace what they write atomically
(temporary name, then rename), so a reader never sees half a repo or half a dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import datasets

RepoType = Literal["model", "dataset"]

# Files the hub stores through git LFS (named by sha256 in the cache); other files are git blobs (git sha1). The
# split only has to give each content a unique name; this one matches what hf_hub_download writes for most repos.
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model", ".parquet",
     ".arrow", ".pkl", ".npy", ".npz", ".zip", ".gz", ".tar", ".zst"}
)  # fmt: skip
LFS_MIN_BYTES = 10 * 2**20
PROCESSED_VERSION = "0.0.0"  # what datasets gives a hub dataset without a loading script
_CHUNK = 2**20


def fake_commit(*parts: str) -> str:
    """A deterministic 40-hex commit id for `parts` (the hub accepts any 40 lowercase hex digits)."""
    return hashlib.sha1("\0".join(("obim-rehearsal", *parts)).encode()).hexdigest()


def _is_lfs(path: Path, size: int) -> bool:
    return path.suffix in LFS_SUFFIXES or size >= LFS_MIN_BYTES


def blob_id(path: Path) -> str:
    """The name the hub cache gives a file's blob: sha256 of an LFS file, else the git blob sha1 (streamed)."""
    size = path.stat().st_size
    h = hashlib.sha256() if _is_lfs(path, size) else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def repo_folder(hub_dir: str | Path, repo_id: str, repo_type: RepoType = "model") -> Path:
    """`<hub_dir>/models--org--name` (or `datasets--...`), as huggingface_hub names a repo's cache folder."""
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    return Path(hub_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _replace_link(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_repo(
    hub_dir: str | Path,
    repo_id: str,
    src_dir: str | Path,
    repo_type: RepoType = "model",
    *,
    commit: str | None = None,
    symlinks: bool = True,
) -> Path:
    """Put every file under `src_dir` into the hub cache `hub_dir` (HF_HOME/hub) as repo `repo_id` at `commit`
    and point refs/main at it; returns the snapshot folder (what snapshot_download would return).

    The commit defaults to a hash of the repo's id and contents, so a changed file gives a new commit (and a new
    snapshot), an unchanged one the same. Files already in the snapshot but not in `src_dir` are removed.
    `symlinks=False` writes plain copies into the snapshot (huggingface_hub's layout where symlinks are not
    supported), no blobs."""
    src = Path(src_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"write_repo {repo_id}: no files under {src}")
    ids = {f.relative_to(src).as_posix(): blob_id(f) for f in files}
    if commit is None:
        commit = fake_commit(repo_type, repo_id, *(f"{rel}:{bid}" for rel, bid in ids.items()))
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"write_repo {repo_id}: commit must be 40 lowercase hex digits, got {commit!r}")
    folder = repo_folder(hub_dir, repo_id, repo_type)
    snap = folder / "snapshots" / commit
    for f in files:
        rel = f.relative_to(src).as_posix()
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not symlinks:
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            shutil.copyfile(f, tmp)
            os.replace(tmp, dst)
            continue
        blob = folder / "blobs" / ids[rel]
        if not blob.is_file():  # a blob's name is its content hash: one already there is this file
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f".{blob.name}.tmp-{os.getpid()}")
            shutil.copyfile(f, tmp)
            os.replace(tmp, blob)
        _replace_link(os.path.relpath(blob, dst.parent), dst)
    keep = {snap / rel for rel in ids}
    for p in sorted(snap.rglob("*"), reverse=True):  # children before their folders
        if (p.is_file() or p.is_symlink()) and p not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    _write_text(folder / "refs" / "main", commit)  # no newline: huggingface_hub reads the file verbatim
    return snap


# ------------------------------------------------------------------------------------ datasets' processed cache


def dataset_folder_name(repo_id: str) -> str:
    """`org___snake_name`: the folder datasets keeps a hub dataset's processed configs in."""
    from datasets.naming import camelcase_to_snakecase

    *ns, name = repo_id.split("/")
    return "___".join([*ns, camelcase_to_snakecase(name)])


def processed_dir(home: str | Path, repo_id: str, config: str, hash_: str | None = None) -> Path:
    """Where write_processed puts one config: `<home>/datasets/<org>___<snake>/<config>/0.0.0/<hash>`. The hash
    (a hub commit, as datasets uses) is one per repo: every config of a dataset comes from the same commit."""
    return (
        Path(home)
        / "datasets"
        / dataset_folder_name(repo_id)
        / config
        / PROCESSED_VERSION
        / (hash_ or fake_commit("dataset", repo_id))
    )


SplitRows = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def write_processed(
    home: str | Path,
    repo_id: str,
    config: str,
    splits: Mapping[str, SplitRows],
    features: datasets.Features,
    *,
    hash_: str | None = None,
) -> Path:
    """Write one config of hub dataset `repo_id` into datasets' processed cache under `home` (HF_HOME), so that
    `datasets.load_dataset(repo_id, config, split=...)` loads it offline; returns its folder.

    `config`: the real config name; a dataset without named configs is loaded as config "default" (what datasets
    calls it, and the folder it caches it in), and `load_dataset(repo_id)` finds it when it is the only one.
    `splits`: {split: records (a list of dicts) or columns (a dict of lists)}, encoded with `features` (a
    `datasets.Features`: ClassLabel values as ints or names)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase, filenames_for_dataset_split

    name = camelcase_to_snakecase(repo_id.split("/")[-1])  # the builder's dataset_name: the .arrow files' prefix
    final = processed_dir(home, repo_id, config, hash_)
    staging_root = Path(home) / "datasets" / ".obim-staging"  # outside the <repo>/*/*/* glob datasets searches
    staging_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.parent.parent.parent.name}-{config}-", dir=staging_root))
    try:
        split_dict = datasets.SplitDict(dataset_name=name)
        for split, rows in splits.items():
            ds = (
                datasets.Dataset.from_dict(dict(rows), features=features)
                if isinstance(rows, Mapping)
                else datasets.Dataset.from_list(list(rows), features=features)
            )
            (path,) = filenames_for_dataset_split(str(tmp), dataset_name=name, split=split, filetype_suffix="arrow")
            with ArrowWriter(features=features, path=path) as w:
                w.write_table(ds.data.table)
                n, nbytes = w.finalize()
            split_dict.add(datasets.SplitInfo(name=split, num_bytes=nbytes, num_examples=n, dataset_name=name))
        info = datasets.DatasetInfo(
            features=features,
            builder_name="parquet",  # what the hub's parquet datasets are built with
            dataset_name=name,
            config_name=config,  # must equal the folder name for datasets to take the folder as this config
            version=PROCESSED_VERSION,
            splits=split_dict,
            dataset_size=sum(s.num_bytes for s in split_dict.values()),
        )
        info.write_to_directory(str(tmp))
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():  # a folder cannot be renamed onto a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix="old-", dir=staging_root))
            os.replace(final, old / "x")
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # another writer's staging folder may be in it
            staging_root.rmdir()
    return final
