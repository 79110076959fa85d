"""mergekit configs in: the methods both tools define merged by obim from a mergekit YAML and by mergekit 0.1.5 itself
(the peer is a dev dependency) give the same weights within float tolerance; the rest is refused in one line naming
what differs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_merge import load_state

from obim import merge
from obim.merging.config import load_config
from obim.merging.errors import ObimError


def mergekit_yaml() -> str:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    found = str(exe) if exe.exists() else shutil.which("mergekit-yaml")
    assert found, "mergekit-yaml not installed: pip install -e '.[dev]' installs mergekit==0.1.5"
    return found


def configs(zoo) -> dict[str, dict]:
    base = str(zoo["base"])
    experts = [str(zoo[n]) for n in ("lm", "math", "code")]
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.7}} for m in experts],
            "parameters": {"lambda": 0.9},
            "dtype": "float32",
        },
        "task_arithmetic_normalized": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "linear": {
            "merge_method": "linear",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *experts]],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 1.0, "density": d}}
                for m, d in zip(experts, (0.3, 0.5, 0.7), strict=True)
            ],
            "parameters": {"int8_mask": True},
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": experts[1]}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": m} for m in experts],
            "parameters": {"select_topk": 0.5},
            "dtype": "float32",
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["task_arithmetic", "task_arithmetic_normalized", "linear", "ties", "slerp", "sce"])
def test_a_mergekit_config_merges_as_mergekit_does(name, zoo, tmp_path):
    cfg = configs(zoo)[name]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [mergekit_yaml(), str(path), str(tmp_path / "mergekit"), "--no-cuda", "--quiet", "--random-seed", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    merge(str(path), tmp_path / "obim", progress=False)
    ours, theirs = load_state(tmp_path / "obim"), load_state(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for k in ours:
        # top-k selections (ties, sce) may break an exact tie differently: a few entries at most
        close = torch.isclose(ours[k].float(), theirs[k].float(), rtol=1e-4, atol=1e-6)
        assert close.float().mean() >= (0.999 if name in ("ties", "sce") else 1.0), (name, k)


def test_what_maps_and_what_is_refused(zoo):
    c = configs(zoo)
    ta = load_config(c["task_arithmetic"])
    assert ta.method.name == "ta" and [m.name for m in ta.models] == ["lm", "math", "code"]
    assert ta.models[0].params["lambda"] == pytest.approx(0.9 * 0.7)
    assert load_config(c["task_arithmetic_normalized"]).models[0].params["lambda"] == pytest.approx(1 / 3)
    assert load_config(c["linear"]).models[0].params["lambda"] == pytest.approx(1 / 4)  # the base is listed too
    ties = load_config(c["ties"])
    assert [m.params["density"] for m in ties.models] == [0.3, 0.5, 0.7]
    s = load_config(c["slerp"])
    assert s.method.name == "slerp" and [m.name for m in s.models] == ["math"] and s.models[0].params["t"] == 0.3

    def refused(change: dict, match: str) -> None:
        bad = {**c["ties"], **change}
        with pytest.raises(ObimError, match=match) as e:
            load_config(bad)
        assert "\n" not in str(e.value)

    refused({"merge_method": "dare_ties"}, "rescales by 1/\\(1 - p\\)")
    refused({"merge_method": "breadcrumbs"}, "per row")
    refused({"merge_method": "model_stock"}, "obim has no such method")
    refused({"slices": []}, "slices \\(layer ranges\\): not supported")
    refused({"parameters": {"normalize": False}}, "averages them")
    refused({"parameters": {"density": [0.1, 0.9]}}, "a gradient or a per-tensor filter")
    models = [
        {"model": m["model"], "parameters": {"weight": w}} for m, w in zip(c["ties"]["models"], (1, 2, 1), strict=True)
    ]
    refused({"models": models}, "per-model weights")
    refused({"base_model": None}, "base_model is required")
