"""int8 linear layers for TVM on AVX512-VNNI CPUs: W8A8 with int32 accumulation and a per-token activation scale.

`vpdpbusd` multiplies 4 unsigned by 4 signed bytes and adds the four products into one int32 lane: four times the
multiply-adds of an fp32 FMA per instruction. So:

- weights are int8, symmetric, one scale per output channel, stored as `[N/64, K/4, 64, 4]` panels (4 consecutive
  K values of a column together: the quad `vpdpbusd` reads), with a `[2, N]` fp32 side table of each column's scale
  and `128 * sum_k W_q[n, k]` (`pack_quads`);
- each token's activations get their own scale (`max |x| / 127`, so a row's answer never depends on its batch-mates,
  unlike ONNX Runtime's per-tensor `DynamicQuantizeLinear`), are rounded to int8 and shifted by 128 into uint8
  (`quantize_rows`);
- the matmul (`quad_matmul`) accumulates uint8 x int8 in int32 over K, then removes the shift
  (`acc - 128 * sum_k W_q`) and rescales in fp32; the schedule replaces its 16-column x 4-K inner loops by one
  `vpdpbusd` (the `DOT_16x4` tensor intrinsic). TVM's own `dot_16x4_vnni` passes `<16 x i32>` operands, which LLVM
  22 (the one apache-tvm 0.27 bundles) refuses: its intrinsic takes `<64 x i8>`. As for bf16 (`tvm_bf16`), a small
  LLVM function imported with `pragma_import_llvm` bitcasts and calls it, inlined by LLVM.

On CPUs with AMX, the same panels feed AMX's `tdpbusd` instead (`quad_matmul(amx=True)`, `tvm_amx`): 2.5-3.5x the
VNNI kernel's rate here.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from toolkit import tvm_amx
from toolkit.tvm_compile import GLU_HALF, PANEL, int64_shape, kernel_func, linear_output, llvm_dot, panel_product

MATMUL_NAME = "int8_quad_matmul"  # the reduction blocks' names: how the schedule rule recognises them
AMX_MATMUL_NAME = "int8_amx_matmul"
DOT_16x4 = "qwen3_deploy_vnni_dot_16x4"
SHIFT = 128  # int8 activations + 128 = the uint8 operand of vpdpbusd

VPDPBUSD_LLVM = llvm_dot("qwen3_deploy_vpdpbusd", "llvm.x86.avx512.vpdpbusd.512", "<16 x i32>", "<64 x i8>")


def pack_quads(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] fp32 weight → (int8 panels [N/64, K/4, 64, 4], fp32 [2, N]: per-column scale, 128 * column sum)."""
    n, k = weight.shape
    scale = np.maximum(np.abs(weight).max(axis=1), 1e-12).astype(np.float32) / 127.0
    quantized = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    panels = np.ascontiguousarray(quantized.reshape(n // PANEL, PANEL, k // 4, 4).transpose(0, 2, 1, 3))
    side = np.stack([scale, SHIFT * quantized.sum(axis=1, dtype=np.int64).astype(np.float32)])
    return panels, side


def row_absmax(rows, k: int):
    """PrimFunc: each token's max |x| over its K activations (its scale * 127)."""
    act = te.placeholder(int64_shape(rows, k), "float32", name="act")
    j = te.reduce_axis(int64_shape(0, k), name="j")
    absmax = te.compute(int64_shape(rows), lambda r: te.max(tirx.abs(act[r, j]), axis=j), name="int8_row_absmax")
    return kernel_func(act, absmax)


def quantize_rows(rows, k: int, amx: bool = False):
    """PrimFunc: (x [rows, K], absmax [rows]) → uint8 [rows, K] = round(x * 127 / absmax) + 128. With `amx`, rows
    are padded to whole tiles (`tvm_amx.activation_rows`) holding 128, a zero."""
    act = te.placeholder(int64_shape(rows, k), "float32", name="act")
    absmax = te.placeholder(int64_shape(rows), "float32", name="absmax")

    def quantize(r, c):
        inverse = tirx.const(127.0, "float32") / tirx.max(absmax[r], tirx.const(1e-30, "float32"))
        q = tirx.round(act[r, c] * inverse)
        shifted = (tirx.max(tirx.min(q, tirx.const(127.0, "float32")), tirx.const(-127.0, "float32"))
                   + tirx.const(float(SHIFT), "float32")).astype("uint8")
        return tirx.if_then_else(r < rows, shifted, tirx.const(SHIFT, "uint8")) if amx else shifted

    out_shape = int64_shape(tvm_amx.activation_rows(rows, amx), k)
    return kernel_func(act, absmax, te.compute(out_shape, quantize, name="int8_quantize"))


def quad_matmul(rows, k: int, n: int, amx: bool = False, epilogue: str | None = None):
    """PrimFunc: y[rows, N] = (sum_k q[r, k] W_q[n, k] - 128 sum_k W_q[n, k]) * scale_w[n] * absmax[r] / 127, then
    the `epilogue` (`linear_output`: a residual add, or SiLU * up). With `amx`, q has whole tiles of rows
    (`tvm_amx.activation_rows`) and the product is the AMX kernel's."""
    q_rows = tvm_amx.activation_rows(rows, amx)
    q = te.placeholder(int64_shape(q_rows, k), "uint8", name="q")
    panels = te.placeholder(int64_shape(n // PANEL, k // 4, PANEL, 4), "int8", name="panels")
    side = te.placeholder(int64_shape(2, n), "float32", name="side")
    absmax = te.placeholder(int64_shape(rows), "float32", name="absmax")
    j = te.reduce_axis(int64_shape(0, k), name="j")

    def product(r, panel, column):
        return te.sum(q[r, j].astype("int32") * panels[panel, j // 4, column, j % 4].astype("int32"), axis=j)

    acc, at = panel_product(q_rows, n, epilogue, product, AMX_MATMUL_NAME if amx else MATMUL_NAME)

    def dequantized(r, *column):  # column: c, or (panel, half, c) for GLU (`panel_product`)
        c = column[0] * PANEL + column[1] * GLU_HALF + column[2] if len(column) == 3 else column[0]
        return (at(r, *column).astype("float32") - side[1, c]) * side[0, c] * (absmax[r] * tirx.const(1 / 127.0,
                                                                                                       "float32"))

    extra, out = linear_output(rows, n, dequantized, epilogue, "int8_dequantize")
    return kernel_func(q, panels, side, absmax, *extra, out)


@T.prim_func(s_tir=True)
def _dot_16x4_desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                   acc: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(acc[0:16], a[0:4], b[0:16, 0:4])
        T.writes(acc[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    acc[vi] = acc[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vpdpbusd(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                       acc: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(acc[0:16], a[0:4], b[0:16, 0:4])
        T.writes(acc[0:16])
        quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
        acc[T.ramp(T.int32(0), 1, 16)] = T.call_extern("int32x16", "qwen3_deploy_vpdpbusd", acc.vload([0], "int32x16"),
                                                        T.broadcast(quad, 16),
                                                        T.reinterpret(b.vload([0, 0], "int8x64"), dtype="int32x16"))


s_tir.TensorIntrin.register(DOT_16x4, _dot_16x4_desc, _dot_16x4_vpdpbusd, override=True)
