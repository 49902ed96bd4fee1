"""Patched model → ONNX, with symbolic batch and sequence axes (one export serves every SEQ of a bucket set: ONNX
Runtime runs it as it is, TVM compiles it at each SEQ's static shape); fp16 weights kept fp16 in the file;
fp32 graphs folded so the ONNX ecosystem's stock tools (quantize_dynamic, the transformer optimizer, onnxsim) find
their weights, fp16 ones all but their weights' casts so ONNX Runtime finds its fusions."""
from __future__ import annotations

import ast
import logging
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from toolkit.artifact import TensorSpec
from toolkit.tokenizer import MAX_CONTEXT

ONNX_OPSET = 18
ROTARY_OPSET = 23  # RotaryEmbedding's first opset (`Qwen3ForDeployment.rotary_op`)
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class OnnxExport:
    """What one export produced, for the manifest."""

    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cached_prefix: list[int]  # the prompt tokens whose keys and values the graph holds (`Manifest.cached_prefix`)
    cached_instruction: str | None  # the instruction whose tokens end them (`Manifest.instruction`)


def io_specs(task, seq_len: int, batch: int, hidden_size: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs an artifact is served at: `[batch, seq_len]` token ids and mask, the task's output."""
    return ([TensorSpec(name, [batch, seq_len], "int64") for name in INPUT_NAMES],
            [TensorSpec(**task.output_spec(batch, hidden_size))])


def export_onnx(model, task, path: Path, seq_len: int, batch: int, rotary_op: bool = False) -> OnnxExport:
    """Export `model` (a Qwen3ForDeployment for `task`) to `path` and check it. The batch and sequence axes are
    symbolic: the graph runs any `[rows, seq]`, so a partial batch computes no padding rows on ONNX Runtime, and every
    SEQ of a bucket set comes from one export (`batch` and `seq_len` are the shape this artifact is served at; TVM
    compiles the graph at that static shape). Measured on the 0.6B shape: the symbolic graph runs as fast as a
    fixed-SEQ one (`[4, 64]`, ONNX Runtime) with identical outputs.

    Weights always go to `model.onnx.data` beside the graph: saved that way each tensor is streamed to the file, where
    an embedded protobuf is first built whole in memory (measured on the 0.6B shape: export peak 5.1 GB → 1.6 GB).
    A streamed model (`from_pretrained(stream=True)`: fake parameters) is traced without its weights, and each weight
    is read from the checkpoint as the file is written (`stream_weights`): the export never holds the model.

    `rotary_op` (graphs for ONNX Runtime): RoPE as ONNX's RotaryEmbedding op, so the graph's opset is 23.

    The dynamo exporter runs with `optimize=False`: its optimizer constant-folds `Cast(fp16 weight)` into fp32
    initializers, which would silently double the artifact and drop the fp16 storage we asked for."""
    import onnx

    inputs, outputs = io_specs(task, seq_len, batch, model.shape.hidden_size)
    # distinct example sizes: torch.export would otherwise take equal batch and SEQ for one symbol
    example_rows = 2 if seq_len != 2 else 3
    ids = torch.zeros(example_rows, seq_len, dtype=torch.int64)
    mask = torch.ones_like(ids)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-missing notices are noise here
    with warnings.catch_warnings(), torch.no_grad(), model.rotary_as_op(rotary_op):
        warnings.simplefilter("ignore")
        # the most rows, and tokens per row, a symbolic axis is exported for
        axes = {0: torch.export.Dim("batch", min=1, max=MAX_CONTEXT),
                1: torch.export.Dim("seq", min=len(model.cached_prefix) + 2, max=MAX_CONTEXT)}
        program = torch.onnx.export(model, (ids, mask), dynamo=True, optimize=False, verbose=False,
                                    opset_version=ROTARY_OPSET if rotary_op else ONNX_OPSET,
                                    input_names=list(INPUT_NAMES),
                                    output_names=[o.name for o in outputs], external_data=True,
                                    dynamic_shapes={name: axes for name in INPUT_NAMES})
    release_trace()
    if model.fakes:
        stream_weights(program.model, model.weights)
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)  # path-based: works above 2 GiB; full_check infers shapes
    return OnnxExport(model_file=path.name, inputs=inputs, outputs=outputs, cached_prefix=list(model.cached_prefix),
                      cached_instruction=model.cached_instruction)


