"""int8 ONNX graphs for ONNX Runtime: the decoder linear layers of an exported graph quantized as calibration
planned (`quantize.QuantizationPlan`), into the graph ONNX Runtime's own quantizer writes, one weight at a time."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.progress import progress_bar
from toolkit.quantize import WEIGHT_MAX, Int8Scheme, QuantizationPlan


def quantize_onnx(graph: Path, out: Path, plan: QuantizationPlan, scheme: Int8Scheme) -> None:
    """Quantize an exported graph for ONNX Runtime: every decoder linear layer not kept out of int8; nothing else (the
    yes/no head, attention's own matmuls). Its weights may reach their MatMuls as they are exported (fp16, through
    `Cast` and `Transpose`: what compile gives it) or folded (`export.fold_weights` of an fp32 graph: the form stock
    tools take). A layer kept keeps its exported weight.

    The graph written is the one ONNX Runtime's `quantize_dynamic(per_channel=True, weight_type=QInt8)` writes, with
    the same int8 weights (a test checks both; `scheme.unsigned_weights`: the same plus 128, as uint8): per linear layer
    `DynamicQuantizeLinear(x)` → `MatMulInteger` → `Cast` → `Mul(x_scale * w_scale)`, which ONNX Runtime fuses into
    `DynamicQuantizeMatMul` at load. With `scheme.per_token` (`activation_scales: row`) each row of `x` gets its own
    scale instead (`_row_quantize`): a row's result no longer depends on the rows batched with it, at about 30% of the
    forward's time (0.6B, `[9, 28]`: 220 against 167 ms), the quantization being unfused nodes. Each weight is read
    from the memory-mapped export and quantized as the graph is written, so the int8 weights are never held together.
    (`quantize_dynamic` holds the fp32 model three times over, 0.6B: 8.6 GB peak for a 2.0 GB graph, and needs the
    graph folded to fp32 first.)"""
    import onnx
    import onnx_ir as ir

    from toolkit.export import linear_module, save_graph

    model = ir.load(graph)
    named = [(node, module) for node in model.graph if node.op_type == "MatMul"
             and (module := linear_module(node) or node.name).startswith("layers.")]
    linears = [(node, module, source) for node, module in named
               if module not in plan.keep_fp32 and (source := _linear_weight(node.inputs[1]))]
    if not linears:
        raise ToolkitError(f"{graph} has no MatMul of a decoder linear layer with a constant weight; is it an export "
                           "of this toolkit's patched model?")
    per_row = _per_row_constants(model.graph) if scheme.per_token else None
    for node, name, (weight, transposed) in progress_bar(linears, desc="scaling linear layers"):
        scale = _weight_scale(_read_weight(weight.const_value, transposed))
        unsigned = scheme.unsigned_weights  # the same values around zero point 128: uint8 x uint8 never saturates
        zero = np.full(scale.shape, 128 if unsigned else 0, np.uint8 if unsigned else np.int8)
        quantized = ir.LazyTensor(partial(_quantized_weight, weight.const_value, transposed, scale, unsigned),
                                  ir.DataType.UINT8 if unsigned else ir.DataType.INT8,
                                  ir.Shape(list(weight.const_value.shape)[::-1 if transposed else 1]))
        constants = []
        for suffix, value in (("quantized", quantized), ("scale", ir.Tensor(scale)), ("zero_point", ir.Tensor(zero))):
            constants.append(ir.Value(name=f"{weight.name}_{suffix}", const_value=value))
            model.graph.register_initializer(constants[-1])
        weight_q, weight_scale, weight_zero = constants
        if per_row:
            activation, x_q, x_scale = _row_quantize(node.inputs[0], name, per_row)
            x_zero = per_row["zero_point"]
        else:
            quantize = ir.node("DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3, name=f"{name}_input_quantize")
            activation, (x_q, x_scale, x_zero) = [quantize], quantize.outputs
        matmul = ir.node("MatMulInteger", [x_q, weight_q, x_zero, weight_zero], name=f"{name}_quant")
        cast = ir.node("Cast", matmul.outputs, {"to": ir.DataType.FLOAT}, name=f"{name}_quant_cast")
        scales = ir.node("Mul", [x_scale, weight_scale], name=f"{name}_quant_scales_mul")
        output = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}_quant_output")
        model.graph.insert_before(node, [*activation, matmul, cast, scales, output])
        node.outputs[0].replace_all_uses_with(output.outputs[0])
        _remove_unused(model.graph, node)
    save_graph(model, out, "writing int8 weights")
    onnx.checker.check_model(str(out), full_check=True)


def _per_row_constants(graph) -> dict:
    """The constants every layer's per-row activation quantization reads, registered once."""
    import onnx_ir as ir

    values = {"last_axis": np.array([-1], np.int64), "levels": np.array(127.0, np.float32),
              "smallest": np.array(1e-30, np.float32), "offset": np.array(128.0, np.float32),
              "zero_point": np.array(128, np.uint8)}
    constants = {}
    for key, value in values.items():
        constants[key] = ir.Value(name=f"row_quantize_{key}", const_value=ir.Tensor(value))
        graph.register_initializer(constants[key])
    return constants


