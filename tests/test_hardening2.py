"""Hardening, round two (issue 21): no write lands on or through an input, writers of one OUT exclude each other,
dead writers' debris goes, and malformed or hostile input files are refused in one line. Each test names the
defect it reproduces (the issue's numbering)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import start_merge, wait_mid_merge
from safetensors.torch import load_file, save_file

from obim import load_config, merge
from obim.merging import staging
from obim.merging.checkpoint import Checkpoint, open_checkpoint, read_safetensors_header
from obim.merging.cli import merge_main
from obim.merging.errors import ObimError
from obim.merging.staging import clean_stale_staging, host_tag, staged_output

RET = {"lm": 0.4, "math": 0.45, "code": 0.1}


def cfg(zoo, method="ta", **kw):
    models = [{"name": n, "path": str(zoo[n])} for n in RET]
    return {"method": method, "base_model": str(zoo["base"]), "models": models, "seed": 0, **kw}


def refused(fn, match: str) -> str:
    with pytest.raises(ObimError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".obim-" in p.name)


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ 1-3: no write onto an input


def test_2_input_shard_symlinked_into_out_is_refused(zoo, tmp_path):
    out = tmp_path / "out"
    merge(cfg(zoo), out, progress=False)
    before = (out / "model.safetensors").read_bytes()
    lm = copy_model(zoo["lm"], tmp_path / "lm")
    (lm / "model.safetensors").unlink()
    (lm / "model.safetensors").symlink_to(out / "model.safetensors")  # a model made from the last merge
    c = cfg(zoo)
    c["models"][0]["path"] = str(lm)
    refused(
        lambda: merge(c, out, overwrite=True, progress=False),
        r"out: the output directory contains file model\.safetensors of model 'lm' \(.*-> .*out/model",
    )
    assert (out / "model.safetensors").read_bytes() == before and debris(tmp_path) == []


def test_2_out_reached_through_a_second_path_is_refused(zoo, tmp_path):
    """The same directory by another path (here a symlinked parent): identity, not spelling, decides."""
    lm = copy_model(zoo["lm"], tmp_path / "lm")
    (tmp_path / "alias").symlink_to(tmp_path)
    c = cfg(zoo)
    c["models"][0]["path"] = str(lm)
    refused(lambda: merge(c, tmp_path / "alias" / "lm" / "sub", progress=False), r"lies inside model 'lm'")
    refused(lambda: merge(c, tmp_path / "alias", overwrite=True, progress=False), r"contains model 'lm'")


@pytest.mark.parametrize("existing", [False, True])
def test_3_out_symlink_to_a_directory_is_written_through(zoo, tmp_path, existing):
    target = tmp_path / "scratch" / "merged"
    target.parent.mkdir()
    if existing:
        merge(cfg(zoo, "ties"), target, progress=False)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    merge(cfg(zoo), link, overwrite=existing, progress=False)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert yaml.safe_load((target / "obim_merge.yaml").read_text())["method"] == "ta"
    assert debris(tmp_path) == [] and debris(target.parent) == []


# ------------------------------------------------------------------------------------ 4-5: concurrent writers


@pytest.mark.slow
def test_4_two_merges_to_one_new_out_exactly_one_wins(zoo, tmp_path):
    out = tmp_path / "out"
    first = start_merge(cfg(zoo, "ta"), out, tmp_path, "a", pause=0.5)
    wait_mid_merge(first, out)  # the second starts while OUT is still absent
    second = start_merge(cfg(zoo, "ties"), out, tmp_path, "b", pause=0.1)
    t_end = time.time() + 60
    while len(list(tmp_path.glob(".out.obim-tmp-*"))) < 2:  # both past the start's check, both staging
        assert time.time() < t_end and first.poll() is None and second.poll() is None
        time.sleep(0.02)
    errs = [p.communicate(timeout=300)[1] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 1], (codes, errs)
    loser = errs[codes.index(1)].strip()
    assert "\n" not in loser and "another writer completed it" in loser, loser
    winner = ["ta", "ties"][codes.index(0)]
    assert yaml.safe_load((out / "obim_merge.yaml").read_text())["method"] == winner
    ck = open_checkpoint(str(out))
    assert all(torch.isfinite(ck.get(n).float()).all() for n in ck.tensors)
    assert debris(tmp_path) == []


def test_4_out_filled_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with (  # noqa: PT012  (the error must rise where the staged block ends, after OUT was filled in it)
        pytest.raises(ObimError, match="another writer completed it"),
        staged_output(out, overwrite=False) as tmp,
    ):
        (tmp / "mine").write_text("x")
        out.mkdir()
        (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"] and debris(tmp_path) == []
    (out / "obim_merge.yaml").write_text("")  # an obim output: --overwrite may replace it, even if it came late
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("x")
    assert [p.name for p in out.iterdir()] == ["mine"] and debris(tmp_path) == []


def test_4_out_filled_between_the_check_and_the_rename(tmp_path, monkeypatch):
    """The narrowest race: OUT passes the swap's check, then another writer fills it before the rename."""
    out = tmp_path / "out"
    real = staging.check_output_dir
    calls = []

    def check_then_race(o, overwrite, marker=staging.OUTPUT_MARKER):
        real(o, overwrite, marker)
        calls.append(o)
        if len(calls) == 2:  # the swap's first check (the first is staged_output's at the start)
            out.mkdir()
            (out / "theirs").write_text("y")

    monkeypatch.setattr(staging, "check_output_dir", check_then_race)
    with pytest.raises(ObimError, match="another writer completed it"), staged_output(out, overwrite=False) as tmp:
        (tmp / "mine").write_text("x")
    assert [p.name for p in out.iterdir()] == ["theirs"] and debris(tmp_path) == []


