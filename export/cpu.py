"""The CPU a check ran on, as its kernels see it: model, the instruction sets that change results, and the
paths torch and onnxruntime take on it.

Results are per machine: float kernels round differently from one CPU to another, and onnxruntime's int8
products are summed in int32 with VNNI but in saturating int16 pairs without it (see `export.quantize`).
onnxruntime does not say which kernels it picked; MLAS chooses them from the CPU's feature flags, so the
int8 path is inferred from the same flags.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flag names that decide the float and int8 kernels
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_model() -> str:
    """The CPU's model name as `lscpu` shows it."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of `KERNEL_FLAGS` the CPU has, from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo_lines() if line.startswith("flags")), [])
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def int8_products(flags: list[str], machine: str) -> str:
    """How onnxruntime sums the int8 products on a CPU with `flags`, as MLAS picks its kernels."""
    if machine.lower() not in ("x86_64", "amd64"):
        return "not x86: no int16 pair sums"
    if any(flag in flags for flag in VNNI_FLAGS):
        return "VNNI: int32 sums"
    if "avx2" in flags:
        return "no VNNI: vpmaddubsw, saturating int16 pair sums"
    return "unknown: flags not readable here"


def describe_cpu() -> dict:
    """What parity reports record about the machine they were made on."""
    flags, machine = cpu_flags(), platform.machine()
    return {
        "model": cpu_model(),
        "architecture": machine,
        "flags": flags,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),  # honours ATEN_CPU_CAPABILITY
        "onnxruntime_int8_products": int8_products(flags, machine),
    }


def summary(cpu: dict) -> str:
    """One line for a markdown report."""
    flags = ", ".join(cpu.get("flags") or []) or "flags unknown"
    return (
        f"CPU: {cpu.get('model')} ({cpu.get('architecture')}; {flags}); torch kernels "
        f"{cpu.get('torch_capability')}; onnxruntime int8 products: {cpu.get('onnxruntime_int8_products')}."
    )


def _cpuinfo_lines() -> list[str]:
    try:
        return CPUINFO.read_text(errors="replace").splitlines()
    except OSError:
        return []
