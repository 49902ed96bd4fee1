"""Backends behind one small interface: `run(input_ids, attention_mask) -> outputs` on left-padded int64 arrays.

Outputs are raw graph outputs: `[B, hidden]` last-token hidden states (embedding, before L2 normalisation) or `[B, 2]`
("no", "yes") logits (reranker). The artifact backends (`ArtifactBackend`) share one constructor, `(manifest, threads,
device_id)`, and `open_backend(manifest)` picks the one the manifest names. The torch references run the *unpatched*
Hugging Face model, so every parity check compares the compiled artifact with what users run today: `TorchReference`
loads it whole, `LayerwiseReference` holds one decoder layer's weights at a time (same results, a fraction of the
memory).
"""
from __future__ import annotations

import threading
import weakref
from functools import partial
from pathlib import Path

import numpy as np
from typing_extensions import override

from toolkit.artifact import Manifest
from toolkit.checkpoint import CheckpointTensors, embedding_lookup
from toolkit.errors import ToolkitError
from toolkit.memory import return_freed_memory
from toolkit.tasks import Task, get_task
from toolkit.text import split_cached_prefix


class Backend:
    """One loaded model. `batch` is the most rows per run (fewer are fine) and `seq_len` the row length, or None
    where any runs; with `dynamic_seq`, `seq_len` is the longest row and shorter runs are fine."""

    task: Task
    seq_len: int | None
    batch: int | None
    dynamic_seq: bool = False

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Raw outputs for one left-padded batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (sessions, device memory)."""


class TorchReference(Backend):
    """The unpatched Hugging Face model in fp32 (any batch, any length)."""

    seq_len = batch = None

    def __init__(self, checkpoint_dir: Path, task: Task, threads: int | None = None):
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


class LayerwiseReference(Backend):
    """The unpatched Hugging Face model in fp32 (any batch, any length) with one decoder layer's weights resident at a
    time: the same results as `TorchReference`, at a peak of about one layer instead of the whole model.

    The model is built on the meta device from config.json. A forward pre-hook loads each decoder layer's weights
    from the safetensors files (single or sharded) just before the layer runs, and a forward hook drops them back to
    meta after it, so the hidden states flow through Hugging Face's own forward unchanged. The embedding reads only
    the rows a batch uses (a gather: the same values); a causal LM's head is loaded whole for its one matmul, because
    slicing it over the vocabulary changes BLAS's summation order (up to ~1e-5 on the logits). The final norm and the
    rotary tables are small and stay loaded."""

    seq_len = batch = None

    def __init__(self, checkpoint_dir: Path, task: Task, progress: bool = False):
        import torch
        from transformers import AutoConfig

        from toolkit.checkpoint import read_hf_config

        checkpoint_dir = Path(checkpoint_dir)
        read_hf_config(checkpoint_dir)  # a Qwen3 checkpoint, or a one-line refusal
        self.task, self.progress, self.bar = task, progress, None
        try:
            config = AutoConfig.from_pretrained(str(checkpoint_dir))
            with torch.device("meta"):  # the architecture without its weights: no memory
                self.model = task.hf_model_class().from_config(config, dtype=torch.float32).eval()
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ToolkitError(f"cannot build the Hugging Face model from {checkpoint_dir}/config.json "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
        self.weights = CheckpointTensors(checkpoint_dir, bool(getattr(config, "tie_word_embeddings", False)))
        for name, param in self.model.named_parameters(remove_duplicate=False):
            self.weights.check(name.removeprefix("model."), param.shape)
        base = self.model.base_model
        # inv_freq is computed at init, not loaded: compute it for real (from_pretrained does too)
        base.rotary_emb = type(base.rotary_emb)(self.model.config)
        self._load("norm.", base.norm, ())
        # an instance attribute wins over the class's forward: nn.Embedding's lookup, reading only the rows used
        base.embed_tokens.forward = partial(embedding_lookup, self.weights, "embed_tokens.weight")
        self.layers = list(base.layers)
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(partial(self._load, f"layers.{i}."))
            layer.register_forward_hook(self._drop)
        self.heavy = list(self.layers)  # what the hooks load and drop (and the progress bar counts)
        if hasattr(self.model, "lm_head"):
            self.model.lm_head.register_forward_pre_hook(partial(self._load, "lm_head."))
            self.model.lm_head.register_forward_hook(self._drop)
            self.heavy.append(self.model.lm_head)

    def _load(self, prefix: str, module, args) -> None:
        """Materialise `module`'s weights (stored under `prefix`) from the checkpoint, in fp32."""
        import torch

        names = [name for name, _ in module.named_parameters()]
        # Ordinary parameters (requires_grad, not inference tensors), like from_pretrained's: torch's matmul picks
        # its kernel path by those flags, and another path sums in another order (~1e-7 on the logits).
        with torch.inference_mode(False):
            loaded = self.weights.load([prefix + name for name in names])
            module.load_state_dict({name: loaded[prefix + name] for name in names}, assign=True)

    def _drop(self, module, args, output) -> None:
        """Send `module`'s weights back to meta (freeing them) once it has run."""
        module.to_empty(device="meta")
        # A layer's tensors are a few MiB each, under glibc's mmap threshold, so they live on the heap, and the holes
        # they leave stay resident: untrimmed, RSS grows by about half a layer per layer (1.4 GB, not 0.55, at 0.6B).
        return_freed_memory()
        if self.bar is not None:
            self.bar.update()

    @override
    def run(self, input_ids, attention_mask):
        import torch

        from toolkit.progress import progress_bar

        ids, mask = torch.from_numpy(np.asarray(input_ids)), torch.from_numpy(np.asarray(attention_mask))
        try:
            with torch.inference_mode(), progress_bar(total=len(self.heavy), desc="reference layers",
                                                      show=self.progress) as self.bar:
                return self.task.reference_forward(self.model, ids, mask)
        finally:
            self.bar = None
            for module in self.heavy:  # a run that failed midway leaves its layer loaded
                module.to_empty(device="meta")


