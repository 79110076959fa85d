"""Streaming reader and writer against the safetensors library itself."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from obim.merging.checkpoint import Checkpoint, ShardedWriter, plan_shards, read_safetensors_header
from obim.merging.errors import ObimError
from obim.merging.staging import staged_output


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g).bfloat16(),
        "b.weight": torch.randn(7, generator=g),
        "c.scalar": torch.tensor(3.5, dtype=torch.float16),
        "d.ids": torch.arange(4, dtype=torch.int64),
        "e.empty": torch.zeros(0, 3),
    }


def test_writer_round_trips_through_safetensors(tmp_path):
    ts = _tensors()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    shards = plan_shards(entries, 64)  # tiny limit: several shards
    assert len(shards) > 1 and all(s.file.startswith("model-0000") for s in shards)
    w = ShardedWriter(tmp_path, shards)
    for k, v in ts.items():
        w.write(k, v)
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    for k, v in ts.items():
        with safe_open(str(tmp_path / index["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v)
            assert f.metadata() == {"format": "pt"}


def test_single_shard_named_model_safetensors(tmp_path):
    ts = _tensors()
    shards = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], 5_000_000_000)
    assert [s.file for s in shards] == ["model.safetensors"]


def test_writer_rejects_out_of_plan_tensor(tmp_path):
    w = ShardedWriter(tmp_path, plan_shards([("x", torch.float32, (2,))], 100))
    with pytest.raises(RuntimeError):
        w.write("y", torch.zeros(2))
    w.abort()


def test_reader_matches_safetensors_and_detects_truncation(tmp_path):
    ts = _tensors()
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file(ts, str(tmp_path / "model.safetensors"))
    ck = Checkpoint("m", tmp_path)
    for k, v in ts.items():
        assert torch.equal(ck.get(k), v)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-5])
    with pytest.raises(ObimError, match="truncated"):
        read_safetensors_header(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ObimError, match=r"model.safetensors"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_reader_bin_shards(tmp_path):
    ts = _tensors()
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    torch.save({k: ts[k] for k in ["a.weight", "b.weight"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: ts[k] for k in ["c.scalar", "d.ids", "e.empty"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    ck = Checkpoint("m", tmp_path)
    assert ck.format == "bin"
    for k, v in ts.items():
        assert ck.tensors[k].shape == tuple(v.shape)
        assert torch.equal(ck.get(k), v)


def test_staged_output_renames_only_on_success(tmp_path):
    out = tmp_path / "out"
    with (  # noqa: PT012  (the error must rise inside the staged block)
        pytest.raises(ValueError, match="boom"),
        staged_output(out, overwrite=False) as tmp,
    ):
        (tmp / "partial").write_text("x")
        raise ValueError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_output(out, overwrite=False) as tmp:
        (tmp / "done").write_text("x")
    assert (out / "done").exists()
    with pytest.raises(ObimError, match="not empty"), staged_output(out, overwrite=False):
        pass
    with pytest.raises(ObimError, match="replaces only a directory obim wrote"), staged_output(out, overwrite=True):
        pass
    (out / "obim_merge.yaml").write_text("")
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
