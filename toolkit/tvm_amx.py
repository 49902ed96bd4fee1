"""AMX tile kernels for TVM's int8 and bf16 linear layers, and for fp16/fp32 ones as three bf16 products (bf16x3), on
CPUs with Intel AMX (Sapphire Rapids and later).

One AMX instruction multiplies a 16 x 64-byte tile of activations by a 64-byte x 16-column tile of weights into a
16 x 16 tile of int32 (`tdpbusd`, uint8 x int8) or fp32 (`tdpbf16ps`, bf16 pairs) accumulators: 16 AVX-512 dot
products' worth of work per instruction. The weight panels `tvm_int8` and `tvm_bf16` already pack (`[N/64, K/4, 64,
4]` int8 quads, `[N/64, K/2, 64]` bf16 pairs) are exactly AMX's weight-tile layout: 16 panel rows, 256 bytes apart,
hold a 64-byte x 16-column tile, so the same panels serve both kernels.

The micro-kernel (`micro_kernel_llvm`, LLVM IR imported with `pragma_import_llvm`) computes a block of 16 rows x
one to four panels over the whole K: per panel, four accumulator tiles stay in tile registers while each 64-byte step
of K loads one activation tile and four weight tiles. The schedule (`tvm_schedules.Matmul`) tensorizes the matmul's
`[16, 64 * panels, K]` loop nest with it (`register`); rows are padded to a multiple of 16 by the kernel feeding the
matmul (`activation_rows`), since a tile always holds 16 rows. A padded row costs no time: an AMX product takes as long
for 1 row as for 16.

Linux hands tile registers to a process only once it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, else SIGILL): a TVM
backend asks before loading an AMX artifact (`request_tiles`)."""
from __future__ import annotations

import ctypes
import functools
import os
from typing import NamedTuple

from toolkit.host import cpu_has

TILE_ROWS = 16  # activation rows per tile
TILE_BYTES = 64  # bytes of a tile row: K values per step (64 int8 or 32 bf16)
PANEL_ROW_BYTES = 256  # a weight panel row: 64 columns x 4 bytes (an int8 quad or a bf16 pair)
PANEL_GROUP_BYTES = 512 << 10  # the most weight bytes one micro-kernel call covers (see `panels_per_call`)


class Kind(NamedTuple):
    """A kind of AMX kernel."""

    flag: str  # the cpuinfo flag of its instruction
    instruction: str  # the tile instruction (its LLVM intrinsic's name)
    value_bytes: int  # bytes of one K value in its activation rows and weight panels
    planes: int = 1  # 2: each operand is a high and a low bf16 plane (`tvm_bf16.split_matmul`)


KINDS = {"int8": Kind("amx_int8", "tdpbusd", 1), "bf16": Kind("amx_bf16", "tdpbf16ps", 2),
         "bf16x3": Kind("amx_bf16", "tdpbf16ps", 2, planes=2)}
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158
SWITCH = "QWEN3_DEPLOY_TVM_AMX"  # "0": AVX-512 kernels even where the CPU has AMX


def kinds_to_build() -> frozenset[str]:
    """The linear-layer kernels (`KINDS`: "int8", "bf16", "bf16x3") that CPU builds give AMX tiles: those this CPU
    has, if Linux lets this process use them; none where the environment sets QWEN3_DEPLOY_TVM_AMX=0 (the AVX-512
    kernels, to compare the two)."""
    if os.environ.get(SWITCH) == "0" or not cpu_has("amx_tile") or tiles_refused():
        return frozenset()
    return frozenset(name for name, kind in KINDS.items() if cpu_has(kind.flag))


def activation_row_bytes(kind: str, k: int) -> int:
    """Bytes of an activation row of K values, all its planes (the stride between a tile's rows)."""
    return k * KINDS[kind].value_bytes * KINDS[kind].planes


def fits(kind: str, k: int) -> bool:
    """Whether K values make whole 64-byte steps, as the micro-kernel takes them (every Qwen3 shape)."""
    return k * KINDS[kind].value_bytes % TILE_BYTES == 0


