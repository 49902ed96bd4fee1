"""What this machine's CPU can do, for the choices tied to it: TVM's bf16/int8 kernels need AVX512-BF16/VNNI, and
ONNX Runtime's int8 matmul is exact only where the CPU has a VNNI dot product (see `int8_full_range_exact`)."""
from __future__ import annotations

import functools
import platform

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


# The cpuinfo flags that name instructions a compiler may emit (x86); on other machines every listed feature is one.
X86_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "popcnt", "abm", "movbe", "adx", "amx", "gfni", "vaes",
                    "vpclmulqdq", "aes", "pclmulqdq", "sha_ni", "cx16")


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's instruction set extensions as Linux names them in /proc/cpuinfo (`flags` on x86, `Features` on
    Arm); None where that cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def cpu_has(flag: str) -> bool:
    """Whether this CPU has an instruction set extension (Linux's cpuinfo flag, e.g. avx512_bf16; False where it
    cannot be read)."""
    return flag in (cpu_flags() or ())


def isa_flags() -> list[str] | None:
    """The extensions among this CPU's flags that compiled code may use: what a TVM CPU artifact records of the CPU
    it was built on, and what a host must have to run it. None where the flags cannot be read."""
    flags = cpu_flags()
    if flags is None:
        return None
    return sorted(f for f in flags if not is_x86() or f.startswith(X86_ISA_PREFIXES))


def is_x86() -> bool:
    """Whether this is an x86 machine."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


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
    return not is_x86() or any(cpu_has(flag) for flag in VNNI_FLAGS)
