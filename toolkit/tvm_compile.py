"""ONNX export → Apache TVM (Relax) → a compiled library plus fp16 weights.

Why import from the ONNX export rather than torch.export: it is the very graph ONNX Runtime validates, so both
backends run the same patched model, and Relax's ONNX frontend takes it without custom converters (torch.export's
Relax frontend needs every aten op of the exporter's decompositions to be mapped).

Flow: from_onnx (weights stay function inputs) → LegalizeOps → FuseOps/FuseTIR → LiftTransformParams (the fp16→fp32
casts and weight transposes move into `main_transform_params`, run once when the artifact loads) → schedules
(our CPU rules, or dlight's GPU rules) → build. The artifact holds `model.so` and `params.npz` (fp16, as exported).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

LIBRARY = "model.so"
PARAMS = "params.npz"


def host_target() -> dict:
    """The llvm target of this CPU (its exact mcpu: the artifact is tied to it)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


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


def import_onnx(onnx_path: Path):
    """Returns (Relax module whose `main` takes input_ids, attention_mask, *weights; the weights as numpy)."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(onnx_path))
    normalize_constants(model)
    mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params["main"]]


PANEL = 64  # columns per packed weight panel: the matmul rule's register tile width (4 AVX-512 vectors)


def pack_linear_weights(mod):
    """Rewrite `matmul(x, permute_dims(astype(W)))` (every nn.Linear of the export, W a weight input) so W is used as
    contiguous `[N/64, K, 64]` panels: `y = reshape(permute(matmul(x[:, None], panels)))`. The packing depends on W
    only, so LiftTransformParams moves it to load time; the micro-kernel then streams each panel linearly instead of
    reading 64 columns out of rows N floats apart (TLB- and prefetch-hostile for N in the thousands)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, w = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(x, is_op("relax.permute_dims")(is_op("relax.astype")(w)))

    def rewriter(expr, matches):
        weight, act = matches[w], matches[x]
        if isinstance(weight, relax.Call) or len(weight.ty.shape) != 2:  # only weights (function inputs)
            return expr
        n, k = (int(d) for d in weight.ty.shape)
        dims = [int(d) for d in act.ty.shape]
        if n % PANEL:
            return expr
        op = relax.op
        panels = op.permute_dims(op.reshape(op.astype(weight, "float32"), (n // PANEL, PANEL, k)), [0, 2, 1])
        out = op.matmul(op.expand_dims(act, len(dims) - 2), panels)  # [..., N/64, M, 64]
        rank = len(dims) + 1
        out = op.permute_dims(out, list(range(rank - 3)) + [rank - 2, rank - 3, rank - 1])  # [..., M, N/64, 64]
        return op.reshape(out, dims[:-1] + [n])

    return tvm.IRModule({gv: rewrite_call(pattern, rewriter, f) if isinstance(f, relax.Function) else f
                         for gv, f in mod.functions.items()})


def _fast_softmax(bb, call):
    from tvm import topi

    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))


def _fast_sigmoid(bb, call):
    from tvm import topi

    return bb.call_te(lambda x: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))), call.args[0])


# exp through libm is a scalar call per element; TOPI's fast_exp is a vectorisable polynomial (rel. error ~1e-7).
FAST_LEGALIZATION = {"relax.nn.softmax": _fast_softmax, "relax.sigmoid": _fast_sigmoid}


def lower(mod, target, schedule: bool = True):
    """Relax-level lowering, then (unless `schedule=False`, for checking) a schedule for every PrimFunc."""
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from toolkit.tvm_schedules import cpu_rules

    if target.kind.name == "llvm":
        mod = pack_linear_weights(mod)
    mod = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(FAST_LEGALIZATION if target.kind.name == "llvm" else None),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.LiftTransformParams(),
        relax.transform.DeadCodeElimination(),
    ])(mod)
    if not schedule:
        return mod
    if target.kind.name == "llvm":
        rules = cpu_rules()
    else:
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    with target:
        return dl.ApplyDefaultSchedule(*rules)(mod)


@dataclass(frozen=True)
class TvmBuild:
    """What one TVM compile produced, for the manifest."""

    model_file: str
    params_file: str
    tvm_target: dict
    primfuncs: int
    unscheduled: list[str]
    compile_seconds: float


def compile_tvm(onnx_path: Path, out_dir: Path, device: str, log=print) -> TvmBuild:
    """Compile the exported ONNX graph into `out_dir` (`model.so` + `params.npz`)."""
    from tvm import relax

    from toolkit.tvm_schedules import unscheduled

    target_spec = host_target() if device == "cpu" else cuda_target()
    target = tvm.target.Target(target_spec)
    started = time.perf_counter()
    mod, params = import_onnx(onnx_path)
    mod = lower(mod, target)
    missing = unscheduled(mod)
    if missing:
        log(f"warning: {len(missing)} PrimFunc(s) left unscheduled: {', '.join(missing)}")
    primfuncs = sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())
    executable = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("default_build"))
    executable.export_library(str(out_dir / LIBRARY))
    np.savez(out_dir / PARAMS, *params)
    return TvmBuild(model_file=LIBRARY, params_file=PARAMS, tvm_target=target_spec, primfuncs=primfuncs,
                    unscheduled=missing, compile_seconds=round(time.perf_counter() - started, 2))