def activation_rows(rows, amx: bool):
    """The rows of the activations a linear kernel reads: `rows`, or with `amx` those rounded up to whole tiles (an
    int, or a simplified expression of the symbolic batch: the kernels' buffers and Relax's tensor types must spell
    it alike)."""
    if not amx:
        return rows
    padded = (rows + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS
    if isinstance(rows, int):
        return padded
    from tvm.sym.analyzer import Analyzer

    return Analyzer().simplify(padded)


@functools.cache
def tiles_refused() -> int:
    """0 once Linux has given this process the tile registers (asked once: every thread may then use them), else the
    errno of its refusal (kernels before 5.16 have no AMX support)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 else ctypes.get_errno()


def request_tiles() -> None:
    """Make sure this process may use the tile registers, which an artifact with AMX kernels needs."""
    if errno := tiles_refused():
        from toolkit.errors import ToolkitError

        raise ToolkitError(f"Linux refused this process AMX tile registers (arch_prctl errno {errno}; kernels before "
                           "5.16 have no AMX support): run this artifact on a newer Linux kernel, or rebuild it on "
                           "this one, which builds AVX-512 kernels instead")


def panels_per_call(panels: int, k: int, kind: str) -> int:
    """How many of a matmul's `panels` weight panels (of K values each) one micro-kernel call covers: 4, 2 or 1,
    dividing `panels`, their bytes within PANEL_GROUP_BYTES. A group's row tiles run in turn with its panels in L2
    (2 MB a core here); more panels a call spread the tile configuration's cost (int8 `[252, 1024] x [1024, 6144]`:
    2,655 GOPS with 4, 2,344 with 1), but bf16 `[252, 3072] x [3072, 1024]` with 4 of its 384 KB panels ran at 1,168
    GFLOP/s against 1,640 with 1."""
    panel_bytes = activation_row_bytes(kind, k) * (PANEL_ROW_BYTES // 4)  # K values x 64 columns
    return next(p for p in (4, 2, 1) if panels % p == 0 and (p == 1 or p * panel_bytes <= PANEL_GROUP_BYTES))


def kernel_name(kind: str) -> str:
    """The micro-kernel's LLVM function name."""
    return f"qwen3_deploy_amx_{kind}"


