"""ONNX export → Apache TVM (Relax) → a compiled library plus fp16 weights.

Why import from the ONNX export rather than torch.export: it is the very graph ONNX Runtime validates, so both
backends run the same patched model, and Relax's ONNX frontend takes it without custom converters (torch.export's
Relax frontend needs every aten op of the exporter's decompositions to be mapped).

Flow: the symbolic export made static at the artifact's SEQ and its shape arithmetic folded, its batch symbolic
(`import_onnx`: an artifact runs any batch up to its own, computing only the rows it is given) → from_onnx without
the weights' bytes (they stay function inputs) → on CPU, linear weights taken as packed fp16 panels, each residual
add and SiLU * up in the int8/bf16 linear kernel before it (`pack_linear_weights`), and each RMSNorm made one kernel
(`rms_norm_kernels`) → LegalizeOps → FuseOps/FuseTIR → each panel's cast fused into its matmul
(`fuse_weight_casts`) → LiftTransformParams (what is left to do once at load,
e.g. the fp32 copies dlight's GPU rules read) → schedules (our CPU rules, or dlight's GPU rules) → build. The
artifact holds `model.so` and `params.npz`, written tensor by tensor from the export's external data, in the layout
the kernels read (fp16 panels as exported; with AMX bf16x3 two bf16 planes, 4 bytes a weight; bf16 pairs; int8
quads); on CPU they are the weights in memory too (no fp32 copy is made at load).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.host import cpu_has
from toolkit.tvm_backend import import_tvm

tvm = import_tvm(compiler=True)

LIBRARY = "model.so"
PARAMS = "params.npz"


# The extensions our kernels call directly, as Linux names them (/proc/cpuinfo) and as LLVM does
KERNEL_FEATURES = {"avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni", "amx_tile": "amx-tile",
                   "amx_int8": "amx-int8", "amx_bf16": "amx-bf16"}


def host_target() -> dict:
    """The llvm target of this CPU: its exact mcpu (the artifact is tied to it), plus those of our kernels' extensions
    that it has and LLVM's model of that mcpu lacks. A hypervisor may report a CPU model older than the CPU: a Xeon
    with AMX and avx512_bf16 here reports model 167, which LLVM names rocketlake (no avx512bf16), and the bf16
    kernels' `vdpbf16ps` then aborted LLVM ("Do not know how to split this operator's operand")."""
    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu()
    modelled = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    missing = [f"+{llvm}" for flag, llvm in KERNEL_FEATURES.items() if cpu_has(flag) and llvm not in modelled]
    return {"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1, **({"mattr": missing} if missing else {})}


def cuda_target(arch: str | None = None) -> dict:
    """The CUDA target (sm_90 unless QWEN3_DEPLOY_CUDA_ARCH says otherwise)."""
    return {"kind": "cuda", "arch": arch or os.environ.get("QWEN3_DEPLOY_CUDA_ARCH", "sm_90")}


def normalize_constants(model) -> None:
    """The dynamo exporter writes Constant(value_int[s]/value_float[s]); Relax's importer only reads `value`."""
    from onnx import helper, numpy_helper

    converters = {"value_int": lambda a: np.array(a.i, np.int64),
                  "value_ints": lambda a: np.array(list(a.ints), np.int64),
                  "value_float": lambda a: np.array(a.f, np.float32),
                  "value_floats": lambda a: np.array(list(a.floats), np.float32)}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name in converters:
            value = converters[node.attribute[0].name](node.attribute[0])
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


@dataclass(frozen=True)
class ImportedGraph:
    """The Relax module (`main` takes input_ids, attention_mask, *weights) and, for each weight input in order, the
    ONNX initializer whose bytes stay in the export's external data file."""

    mod: tvm.IRModule
    weights: list


FOLDED_ELEMENTS = 1 << 22  # constants up to this size are folded at import (RoPE's tables, the causal mask at SEQ 1024)


def import_onnx(onnx_path: Path, max_batch: int, seq_len: int) -> ImportedGraph:
    """Import the export (symbolic batch and sequence axes, as the onnx backend's artifacts have) at SEQ `seq_len`
    with a symbolic batch of 1..`max_batch` rows (`symbolic_batch`), without reading its external data: those weights
    become inputs of `main` (never Relax constants, of which the importer would hold two more copies), so importing a
    4B graph takes megabytes.

    Relax's importer cannot take the exporter's shape arithmetic (Shape → Gather → Concat → Reshape: "Reshape
    expects the input data to be a Tensor"), so the graph is first made static (at SENTINEL_BATCH rows, made symbolic
    again after import) and its constants folded by onnxscript
    (the weights, graph inputs by then, are not folded: their fp16 casts stay). The int64 constants folding makes go
    back in as `Constant` nodes, as do the small tensors it precomputes for this shape (RoPE tables, the causal mask):
    the importer reads a Constant's value but makes an initializer a parameter, and then a GQA `Expand` would get a
    shape known only at run time, and the parameters (the weights file every SEQ of a set shares) would differ per
    SEQ."""
    import onnx
    import onnx_ir as ir
    import onnxscript
    from onnx import helper
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    static = {"batch": SENTINEL_BATCH, "seq": seq_len}
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in static:
                dim.dim_value = static[dim.dim_param]  # clears dim_param (one of)
    del model.graph.value_info[:]  # symbolic shapes: inferred again, statically
    normalize_constants(model)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)  # small tensors: folded with the rest, then constants of the module
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    folded = ir.from_proto(model)
    # 2 s at 0.6B (its full `optimize`: 37 s, per SEQ). Its default input limit, 8192 elements, left RoPE's tables
    # (`cos` of a [SEQ, 128] constant) unfolded from SEQ 64 on, and their RoPE out of q's and k's norm kernels
    onnxscript.optimizer.fold_constants(folded, input_size_limit=FOLDED_ELEMENTS, output_size_limit=FOLDED_ELEMENTS)
    onnxscript.optimizer.remove_unused_nodes(folded)
    model = ir.to_proto(folded)
    folded_constants = list(model.graph.initializer)
    del model.graph.initializer[:]
    for tensor in reversed(folded_constants):
        model.graph.node.insert(0, helper.make_node("Constant", [], [tensor.name], value=tensor))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Renaming name")  # "a.b.weight" → "a_b_weight", once per weight input
        mod = from_onnx(model)
    mod["main"] = mod["main"].with_attr("num_input", len(model.graph.input) - len(external))
    return ImportedGraph(symbolic_batch(mod, max_batch), external)


BATCH_VAR = "batch"
SENTINEL_BATCH = 7919  # the batch a graph is imported at before it is made symbolic: a prime no model dimension is


