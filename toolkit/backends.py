"""Backends behind one small interface: `run(input_ids, attention_mask) -> outputs` on left-padded int64 arrays.

Outputs are task-level: `[B, hidden]` last-token hidden states (embedding, before L2 normalisation) or `[B, 2]`
("no", "yes") logits (reranker). The torch reference runs the *unpatched* Hugging Face model, so every parity check
compares the compiled artifact with what users run today.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ToolkitError
from .tokenizer import NO_TOKEN_ID, YES_TOKEN_ID


class Backend:
    name: str
    task: str
    seq_len: int | None  # None: any length (torch reference)
    batch: int | None  # None: any batch size

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchReference(Backend):
    name = "torch"
    seq_len = batch = None

    def __init__(self, checkpoint_dir: Path, task: str, threads: int | None = None):
        import torch

        from .checkpoint import load_hf_model

        if threads:
            torch.set_num_threads(threads)
        self.task = task
        self.model = load_hf_model(checkpoint_dir, task)

    def run(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            ids, mask = torch.from_numpy(np.asarray(input_ids)), torch.from_numpy(np.asarray(attention_mask))
            if self.task == "embedding":
                return self.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float().numpy()
            # logits_to_keep=1: only the last position's [vocab] logits, not [batch, seq, 151669]
            out = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            return out.logits[:, -1, [NO_TOKEN_ID, YES_TOKEN_ID]].float().numpy()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: Path, task: str, seq_len: int, batch: int, threads: int | None = None,
                 device: str = "cpu", device_id: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = (["CPUExecutionProvider"] if device == "cpu" else
                     [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(model_path), opts, providers=providers)
        if device != "cpu" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ToolkitError("this artifact targets CUDA but ONNX Runtime has no usable CUDA provider here "
                               f"(available: {ort.get_available_providers()}); install onnxruntime-gpu on a GPU host")
        self.task, self.seq_len, self.batch = task, seq_len, batch
        self.output_name = self.session.get_outputs()[0].name

    def run(self, input_ids, attention_mask):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run([self.output_name], feeds)[0]
