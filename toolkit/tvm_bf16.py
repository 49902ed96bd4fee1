"""bf16 kernels for TVM on AVX512-BF16 CPUs: what `--dtype bf16` puts in place of each nn.Linear and of attention's
two matmuls.

`vdpbf16ps` multiplies 16 pairs of bf16 values and adds each pair's two products into one fp32 lane: twice the
multiply-adds of an fp32 FMA per instruction. It wants both operands as 32-bit lanes holding a bf16 pair, so:

- weights are stored as `[N/64, K/2, 64]` int32 panels, each lane the pair (W[n, 2p], W[n, 2p+1]) (`pack_pairs`);
- activations are rounded to bf16 (round to nearest even, NaN kept NaN) and paired along K (`to_pairs`);
- the matmul (`pair_matmul`) sums pair products over K/2 into fp32; the schedule (`tvm_schedules.Matmul`) replaces
  its 16-column inner loop by one `vdpbf16ps` (the `DOT_16` tensor intrinsic).

TIR's own bfloat16 type is not used: TVM legalizes bf16 arithmetic to fp32 before codegen, and its LLVM backend
cannot pass the `<32 x bfloat>` operands the intrinsic takes. The pairs travel as int32; a four-line LLVM function,
imported into each kernel with `pragma_import_llvm`, bitcasts them and calls the intrinsic (inlined by LLVM).

Attention in bf16 artifacts takes the same instruction (`tvm_compile.bf16_attention_kernels`): q·kᵀ from q's pairs
and k's, paired along the head dimension and transposed (`key_pairs`), and P·V from the softmax's pairs and v's,
paired along positions (`value_pairs`).

On CPUs with AMX, the same panels feed AMX's `tdpbf16ps` instead (`pair_matmul(amx=True)`, `tvm_amx`), and fp16/fp32
linear layers run as three bf16 products of their high and low bf16 parts (`split_matmul`, "bf16x3").
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from toolkit import tvm_amx
from toolkit.tvm_compile import PANEL, int64_shape, kernel_func, linear_output, llvm_dot, panel_product

MATMUL_NAME = "bf16_pair_matmul"  # the compute blocks' names: how the schedule rule recognises them
AMX_MATMUL_NAME = "bf16_amx_matmul"
SPLIT_MATMUL_NAME = "bf16x3_amx_matmul"
SCORES_NAME, VALUES_NAME = "bf16_pair_scores", "bf16_pair_values"  # attention's q·kᵀ and P·V
DOT_16 = "qwen3_deploy_bf16_dot_16"

DPBF16_LLVM = llvm_dot("qwen3_deploy_dpbf16", "llvm.x86.avx512bf16.dpbf16ps.512", "<16 x float>", "<32 x bfloat>")


def pack_pairs(weight: np.ndarray) -> np.ndarray:
    """[N, K] bf16 weight → [N/64, K/2, 64] int32 panels of (W[n, 2p], W[n, 2p+1]) pairs (low half first)."""
    n, k = weight.shape
    pairs = weight.reshape(n // PANEL, PANEL, k // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(pairs).view(np.int32).reshape(n // PANEL, k // 2, PANEL)


def _low(pair):
    return tirx.reinterpret("float32", tirx.shift_left(pair, 16))


def _high(pair):
    return tirx.reinterpret("float32", tirx.bitwise_and(pair, tirx.const(-65536, "int32")))


def pair_product(a, b):
    """The sum of the products of two bf16 pairs, in fp32 (what `vdpbf16ps` / `tdpbf16ps` compute per lane)."""
    return _low(a) * _low(b) + _high(a) * _high(b)


def split_product(a_high, a_low, b_high, b_low):
    """x·w from bf16 planes (x = high + low, each a bf16 pair): hi·hi + lo·hi + hi·lo, within 2^-15 of |x·w| (x's
    planes hold it to 2^-16, and the dropped lo·lo is under 2^-16: `split_matmul`)."""
    return pair_product(a_high, b_high) + pair_product(a_low, b_high) + pair_product(a_high, b_low)


def _round_to_bf16(x):
    """fp32 → its bf16 bits in the low 16 of a uint32: round to nearest even; NaN stays a (quiet) NaN."""
    bits = tirx.reinterpret("uint32", x)
    rounded = tirx.shift_right(bits + tirx.const(0x7FFF, "uint32") + tirx.bitwise_and(
        tirx.shift_right(bits, tirx.const(16, "uint32")), tirx.const(1, "uint32")), tirx.const(16, "uint32"))
    is_nan = tirx.bitwise_and(bits, tirx.const(0x7FFFFFFF, "uint32")) > tirx.const(0x7F800000, "uint32")
    return tirx.Select(is_nan, tirx.const(0x7FC0, "uint32"), rounded)


def pair_bits(low, high):
    """Two fp32 values → one int32 lane holding them as a bf16 pair, `low` in the low half."""
    high_bits = tirx.shift_left(_round_to_bf16(high), tirx.const(16, "uint32"))
    return tirx.reinterpret("int32", _round_to_bf16(low) | high_bits)


def to_pairs(rows, k: int, amx: bool = False):
    """PrimFunc: fp32 activations [rows, K] → bf16 pairs [rows, K/2] (int32). With `amx`, rows are padded to whole
    tiles (`tvm_amx.activation_rows`) of zeros."""
    act = te.placeholder(int64_shape(rows, k), "float32", name="act")

    def pair(r, p):
        bits = pair_bits(act[r, 2 * p], act[r, 2 * p + 1])
        return tirx.if_then_else(r < rows, bits, tirx.const(0, "int32")) if amx else bits

    pairs = te.compute(int64_shape(tvm_amx.activation_rows(rows, amx), k // 2), pair, name="bf16_pairs")
    return kernel_func(act, pairs)


def key_pairs(batch, groups: int, seq: int, head_dim: int, columns: int):
    """PrimFunc: keys `[b, groups, S, D]` fp32 → `[b, groups, D/2, columns]` bf16 pairs along D, transposed (a
    position's pairs down a column: the scores' vector operand), the columns from S on zeros."""
    keys = te.placeholder(int64_shape(batch, groups, seq, head_dim), "float32", name="keys")

    def pair(b, g, p, j):
        return tirx.if_then_else(j < seq, pair_bits(keys[b, g, j, 2 * p], keys[b, g, j, 2 * p + 1]),
                                 tirx.const(0, "int32"))

    return kernel_func(keys, te.compute(int64_shape(batch, groups, head_dim // 2, columns), pair, name="key_pairs"))


def value_pairs(batch, groups: int, seq: int, head_dim: int):
    """PrimFunc: values `[b, groups, S, D]` fp32 → `[b, groups, S/2, D]` bf16 pairs of consecutive positions (the
    reduction axis of P·V)."""
    values = te.placeholder(int64_shape(batch, groups, seq, head_dim), "float32", name="values")
    return kernel_func(values, te.compute(int64_shape(batch, groups, seq // 2, head_dim), lambda b, g, p, d: pair_bits(
        values[b, g, 2 * p, d], values[b, g, 2 * p + 1, d]), name="value_pairs"))


def pair_scores(batch, groups: int, rows: int, seq: int, columns: int, head_dim: int, scale: float, mask_rows: int):
    """PrimFunc: attention logits `q·kᵀ * scale + mask`, `[b, groups, rows, S]`, from q's bf16 pairs `[b, groups,
    rows, D/2]` (`to_pairs`), k's `[b, groups, D/2, columns]` (`key_pairs`) and the additive mask `[b, 1,
    mask_rows, S]` (`mask_rows` 1: one row for all), bf16 products summed in fp32 (`vdpbf16ps`). The product has the
    padded columns (whole register tiles); the output stage, run on each tile, drops them."""
    q = te.placeholder(int64_shape(batch, groups, rows, head_dim // 2), "int32", name="q_pairs")
    k = te.placeholder(int64_shape(batch, groups, head_dim // 2, columns), "int32", name="k_pairs")
    mask = te.placeholder(int64_shape(batch, 1, mask_rows, seq), "float32", name="mask")
    p = te.reduce_axis(int64_shape(0, head_dim // 2), name="p")
    product = te.compute(int64_shape(batch, groups, rows, columns), lambda b, g, i, j: te.sum(
        pair_product(q[b, g, i, p], k[b, g, p, j]), axis=p), name=SCORES_NAME)
    row = (lambda i: i) if mask_rows == rows else (lambda i: tirx.const(0, "int64"))
    return kernel_func(q, k, mask, te.compute(int64_shape(batch, groups, rows, seq), lambda b, g, i, j: product[
        b, g, i, j] * tirx.const(scale, "float32") + mask[b, 0, row(i), j], name="attention_logits"))


def pair_values(batch, groups: int, rows: int, seq: int, head_dim: int):
    """PrimFunc: attention output `P·V`, `[b, groups, rows, D]`, from P's bf16 pairs `[b, groups, rows, S/2]` (the
    softmax's, `tvm_compile.softmax_rows`) and V's `[b, groups, S/2, D]` (`value_pairs`), summed in fp32."""
    probs = te.placeholder(int64_shape(batch, groups, rows, seq // 2), "int32", name="p_pairs")
    values = te.placeholder(int64_shape(batch, groups, seq // 2, head_dim), "int32", name="v_pairs")
    p = te.reduce_axis(int64_shape(0, seq // 2), name="p")
    return kernel_func(probs, values, te.compute(int64_shape(batch, groups, rows, head_dim), lambda b, g, i, d: te.sum(
        pair_product(probs[b, g, i, p], values[b, g, p, d]), axis=p), name=VALUES_NAME))


def pack_split_pairs(weight: np.ndarray) -> np.ndarray:
    """[N, K] fp16 or fp32 weight → [N/64, 2, K/2, 64] int32 panels: each panel's high bf16 plane (W rounded to
    bf16), then its low plane (W minus the high plane, rounded): high + low is an fp16 weight exactly, an fp32 one to
    16 bits. 4 bytes a weight, what an artifact with bf16x3 kernels stores and holds in memory."""
    import ml_dtypes

    exact = weight.astype(np.float32)
    high = exact.astype(ml_dtypes.bfloat16)
    low = (exact - high.astype(np.float32)).astype(ml_dtypes.bfloat16)
    return np.ascontiguousarray(np.stack([pack_pairs(high), pack_pairs(low)], axis=1))


def to_split_pairs(rows, k: int):
    """PrimFunc: fp32 activations [rows, K] → bf16 planes [rows in whole tiles, 2, K/2] (int32 pairs): plane 0
    x rounded to bf16, plane 1 the remainder rounded (x to 16 bits); padding rows zeros."""
    act = te.placeholder(int64_shape(rows, k), "float32", name="act")

    def bf16_value(bits):
        return tirx.reinterpret("float32", tirx.shift_left(bits, tirx.const(16, "uint32")))

    def plane_bits(x, plane):
        high = _round_to_bf16(x)
        return high if plane == 0 else _round_to_bf16(x - bf16_value(high))

    def pair(r, plane, p):
        bits = [tirx.if_then_else(plane == 0, plane_bits(act[r, 2 * p + i], 0), plane_bits(act[r, 2 * p + i], 1))
                for i in (0, 1)]
        packed = tirx.reinterpret("int32", bits[0] | tirx.shift_left(bits[1], tirx.const(16, "uint32")))
        return tirx.if_then_else(r < rows, packed, tirx.const(0, "int32"))

    shape = int64_shape(tvm_amx.activation_rows(rows, True), 2, k // 2)
    return kernel_func(act, te.compute(shape, pair, name="bf16x3_planes"))


def split_matmul(rows, k: int, n: int, epilogue: str | None = None):
    """PrimFunc: y[rows, N] = x · W on AMX bf16 tiles from x's planes (`to_split_pairs`) and W's
    (`pack_split_pairs`): three bf16 products a K step (`split_product`), summed in fp32, each within
    2^-15 of its size (fp16 weights are themselves rounded to 2^-11), then the `epilogue` if any (`linear_output`).
    Where the CPU has AMX, this runs an fp16 or fp32 linear layer 2-2.5x faster than torch's fp32 GEMM here (in the
    model, 252 rows: 700-810 GFLOP/s against 321-343), its weights 4 bytes each in memory."""
    pair_rows = tvm_amx.activation_rows(rows, True)
    planes = te.placeholder(int64_shape(pair_rows, 2, k // 2), "int32", name="planes")
    panels = te.placeholder(int64_shape(n // PANEL, 2, k // 2, PANEL), "int32", name="panels")
    p = te.reduce_axis(int64_shape(0, k // 2), name="p")
    _, at = panel_product(pair_rows, n, epilogue, lambda r, panel, column: te.sum(split_product(
        planes[r, 0, p], planes[r, 1, p], panels[panel, 0, p, column], panels[panel, 1, p, column]), axis=p),
        SPLIT_MATMUL_NAME)
    extra, out = linear_output(rows, n, at, epilogue, "bf16x3_rows")
    return kernel_func(planes, panels, *extra, out)


def pair_matmul(rows, k: int, n: int, amx: bool = False, epilogue: str | None = None):
    """PrimFunc: y[rows, N] = pairs[rows, K/2] · panels[N/64, K/2, 64], bf16 products summed in fp32, then the
    `epilogue` if any (`linear_output`). With `amx`, the pairs have whole tiles of rows (`tvm_amx.activation_rows`)
    and the product is the AMX kernel's."""
    pair_rows = tvm_amx.activation_rows(rows, amx)
    pairs = te.placeholder(int64_shape(pair_rows, k // 2), "int32", name="pairs")
    panels = te.placeholder(int64_shape(n // PANEL, k // 2, PANEL), "int32", name="panels")
    p = te.reduce_axis(int64_shape(0, k // 2), name="p")
    out, at = panel_product(pair_rows, n, epilogue, lambda r, panel, column: te.sum(
        pair_product(pairs[r, p], panels[panel, p, column]), axis=p), AMX_MATMUL_NAME if amx else MATMUL_NAME)
    extra = []
    if amx or epilogue:  # the rows asked for, out of whole tiles; or the epilogue (an epilogue of the tiles)
        extra, out = linear_output(rows, n, at, epilogue, "bf16_amx_rows" if amx else "bf16_epilogue")
    return kernel_func(pairs, panels, *extra, out)


@T.prim_func(s_tir=True)
def _dot_16_desc(a: T.Buffer((1,), "int32", offset_factor=1), b: T.Buffer((16,), "int32", offset_factor=1),
                 acc: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(acc[0:16], a[0:1], b[0:16])
        T.writes(acc[0:16])
        for i in T.serial(0, 16):
            with T.sblock("update"):
                vi = T.axis.remap("S", [i])
                acc[vi] = acc[vi] + (T.reinterpret("float32", T.shift_left(a[0], 16))
                                     * T.reinterpret("float32", T.shift_left(b[vi], 16))
                                     + T.reinterpret("float32", T.bitwise_and(a[0], -65536))
                                     * T.reinterpret("float32", T.bitwise_and(b[vi], -65536)))


@T.prim_func(s_tir=True)
def _dot_16_vdpbf16ps(a: T.Buffer((1,), "int32", offset_factor=1), b: T.Buffer((16,), "int32", offset_factor=1),
                      acc: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(acc[0:16], a[0:1], b[0:16])
        T.writes(acc[0:16])
        acc[T.ramp(T.int32(0), 1, 16)] = T.call_extern("float32x16", "qwen3_deploy_dpbf16",
                                                        acc.vload([0], "float32x16"), T.broadcast(a[0], 16),
                                                        b.vload([0], "int32x16"))


s_tir.TensorIntrin.register(DOT_16, _dot_16_desc, _dot_16_vdpbf16ps, override=True)