def symbolic_batch(mod, max_batch: int) -> tvm.IRModule:
    """`main` imported at batch SENTINEL_BATCH, with that batch made a symbolic dimension `batch` (1..max_batch).

    Why this way: Relax's ONNX importer cannot take the export's shape arithmetic with a symbolic batch (see
    `import_onnx`), and folding it needs a number; a prime that no other dimension equals marks, after import, every
    shape the batch is in (the inputs' types and the shapes Reshape and Expand were folded to), and only those.
    Everything downstream is inferred again from the new inputs. `max_batch` bounds the VM's memory plan."""
    from tvm import relax, tirx
    from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

    batch = tirx.Var(BATCH_VAR, "int64")

    def is_sentinel(dim) -> bool:
        return isinstance(dim, tirx.IntImm) and int(dim) == SENTINEL_BATCH

    def dims(shape):
        return [batch if is_sentinel(d) else d for d in shape]

    def holds_sentinel(ty) -> bool:
        return isinstance(ty, relax.TensorType) and ty.shape is not None and any(map(is_sentinel, ty.shape.values))

    @mutator
    class MakeBatchSymbolic(PyExprMutator):
        def visit_shape_expr_(self, op):
            return relax.ShapeExpr(dims(op.values))

        def visit_var_def_(self, var):
            if holds_sentinel(var.ty):
                return relax.Var(var.name, relax.TensorType(dims(var.ty.shape.values), var.ty.dtype))
            return var

    @visitor
    class FindSentinel(PyExprVisitor):
        """Raise where a shape still holds the sentinel: a place the batch hides that the mutator does not reach."""

        def visit_var_binding_(self, binding):
            var = binding.var
            if holds_sentinel(var.ty):
                raise ToolkitError(f"TVM's import left the batch fixed at {var.name} ({var.ty}): this graph cannot be "
                                   "compiled with a batch of any size; please report it")
            self.visit_expr(binding.value)

    main = MakeBatchSymbolic(mod).visit_expr(mod["main"])
    FindSentinel().visit_expr(main)
    mod["main"] = main.with_attr("tir_var_upper_bound", {BATCH_VAR: max_batch})
    return mod


def weight_inputs(mod) -> list:
    """`main`'s weight inputs, in order: its parameters after the `num_input` real inputs."""
    main = mod["main"]
    return list(main.params[int(main.attrs["num_input"]):])


PANEL = 64  # columns per packed weight panel: the matmul rule's register tile width (4 AVX-512 vectors)
VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register
ROW_TILE_COLUMNS = 32  # attention rows up to this wide are one tile (in 8-lane vectors where 16 would be padding)


def int64_shape(*dims) -> tuple:
    """A TE shape as Relax's own kernels have it (int64): FuseTIR refuses to mix int32- and int64-shaped buffers.
    A dimension may be symbolic (an int64 expression of `batch`)."""
    from tvm import tirx

    return tuple(tirx.IntImm("int64", d) if isinstance(d, int) else d for d in dims)


def kernel_func(*tensors):
    """`te.create_prim_func` of the inputs and the output (the last tensor), taking as scalar parameters, between them,
    the symbolic variables that the buffers' shapes hold only inside expressions (`batch` in `batch * 28` rows): a
    buffer binds a dimension that is a variable by itself, and nothing else would (`KernelCalls` passes them)."""
    from tvm import te, tirx
    from tvm.tirx.analysis import undefined_vars

    dims = [d for t in tensors for d in t.shape]
    plain = [d for d in dims if isinstance(d, tirx.Var)]
    loose = {}
    for d in dims:
        for v in undefined_vars(d):
            if not any(v.same_as(p) for p in plain):
                loose[v.name] = v
    *inputs, output = tensors
    return te.create_prim_func([*inputs, *(loose[n] for n in sorted(loose)), output])


RESIDUAL, GLU = "residual", "glu"  # epilogues a linear kernel can end with (`linear_output`)
GLU_HALF = PANEL // 2  # a GLU layer's packed panels hold 32 gate columns, then the same 32 up columns


