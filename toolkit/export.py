"""Patched model → ONNX at a fixed `[batch, SEQ]`, with fp16 weights kept fp16 in the file."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .artifact import io_spec

ONNX_OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's 2 GiB cap: above it, weights go external


def export_onnx(model, path: Path, seq_len: int, batch: int) -> dict:
    """Export `model` (a Qwen3ForDeployment) and check it. Returns the I/O spec for the manifest.

    The dynamo exporter runs with `optimize=False`: its optimizer constant-folds `Cast(fp16 weight)` into fp32
    initializers, which would silently double the artifact and drop the fp16 storage we asked for."""
    import onnx

    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    inputs, outputs = io_spec(model.task, seq_len, batch, model.shape.hidden_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > PROTOBUF_LIMIT
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-missing notices are noise here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (ids, mask), dynamo=True, optimize=False, verbose=False, opset_version=ONNX_OPSET,
                                    input_names=[i["name"] for i in inputs],
                                    output_names=[o["name"] for o in outputs], external_data=external)
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=True)  # path-based: works above 2 GiB; full_check infers shapes
    return {"inputs": inputs, "outputs": outputs, "model_file": path.name, "external_data": external}
