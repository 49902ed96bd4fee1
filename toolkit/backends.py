"""Backends behind one small interface: `run(input_ids, attention_mask) -> outputs` on left-padded int64 arrays.

Outputs are raw graph outputs: `[B, hidden]` last-token hidden states (embedding, before L2 normalisation) or `[B, 2]`
("no", "yes") logits (reranker). The artifact backends share one constructor, `(manifest, threads, device_id)`, and
`open_backend(manifest)` picks the one the manifest names. The torch reference runs the *unpatched* Hugging Face model,
so every parity check compares the compiled artifact with what users run today.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from typing_extensions import override

from toolkit.artifact import Manifest
from toolkit.errors import ToolkitError
from toolkit.tasks import Task


class Backend:
    """One loaded model. `seq_len`/`batch` are the fixed input shape, or None where any size runs; with
    `dynamic_batch`, `batch` is the most rows per run and fewer are fine."""

    name: str
    task: Task
    seq_len: int | None
    batch: int | None
    dynamic_batch: bool = False

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Raw outputs for one left-padded batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (sessions, device memory)."""


class TorchReference(Backend):
    """The unpatched Hugging Face model in fp32 (any batch, any length)."""

    name = "torch"
    seq_len = batch = None

    def __init__(self, checkpoint_dir: Path, task: Task, threads: int | None = None, device_id: int = 0):
        import torch

        from toolkit.checkpoint import load_hf_model

        if threads:
            torch.set_num_threads(threads)
        self.task = task
        self.model = load_hf_model(checkpoint_dir, task)

    @override
    def run(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            ids, mask = torch.from_numpy(np.asarray(input_ids)), torch.from_numpy(np.asarray(attention_mask))
            return self.task.reference_forward(self.model, ids, mask)


class OnnxRuntimeBackend(Backend):
    """An `onnx` artifact on ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)."""

    name = "onnx"

    def __init__(self, manifest: Manifest, threads: int | None = None, device_id: int = 0):
        import onnxruntime as ort

        from toolkit.tasks import get_task

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        device = manifest.target.device
        providers = (["CPUExecutionProvider"] if device == "cpu" else
                     [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(manifest.path / manifest.model_file), opts, providers=providers)
        if device != "cpu" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ToolkitError("this artifact targets CUDA but ONNX Runtime has no usable CUDA provider here "
                               f"(available: {ort.get_available_providers()}); install onnxruntime-gpu on a GPU host")
        self.task, self.seq_len, self.batch = get_task(manifest.task), manifest.seq_len, manifest.batch
        self.dynamic_batch = manifest.dynamic_batch
        self.output_name = self.session.get_outputs()[0].name

    @override
    def run(self, input_ids, attention_mask):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run([self.output_name], feeds)[0]


def open_backend(manifest: Manifest, threads: int | None = None, device_id: int = 0) -> Backend:
    """Load a deployable artifact (validated, or validation explicitly skipped) with the backend its manifest names."""
    return load_backend(manifest.require_deployable(), threads, device_id)


def load_backend(manifest: Manifest, threads: int | None = None, device_id: int = 0) -> Backend:
    """Load an artifact whatever its validation state: only for validating it."""
    if manifest.backend == "tvm":
        from toolkit.tvm_backend import TvmBackend

        return TvmBackend(manifest, threads, device_id)
    return OnnxRuntimeBackend(manifest, threads, device_id)


def device_available(backend: str, device: str) -> bool:
    """Whether this machine can run artifacts of `backend` on `device` (CPU always can)."""
    if device == "cpu":
        return True
    if backend == "tvm":
        import tvm

        return bool(tvm.cuda(0).exist)
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