def glu_interleaved(weight: np.ndarray) -> np.ndarray:
    """[2N, K] weight, gate rows then up rows → rows in blocks of GLU_HALF gate, GLU_HALF up: every packed panel then
    holds the gate and up columns of the same GLU_HALF outputs, and SiLU(gate) * up is computed inside its tile."""
    n, k = weight.shape
    return np.ascontiguousarray(weight.reshape(2, n // PANEL, GLU_HALF, k).transpose(1, 0, 2, 3).reshape(n, k))


def panel_product(rows, n: int, epilogue: str | None, product, name: str):
    """A linear kernel's product block from `product(r, panel, column)` (a reduction): `[rows, n]`, or for a GLU
    epilogue `[rows, n/64, 2, 32]` (panel, gate or up half, column), so that the epilogue reads a point of each
    half: TVM cannot place in a tile an epilogue whose reads it can only bound by a range of a flat axis (`64 * b
    + l` and `64 * b + 32 + l`). Returns the block's tensor and `at(r, *column)`, its value at the column indices
    `linear_output` passes."""
    from tvm import te

    if epilogue == GLU:
        block = te.compute(int64_shape(rows, n // PANEL, 2, GLU_HALF),
                           lambda r, panel, half, c: product(r, panel, half * GLU_HALF + c), name=name)
        return block, lambda r, panel, half, c: block[r, panel, half, c]
    block = te.compute(int64_shape(rows, n), lambda r, c: product(r, c // PANEL, c % PANEL), name=name)
    return block, lambda r, c: block[r, c]


def linear_output(rows, n: int, value, epilogue: str | None, name: str):
    """The output stage of a linear kernel whose product is `value(r, c)` (fp32; `value(r, panel, half, column)`
    for GLU, `panel_product`): `[rows, n]` as it is, plus a `residual` input (`RESIDUAL`), or SiLU(gate) * up of
    GLU-interleaved columns (`GLU`, `glu_interleaved`) as `[rows, n/64, 32]`, which is `[rows, n/2]` in memory. Fused
    into the matmul's tiles, the product never goes to memory: the residual add and SiLU * up were kernels of their
    own that read it back (6 MB a layer for gate/up at `[9, 28]`). Returns (extra inputs, output tensor)."""
    from tvm import te, tirx, topi

    if epilogue is None:
        return [], te.compute(int64_shape(rows, n), value, name=name)
    if epilogue == RESIDUAL:
        residual = te.placeholder(int64_shape(rows, n), "float32", name="residual")
        return [residual], te.compute(int64_shape(rows, n), lambda r, c: value(r, c) + residual[r, c], name=name)
    assert epilogue == GLU, epilogue
    # SiLU as the graph's own sigmoid computes it (`_fast_sigmoid`): x * 1 / (1 + fast_exp(-x)). SiLU(gate) * up is
    # written as a product over the half axis (SiLU of half 0 times half 1): every read of the product is then a
    # point in the block's own indices, which TVM needs to place the block in the tile (`panel_product`)
    halves = int64_shape(rows, n // PANEL, 2, GLU_HALF)
    exp = topi.fast_exp(te.compute(halves, lambda r, b, h, c: -value(r, b, h, c), name="glu_negative"))
    one = tirx.const(1.0, "float32")

    def silu_or_up(r, b, h, c):
        x = value(r, b, h, c)
        return tirx.Select(h == 0, x * (one / (one + exp[r, b, h, c])), x)

    product = te.comm_reducer(lambda x, y: x * y, lambda dtype: tirx.const(1, dtype), name="product")
    half = te.reduce_axis(int64_shape(0, 2), name="half")
    return [], te.compute(int64_shape(rows, n // PANEL, GLU_HALF),
                          lambda r, b, c: product(silu_or_up(r, b, half, c), axis=half), name=name)


class KernelCalls:
    """Calls of our own TE kernels in a module being rewritten: each kernel added to `builder` once, the first time it
    is called, under its name."""

    def __init__(self, mod):
        from tvm import relax

        self.builder = relax.BlockBuilder(mod)
        self._added = {}  # key → (GlobalVar, PrimFunc)

    def call(self, name: str, make, args: list, out_ty, key=None):
        """`call_tir` of the kernel `make()` (added as `name`; `key`, default `name`, says which calls share it),
        passing the symbolic variables it takes (`kernel_func`)."""
        from tvm import relax, tirx

        key = name if key is None else key
        if key not in self._added:
            func = make().with_attr("global_symbol", name)
            self._added[key] = self.builder.add_func(func, name), func
        gv, func = self._added[key]
        scalars = [p for p in func.params if not isinstance(p.ty, tirx.BufferType)]
        return relax.call_tir(gv, [*args, *scalars], out_ty)


def dims_name(*dims) -> str:
    """A kernel name's shape part: `8_28_1024`, or `batchx28_1024` where the batch is symbolic."""
    from tvm import tirx

    return "_".join(str(int(d)) if isinstance(d, tirx.IntImm | int) else
                    str(d).replace(" * ", "x").replace("T.int64(", "").replace(")", "") for d in dims)


def llvm_dot(name: str, intrinsic: str, acc: str, operand: str) -> str:
    """LLVM IR of `acc name(acc, <16 x i32> a, <16 x i32> b)`: a and b bitcast to the intrinsic's `operand` vector
    type, then `intrinsic` (an x86 dot-product instruction). Kernels import it with `pragma_import_llvm` and LLVM
    inlines it: TVM's LLVM backend cannot form these operand types itself (see tvm_bf16, tvm_int8)."""
    return f"""
define linkonce_odr {acc} @{name}({acc} %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to {operand}
  %y = bitcast <16 x i32> %b to {operand}
  %r = call {acc} @{intrinsic}({acc} %acc, {operand} %x, {operand} %y)
  ret {acc} %r
}}
declare {acc} @{intrinsic}({acc}, {operand}, {operand})
"""


# How `write_params` stores each weight input of `main` (see `pack_linear_weights`)
PLAIN, PANELS, BF16_PAIRS, INT8_QUADS = "plain", "panels", "bf16_pairs", "int8_quads"
SPLIT_PANELS = "split_panels"  # fp16/fp32 weights as the bf16 planes of the bf16x3 AMX kernel
GLU_SUFFIX = "+glu"  # a layout of a GLU kernel's weight: its rows `glu_interleaved` first
PLAIN_CHUNK = 16 << 20


def _or(rewritten, expr):
    """The rewritten expression, or `expr` where there is none (Relax expressions have no truth value)."""
    return expr if rewritten is None else rewritten


def _definitions(func):
    """`resolve(expr)`: the expression a variable of `func` is bound to, else `expr` itself (a pattern match hands
    over either, depending on how it reached the node)."""
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    return lambda expr: bound.get(expr, expr)


def _slice_fields(call) -> list[list[int]]:
    """A `relax.strided_slice` call's axes, begin, end and strides, as lists of ints."""
    return [[int(v.value) for v in field] for field in call.args[1:]]


def _same_dims(a, b) -> bool:
    """Whether two shapes (dimensions symbolic in the batch or not) are provably equal."""
    from tvm.sym.analyzer import Analyzer

    return len(a) == len(b) and all(Analyzer().can_prove_equal(x, y) for x, y in zip(a, b))


def pack_linear_weights(mod, int8: frozenset[int] = frozenset(), amx: frozenset[str] = frozenset()
                        ) -> tuple[tvm.IRModule, list[str]]:
    """Rewrite `matmul(x, permute_dims([astype](W)))` (every nn.Linear of the export, W a weight input of `main`) so
    that `main` takes W already packed as contiguous `[N/64, K, 64]` panels in its storage dtype, cast inside the
    matmul: `y = reshape(permute(matmul(x as [1, tokens, K], astype(panels))))`. The micro-kernel then streams each
    panel linearly instead of reading 64 columns out of rows N floats apart (TLB- and prefetch-hostile for N in the
    thousands), and the weights stay fp16 in memory (no fp32 copy at load; half the bytes to stream). All tokens of
    the batch are the GEMM's rows, so a panel is reused across the whole batch while it is in cache: a `[32, 8]`
    bucket runs the same GEMM as `[1, 256]` (per sequence, SEQ 8 reused each panel for 8 rows only). Returns the
    module and, per weight input, its layout for `write_params`.

    bf16 weights become bf16 pair panels `[N/64, K/2, 64]` (int32) instead, and the matmul the AVX512-BF16 kernel of
    `tvm_bf16` on activations rounded to bf16 pairs: `y = pair_matmul(to_pairs(x as [tokens, K]), panels)`. fp16 or
    fp32 weights whose index is in `int8` become int8 quad panels plus a scale table (two inputs of `main`), and the
    matmul the VNNI kernel of `tvm_int8` on activations quantized per token. Kinds ("int8", "bf16") in `amx` take
    the AMX tile kernels of `tvm_amx` instead (wherever K fills whole tiles: every Qwen3 shape), their activations
    padded to whole tiles of rows. With "bf16x3" in `amx`, the other (fp16 or fp32) weights become their two bf16
    planes `[N/64, 2, K/2, 64]` (int32 pairs) and the matmul three bf16 products on AMX tiles
    (`tvm_bf16.split_matmul`), to 2^-15 of each product instead of fp32's 2^-24, at 2-2.5x torch's fp32 GEMM here.

    These kernels (all but the plain fp16/fp32 matmul) also take the work that follows them where it is
    elementwise on their output (`linear_output`): `residual + x·Wᵀ` (o_proj, down_proj) adds the residual in the
    tile, and SiLU(gate) * up of the fused gate_up_proj runs on the tile of a weight packed with its gate and up rows
    interleaved (`glu_interleaved`). The VNNI and AVX512-BF16 kernels read the product from their registers, so it
    never goes to memory (on the Zen4 host, int8 traffic ran 1.15x faster); the AMX ones read it back from the tile
    they just stored, still in cache, instead of from a `[rows, N]` product in a kernel of their own."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard
    from tvm.sym.analyzer import Analyzer

    from toolkit import tvm_amx, tvm_bf16, tvm_int8

    main, weights = mod["main"], weight_inputs(mod)
    panels_of = {}  # weight index → its new parameter(s)
    layouts = [PLAIN] * len(weights)
    kernels = KernelCalls(mod)  # the bf16 / int8 kernels added on the way

    def call(name: str, make, shape: tuple, args: list, out_ty, tiles: bool = False, epilogue: str | None = None):
        options = ({"amx": True} if tiles else {}) | ({"epilogue": epilogue} if epilogue else {})  # tiles: AMX's
        return kernels.call(f"{name}{'_amx' if tiles else ''}_{dims_name(*shape)}{f'_{epilogue}' if epilogue else ''}",
                            lambda: make(*shape, **options), args, out_ty)

    def linear(act, weight, epilogue: str | None = None, residual=None):
        """`act · weightᵀ` (then the `epilogue`: + `residual`, or SiLU * up) as our kernel's call; None where the
        weight has no packed layout, or where its kernel has no such epilogue (the plain fp16/fp32 matmul)."""
        key = next((i for i, v in enumerate(weights) if weight.same_as(v)), None)
        if key is None or len(weight.ty.shape) != 2 or int(weight.ty.shape[0]) % PANEL:
            return None
        n, k = (int(d) for d in weight.ty.shape)
        op, dims = relax.op, list(act.ty.shape.values)
        # every token of every sequence: one GEMM whatever the (batch, SEQ) split (batch * SEQ, the batch symbolic)
        rows = Analyzer().simplify(functools.reduce(operator.mul, dims[:-1]))
        flat = op.reshape(act, (rows, k))
        extra = [] if residual is None else [op.reshape(residual, (rows, n))]
        out_shape = (rows, n // PANEL, GLU_HALF) if epilogue == GLU else (rows, n)
        shaped = dims[:-1] + [n // 2 if epilogue == GLU else n]

        def packed(layout: str, params: list):
            layouts[key] = layout + (GLU_SUFFIX if epilogue == GLU else "")
            return panels_of.setdefault(key, params)

        if weight.ty.dtype == "bfloat16":
            tiles = "bf16" in amx and tvm_amx.fits("bf16", k)
            [panels] = packed(BF16_PAIRS, [relax.Var(f"{weight.name}_pairs", relax.TensorType(
                (n // PANEL, k // 2, PANEL), "int32"))])
            pairs = call("bf16_pairs", tvm_bf16.to_pairs, (rows, k), [flat], relax.TensorType(
                (tvm_amx.activation_rows(rows, tiles), k // 2), "int32"), tiles)
            out = call("bf16_matmul", tvm_bf16.pair_matmul, (rows, k, n), [pairs, panels, *extra],
                       relax.TensorType(out_shape, "float32"), tiles, epilogue)
            return op.reshape(out, shaped)
        if key in int8 and k % 4 == 0:
            tiles = "int8" in amx and tvm_amx.fits("int8", k)
            panels, side = packed(INT8_QUADS, [
                relax.Var(f"{weight.name}_quads", relax.TensorType((n // PANEL, k // 4, PANEL, 4), "int8")),
                relax.Var(f"{weight.name}_scales", relax.TensorType((2, n), "float32"))])
            absmax = call("int8_absmax", tvm_int8.row_absmax, (rows, k), [flat], relax.TensorType((rows,), "float32"))
            quantized = call("int8_quantize", tvm_int8.quantize_rows, (rows, k), [flat, absmax],
                             relax.TensorType((tvm_amx.activation_rows(rows, tiles), k), "uint8"), tiles)
            out = call("int8_matmul", tvm_int8.quad_matmul, (rows, k, n), [quantized, panels, side, absmax, *extra],
                       relax.TensorType(out_shape, "float32"), tiles, epilogue)
            return op.reshape(out, shaped)
        if "bf16x3" in amx and tvm_amx.fits("bf16x3", k):
            [planes] = packed(SPLIT_PANELS, [relax.Var(f"{weight.name}_planes", relax.TensorType(
                (n // PANEL, 2, k // 2, PANEL), "int32"))])
            split = call("bf16x3_planes", tvm_bf16.to_split_pairs, (rows, k), [flat], relax.TensorType(
                (tvm_amx.activation_rows(rows, True), 2, k // 2), "int32"))
            out = call("bf16x3_matmul", tvm_bf16.split_matmul, (rows, k, n), [split, planes, *extra],
                       relax.TensorType(out_shape, "float32"), epilogue=epilogue)
            return op.reshape(out, shaped)
        if epilogue:
            return None
        [panels] = packed(PANELS, [relax.Var(f"{weight.name}_panels", relax.TensorType(
            (n // PANEL, k, PANEL), weight.ty.dtype))])
        out = op.matmul(op.reshape(act, (1, rows, k)), op.astype(panels, "float32"))  # [N/64, rows, 64]
        out = op.permute_dims(out, [1, 0, 2])  # [rows, N/64, 64]
        return op.reshape(out, shaped)

    def matmul_pattern():
        act, weight = wildcard(), wildcard()
        return act, weight, is_op("relax.matmul")(act, is_op("relax.permute_dims")(is_op("relax.astype")(weight)
                                                                                     | weight))  # fp16 | fp32

    users = {var: len(uses) for var, uses in relax.analysis.udchain(main.body.blocks[0]).items()}
    resolved = _definitions(main)

    def used_once(expr) -> bool:  # a product the epilogue would take from every other reader
        return isinstance(expr, relax.Var) and users.get(expr, 0) == 1

    # First the epilogues: `residual + x·Wᵀ` and SiLU(gate) * up of one `x·[gate; up]ᵀ` (the export's fused
    # gate_up_proj, sliced in halves) each become one kernel; then every other linear layer.
    x, w, product = matmul_pattern()
    residual = wildcard()
    add = is_op("relax.add")(residual, product) | is_op("relax.add")(product, residual)
    gx, gw, gate_product = matmul_pattern()
    gate, gate_again, up = (is_op("relax.strided_slice")(p, wildcard(), wildcard(), wildcard(), wildcard())
                            for p in (gate_product, gate_product, matmul_pattern()[2]))
    glu = is_op("relax.multiply")(is_op("relax.multiply")(gate, is_op("relax.sigmoid")(gate_again)), up)

    def is_first_and_second_half(first, second) -> bool:
        """Whether two strided slices take the first and the second half of one product's last axis, and nothing
        else reads the product."""
        source = first.args[0]
        if not (source.same_as(second.args[0]) and users.get(source, 0) == 2):
            return False
        n, last = int(source.ty.shape[-1]), len(source.ty.shape) - 1
        (axes, begin, end, strides), (axes2, begin2, end2, strides2) = _slice_fields(first), _slice_fields(second)
        return (axes == axes2 == [last] and strides == strides2 == [1] and begin == [0] and end == begin2 == [n // 2]
                and end2[0] >= n)

    def with_epilogue(expr, matches):
        if glu in matches:
            first, again, second = (resolved(matches[p]) for p in (gate, gate_again, up))
            if first.same_as(again) and is_first_and_second_half(first, second):
                return _or(linear(matches[gx], matches[gw], GLU), expr)
            return expr
        sum_of = [a for a in expr.args if resolved(a).same_as(matches[product])]
        if sum_of and used_once(sum_of[0]) and _same_dims(matches[residual].ty.shape.values,
                                                          expr.ty.shape.values):  # no broadcast
            return _or(linear(matches[x], matches[w], RESIDUAL, matches[residual]), expr)
        return expr

    def plain(expr, matches):
        return _or(linear(matches[x], matches[w]), expr)

    with_epilogues = relax.analysis.remove_all_unused(rewrite_call(add | glu, with_epilogue, main))
    rewritten = rewrite_call(product, plain, with_epilogues)
    first_weight = len(rewritten.params) - len(weights)
    params = list(rewritten.params[:first_weight])
    for key, weight in enumerate(rewritten.params[first_weight:]):
        params += panels_of.get(key, [weight])
    packed_main = relax.Function(params, rewritten.body, rewritten.ret_ty, rewritten.is_pure, rewritten.attrs)
    if relax.analysis.free_vars(packed_main):  # a weight also used unpacked elsewhere: keep it whole
        return mod, [PLAIN] * len(weights)
    packed_mod = kernels.builder.get()
    packed_mod[packed_mod.get_global_var("main")] = packed_main
    return packed_mod, layouts


def rms_norm_kernels(mod):
    """Rewrite every RMSNorm of the export, `multiply(divide(x, sqrt(add(mean(power(x, 2)), eps))), [astype](w))`
    (the hidden states', and q/k's per head), into one kernel (`rms_norm`). Left to FuseOps, `power` stayed a kernel
    of its own (one more pass over x) and the rest carried the weight's cast as a 1-D block beside the rows, which no
    row rule maps (dlight's took it: parallel over the batch alone, a scalar sum: 0.14 ms for `[252, 1024]`). The
    kernel scales by 1/sqrt once per row, as Hugging Face's `rsqrt` does, not by a division per element. Where x is
    q or k cut out of the fused qkv_proj's output (`reshape(strided_slice(qkv))`), the kernel reads them there: the
    slice was a copy of its own (q's 3.1 ms, k's 1.4 ms a forward in the int8 set's SEQ 28 on the Zen4 host). Where
    the norm of q's or k's heads is followed by RoPE (`x * cos + rotate_half(x) * sin` of `permute_dims(norm, [0, 2,
    1, 3])`, cos and sin constant tables), the kernel applies it and writes the attention's `[b, heads, S, D]`: RoPE
    and its transpose were a pass of their own over q and over k (8.4 ms a forward, same set)."""
    from tvm import relax
    from tvm.relax.dpl import TuplePattern, is_const, is_op, rewrite_call, wildcard

    x, two, eps, w = wildcard(), is_const(), is_const(), wildcard()
    mean = is_op("relax.mean")(is_op("relax.power")(x, two))
    norm = is_op("relax.multiply")(is_op("relax.divide")(x, is_op("relax.sqrt")(is_op("relax.add")(mean, eps))),
                                   is_op("relax.astype")(w) | w)
    heads = is_op("relax.permute_dims")(norm)
    upper, lower = (is_op("relax.strided_slice")(heads, wildcard(), wildcard(), wildcard(), wildcard())
                    for _ in range(2))
    cos, sin = is_const(), is_const()
    rotated = is_op("relax.concat")(TuplePattern([is_op("relax.negative")(upper), lower]))
    rope = is_op("relax.add")(is_op("relax.multiply")(heads, cos), is_op("relax.multiply")(rotated, sin))
    kernels = KernelCalls(mod)
    resolved = _definitions(mod["main"])

    def heads_of(data):
        """(source, offset): where `data` is the last axis of `source` from `offset` on, split into heads; else None."""
        reshape = resolved(data)
        if not (isinstance(reshape, relax.Call) and reshape.op.name == "relax.reshape"):
            return None
        sliced = resolved(reshape.args[0])
        if not (isinstance(sliced, relax.Call) and sliced.op.name == "relax.strided_slice"):
            return None
        source = sliced.args[0]
        axes, begin, end, strides = _slice_fields(sliced)
        shape, source_shape = data.ty.shape.values, source.ty.shape.values
        if len(shape) != len(source_shape) + 1 or axes != [len(source_shape) - 1] or strides != [1]:
            return None
        width = int(shape[-2]) * int(shape[-1])
        if min(end[0], int(source_shape[-1])) - begin[0] != width or not _same_dims(shape[:-2], source_shape[:-1]):
            return None
        return source, begin[0]

    def rotary_tables(matches) -> list | None:
        """[cos, sin] where the match is RoPE as Hugging Face's `rotate_half` writes it, over the last axis of the
        norm's heads brought to `[b, heads, S, D]`, with `[1, 1, S, D]` fp32 tables; else None."""
        transpose, first, second = (resolved(matches[p]) for p in (heads, upper, lower))
        shape = transpose.ty.shape.values
        if len(shape) != 4 or [int(a) for a in transpose.attrs.axes] != [0, 2, 1, 3]:
            return None
        d = int(shape[-1])
        (axes, begin, end, strides), (axes2, begin2, end2, strides2) = _slice_fields(first), _slice_fields(second)
        halves = (axes == axes2 == [3] and strides == strides2 == [1] and begin == [d // 2] and end[0] >= d
                  and begin2 == [0] and end2 == [d // 2] and d % 2 == 0)
        concat_axis = int(resolved(matches[rotated]).attrs.axis)
        tables, table_shape = [matches[cos], matches[sin]], [1, 1, int(shape[2]), d]
        if not halves or concat_axis % 4 != 3 or any(
                t.ty.dtype != "float32" or [int(v) for v in t.ty.shape] != table_shape for t in tables):
            return None
        return tables

    def normed(matches, rotary: list | None = None):
        """The kernel call for a matched norm (with `rotary`, its RoPE too); None where the match is another op."""
        data, weight, reduce = matches[x], matches[w], matches[mean]
        shape = list(data.ty.shape.values)
        if (data.ty.dtype != "float32" or float(matches[two].value.numpy()) != 2.0 or not reduce.attrs.keepdims
                or [int(a) % len(shape) for a in reduce.attrs.axis] != [len(shape) - 1]
                or [int(d) for d in weight.ty.shape] != [int(shape[-1])]):
            return None
        epsilon = float(matches[eps].value.numpy())
        out_shape = [shape[0], shape[2], shape[1], shape[3]] if rotary else shape
        name = f"rms_norm{'_rope' if rotary else ''}_{dims_name(*out_shape)}"
        key = (name, weight.ty.dtype, epsilon)
        args, within = [data, weight, *(rotary or [])], None
        heads = heads_of(data)
        if heads:
            source, offset = heads
            within = (int(source.ty.shape[-1]), offset)
            name, key, args = f"{name}_of_{within[0]}_from_{offset}", (*key, *within), [source, *args[1:]]
        return kernels.call(name, lambda: rms_norm(shape, weight.ty.dtype, epsilon, within, bool(rotary)), args,
                            relax.TensorType(out_shape, "float32"), key=key)

    def with_rope(expr, matches):
        tables = rotary_tables(matches)
        return _or(tables and normed(matches, tables), expr)

    main = relax.analysis.remove_all_unused(rewrite_call(rope, with_rope, mod["main"]))
    main = rewrite_call(norm, lambda expr, matches: _or(normed(matches), expr), main)
    rewritten = kernels.builder.get()
    rewritten[rewritten.get_global_var("main")] = main
    return rewritten


def rms_norm(shape: list, weight_dtype: str, eps: float, heads_of: tuple[int, int] | None = None,
             rotary: bool = False):
    """PrimFunc: `x * (1 / sqrt(mean(x^2 over the last axis) + eps)) * float32(w)`, x fp32 of `shape`. With
    `heads_of` (columns, offset), x is read from a `[..., columns]` source, its heads `[..., heads, head_dim]` the
    columns from `offset` on. With `rotary`, x is `[b, S, heads, D]` and the output RoPE of the norm in `[b, heads,
    S, D]`, `n * cos + rotate_half(n) * sin`, from two more inputs, the `[1, 1, S, D]` cos and sin tables."""
    from tvm import te, tirx

    *rows, n = shape
    n = int(n)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    if heads_of:
        columns, offset = heads_of
        source = te.placeholder(int64_shape(*rows[:-1], columns), "float32", name="source")
        x = lambda *i: source[(*i[:-2], offset + i[-2] * n + i[-1])]  # noqa: E731
    else:
        source = te.placeholder(int64_shape(*shape), "float32", name="x")
        x = lambda *i: source[i]  # noqa: E731
    w = te.placeholder(int64_shape(n), weight_dtype, name="weight")
    k = te.reduce_axis(int64_shape(0, n), name="k")
    squares = te.compute(int64_shape(*rows), lambda *r: te.sum(x(*r, k) * x(*r, k), axis=k),
                         name="rms_sum_squares")
    inverse = te.compute(int64_shape(*rows), lambda *r: f32(1.0) / tirx.sqrt(squares[r] / f32(n) + f32(eps)),
                         name="rms_inverse")

    def normed(*i):
        return x(*i) * inverse[i[:-1]] * w[i[-1]].astype("float32")

    if not rotary:
        return kernel_func(source, w, te.compute(int64_shape(*shape), normed, name="rms_norm"))
    batch, seq, heads, _ = shape
    cos, sin = (te.placeholder(int64_shape(1, 1, seq, n), "float32", name=name) for name in ("cos", "sin"))
    half = n // 2

    def rope(b, h, t, e):  # rotate_half(n)[e] = -n[e + D/2] below D/2, n[e - D/2] from there: (e + D/2) mod D
        rotated = tirx.Select(e < half, f32(-1.0), f32(1.0)) * normed(b, t, h, (e + half) % n)
        return normed(b, t, h, e) * cos[0, 0, t, e] + rotated * sin[0, 0, t, e]

    return kernel_func(source, w, cos, sin, te.compute(int64_shape(batch, heads, seq, n), rope, name="rms_norm_rope"))


def column_multiple(columns: int, short: int) -> int:
    """What attention's q·kᵀ columns (SEQ keys) are padded to a multiple of, for whole register tiles of the matmul
    rule: `short` up to ROW_TILE_COLUMNS (one tile spans the row), else 64 where that adds at most a quarter, else 32
    (`tvm_schedules.Matmul._pad_columns` for fp32, `attention_columns` for bf16)."""
    if columns <= ROW_TILE_COLUMNS:
        return short
    return 64 if -(-columns // 64) * 64 <= columns * 5 // 4 else 32


def attention_columns(seq: int) -> int:
    """Columns of bf16 attention's q·kᵀ product for SEQ keys: padded to whole 16-lane vectors (what one `vdpbf16ps`
    fills) and register tiles (`column_multiple`)."""
    multiple = column_multiple(seq, VECTOR_LANES)
    return -(-seq // multiple) * multiple


def bf16_attention_kernels(mod):
    """Rewrite attention, `softmax(q·kᵀ * scale + mask)·v` (per KV group, its query heads stacked as rows), into
    bf16 products summed in fp32 (`vdpbf16ps`), as the bf16 linear layers are: q, k, the probabilities and v are
    rounded to bf16 pairs (`tvm_bf16.key_pairs`, `value_pairs`, `to_pairs`, and the softmax writing its output as
    pairs), the logits and the softmax stay fp32. Both matmuls ran 2x faster than their fp32 kernels here
    (`[3, 260]`, 8 groups of 2 heads x 128: q·kᵀ 6.2 → 3.1 ms, P·V 4.3 → 2.1 ms a layer, 2 threads). Applied to
    bf16 artifacts, whose precision contract this is."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard
    from tvm.sym.analyzer import Analyzer

    from toolkit import tvm_bf16

    q, k, scale, mask, v = wildcard(), wildcard(), is_const(), wildcard(), wildcard()
    scores = is_op("relax.matmul")(q, is_op("relax.permute_dims")(k))
    probs = is_op("relax.nn.softmax")(is_op("relax.add")(is_op("relax.multiply")(scores, scale), mask))
    attention = is_op("relax.matmul")(probs, v)
    kernels = KernelCalls(mod)
    resolved = _definitions(mod["main"])

    def rewrite(expr, matches):
        queries, keys, values, additive = (matches[p] for p in (q, k, v, mask))
        if any(len(t.ty.shape.values) != 4 or t.ty.dtype != "float32" for t in (queries, keys, values, additive)):
            return expr
        batch, groups, rows, dim = queries.ty.shape.values
        seq = keys.ty.shape.values[2]
        mask_batch, mask_heads, mask_rows, mask_seq = additive.ty.shape.values
        transpose, softmax = resolved(resolved(matches[scores]).args[1]), resolved(matches[probs])
        keys_shape = [batch, groups, seq, dim]
        if (transpose.attrs.axes is None or [int(a) for a in transpose.attrs.axes] != [0, 1, 3, 2]
                or not all(_same_dims(t.ty.shape.values, keys_shape) for t in (keys, values))
                or not _same_dims([mask_batch], [batch]) or int(mask_heads) != 1 or int(mask_seq) != int(seq)
                or int(mask_rows) not in (1, int(rows)) or int(softmax.attrs.axis) not in (-1, 3)
                or matches[scale].ty.shape.values  # a scalar
                or int(dim) % 2 or int(seq) % 2 or int(seq) < VECTOR_LANES):  # pairs; softmax rows of whole vectors
            return expr
        groups, rows, seq, dim, mask_rows = int(groups), int(rows), int(seq), int(dim), int(mask_rows)
        columns, scale_value = attention_columns(seq), float(matches[scale].value.numpy())
        op, pairs, fp32 = relax.op, "int32", "float32"
        heads, kv = dims_name(batch, groups, rows), dims_name(batch, groups, seq, dim)
        flat = Analyzer().simplify(batch * groups * rows)
        q_pairs = op.reshape(kernels.call(f"bf16_pairs_{dims_name(flat, dim)}", lambda: tvm_bf16.to_pairs(
            flat, dim), [op.reshape(queries, (flat, dim))], relax.TensorType((flat, dim // 2), pairs)),
            (batch, groups, rows, dim // 2))
        k_pairs = kernels.call(f"bf16_key_pairs_{kv}", lambda: tvm_bf16.key_pairs(batch, groups, seq, dim, columns),
                               [keys], relax.TensorType((batch, groups, dim // 2, columns), pairs))
        logits = kernels.call(f"bf16_attention_scores_{heads}_{seq}", lambda: tvm_bf16.pair_scores(
            batch, groups, rows, seq, columns, dim, scale_value, mask_rows), [q_pairs, k_pairs, additive],
            relax.TensorType((batch, groups, rows, seq), fp32))
        p_pairs = kernels.call(f"softmax_pairs_{heads}_{seq}", lambda: softmax_pairs(batch, groups, rows, seq),
                               [logits], relax.TensorType((batch, groups, rows, seq // 2), pairs))
        v_pairs = kernels.call(f"bf16_value_pairs_{kv}", lambda: tvm_bf16.value_pairs(batch, groups, seq, dim),
                               [values], relax.TensorType((batch, groups, seq // 2, dim), pairs))
        return kernels.call(f"bf16_attention_values_{heads}_{dim}", lambda: tvm_bf16.pair_values(
            batch, groups, rows, seq, dim), [p_pairs, v_pairs], relax.TensorType((batch, groups, rows, dim), fp32))

    main = relax.analysis.remove_all_unused(rewrite_call(attention, rewrite, mod["main"]))
    rewritten = kernels.builder.get()
    rewritten[rewritten.get_global_var("main")] = main
    return rewritten


def softmax_pairs(batch, groups: int, rows: int, seq: int):
    """PrimFunc: `softmax_rows` of fp32 logits `[b, groups, rows, S]`, written as bf16 pairs `[..., S/2]`."""
    from tvm import te

    logits = te.placeholder(int64_shape(batch, groups, rows, seq), "float32", name="logits")
    return kernel_func(logits, softmax_rows(logits, pairs=True))


def fuse_weight_casts(mod):
    """Fuse each panel's fp16→fp32 cast (a PrimFunc of its own after FuseOps, which never fuses an elementwise
    producer into a matmul) into the matmul that reads it, so the cast happens on load into registers and no fp32
    panel is ever materialised. Done after FuseTIR, as MLC-LLM fuses dequantize into matmul."""
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

    weights = weight_inputs(mod)

    def is_weight_cast_into_matmul(ctx) -> bool:
        cast, matmul = ctx.annotated_expr["cast"], ctx.annotated_expr["matmul"]
        source = cast.args[1].fields[0]
        return "matmul" in matmul.args[0].name_hint and any(source.same_as(v) for v in weights)

    cast = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard()]), add_constraint=False)
    patterns = []
    for scalars in ([], [wildcard()]):  # the matmul also takes the batch where its rows are `batch * SEQ`
        matmul = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard(), cast, *scalars]),
                                         add_constraint=False)
        patterns.append(("cast_matmul", matmul, {"cast": cast, "matmul": matmul}, is_weight_cast_into_matmul))
    return tvm.transform.Sequential([relax.transform.FuseOpsByPattern(patterns, bind_constants=False),
                                     relax.transform.FuseTIR()])(mod)


def _fast_softmax(bb, call):
    """Softmax over the last axis of fp32 rows of a vector or more (attention's): `softmax_rows`; TOPI's otherwise."""
    from tvm import tirx, topi

    data = call.args[0]
    *_, n = data.ty.shape.values
    rank = len(data.ty.shape.values)
    if (int(call.attrs.axis) % rank == rank - 1 and data.ty.dtype == "float32" and isinstance(n, tirx.IntImm)
            and int(n) >= VECTOR_LANES):
        return bb.call_te(softmax_rows, data, primfunc_name_hint="softmax")
    return bb.call_te(topi.nn.fast_softmax, data, int(call.attrs.axis))


def softmax_rows(x, pairs: bool = False):
    """TE softmax over the last axis, with both row reductions (max, sum of exp) as VECTOR_LANES partials read in
    whole vectors whatever the row's length: the last vector of a row starts at `n - 16` and overlaps the one before
    it (the max does not mind; the sum leaves out the lanes already counted). TOPI's softmax, at rows that are not
    whole vectors (SEQ 260, 204, 60), was scheduled as a scalar chain per row: 9.7 ms at [3, 16, 260, 260], 2.2 ms
    with these. With `pairs` (an even row), the probabilities are written as bf16 pairs of neighbours, `[..., n/2]`
    int32, what bf16 attention's P·V reads (`tvm_bf16.pair_values`). `tvm_schedules.Softmax` schedules it by its
    block names."""
    from tvm import te, tirx, topi

    from toolkit.tvm_bf16 import pair_bits

    *rows, n = x.shape
    n = int(n)
    vectors = -(-n // VECTOR_LANES)

    def start(c):  # first element of the row's vector c
        return tirx.min(c * VECTOR_LANES, n - VECTOR_LANES)

    def lanes(value, name, reduce):
        c = te.reduce_axis(int64_shape(0, vectors), name="c")
        return te.compute(int64_shape(*rows, VECTOR_LANES), lambda *i: reduce(value(i[:-1], c, i[-1]), axis=c),
                          name=name)

    def across_lanes(partial, name, reduce):
        lane = te.reduce_axis(int64_shape(0, VECTOR_LANES), name="lane")
        return te.compute(int64_shape(*rows), lambda *r: reduce(partial[(*r, lane)], axis=lane), name=name)

    max_lanes = lanes(lambda r, c, lane: x[(*r, start(c) + lane)], "softmax_max_lanes", te.max)
    row_max = across_lanes(max_lanes, "softmax_max", te.max)
    exp = topi.fast_exp(te.compute(x.shape, lambda *i: x[i] - row_max[i[:-1]], name="softmax_shifted"))
    zero = tirx.const(0, "float32")
    sum_lanes = lanes(lambda r, c, lane: tirx.Select(start(c) + lane >= c * VECTOR_LANES, exp[(*r, start(c) + lane)],
                                                     zero), "softmax_sum_lanes", te.sum)
    row_sum = across_lanes(sum_lanes, "softmax_sum", te.sum)

    def probability(r, c):
        return exp[(*r, c)] / row_sum[tuple(r)]

    if pairs:
        return te.compute(int64_shape(*rows, n // 2), lambda *i: pair_bits(
            probability(i[:-1], 2 * i[-1]), probability(i[:-1], 2 * i[-1] + 1)), name="softmax")
    return te.compute(x.shape, lambda *i: probability(i[:-1], i[-1]), name="softmax")


def _fast_sigmoid(bb, call):
    from tvm import topi

    return bb.call_te(lambda x: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))), call.args[0])


def _reshape(bb, call):
    """Reshape that unravels the flat index with no modulo by the outermost input dimension (the flat index is below
    the size: the quotient is the index). TOPI's takes it modulo every dimension; `% batch` of a symbolic batch is
    one the analyser cannot remove, and FuseOps then takes the reshape for opaque and fuses nothing across it (the
    symbolic int8 forward at [9, 28] ran 6% slower: K's transpose alone a kernel, 18 ms)."""
    from tvm import te

    data = call.args[0]
    in_shape, out_shape = list(data.ty.shape.values), list(call.ty.shape.values)

    def reshape(x):
        def element(*index):
            flat = index[0]
            for dim, i in zip(out_shape[1:], index[1:]):
                flat = flat * dim + i
            source = []
            for dim in reversed(in_shape[1:]):
                source.append(flat % dim)
                flat = flat // dim
            return x(flat, *reversed(source))

        return te.compute(out_shape, element, name="T_reshape")

    return bb.call_te(reshape, data, primfunc_name_hint="reshape")


def _clipped_take(bb, call):
    """Take (ONNX Gather: the embedding rows of the token ids, the rotary tables' rows of the positions) with its
    indices clipped to the axis, where the ONNX frontend asks for TOPI's "fast" mode, which prints "Warning: Fast mode
    segfaults when there are out-of-bounds indices" for every take of every build. The same values for indices in
    bounds (the engine refuses token ids past the vocabulary; positions are within SEQ), and an index out of bounds
    reads a row of the table, not memory it does not own; a min and a max per row index."""
    from tvm import topi

    return bb.call_te(topi.take, call.args[0], call.args[1], call.attrs.axis, mode="clip")


# exp through libm is a scalar call per element; TOPI's fast_exp is a vectorisable polynomial (rel. error ~1e-7).
FAST_LEGALIZATION = {"relax.nn.softmax": _fast_softmax, "relax.sigmoid": _fast_sigmoid}
EVERY_TARGET_LEGALIZATION = {"relax.reshape": _reshape, "relax.take": _clipped_take}


def lower(mod, target, schedule: bool = True, int8: frozenset[int] = frozenset(), amx: frozenset[str] = frozenset()
          ) -> tuple[tvm.IRModule, list[str]]:
    """Relax-level lowering, then (unless `schedule=False`, for checking) a schedule for every PrimFunc. Returns the
    module and the layout of each weight input (`pack_linear_weights`, which quantizes the weights in `int8` and
    gives the kinds in `amx` AMX kernels)."""
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from toolkit.tvm_schedules import cpu_rules

    cpu = target.kind.name == "llvm"
    if cpu:
        mod, layouts = pack_linear_weights(mod, int8, amx)
        mod = rms_norm_kernels(mod)
        if any(layout.startswith(BF16_PAIRS) for layout in layouts):
            mod = bf16_attention_kernels(mod)
    else:  # dlight's GPU rules read plain weights; their fp32 copies are made once at load
        layouts = [PLAIN] * len(weight_inputs(mod))
    mod = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps({**EVERY_TARGET_LEGALIZATION, **(FAST_LEGALIZATION if cpu else {})}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)
    if cpu:
        mod = fuse_weight_casts(mod)
    mod = tvm.transform.Sequential([relax.transform.LiftTransformParams(),
                                    relax.transform.DeadCodeElimination()])(mod)
    if not schedule:
        return mod, layouts
    if target.kind.name == "llvm":
        rules = cpu_rules()
    else:
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    with target:
        return dl.ApplyDefaultSchedule(*rules)(mod), layouts


@dataclass(frozen=True)
class TvmBuild:
    """What one TVM compile produced, for the manifest."""

    model_file: str
    params_file: str
    params_sha256: str
    tvm_target: dict
    primfuncs: int
    unscheduled: list[str]
    amx_kernels: list[str]  # the kinds of linear layers ("int8", "bf16", "bf16x3") that run on AMX tiles
    compile_seconds: float


def compile_tvm(onnx_path: Path, out_dir: Path, device: str, batch: int, seq_len: int, int8_layers=(),
                fp32_linears: str = "bf16x3", same_params: tuple[Path, str] | None = None) -> TvmBuild:
    """Compile the exported ONNX graph at `[batch, seq_len]` into `out_dir` (`model.so` + `params.npz`); the linear
    layers named in `int8_layers` (module names, `layers.3.mlp.down_proj`) run W8A8 on VNNI, fp16/fp32 ones on AMX
    bf16x3 tiles unless `fp32_linears` is "fma" (or the CPU has no AMX). `same_params`: another
    artifact's params file and its digest (a bucket set's first SEQ), which `params.npz` becomes a hard link to when
    this one's weights are the same (`write_params`)."""
    from tvm import relax

    from toolkit import tvm_amx
    from toolkit.tvm_schedules import unscheduled

    target_spec = host_target() if device == "cpu" else cuda_target()
    target = tvm.target.Target(target_spec)
    started = time.perf_counter()
    graph = import_onnx(onnx_path, batch, seq_len)
    int8_layers = set(int8_layers)
    int8 = frozenset(i for i, w in enumerate(graph.weights)
                     if w.name.removesuffix(".weight") in int8_layers)
    amx = tvm_amx.kinds_to_build() if device == "cpu" else frozenset()
    if fp32_linears != "bf16x3":
        amx -= {"bf16x3"}
    mod, layouts = lower(graph.mod, target, int8=int8, amx=amx)
    amx_used = amx & {kind for kind, layout in (("int8", INT8_QUADS), ("bf16", BF16_PAIRS), ("bf16x3", SPLIT_PANELS))
                      if layout in layouts}
    missing = unscheduled(mod)
    primfuncs = sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())
    executable = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("default_build"))
    executable.export_library(str(out_dir / LIBRARY))
    digest = write_params(out_dir / PARAMS, onnx_path.parent, graph.weights, layouts, same_params)
    return TvmBuild(model_file=LIBRARY, params_file=PARAMS, params_sha256=digest, tvm_target=target_spec,
                    primfuncs=primfuncs, unscheduled=missing, amx_kernels=sorted(amx_used),
                    compile_seconds=round(time.perf_counter() - started, 2))


def build_process_main(request_file: str) -> None:
    """The process `toolkit compile` builds each TVM artifact in (compile.py's `compile_tvm_process`): runs
    `compile_tvm` on the JSON arguments in `request_file` and writes the build and this process's peak RSS beside it,
    in `result.json`."""
    import json

    from toolkit.memory import map_large_blocks, resident_mb

    map_large_blocks()
    request_path = Path(request_file)
    request = json.loads(request_path.read_text())
    same_params = request["same_params"]
    built = compile_tvm(Path(request["onnx_path"]), Path(request["out_dir"]), request["device"], request["batch"],
                        request["seq_len"], request["int8_layers"], request["fp32_linears"],
                        (Path(same_params[0]), same_params[1]) if same_params else None)
    result = {"build": dataclasses.asdict(built), "peak_rss_mb": resident_mb("VmHWM")}
    request_path.with_name("result.json").write_text(json.dumps(result))


def write_params(path: Path, graph_dir: Path, weights: list, layouts: list[str],
                 same_as: tuple[Path, str] | None = None) -> str:
    """`main`'s weights (external ONNX initializers, in `graph_dir`'s data file) in order, as `np.savez` lays them out
    (`arr_0.npy`, ...), written one tensor at a time straight from the export's external data, in their `layouts`
    (`pack_linear_weights`; an int8 weight is two arrays); other bf16 tensors as numpy writes them (`|V2`, read back
    by `TvmBackend`). A tensor kept as it is (`PLAIN`: the embedding table, 310 MB at 0.6B and 1.2 GB at 8B) is
    copied PLAIN_CHUNK bytes at a time, never held whole. Returns the digest of what was written (dtypes, shapes,
    bytes): artifacts of one bucket set share it, and the runtime loads their weights once (`TvmBackend`).

    Given `same_as` (another params file and its digest), the weights are packed and hashed first, without writing:
    when the digest is the same, `path` becomes a hard link to that file (every SEQ of a TVM bucket set has the same
    weights: one file on disk, hashed once per process at load, nothing written twice; 15 GB per SEQ at 8B). Else,
    or on a filesystem without hard links, they are written."""
    import hashlib
    import zipfile

    from onnx.external_data_helper import ExternalDataInfo
    from onnx.helper import tensor_dtype_to_np_dtype

    from toolkit.progress import progress_bar
    from toolkit.tvm_bf16 import pack_pairs, pack_split_pairs
    from toolkit.tvm_int8 import pack_quads

    def panels(array):
        n, k = array.shape
        return np.ascontiguousarray(array.reshape(n // PANEL, PANEL, k).transpose(0, 2, 1))

    packers = {PANELS: lambda a: [panels(a)], SPLIT_PANELS: lambda a: [pack_split_pairs(a)],
               BF16_PAIRS: lambda a: [pack_pairs(a)], INT8_QUADS: lambda a: list(pack_quads(a.astype(np.float32)))}

    def file_chunks(file: Path, offset: int, size: int):
        with open(file, "rb") as stream:
            stream.seek(offset)
            while size:
                chunk = stream.read(min(PLAIN_CHUNK, size))
                size -= len(chunk)
                yield chunk

    def stored(desc: str):
        """Each array to store, in order: its dtype, shape and bytes (in chunks)."""
        for weight, layout in progress_bar(list(zip(weights, layouts)), desc=desc, unit="tensor"):
            info = ExternalDataInfo(weight)
            dtype, shape = np.dtype(tensor_dtype_to_np_dtype(weight.data_type)), tuple(int(d) for d in weight.dims)
            count, file = int(np.prod(shape)), graph_dir / info.location
            if layout == PLAIN:
                yield dtype, shape, file_chunks(file, info.offset, count * dtype.itemsize)
                continue
            array = np.fromfile(file, dtype=dtype, count=count, offset=info.offset).reshape(shape)
            if layout.endswith(GLU_SUFFIX):
                layout, array = layout.removesuffix(GLU_SUFFIX), glu_interleaved(array)
            for array in packers[layout](array):
                yield array.dtype, array.shape, [np.ascontiguousarray(array).reshape(-1).view(np.uint8)]  # any dtype

    def hashed(digest, dtype, shape, chunks):
        digest.update(f"{dtype.str}{shape}".encode())
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    if same_as:
        source, expected = same_as
        digest = hashlib.sha256()
        for dtype, shape, chunks in stored("comparing weights"):
            for _ in hashed(digest, dtype, shape, chunks):
                pass
        if digest.hexdigest() == expected:
            try:
                os.link(source, path)
                return expected
            except OSError:  # no hard links here: write a copy
                pass
    digest = hashlib.sha256()
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for written, (dtype, shape, chunks) in enumerate(stored("writing weights")):
            with archive.open(f"arr_{written}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_1_0(
                    entry, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                for chunk in hashed(digest, dtype, shape, chunks):
                    entry.write(chunk)
    return digest.hexdigest()