def release_trace() -> None:
    """Drop the trace torch.export keeps in a module global after it returns (a map from its fake tensors to their
    graph nodes, cleared only when the next export starts): 33 MB at the 0.6B shape, held through the rest of a
    compile. A private name: where a torch version lacks it, nothing is held there."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


def stream_weights(graph_model, weights) -> None:
    """Make each initializer of an exported streamed model that is a parameter (a fake tensor, named after it) read
    its parameter from `weights` (`PatchedWeights`) when it is written, and drop it after: one weight in memory at a
    time. The others (a cached prefix's keys and values) hold their values already."""
    import onnx_ir as ir

    def read(name):
        return ir.tensor(weights.load([name])[name], name=name)

    for name, value in graph_model.graph.initializers.items():
        if name in weights.sources:
            value.const_value = ir.LazyTensor(partial(read, name), value.dtype, value.shape, name=name)


def linear_module(node) -> str | None:
    """The module an exported node computes in (`layers.3.mlp.down_proj` for a linear layer's MatMul), from the name
    scopes the exporter records on every node; None when it has none."""
    scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None


def fold_weights(path: Path) -> None:
    """Constant-fold an fp32 graph in place so each linear layer's weight reaches its MatMul as an initializer (the
    exporter emits `Transpose(weight)`, which stock tools do not look through), and name each such MatMul after its
    module (`layers.3.mlp.down_proj`) so tools and our quantizer can select layers by name. Not for fp16 weights:
    folding would turn their `Cast`s into fp32 copies (`fold_small_constants` is theirs)."""
    import onnxscript

    def fold(model):
        onnxscript.optimizer.optimize(model)  # in place on an ir.Model
        for node in model.graph:
            if node.op_type == "MatMul" and node.inputs[1].is_initializer() and (module := linear_module(node)):
                node.name = module

    rewrite_graph(path, fold, "writing folded weights")


def fold_small_constants(path: Path) -> None:
    """Constant-fold an fp16-weight graph in place except the `Cast`s to fp32 of its matrices (linear weights, the
    embedding table, a cached prefix's keys and values): the exporter's axes and shapes (`Reshape(Constant)`), the
    norms' weights (vectors) are folded. ONNX Runtime then finds its fusions (RMSNorm as one
    SimplifiedLayerNormalization, q/k/v and gate/up as Splits) with its own constant folding off, which is how it
    loads fp16 artifacts on CPU (`OnnxRuntimeBackend`: folding there also casts every weight to fp32, at twice the
    peak). Measured on the 0.6B reranker, `[5, 172]`: 1.44-1.53 s → 1.35-1.45 s a run, as fast as with folding on."""
    from onnxscript.optimizer import fold_constants, remove_unused_nodes

    def keeps_weight_cast(node):  # None: the folder's own size limits decide
        weight = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
        matrix = weight is not None and weight.const_value is not None and len(weight.const_value.shape) >= 2
        return False if matrix else None

    def fold(model):
        fold_constants(model, should_fold=keeps_weight_cast)
        remove_unused_nodes(model)

    rewrite_graph(path, fold, "writing the folded graph")


def rewrite_graph(path: Path, rewrite, desc: str) -> None:
    """Apply `rewrite` (in place, on an onnx_ir model) to the graph at `path` and save it over it. Done on onnx_ir's
    model, whose initializers stay memory-mapped from the external data until written: through a ModelProto the
    weights were held three times over (loaded, the optimizer's IR, the proto it gives back)."""
    import onnx
    import onnx_ir as ir

    model = ir.load(path)
    rewrite(model)
    # the optimizer can leave stale shapes of folded values (seen: ONNX Runtime's quantizer then refuses the graph);
    # shape inference redoes all but the graph's inputs and outputs
    outputs = set(model.graph.outputs)
    for value in [*model.graph.initializers.values(), *(v for node in model.graph for v in node.outputs)]:
        if value not in outputs:
            value.shape = None
    # saved beside, then moved over the export: the weights not folded are read from its data file as they are written
    folded = path.parent / ".folded"
    folded.mkdir(exist_ok=True)
    save_graph(model, folded / path.name, desc)
    for name in (path.name, f"{path.name}.data"):
        os.replace(folded / name, path.parent / name)
    folded.rmdir()
    onnx.checker.check_model(str(path), full_check=True)


def save_graph(model, path: Path, desc: str) -> None:
    """Save an onnx_ir model with its weights beside it (`PATH.data`), one tensor at a time, with a progress bar."""
    import onnx_ir as ir

    from toolkit.progress import progress_bar

    with progress_bar(desc=desc, unit="tensor") as bar:
        def progress(tensor, info):
            bar.total = info.total
            bar.update()
        ir.save(model, path, external_data=f"{path.name}.data", callback=progress)