def _lock_of(tmp: Path) -> Path:
    return tmp.parent / tmp.name.replace(".obim-tmp-", ".obim-lock-")


def _held(lock: Path) -> bool:
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_5_a_starting_writer_never_exposes_an_unheld_lock(tmp_path, monkeypatch):
    """Another writer's cleanup runs in the window before this writer's flock: the lock must survive it."""
    real = staging.fcntl.flock
    ran = []

    def flock_after_a_cleanup(fd, op):
        if not ran:
            ran.append(clean_stale_staging(tmp_path))
        return real(fd, op)

    monkeypatch.setattr(staging.fcntl, "flock", flock_after_a_cleanup)
    with staged_output(tmp_path / "out", overwrite=False) as tmp:
        monkeypatch.setattr(staging.fcntl, "flock", real)
        assert ran == [[]]
        assert _lock_of(tmp).exists() and _held(_lock_of(tmp))
        (tmp / "f").write_text("x")
    assert debris(tmp_path) == []


def test_5_staging_names_carry_the_host_and_other_hosts_are_left_alone(tmp_path):
    with staged_output(tmp_path / "out", overwrite=False) as tmp:
        assert f".obim-tmp-{host_tag()}-{os.getpid()}-" in tmp.name
    dead = 2**22 + 12345  # above pid_max's default: no such process here
    mine = tmp_path / f".x.obim-tmp-{host_tag()}-{dead}-0123abcd"
    other = tmp_path / f".x.obim-tmp-otherhost-{dead}-0123abcd"
    mine.mkdir()
    other.mkdir()
    assert clean_stale_staging(tmp_path) == [] and mine.is_dir()  # lockless and fresh: maybe another pid namespace
    long_ago = time.time() - 3600
    for p in (mine, other):
        os.utime(p, (long_ago, long_ago))
    assert clean_stale_staging(tmp_path) == [mine] and other.is_dir()  # another host's, without a lock: kept


def test_5_another_hosts_free_lock_needs_its_staging_unchanged(tmp_path):
    """flock may be local to each host (NFS nolock, Lustre localflock): a lock free from here is not enough."""
    sid = f"otherhost-{os.getpid()}-0123abcd"
    tmp, lock = tmp_path / f".x.obim-tmp-{sid}", tmp_path / f".x.obim-lock-{sid}"
    tmp.mkdir()
    lock.write_text("x")
    assert clean_stale_staging(tmp_path) == [] and tmp.is_dir()
    long_ago = time.time() - staging.STALE_S - 60
    for p in (lock, tmp):
        os.utime(p, (long_ago, long_ago))
    assert sorted(clean_stale_staging(tmp_path)) == sorted([tmp, lock])


