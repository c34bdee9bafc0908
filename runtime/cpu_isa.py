"""The CPU's matrix instruction sets, from /proc/cpuinfo's flags (plain data, no torch): whether BF16
runs natively (AVX-512 BF16 or AMX), and what `bench` reports next to its GEMM floors.

Every check is a function over the flags string, so tests give it any CPU's flags."""

from __future__ import annotations

from pathlib import Path

from janusflow_trt.errors import InputError

MATRIX_ISA = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # BF16 dot products in hardware (oneDNN's BF16 GEMM kernels)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first `flags` line of /proc/cpuinfo ('' where there is none: not Linux, or not x86)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")


def matrix_isa(flags: str) -> dict[str, bool]:
    have = set(flags.split())
    return {f: f in have for f in MATRIX_ISA}


def has_bf16(flags: str) -> bool:
    return any(f in flags.split() for f in BF16_FLAGS)


def require_bf16(flags: str | None = None) -> None:
    """Refuse BF16 in one line on a CPU without BF16 instructions: there torch emulates BF16 by converting
    to FP32 around every product, slower than FP32 itself (docs/performance.md: the emulated GEMM rate)."""
    flags = cpu_flags() if flags is None else flags
    if not has_bf16(flags):
        raise InputError("precision bf16 needs a CPU with AVX-512 BF16 or AMX (no avx512_bf16 / amx_bf16 in "
                         "/proc/cpuinfo flags); emulated BF16 is slower than fp32 here: use --precision fp32")
