"""The same bytes on any x86-64 machine (obim.merging.determinism): the CPU kernel pins and what they promise, the
quick zoo built under other thread counts giving the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from obim.merging.determinism import MKL_CBWR_AVX2_STRICT, pin_cpu_kernels, unpinned_env

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512 = AVX2.replace("avx2", "avx2 avx512f avx512bw")


def test_the_pins_are_set_where_the_user_set_nothing():
    env: dict[str, str] = {}
    assert pin_cpu_kernels(env, "x86_64", AVX512)
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "OBIM_CPU_KERNELS": "pinned"}
    # a child process inherits them (told by OBIM_CPU_KERNELS=pinned); vLLM's child gets them taken away
    assert pin_cpu_kernels(dict(env), "x86_64", AVX512)
    assert unpinned_env({**env, "PATH": "/bin"}) == {"PATH": "/bin"}
    mine = {"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/bin"}
    assert unpinned_env(mine) == mine  # the user's own: left as they are


def test_the_users_own_settings_win_and_are_reported_as_not_pinned():
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert not pin_cpu_kernels(env, "x86_64", AVX512)
    assert env == {"ATEN_CPU_CAPABILITY": "avx512"}  # the kernels are the user's: none of the others is set


@pytest.mark.parametrize(
    ("env", "machine", "cpuinfo"),
    [
        ({"OBIM_CPU_KERNELS": "native"}, "x86_64", AVX512),  # the user's choice: the machine's best kernels
        ({}, "aarch64", "flags\t: fp asimd"),  # no x86 kernel family to pin
        ({}, "x86_64", AVX2.replace(" avx2", "")),  # below the pinned family: left as it is, not promised
    ],
)
def test_nothing_is_pinned_where_it_cannot_hold_or_is_not_wanted(env, machine, cpuinfo):
    before = dict(env)
    assert not pin_cpu_kernels(env, machine, cpuinfo)
    assert env == before


def test_this_process_runs_pinned_kernels():
    """conftest imports obim before torch, as every entry point does: the pins are in force here."""
    import torch

    if not pin_cpu_kernels(dict(os.environ)):
        pytest.skip("no AVX2 on this CPU, or OBIM_CPU_KERNELS=native: nothing pinned")
    from obim.merging.determinism import cpu_kernels

    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert os.environ["MKL_CBWR"] == "AVX2,STRICT"
    k = cpu_kernels()
    if k["vendor"] == "GenuineIntel":  # MKL honours the request on Intel CPUs only; MKL says which it runs
        assert k["mkl_cbwr"] == hex(MKL_CBWR_AVX2_STRICT)


def _zoo_build(out, threads: int, native: bool = False) -> dict:
    env = unpinned_env(dict(os.environ))
    env.update({"OBIM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if native:
        env["OBIM_CPU_KERNELS"] = "native"
    code = "import sys; from obim.bench.cli import zoo_main; sys.exit(zoo_main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "build", "--quick", "--no-eval", "--quiet", "--out", str(out)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((out / "zoo.json").read_text())


@pytest.mark.slow
def test_the_quick_zoo_is_the_same_bytes_at_any_thread_count(tmp_path):
    """Built at 1 and at 3 threads (torch's and MKL's), pinned: one fingerprint. Without MKL's strict mode the two
    differ (measured: MKL's reduction order follows its thread count), and with the machine's own kernels an
    AVX-512 machine builds other weights than an AVX2 one."""
    if not pin_cpu_kernels(unpinned_env(dict(os.environ))):
        pytest.skip("no AVX2 on this CPU: nothing pinned, nothing promised")
    one, three = _zoo_build(tmp_path / "one", 1), _zoo_build(tmp_path / "three", 3)
    assert one["cpu_kernels"] == {
        "torch": "AVX2",
        "mkl_cbwr": three["cpu_kernels"]["mkl_cbwr"],
        "vendor": three["cpu_kernels"]["vendor"],
    }
    assert len(one["fingerprint"]) == 64 and one["fingerprint"] == three["fingerprint"]
    native = _zoo_build(tmp_path / "native", 1, native=True)
    if native["cpu_kernels"]["torch"] != "AVX2":  # this machine has better kernels than the pinned ones
        assert native["fingerprint"] != one["fingerprint"]  # which is why they are pinned


def test_a_zoo_built_under_other_kernels_is_kept_and_the_caches_key_on_the_kernels(tmp_path):
    """A zoo records the kernels it was built under; one of other kernels is reused, never replaced under running
    jobs; statistics and scores are cached under the kernels of the process that makes them."""
    from obim.bench.zoo import is_current, quick_recipe, recipe_hash
    from obim.merging.determinism import cpu_kernels, kernel_tag

    stamp = {"recipe_hash": recipe_hash(quick_recipe()), "cpu_kernels": {**cpu_kernels(), "torch": "AVX512"}}
    (tmp_path / "zoo.json").write_text(json.dumps(stamp))
    assert is_current(tmp_path, quick_recipe())
    assert kernel_tag("cuda:0") == "cuda:0"
    k = cpu_kernels()
    assert kernel_tag("cpu") == f"cpu:{k['torch']}:{k['mkl_cbwr'] or '-'}:{k['vendor'] or '-'}"


def test_saliency_statistics_are_cached_under_the_kernels(tmp_path, monkeypatch):
    import obim.merging.determinism as det
    from obim.bench.stages import saliency_path

    (tmp_path / "model.safetensors").write_bytes(b"x")
    v = {"max_length": 8, "batch_size": 2}
    here = saliency_path(tmp_path, "m", str(tmp_path), ["a"], v, "cpu")
    assert saliency_path(tmp_path, "m", str(tmp_path), ["a"], v, "cpu") == here
    monkeypatch.setattr(det, "cpu_kernels", lambda: {"torch": "AVX512", "mkl_cbwr": "0x1", "vendor": "GenuineIntel"})
    assert saliency_path(tmp_path, "m", str(tmp_path), ["a"], v, "cpu") != here