class Shared:
    """What every backend loading the same thing holds (an ONNX Runtime session, a TVM artifact's weights): it lives
    while any of them does."""

    def __init__(self, value):
        self.value = value


_loading = threading.Lock()


def load_shared(cache: weakref.WeakValueDictionary, key, load) -> Shared:
    """`cache[key]` if a backend still holds it, else `load()`'s result, kept there for the next one (not with a
    key of None: never shared). One load at a time, so two backends never load the same thing twice."""
    with _loading:
        shared = cache.get(key) if key is not None else None
        if shared is None:
            shared = Shared(load())
            if key is not None:
                cache[key] = shared
    return shared


class ArtifactBackend(Backend):
    """What every artifact backend shares: its task, shape and cached prompt prefix from the manifest, and `run`, which
    lays the rows out for the graph (`split_cached_prefix`) as contiguous int64 arrays for `forward`."""

    def __init__(self, manifest: Manifest):
        self.task, self.seq_len, self.batch = get_task(manifest.task), manifest.seq_len, manifest.batch
        self.cached_prefix = manifest.cached_prefix

    @override
    def run(self, input_ids, attention_mask):
        input_ids, attention_mask = split_cached_prefix(input_ids, attention_mask, self.cached_prefix)
        return self.forward(np.ascontiguousarray(input_ids, dtype=np.int64),
                            np.ascontiguousarray(attention_mask, dtype=np.int64))

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The graph's outputs for rows as `run` laid them out."""
        raise NotImplementedError


_sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # session_key → Shared(session)


def session_key(manifest: Manifest, *settings) -> tuple:
    """What makes two sessions interchangeable: the model files' contents (by the manifest's digests) and the session
    settings. Every SEQ of a compiled ONNX bucket set has the same files (one graph with symbolic axes)."""
    digests = tuple((manifest.files.get(name) or {}).get("sha256")
                    for name in (manifest.model_file, f"{manifest.model_file}.data"))
    return (*digests, *settings)