def test_5_another_hosts_staging_still_changing_is_kept(tmp_path):
    """A free lock from another host with an old mtime is not enough while its staging's files still change."""
    sid = f"otherhost-{os.getpid()}-0123abcd"
    tmp, lock = tmp_path / f".x.obim-tmp-{sid}", tmp_path / f".x.obim-lock-{sid}"
    (tmp / "sub").mkdir(parents=True)
    lock.write_text("x")
    long_ago = time.time() - staging.STALE_S - 60
    for p in (lock, tmp, tmp / "sub"):
        os.utime(p, (long_ago, long_ago))
    (tmp / "sub" / "model.safetensors").write_bytes(b"x")  # its writer wrote a shard just now
    os.utime(tmp / "sub", (long_ago, long_ago))
    assert clean_stale_staging(tmp_path) == [] and tmp.is_dir()


def test_5_signal_during_the_swap_is_deferred(tmp_path, monkeypatch):
    """SIGTERM delivered to another thread (torch's workers exist by then) between the two renames of an overwrite
    must not leave OUT missing: it is deferred until OUT is in place, and reported as such."""
    import threading

    out = tmp_path / "out"
    out.mkdir()
    (out / "obim_merge.yaml").write_text("old")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a thread that does not block SIGTERM
    other.start()
    real = os.rename

    def rename_then_signal(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".out.obim-old-"):  # between the two renames
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # let the handler run, as it would at any later bytecode

    monkeypatch.setattr(staging.os, "rename", rename_then_signal)
    try:
        with (
            pytest.raises(staging.Terminated) as e,
            staging.sigterm_as_interrupt(),
            staged_output(out, overwrite=True) as tmp,
        ):
            (tmp / "obim_merge.yaml").write_text("new")
    finally:
        stop.set()
        other.join()
    assert getattr(e.value, "completed", None) == out
    assert (out / "obim_merge.yaml").read_text() == "new" and debris(tmp_path) == []


def test_5_killed_between_the_renames_previous_output_restored(tmp_path):
    sid = f"{host_tag()}-{2**22 + 12345}-0123abcd"
    old = tmp_path / f".out.obim-old-{sid}"
    old.mkdir()
    (old / "obim_merge.yaml").write_text("previous")
    (tmp_path / f".out.obim-tmp-{sid}").mkdir()  # the new output, never renamed in
    (tmp_path / f".out.obim-lock-{sid}").write_text("out")
    clean_stale_staging(tmp_path)
    assert (tmp_path / "out" / "obim_merge.yaml").read_text() == "previous" and debris(tmp_path) == []


def test_5_inputs_among_debris_are_kept(tmp_path):
    sid = f"{host_tag()}-{2**22 + 12345}-0123abcd"
    old = tmp_path / f".m.obim-old-{sid}"
    old.mkdir()
    (tmp_path / f".m.obim-lock-{sid}").write_text("m")
    (tmp_path / "m").mkdir()  # OUT present: the trash would simply go
    assert clean_stale_staging(tmp_path, keep=(old / "config.json",)) == [] and old.is_dir()


