"""What this machine's CPU can do, for the choices tied to it: TVM's bf16/int8 kernels need AVX512-BF16/VNNI, and
ONNX Runtime's int8 matmul is exact only where the CPU has a VNNI dot product (see `int8_full_range_exact`)."""
from __future__ import annotations

import platform

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_has(flag: str) -> bool:
    """Whether this CPU has an instruction set extension (Linux's cpuinfo flag, e.g. avx512_bf16; False where it
    cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)
    except OSError:
        return False


def missing_tvm_extension(dtype: str) -> tuple[str, str] | None:
    """For TVM `dtype` artifacts: (the extension their kernels need, the build option to use instead) when this CPU
    lacks it; None when it has it or `dtype` needs none. Compile and load both refuse on it."""
    from toolkit.config import TVM_CPU_KERNELS

    feature, instead = TVM_CPU_KERNELS.get(dtype, (None, None))
    return (feature, instead) if feature and not cpu_has(feature) else None


def int8_full_range_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 matmul is exact here for full-range int8 weights. On x86 without VNNI it
    multiplies with `vpmaddubsw`, which adds pairs of u8*s8 products in int16 and saturates (255*127*2 > 32767); ONNX
    Runtime's quantization guide names 7-bit weights (`reduce_range`) or uint8 weights (its uint8 x uint8 matmul
    widens to int16 first) as the fixes, and int8 builds here take uint8. Measured on an AVX2-only host, tiny outlier
    embedding checkpoint: min cosine 0.988 with full-range int8 weights, 0.9996 with 7-bit ones."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return not x86 or any(cpu_has(flag) for flag in VNNI_FLAGS)