def _row_quantize(x, name: str, constants: dict) -> tuple:
    """`x` as uint8 around zero point 128 with a symmetric scale per row (token): `max|x_row| / 127`, as TVM's
    `quantize_rows` and `_fake_quant_activation_per_token` round it. uint8 (not int8) because ONNX Runtime's int8 x
    int8 `MatMulInteger` ran 20x slower than its uint8 x int8 one here. Returns the nodes in order, the quantized
    rows, and their scales (`[..., 1]`)."""
    import onnx_ir as ir

    def step(op, inputs, suffix, **attributes):
        return ir.node(op, inputs, attributes or None, name=f"{name}_input_{suffix}")

    magnitude = step("Abs", [x], "abs")
    peak = step("ReduceMax", [magnitude.outputs[0], constants["last_axis"]], "peak", keepdims=1)
    ratio = step("Div", [peak.outputs[0], constants["levels"]], "ratio")
    scale = step("Max", [ratio.outputs[0], constants["smallest"]], "scale")  # an all-zero row: no 0/0
    scaled = step("Div", [x, scale.outputs[0]], "scaled")
    rounded = step("Round", scaled.outputs, "round")
    shifted = step("Add", [rounded.outputs[0], constants["offset"]], "shift")
    quantized = step("Cast", shifted.outputs, "quantize", to=ir.DataType.UINT8)
    nodes = [magnitude, peak, ratio, scale, scaled, rounded, shifted, quantized]
    return nodes, quantized.outputs[0], scale.outputs[0]


def _read_weight(tensor, transposed: bool) -> np.ndarray:
    """A MatMul's weight as fp32 `[K, N]` (`[N, K]` transposed if `transposed`); memory-mapped, it is unmapped after
    reading (read pages stay in RSS while mapped)."""
    import onnx_ir as ir

    array = tensor.numpy().astype(np.float32)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return array.T if transposed else array


def _quantized_weight(tensor, transposed: bool, scale: np.ndarray, unsigned: bool):
    """The int8 weight of `tensor` (a MatMul's weight, as `_read_weight` reads it) at its `scale`, or uint8 around
    zero point 128."""
    import onnx_ir as ir

    quantized = _quantize_weight(_read_weight(tensor, transposed), scale)
    return ir.Tensor((quantized.astype(np.int16) + 128).astype(np.uint8) if unsigned else quantized)


def _linear_weight(value) -> tuple | None:
    """The initializer a MatMul's weight input is computed from by the exporter's `Cast` (fp16 → fp32) and
    `Transpose` (`x @ W.T`) alone, and whether it is transposed (so `[N, K]`); None if it is computed otherwise."""
    transposed = False
    while not value.is_initializer():
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "Transpose") or len(node.inputs) != 1:
            return None
        transposed ^= node.op_type == "Transpose"
        value = node.inputs[0]
    return (value, transposed) if value.const_value is not None and len(value.const_value.shape) == 2 else None


def _remove_unused(graph, node) -> None:
    """Remove `node`, then whatever computed its inputs (the weight's `Transpose`, `Cast`, initializer) that nothing
    else uses any more."""
    inputs = [value for value in node.inputs if value is not None]
    graph.remove(node, safe=True)
    for value in inputs:
        if value.uses():
            continue
        if value.is_initializer():
            del graph.initializers[value.name]
        elif (producer := value.producer()) is not None and producer.graph is graph:
            _remove_unused(graph, producer)


def _quantize_weight(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A MatMul's `[K, N]` fp32 weight as ONNX Runtime quantizes it per output channel at its `[N]` scales
    (`_weight_scale`): symmetric int8, in [-WEIGHT_MAX, WEIGHT_MAX] since the scale maps max |w| to WEIGHT_MAX. Same
    arithmetic as its `compute_data_quant_params` and `quantize_nparray`, column by column."""
    return np.clip(np.round(weight / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)


def _weight_scale(weight: np.ndarray) -> np.ndarray:
    """The `[N]` per-output-channel scales of a `[K, N]` weight (`_quantize_weight`)."""
    absmax = np.maximum(-np.minimum(weight.min(axis=0), 0), np.maximum(weight.max(axis=0), 0))
    scale = (2 * absmax.astype(np.float64) / (2 * WEIGHT_MAX)).astype(np.float32)  # range over levels, in float64
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    return scale