def micro_kernel_llvm(kind: str) -> str:
    """LLVM IR of `void kernel(acc, act, panel, act_row_bytes, steps, panels)`: for each of `panels` consecutive
    weight panels p, acc[16, 64p:64p+64] (acc row-major, `panels` * 256 bytes a row) = act[16, steps * 64 bytes] ·
    panel p [steps * 16 rows of 256 bytes]. Tiles 0-3 are the accumulators, 4 the activations and 5/6 the weights
    (alternating, so a weight load overlaps the previous product).

    A two-plane kind (`bf16x3`) has each activation row as its high plane then its low plane (`act_row_bytes / 2`
    apart) and each panel as its high then its low plane (`steps` * 16 rows apart): per step, tiles 4/5 hold the
    activation planes, 6/7 a column group's high and low weight planes, and each accumulator takes hi·hi, lo·hi and
    hi·lo (`tvm_bf16.split_matmul`).

    The tile configuration is loaded on every call: no cheaper way tells whether another library on this thread
    (ONNX Runtime's, oneDNN's AMX kernels) changed it, and `sttilecfg` costs as much as `ldtilecfg` here (about 300
    ns each, measured): a call covers several panels to spread it (`panels_per_call`)."""
    config = [0] * 64  # ldtilecfg's palette 1: every tile 16 rows of 64 bytes
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile], config[48 + tile] = TILE_BYTES, TILE_ROWS
    instruction, planes = KINDS[kind].instruction, KINDS[kind].planes
    step_bytes = TILE_ROWS * PANEL_ROW_BYTES

    def product(g: int, act_tile: int, weight_tile: int, plane: str) -> str:
        return (f"  %w{plane}{g} = getelementptr i8, ptr %panel_{plane}, i64 {TILE_BYTES * g}\n"
                f"  call void @llvm.x86.tileloadd64(i8 {weight_tile}, ptr %w{plane}{g}, i64 {PANEL_ROW_BYTES})\n"
                f"  call void @llvm.x86.{instruction}(i8 {g}, i8 {act_tile}, i8 {weight_tile})")

    if planes == 1:
        loads = ""
        products = "\n".join(product(g, 4, 5 + g % 2, "hi") for g in range(4))
    else:
        loads = ("  %act_lo = getelementptr i8, ptr %act_step, i64 %half_row\n"
                 "  call void @llvm.x86.tileloadd64(i8 5, ptr %act_lo, i64 %act_row_bytes)\n"
                 "  %panel_lo = getelementptr i8, ptr %panel_hi, i64 %plane_bytes")
        def pair_of_groups(g: int) -> str:  # products of two column groups alternate, hiding each one's latency
            return "\n".join([product(g, 4, 6, "hi"), product(g + 1, 4, 7, "hi"),
                              f"  call void @llvm.x86.{instruction}(i8 {g}, i8 5, i8 6)",
                              f"  call void @llvm.x86.{instruction}(i8 {g + 1}, i8 5, i8 7)",
                              product(g, 4, 6, "lo"), product(g + 1, 4, 7, "lo")])

        products = pair_of_groups(0) + "\n" + pair_of_groups(2)
    zero = "\n".join(f"  call void @llvm.x86.tilezero(i8 {g})" for g in range(4))
    stores = "\n".join(f"  %acc{g} = getelementptr i8, ptr %acc_panel, i64 {TILE_BYTES * g}\n"
                       f"  call void @llvm.x86.tilestored64(i8 {g}, ptr %acc{g}, i64 %acc_row_bytes)"
                       for g in range(4))
    return f"""
define linkonce_odr void @{kernel_name(kind)}(ptr %acc, ptr %act, ptr %panel, i64 %act_row_bytes, i64 %steps,
                                            i64 %panels) {{
entry:
  %config = alloca <64 x i8>, align 64
  store <64 x i8> <{", ".join(f"i8 {byte}" for byte in config)}>, ptr %config, align 64
  call void @llvm.x86.ldtilecfg(ptr %config)
  %acc_row_bytes = mul i64 %panels, {PANEL_ROW_BYTES}
  %half_row = lshr i64 %act_row_bytes, 1
  %plane_bytes = mul i64 %steps, {step_bytes}
  %panel_bytes = mul i64 %plane_bytes, {planes}
  br label %panel_start
panel_start:
  %p = phi i64 [0, %entry], [%p_next, %panel_end]
  %panel_offset = mul i64 %p, %panel_bytes
  %panel_p = getelementptr i8, ptr %panel, i64 %panel_offset
{zero}
  br label %step
step:
  %i = phi i64 [0, %panel_start], [%next, %step]
  %act_offset = mul i64 %i, {TILE_BYTES}
  %act_step = getelementptr i8, ptr %act, i64 %act_offset
  call void @llvm.x86.tileloadd64(i8 4, ptr %act_step, i64 %act_row_bytes)
  %step_offset = mul i64 %i, {step_bytes}
  %panel_hi = getelementptr i8, ptr %panel_p, i64 %step_offset
{loads}
{products}
  %next = add i64 %i, 1
  %done = icmp eq i64 %next, %steps
  br i1 %done, label %panel_end, label %step
panel_end:
  %acc_offset = mul i64 %p, {PANEL_ROW_BYTES}
  %acc_panel = getelementptr i8, ptr %acc, i64 %acc_offset
{stores}
  %p_next = add i64 %p, 1
  %all = icmp eq i64 %p_next, %panels
  br i1 %all, label %exit, label %panel_start
exit:
  ret void
}}
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilezero(i8)
declare void @llvm.x86.tileloadd64(i8, ptr, i64)
declare void @llvm.x86.tilestored64(i8, ptr, i64)
declare void @llvm.x86.{instruction}(i8, i8, i8)
"""


