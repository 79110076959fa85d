"""obim installed from its wheel (pip install ., not editable) works away from the source tree: the search composes
the Hydra config shipped in the package (obim/conf) and plans a real experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from pathlib import Path

import obim
from obim.bench import conf_dir
from obim.bench.search import run_search

site = Path(sys.argv[1])
assert Path(obim.__file__).is_relative_to(site), obim.__file__  # the installed copy, not the source tree
assert conf_dir().is_dir() and not conf_dir().is_symlink() and (conf_dir() / "sweep.yaml").is_file()
out = run_search(["experiment=llama2_13b_sft", "dry_run=plan", "eval.allow_code=true"], say=print)
print("tasks:", ",".join(out["dev"]["tasks"]))
"""


@pytest.mark.slow  # builds a wheel
def test_search_dry_run_from_an_installed_wheel(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # no build isolation: the venv's setuptools builds it, offline
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    (wheel,) = wheels.glob("obim-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    p = subprocess.run([sys.executable, "-c", CHILD, str(site)], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "search (dry run): llama2_13b_sft" in p.stdout
    assert "tasks: obim_mmlu_dev,obim_gsm8k_cot_dev,obim_math_cot_dev,obim_mbpp_dev" in p.stdout
