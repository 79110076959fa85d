"""The same bytes on other x86-64 machines: torch's and MKL's CPU kernels pinned to AVX2 before torch loads.

torch dispatches its CPU kernels by the best instruction set it finds (AVX-512 here, AVX2 elsewhere), and MKL picks
its code path and its reduction order by instruction set and thread count: one zoo recipe and seed gave other
weights on an AVX-512 machine than on an AVX2 one, and (measured on the quick zoo) other bytes at 1 and 2 threads.
Pinned (`ATEN_CPU_CAPABILITY=avx2`, `MKL_CBWR=AVX2,STRICT`), the quick zoo is the same bytes at 1 and 3 threads and
an AVX-512 machine builds what an AVX2 one does. What is not covered: MKL honours `MKL_CBWR=AVX2` on Intel CPUs only
(elsewhere it keeps its own choice, recorded as such: an AMD EPYC ran mode 0x10002 and built the reference's draw 0
as ea8822e4 where the Intel machine built 70c1c0b1). `MKL_CBWR=COMPATIBLE,STRICT`, the branch MKL honours on every
x86-64 CPU, was tried (2026-12-06) and not adopted: its results depend on the thread count (TSV's merge at 1 and 2
threads, the quick zoo at 1 and 3 threads differ) and the quick zoo's training took 44-54 s against 30 s. Nor are
torch's own parallel reductions over large tensors, which still split by thread count; other architectures (arm64),
CPUs without AVX2, GPUs, and vLLM (its child process runs unpinned). The cost: fp32 matrix products on AVX2
kernels, measured +10% on the quick zoo's training (Intel).

The pins are environment variables read once, when torch (and MKL) load: `pin_cpu_kernels()` runs when this module
is imported, which the obim package does first; it sets nothing where the user set any of them, or once torch is
loaded (with a warning: the kernels in force are recorded either way). `OBIM_CPU_KERNELS=native` keeps the
machine's best kernels (bytes then depend on the machine)."""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
# mkl_cbwr_get's answer with MKL_CBWR=AVX2,STRICT in force (MKL_CBWR_AVX2 | MKL_CBWR_STRICT); 1 is MKL's own choice
MKL_CBWR_AVX2_STRICT = 0x1000A


def _has_avx2(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return "avx2" in flags.split()


def pin_cpu_kernels(
    environ: MutableMapping[str, str] | None = None, machine: str | None = None, cpuinfo: str | None = None
) -> bool:
    """Sets the pins while torch is not loaded, on an x86-64 CPU with AVX2, unless OBIM_CPU_KERNELS=native or the
    user set any of them; returns whether they are in force (or will be)."""
    env = os.environ if environ is None else environ
    mode = env.get("OBIM_CPU_KERNELS", "").strip().lower()
    if mode == "native":
        return False
    if mode == "pinned":  # set by obim in a parent process: inherited
        return all(env.get(k) == v for k, v in PINS.items())
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64") or not _has_avx2(cpuinfo):
        return False
    if any(k in env for k in PINS):  # the user's own kernel settings: all of them theirs
        return all(env.get(k) == v for k, v in PINS.items())
    if "torch" in sys.modules and environ is None:
        import warnings

        warnings.warn(
            "obim: torch was imported before obim, so its CPU kernels are not pinned (obim.merging.determinism): "
            "a zoo or statistics made here may differ in their last bits from another machine's",
            stacklevel=3,
        )
        return False
    env.update(PINS)
    env["OBIM_CPU_KERNELS"] = "pinned"  # what a child that must not run pinned (vLLM) looks for
    return True


def unpinned_env(environ: dict[str, str]) -> dict[str, str]:
    """`environ` without the pins obim set (for vLLM's child: its CPU backend runs its own kernels, unpinned)."""
    if environ.get("OBIM_CPU_KERNELS") != "pinned":
        return dict(environ)
    return {k: v for k, v in environ.items() if k not in PINS and k != "OBIM_CPU_KERNELS"}


def _mkl_cbwr() -> int | None:
    """MKL's conditional-numerical-reproducibility mode in force, as the library reports it (mkl_cbwr_get(ALL)),
    not as the environment asked: on a CPU where MKL ignores the request it says so. None without MKL."""
    import ctypes

    import torch

    for lib in ("libtorch_cpu.so", "libmkl_rt.so", "libmkl_rt.so.2"):
        try:
            fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / lib) if lib.startswith("libtorch") else lib)
            get = fn.mkl_serv_cbwr_get if hasattr(fn, "mkl_serv_cbwr_get") else fn.mkl_cbwr_get
        except (OSError, AttributeError):
            continue
        get.restype = ctypes.c_int
        return int(get(-1))
    return None


def _vendor() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("vendor_id")), "")
    return line.partition(":")[2].strip() or None


def cpu_kernels() -> dict[str, str | None]:
    """The CPU kernels in force in this process (recorded with what they computed): torch's dispatch level, MKL's
    reproducibility mode as MKL reports it (hex), and the CPU's vendor."""
    return dict(_cpu_kernels())


@functools.cache
def _cpu_kernels() -> dict[str, str | None]:
    # fixed when torch loads: read once (cache keys ask on every statistics file and evaluation)
    import torch

    cbwr = _mkl_cbwr()
    return {
        "torch": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": None if cbwr is None else hex(cbwr),
        "vendor": _vendor(),
    }


def kernel_tag(device: str) -> str:
    """What a computation's bytes depend on beyond its inputs, for cache keys: the device, and on the CPU the kernels
    in force (statistics or scores made under other kernels are other results)."""
    if not device.startswith("cpu"):
        return device
    k = cpu_kernels()
    return f"{device}:{k['torch']}:{k['mkl_cbwr'] or '-'}:{k['vendor'] or '-'}"


pin_cpu_kernels()