def test_5_no_flock_on_the_filesystem_falls_back(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(staging.fcntl, "flock", no_flock)
    staging._warned.clear()
    with caplog.at_level(logging.WARNING, logger="obim"), staged_output(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "f").write_text("x")
        # a live writer without flock is judged by host and pid: kept
        assert clean_stale_staging(tmp_path) == [] and tmp.is_dir()
    assert (tmp_path / "out" / "f").is_file() and debris(tmp_path) == []
    assert any("has no flock" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------- 6: safetensors headers


def _st(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("overlap", r"tensor b's data_offsets \[8, 24\] overlaps the tensor before it"),
        ("gap", r"tensor b's data_offsets \[24, 40\] leaves a gap of 8 bytes"),
        ("trailing", r"8 bytes after the last tensor"),
        ("negative", r"tensor a has a negative dimension in its shape \[-4, -1\]"),
        ("dtype", r"corrupt safetensors header entry for tensor a"),
        ("float_offset", r"corrupt safetensors header entry for tensor a"),
        ("metadata", r"__metadata__ must map strings to strings"),
    ],
)
def test_6_safetensors_header_validated(tmp_path, case, match):
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    data = bytes(32)
    if case == "overlap":
        b["data_offsets"] = [8, 24]
    elif case == "gap":
        b["data_offsets"], data = [24, 40], bytes(40)
    elif case == "trailing":
        data = bytes(40)
    elif case == "negative":
        a["shape"] = [-4, -1]
    elif case == "dtype":
        a["dtype"] = "Q4"
    elif case == "float_offset":
        a["data_offsets"] = [0.0, 16]
    header = {"a": a, "b": b}
    if case == "metadata":
        header["__metadata__"] = {"k": 1}
    p = _st(tmp_path / "model.safetensors", header, data)
    refused(lambda: read_safetensors_header(p), re.escape(str(p)) + ": .*" + match)


def test_6_deeply_nested_header_is_one_line(tmp_path):
    nest = 200_000
    raw = b"[" * nest + b"]" * nest
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    refused(lambda: read_safetensors_header(p), "nested too deeply")
    cfgp = tmp_path / "config.json"
    cfgp.write_bytes(b'{"a":' * nest + b"1" + b"}" * nest)
    refused(lambda: Checkpoint("m", tmp_path), r"config\.json: JSON nested too deeply")


def test_6_a_valid_file_still_reads(tmp_path):
    t = {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "x.safetensors"))
    _, infos = read_safetensors_header(tmp_path / "x.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in infos.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}


# ------------------------------------------------------------------------------------ 7: integer weights


def test_7_integer_weight_in_a_fine_tune_is_refused(zoo, tmp_path):
    lm = copy_model(zoo["lm"], tmp_path / "lm")
    ts = load_file(str(lm / "model.safetensors"))
    name = next(n for n in sorted(ts) if n.endswith("q_proj.weight"))
    ts[name] = ts[name].mul(100).to(torch.int8)
    save_file(ts, str(lm / "model.safetensors"))
    c = cfg(zoo)
    c["models"][0]["path"] = str(lm)
    refused(
        lambda: merge(c, tmp_path / "out", progress=False),
        rf"tensor {re.escape(name)}: model 'lm' \(.*\) stores it as int8, the base as float32",
    )
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- 8: FIFOs and devices


@pytest.mark.parametrize("what", ["model.safetensors", "config.json"])
def test_8_fifo_input_refused_not_hung(zoo, tmp_path, what):
    lm = copy_model(zoo["lm"], tmp_path / "lm")
    (lm / what).unlink()
    os.mkfifo(lm / what)
    c = cfg(zoo)
    c["models"][0]["path"] = str(lm)
    with deadline(30):
        refused(lambda: merge(c, tmp_path / "out", progress=False), rf"lm/{re.escape(what)}: .*is a FIFO")


def test_8_config_json_from_a_device_refused(zoo, tmp_path):
    lm = copy_model(zoo["lm"], tmp_path / "lm")
    (lm / "config.json").unlink()
    (lm / "config.json").symlink_to("/dev/zero")
    with deadline(30):
        refused(lambda: open_checkpoint(str(lm)), r"config\.json: config\.json is a character device")


def test_8_fifo_tokenizer_file_refused_before_writing(zoo, tmp_path):
    base = copy_model(zoo["base"], tmp_path / "base")
    os.mkfifo(base / "tokenizer.json.tmp")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json.tmp").rename(base / "tokenizer.json")
    c = cfg(zoo)
    c["base_model"] = str(base)
    with deadline(30):
        refused(lambda: merge(c, tmp_path / "out", progress=False), r"tokenizer\.json.*is a FIFO")
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []


# ---------------------------------------------------------------------------------------- 9: YAML bombs


def test_9_yaml_alias_bomb_refused_at_once(zoo, tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = yaml.safe_dump(cfg(zoo)) + "\n".join(lines) + "\n"
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    assert len(text) - len(yaml.safe_dump(cfg(zoo))) < 600
    t0 = time.perf_counter()
    with deadline(30):
        refused(lambda: load_config(p), r"bomb\.yaml: YAML expands to more than 2,000,000 nodes")
    assert time.perf_counter() - t0 < 10


def test_9_aliases_in_reason_still_load(zoo, tmp_path):
    c = yaml.safe_dump(cfg(zoo, "dare", parameters={"drop_rate": 0.3}))
    c = c.replace("drop_rate: 0.3", "drop_rate: &d 0.3\n  lambda: 1.0") + "# shared: *d\n"
    p = tmp_path / "c.yaml"
    p.write_text(c)
    assert load_config(p).parameters["drop_rate"] == 0.3


# -------------------------------------------------------------------------------------- 10: zipped .bin


def test_10_compressed_bin_read_correctly(zoo, tmp_path):
    want = load_file(str(zoo["lm"] / "model.safetensors"))
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(zoo["lm"] / "config.json", d / "config.json")
    torch.save(want, d / "stored.bin")
    with (
        zipfile.ZipFile(d / "stored.bin") as zi,
        zipfile.ZipFile(d / "pytorch_model.bin", "w", compression=zipfile.ZIP_DEFLATED) as zo,
    ):
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    (d / "stored.bin").unlink()
    ck = open_checkpoint(str(d))
    assert ck.format == "bin" and set(ck.tensors) == set(want)
    for n, t in want.items():
        assert torch.equal(ck.get(n), t), n


# ------------------------------------------------------------------------------- 11: one line, not a traceback


def test_11_read_only_parent_is_one_line(zoo, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def ro_open(path, flags, *a, **k):  # the kernel's answer in a read-only folder (root ignores mode bits)
        if Path(path).parent == ro and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(staging.os, "open", ro_open)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(zoo)))
    assert merge_main([str(tmp_path / "c.yaml"), str(ro / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"obim-merge: error: .*ro/out: cannot write beside the output \(Permission denied: .*\)", err
    ), err
    assert os.listdir(ro) == []


def test_11_file_size_limit_mid_write_is_one_line(zoo, tmp_path):
    """A real write failure in the kernel (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk): one line, no debris."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(zoo)))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from obim.merging.cli import merge_main; sys.exit(merge_main(sys.argv[1:]))",
            str(tmp_path / "c.yaml"),
            str(tmp_path / "out"),
            "--quiet",
        ],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = p.stderr.strip()
    assert p.returncode == 1 and re.fullmatch(
        r"obim-merge: error: .*out: stopped by an I/O error \(File too "
        r"large: .*\); nothing was written",
        err,
    ), err
    assert debris(tmp_path) == [] and not (tmp_path / "out").exists()


def test_11_disk_full_while_staging_is_one_line(zoo, tmp_path, monkeypatch):
    from obim.merging import checkpoint

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "model.safetensors"))

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", full)
    refused(
        lambda: merge(cfg(zoo), tmp_path / "out", progress=False),
        r"out: stopped by an I/O error \(No space left on device: .*model\.safetensors\); nothing was written",
    )
    assert debris(tmp_path) == [] and not (tmp_path / "out").exists()


def test_11_long_out_name_works(zoo, tmp_path):
    out = tmp_path / ("m" * 240)
    merge(cfg(zoo), out, progress=False)
    assert (out / "model.safetensors").is_file() and debris(tmp_path) == []
    refused(lambda: merge(cfg(zoo), tmp_path / ("m" * 256), progress=False), r"file name longer than 255 bytes")


def test_11_huge_seed_and_scalar_order_are_one_line(zoo):
    huge = 10**400  # past float's range: math.isfinite(huge) raised OverflowError
    refused(lambda: load_config(cfg(zoo, seed=huge)), r"^seed: must be in \[0, 9223372036854775807\], got " + str(huge))
    refused(lambda: load_config(cfg(zoo, order=5)), r"^order: expected `rotation` or a list of model names .*got 5")


def test_11_huge_seed_in_the_sweep_is_one_line(tmp_path):
    from conftest import compose

    from obim.bench.plan import plan_job

    refused(lambda: plan_job(compose("method=ta", f"seed={10**400}")), r"^seed: must be in")


# ----------------------------------------------------------------------------------- 12: honest records


def test_12_recorded_config_has_absolute_paths_and_reruns_elsewhere(zoo, tmp_path, monkeypatch):
    work = tmp_path / "work"
    copy_model(zoo["base"], work / "models" / "base")
    for n in RET:
        copy_model(zoo[n], work / "models" / n)
    c = {
        "method": "ties",
        "base_model": "models/base",
        "seed": 0,
        "models": [{"name": n, "path": f"models/{n}"} for n in RET],
    }
    monkeypatch.chdir(work)
    merge(c, "out1", progress=False)
    rec = yaml.safe_load((work / "out1" / "obim_merge.yaml").read_text())
    assert rec["base_model"] == str(work / "models" / "base")
    assert [m["path"] for m in rec["models"]] == [str(work / "models" / n) for n in RET]
    monkeypatch.chdir(tmp_path)
    assert merge_main([str(work / "out1" / "obim_merge.yaml"), "out2", "--quiet"]) == 0
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (work / "out1" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- 14: dead writers' debris goes


def _killed_mid_merge(zoo, out: Path, tmp_path: Path) -> None:
    proc = start_merge(cfg(zoo, "ties"), out, tmp_path, "a", pause=0.5)
    wait_mid_merge(proc, out)
    proc.kill()
    proc.wait(timeout=60)
    assert len(debris(tmp_path)) == 2  # its staging dir and lock


def test_14_kill9_debris_removed_by_a_write_to_another_out(zoo, tmp_path):
    _killed_mid_merge(zoo, tmp_path / "a", tmp_path)
    merge(cfg(zoo), tmp_path / "b", progress=False)
    assert debris(tmp_path) == [] and not (tmp_path / "a").exists()


def test_14_kill9_debris_removed_by_an_atomic_file_write(zoo, tmp_path):
    from obim.bench.cache import write_json

    _killed_mid_merge(zoo, tmp_path / "a", tmp_path)
    write_json(tmp_path / "result.json", {"x": 1})  # what a sweep's next job writes in the cache folder
    assert debris(tmp_path) == []


def test_8_fifo_validation_data_and_hdiag_refused(zoo, tmp_path):
    from obim.merging.saliency import load_hdiag
    from obim.merging.texts import read_texts

    os.mkfifo(tmp_path / "val.jsonl")
    os.mkfifo(tmp_path / "h.safetensors")
    with deadline(30):
        refused(lambda: read_texts(tmp_path / "val.jsonl"), r"val\.jsonl: validation file is a FIFO")
        refused(lambda: load_hdiag(tmp_path / "h.safetensors"), r"h\.safetensors: hdiag file is a FIFO")
        c = cfg(zoo, "obim")
        for m, r in zip(c["models"], RET.values(), strict=True):
            m["validation"] = {"data": str(tmp_path / "val.jsonl")}
            m["retention"] = r
        refused(lambda: merge(c, tmp_path / "out", progress=False), r"val\.jsonl: validation file is a FIFO")


def test_2_out_through_a_bind_mount_is_refused(zoo, tmp_path):
    """A bind mount shows one directory at two paths that realpath cannot relate: identity by inode does."""
    models, alias = tmp_path / "models", tmp_path / "alias"
    lm = copy_model(zoo["lm"], models / "lm")
    alias.mkdir()
    p = subprocess.run(["mount", "--bind", str(models), str(alias)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"bind mounts need root with CAP_SYS_ADMIN here: {p.stderr.strip()}")
    try:
        c = cfg(zoo)
        c["models"][0]["path"] = str(lm)
        refused(lambda: merge(c, alias / "lm" / "sub", progress=False), r"lies inside model 'lm'")
        refused(lambda: merge(c, alias / "lm", overwrite=True, progress=False), r"the output is model 'lm'")
        assert sorted(os.listdir(lm)) == sorted(os.listdir(zoo["lm"]))
    finally:
        subprocess.run(["umount", str(alias)], check=True)