class OnnxRuntimeBackend(ArtifactBackend):
    """An `onnx` artifact on ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). Backends whose artifacts have the same
    model files and settings share one session (every SEQ of a bucket set, every instance of an engine): the weights
    are held once per process, not once per bucket (0.6B fp16: about 1.7 GB each). ONNX Runtime runs concurrent
    calls of one session safely."""

    def __init__(self, manifest: Manifest, threads: int | None = None, device_id: int = 0,
                 profile_prefix: str | Path | None = None, idle_spin: bool = True):
        """`profile_prefix`: turn ONNX Runtime's profiler on; `session.end_profiling()` then writes its Chrome trace
        to a file whose name starts with this prefix (`perf profile`). `idle_spin=False`: its threads sleep as soon
        as a run ends (see `open_backend`)."""
        import onnxruntime as ort

        super().__init__(manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not idle_spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_prefix)
        device = manifest.target.device
        providers = (["CPUExecutionProvider"] if device == "cpu" else
                     [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        # ONNX Runtime's CPU kernels have no fp16 matmul: either way an fp16 linear weight is held as fp32 once
        # loaded (its cast insertion upcasts a weight that only feeds a Cast), and its constant folding would first
        # hold both copies: 0.6B load peak 3.9 GB against 2.2 GB without it (1.9x the fp16 weight bytes; 4B: 15 GB).
        # Compile folds every other constant (`export.fold_small_constants`), so ONNX Runtime fuses the norms and
        # runs as fast without it (0.6B reranker, [5, 172]: 1.41-1.49 s against 1.37-1.48 s). On CUDA, where the
        # Casts would run every call, it folds.
        low_peak = manifest.dtype == "fp16" and device == "cpu"
        def open_session():
            session = ort.InferenceSession(str(manifest.path / manifest.model_file), opts, providers=providers,
                                           disabled_optimizers=["ConstantFolding"] if low_peak else None)
            return_freed_memory()
            return session

        key = None if profile_prefix else session_key(manifest, device, device_id, threads, idle_spin)
        self.shared = load_shared(_sessions, key, open_session)  # held: shared while any backend uses it
        self.session = self.shared.value
        if device != "cpu" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ToolkitError("this artifact targets CUDA but ONNX Runtime has no usable CUDA provider here "
                               f"(available: {ort.get_available_providers()}); install onnxruntime-gpu on a GPU host")
        # the graph's symbolic sequence axis (`export_onnx`): a batch runs at its longest row, not at the bucket's SEQ
        self.dynamic_seq = isinstance(self.session.get_inputs()[0].shape[1], str)
        warn_if_int8_saturates(manifest)
        self.output_name = self.session.get_outputs()[0].name

    @override
    def forward(self, input_ids, attention_mask):
        return self.session.run([self.output_name], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def warn_if_int8_saturates(manifest: Manifest) -> None:
    """An int8 ONNX artifact with full-range int8 weights (built on a CPU with VNNI) loses accuracy on an x86 CPU
    without VNNI, where ONNX Runtime's uint8 x int8 matmul saturates (`host.int8_full_range_exact`): its gate figures
    do not hold here. uint8 weights are exact everywhere."""
    import warnings

    from toolkit.host import int8_full_range_exact

    if manifest.dtype == "int8" and manifest.weight_type == "int8" and not int8_full_range_exact():
        warnings.warn(f"{manifest.path}: this int8 artifact has full-range weights and this CPU has no VNNI, so ONNX "
                      "Runtime's int8 matmul saturates here and its validation figures do not hold (measured: min "
                      "cosine 0.988 instead of 0.9996); rebuild it on this machine (`toolkit compile ... --dtype "
                      "int8`), which stores its weights as uint8, exact on any CPU", stacklevel=3)


def open_backend(manifest: Manifest, threads: int | None = None, device_id: int = 0, idle_spin: bool = True) -> Backend:
    """Load a deployable artifact (validated, or validation explicitly skipped) with the backend its manifest names.
    `idle_spin=False` for runs timed in turn with another runtime's in one process: ONNX Runtime's threads then sleep
    when a run ends, where by default they spin on the cores for a while, and a TVM pool run just after waited at its
    barriers for them (2 cores, tiny model: TVM's median 0.4 -> 16.7 ms)."""
    return load_backend(manifest.require_deployable(), threads, device_id, idle_spin)


def load_backend(manifest: Manifest, threads: int | None = None, device_id: int = 0,
                 idle_spin: bool = True) -> Backend:
    """Load an artifact whatever its validation state: only for validating it."""
    if manifest.backend == "tvm":
        from toolkit.tvm_backend import TvmBackend

        return TvmBackend(manifest, threads, device_id)
    return OnnxRuntimeBackend(manifest, threads, device_id, idle_spin=idle_spin)


def device_available(backend: str, device: str) -> bool:
    """Whether this machine can run artifacts of `backend` on `device` (CPU always can)."""
    if device == "cpu":
        return True
    if backend == "tvm":
        from toolkit.tvm_backend import import_tvm

        return bool(import_tvm().cuda(0).exist)
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
