"""Patched model → ONNX at a fixed SEQ and a fixed or dynamic batch (up to `batch`), with fp16 weights kept fp16 in
the file; fp32 graphs folded so the ONNX ecosystem's stock tools (quantize_dynamic, the transformer optimizer,
onnxsim) find their weights."""
from __future__ import annotations

import ast
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.artifact import TensorSpec

ONNX_OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class OnnxExport:
    """What one export produced, for the manifest."""

    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def export_onnx(model, task, path: Path, seq_len: int, batch: int, dynamic_batch: bool = False) -> OnnxExport:
    """Export `model` (a Qwen3ForDeployment for `task`) to `path` and check it. With `dynamic_batch` the batch axis is
    symbolic (`batch` is then the most rows a caller should send at once), so a partial batch is not padded with rows.

    Weights always go to `model.onnx.data` beside the graph: saved that way each tensor is streamed to the file, where
    an embedded protobuf is first built whole in memory (measured on the 0.6B shape: export peak 5.1 GB → 1.6 GB).

    The dynamo exporter runs with `optimize=False`: its optimizer constant-folds `Cast(fp16 weight)` into fp32
    initializers, which would silently double the artifact and drop the fp16 storage we asked for."""
    import onnx

    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    inputs = [TensorSpec(name, [batch, seq_len], "int64") for name in INPUT_NAMES]
    outputs = [TensorSpec(**task.output_spec(batch, model.shape.hidden_size))]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-missing notices are noise here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        rows = torch.export.Dim("batch", min=1, max=max(batch, 2) * 64) if dynamic_batch else None
        program = torch.onnx.export(model, (ids, mask), dynamo=True, optimize=False, verbose=False,
                                    opset_version=ONNX_OPSET, input_names=list(INPUT_NAMES),
                                    output_names=[o.name for o in outputs], external_data=True,
                                    dynamic_shapes={name: {0: rows} for name in INPUT_NAMES} if rows else None)
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)  # path-based: works above 2 GiB; full_check infers shapes
    return OnnxExport(model_file=path.name, inputs=inputs, outputs=outputs)


def fold_weights(path: Path) -> None:
    """Constant-fold an fp32 graph in place so each linear layer's weight reaches its MatMul as an initializer (the
    exporter emits `Transpose(weight)`, which stock tools do not look through), and name each such MatMul after its
    module (`layers.3.mlp.down_proj`) so tools and our quantizer can select layers by name. Not for fp16 weights:
    folding would turn their `Cast`s into fp32 copies."""
    import onnx
    import onnxscript

    model = onnxscript.optimizer.optimize(onnx.load(str(path)))
    del model.graph.value_info[:]  # the optimizer can leave stale shapes of folded values; inference redoes them
    weights = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])
        if node.op_type == "MatMul" and node.input[1] in weights and len(scopes) >= 2 and scopes[-2]:
            node.name = scopes[-2]
    for stale in path.parent.glob(f"{path.name}.data"):
        stale.unlink()  # onnx.save appends to an existing external data file
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    onnx.checker.check_model(str(path), full_check=True)