def _operands(kind: str, k: int, panels: int):
    """The micro-kernel's operands as the matmul blocks spell them (`tvm_int8.quad_matmul`, `tvm_bf16.pair_matmul`,
    `tvm_bf16.split_matmul`): the activation tile's shape and dtype, the weight panels' shape and dtype, the
    accumulators' dtype, the extent of the reduction axis, `term(a, b, row, panel, column, r)`, one reduction step
    of an output, and `reads(...)` (same arguments), the operand regions it reads (as TVM infers them for the
    blocks: tensorize compares them)."""
    from tvm import ir, tirx

    from toolkit import tvm_bf16

    def region(buffer, *indices):  # an index, or (start, extent) for a range
        return tirx.BufferRegion(buffer, [ir.Range.from_min_extent(*i) if isinstance(i, tuple) else
                                          ir.Range.from_min_extent(i, 1) for i in indices])

    if kind == "int8":
        return ((16, k), "uint8", (panels, k // 4, 64, 4), "int8", "int32", k,
                lambda a, b, i, p, c, r: tirx.Cast("int32", a[i, r]) * tirx.Cast("int32", b[p, r // 4, c, r % 4]),
                lambda a, b, i, p, c, r: [region(a, i, r), region(b, p, r // 4, c, r % 4)])
    if kind == "bf16":
        return ((16, k // 2), "int32", (panels, k // 2, 64), "int32", "float32", k // 2,
                lambda a, b, i, p, c, r: tvm_bf16.pair_product(a[i, r], b[p, r, c]),
                lambda a, b, i, p, c, r: [region(a, i, r), region(b, p, r, c)])
    return ((16, 2, k // 2), "int32", (panels, 2, k // 2, 64), "int32", "float32", k // 2,
            lambda a, b, i, p, c, r: tvm_bf16.split_product(a[i, 0, r], a[i, 1, r], b[p, 0, r, c], b[p, 1, r, c]),
            lambda a, b, i, p, c, r: [region(a, i, (0, 2), r), region(b, p, (0, 2), r, c)])


@functools.cache
def register(kind: str, k: int, panels: int, glu: bool = False) -> str:
    """Register (once) the tensor intrinsic that replaces a `[16 rows, 64 * panels columns, K]` block of the `kind`
    matmul (with AMX rows) by one micro-kernel call; returns its name. With `glu`, the block is a GLU kernel's
    `[16, panels, 2, 32]` (`tvm_compile.panel_product`): the same memory, so the same call."""
    from tvm import ir, s_tir, tirx
    from tvm.script import tirx as T

    a_shape, a_dtype, b_shape, b_dtype, acc_dtype, reduction, term, reads = _operands(kind, k, panels)
    cols = 64 * panels
    zero = tirx.const(0, acc_dtype)

    def whole(buffer):
        return tirx.BufferRegion(buffer, [ir.Range.from_min_extent(0, d) for d in buffer.shape])

    def update_reads(c_region, a, b, *indices):
        return [c_region, *reads(a, b, *indices)]

    if glu:
        @T.prim_func(s_tir=True)
        def desc(a: T.Buffer(a_shape, a_dtype, offset_factor=1), b: T.Buffer(b_shape, b_dtype, offset_factor=1),
                 c: T.Buffer((16, panels, 2, 32), acc_dtype, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(whole(a), whole(b))
                T.writes(whole(c))
                for i, p, h, j, r in T.grid(16, panels, 2, 32, reduction):
                    with T.sblock("update"):
                        vi, vp, vh, vj, vr = T.axis.remap("SSSSR", [i, p, h, j, r])
                        T.reads(update_reads(c[vi, vp, vh, vj], a, b, vi, vp, vh * 32 + vj, vr))
                        T.writes(c[vi, vp, vh, vj])
                        with T.init():
                            c[vi, vp, vh, vj] = zero
                        c[vi, vp, vh, vj] = c[vi, vp, vh, vj] + term(a, b, vi, vp, vh * 32 + vj, vr)
    else:
        @T.prim_func(s_tir=True)
        def desc(a: T.Buffer(a_shape, a_dtype, offset_factor=1), b: T.Buffer(b_shape, b_dtype, offset_factor=1),
                 c: T.Buffer((16, cols), acc_dtype, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(whole(a), whole(b))
                T.writes(whole(c))
                for i, j, r in T.grid(16, cols, reduction):
                    with T.sblock("update"):
                        vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                        T.reads(update_reads(c[vi, vj], a, b, vi, vj // 64, vj % 64, vr))
                        T.writes(c[vi, vj])
                        with T.init():
                            c[vi, vj] = zero
                        c[vi, vj] = c[vi, vj] + term(a, b, vi, vj // 64, vj % 64, vr)
    # the implementation: the description's buffers and regions, its body one call of the micro-kernel
    a, b, c = desc.params  # buffers
    act_row_bytes = activation_row_bytes(kind, k)
    call = tirx.call_extern("int32", kernel_name(kind), c.access_ptr("w"), a.access_ptr("r"), b.access_ptr("r"),
                            tirx.IntImm("int64", act_row_bytes),
                            tirx.IntImm("int64", k * KINDS[kind].value_bytes // TILE_BYTES),
                            tirx.IntImm("int64", panels))
    root = desc.body.block
    impl = desc.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], root.reads, root.writes, root.name_hint,
                                                                     tirx.Evaluate(call))))
    name = f"qwen3_deploy_amx_{kind}_16x{cols}x{k}{'_glu' if glu else ''}"
    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    return name
