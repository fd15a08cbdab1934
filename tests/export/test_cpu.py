"""The machine a parity report names: CPU model, the instruction sets that change results, kernel paths."""

from __future__ import annotations

import pytest
from digits.export import cpu

AVX2_ONLY = "avx2 fma bmi2 sse4_2"  # the AMD EPYC: no AVX-512, no VNNI
VNNI_XEON = "avx2 fma avx512f avx512bw avx512_vnni amx_int8"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    def write(flags: str, model: str = "Some CPU") -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\n")
        monkeypatch.setattr(cpu, "CPUINFO", path)

    return write


@pytest.mark.parametrize(
    ("flags", "products"),
    [
        (AVX2_ONLY, "no VNNI: vpmaddubsw, saturating int16 pair sums"),
        (VNNI_XEON, "VNNI: int32 sums"),
        ("avx2 fma avx_vnni", "VNNI: int32 sums"),  # AVX-VNNI without AVX-512 (Alder Lake and later)
        ("avx2 fma avx512f avx512bw", "no VNNI: vpmaddubsw, saturating int16 pair sums"),  # Skylake-SP
    ],
)
def test_int8_products_follow_the_vnni_flags(cpuinfo, flags: str, products: str) -> None:
    cpuinfo(flags, "AMD EPYC 7B13")
    described = cpu.describe_cpu()
    assert described["model"] == "AMD EPYC 7B13"
    assert described["flags"] == [flag for flag in cpu.KERNEL_FLAGS if flag in flags.split()]
    assert cpu.int8_products(described["flags"], "x86_64") == products


def test_flags_are_whole_words(cpuinfo) -> None:
    cpuinfo("avx512_vnni_extra avx2")  # a longer flag must not pass for avx512_vnni
    assert cpu.cpu_flags() == ["avx2"]


def test_other_machines_are_said_to_be_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    assert cpu.cpu_flags() == []
    assert cpu.int8_products([], "aarch64") == "not x86: no int16 pair sums"
    assert cpu.int8_products([], "x86_64") == "unknown: flags not readable here"


def test_the_summary_names_model_flags_and_paths(cpuinfo) -> None:
    cpuinfo(AVX2_ONLY, "AMD EPYC 7B13")
    line = cpu.summary(cpu.describe_cpu())
    assert line.startswith("CPU: AMD EPYC 7B13 (") and "(x86_64; avx2, fma); torch kernels " in line
    assert line.endswith("onnxruntime int8 products: no VNNI: vpmaddubsw, saturating int16 pair sums.")
