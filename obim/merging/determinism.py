"""The same bytes on every x86-64 machine: torch, MKL and oneDNN pinned to one CPU kernel family before torch loads.

torch dispatches its CPU kernels by the best instruction set it finds (AVX-512 here, AVX2 elsewhere), and MKL picks
its code path and its reduction order by instruction set and thread count: one zoo recipe and seed gave other
weights on an AVX-512 machine than on an AVX2 one, and (measured on the quick zoo) other bytes at 1 and 2 threads.
Pinned to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, `MKL_CBWR=AVX2,STRICT`, `ONEDNN_MAX_CPU_ISA=AVX2`), training, saliency
and merges give the same bytes on any x86-64 machine with AVX2 or better, whatever its thread count. Not covered:
other architectures (arm64), CPUs without AVX2, and GPUs (CUDA kernels differ by device and library version).

The pins are environment variables read once, when torch (and MKL) load: `pin_cpu_kernels()` runs when this module
is imported, which the obim package does first; it sets only what the user has not set, and nothing once torch is
loaded. `OBIM_CPU_KERNELS=native` keeps the machine's best kernels (faster where AVX-512 helps; bytes then depend on
the machine)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


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
    """Sets the pins the environment does not set yet, while torch is not loaded, on an x86-64 CPU with AVX2, unless
    OBIM_CPU_KERNELS=native; returns whether it set or found them in force."""
    env = os.environ if environ is None else environ
    if env.get("OBIM_CPU_KERNELS", "").strip().lower() == "native":
        return False
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64") or not _has_avx2(cpuinfo):
        return False
    if "torch" in sys.modules and environ is None:
        return all(env.get(k) == v for k, v in PINS.items())  # too late to set: say whether they hold
    for k, v in PINS.items():
        env.setdefault(k, v)
    return all(env.get(k) == v for k, v in PINS.items())


def cpu_kernels() -> dict[str, str | None]:
    """The CPU kernels in force in this process (recorded with what they computed): torch's dispatch level and the
    MKL and oneDNN settings it loaded with."""
    import torch

    return {
        "torch": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def kernel_tag(device: str) -> str:
    """What a computation's bytes depend on beyond its inputs, for cache keys: the device, and on the CPU the kernels
    in force (a zoo, statistics or scores made under other kernels are other results)."""
    if not device.startswith("cpu"):
        return device
    k = cpu_kernels()
    return f"{device}:{k['torch']}:{k['MKL_CBWR'] or '-'}:{k['ONEDNN_MAX_CPU_ISA'] or '-'}"


pin_cpu_kernels()
