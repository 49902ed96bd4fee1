"""The compile pipeline, top-down: build config → checkpoint → patched model → ONNX → (TVM) → artifact → validate.

Each (backend, seq) pair becomes one self-contained artifact directory:
`WORKSPACE/NAME/BACKEND/seqSEQ/`. A `WORKSPACE/NAME/BACKEND/` directory is then a bucket set for the runtime.
"""
from __future__ import annotations

import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .artifact import load_manifest, open_backend, source_checkpoint, update_manifest, write_manifest
from .backends import TorchReference
from .checkpoint import checkpoint_info, load_tokenizer, resolve_checkpoint
from .config import BuildConfig
from .errors import ToolkitError
from .export import export_onnx
from .parity import TOLERANCES, compare, within_tolerance
from .patches.modeling_qwen3 import Qwen3ForDeployment
from .text import left_pad
from .tokenizer import ENDOFTEXT_ID

TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
VALIDATION_TEXT = ("The quick brown fox jumps over the lazy dog near the riverbank. "
                   "敏捷的棕色狐狸跳过了河边的懒狗。 Qwen3 embeddings, ranked & compiled: 1,024 dims!")


def artifact_dir(cfg: BuildConfig, backend: str, seq_len: int) -> Path:
    return cfg.workspace / cfg.name / backend / f"seq{seq_len}"


def validation_rows(tokenizer, seq_len: int) -> list[list[int]]:
    """Left-padded edge cases: a single token, a typical sentence, and exactly SEQ tokens."""
    typical = tokenizer(VALIDATION_TEXT, add_special_tokens=False).input_ids
    long = (typical * math.ceil(seq_len / len(typical)))[: seq_len - 1]
    return [[ENDOFTEXT_ID], typical[: seq_len - 1] + [ENDOFTEXT_ID], long + [ENDOFTEXT_ID]]


def validate(backend, reference, tokenizer, task: str, dtype: str) -> dict:
    """Run the artifact and the unpatched HF model (fp32) on the same inputs and measure the agreement."""
    rows = validation_rows(tokenizer, backend.seq_len)
    outs, refs = [], []
    for start in range(0, len(rows), backend.batch):
        chunk = rows[start:start + backend.batch]
        ids, mask = left_pad(chunk, backend.seq_len, ENDOFTEXT_ID, backend.batch)
        outs.append(backend.run(ids, mask)[: len(chunk)])
        refs.append(reference.run(ids[: len(chunk)], mask[: len(chunk)]))
    stats = compare(task, np.concatenate(refs), np.concatenate(outs))
    stats["lengths"] = [len(r) for r in rows]
    stats["tolerance"] = TOLERANCES[dtype]
    stats["passed"] = within_tolerance(task, dtype, stats)
    return stats


def compile_config(cfg: BuildConfig, log=print) -> list[Path]:
    """Compile every (backend, seq) of `cfg`; returns the artifact directories. Raises if validation fails."""
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    log(f"checkpoint {checkpoint} ({cfg.task}, {cfg.dtype})")
    model = Qwen3ForDeployment.from_pretrained(checkpoint, cfg.task, TORCH_DTYPES[cfg.dtype])
    reference = TorchReference(checkpoint, cfg.task)
    built = []
    for backend in cfg.backends:
        for seq_len in cfg.seq_lens:
            started = time.perf_counter()
            out = build_artifact(cfg, backend, seq_len, model, tokenizer, checkpoint, log)
            if cfg.target == "cuda" and not cuda_available(backend):
                stats = {"skipped": "no CUDA device on the build machine; run `toolkit validate "
                                    f"{out} --checkpoint CKPT` on the GPU host", "passed": None}
                log(f"warning: {out}: built but not validated ({stats['skipped']})")
            else:
                stats = validate(open_backend(out), reference, tokenizer, cfg.task, cfg.dtype)
            build = {"config": str(cfg.source) if cfg.source else None,
                     "seconds": round(time.perf_counter() - started, 2),
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
            update_manifest(out, validation=stats, build=build)
            if stats["passed"] is not None:
                log(f"{out}: {format_validation(cfg.task, stats)} ({build['seconds']} s, "
                    f"peak RSS {build['peak_rss_mb']} MB)")
            if stats["passed"] is False:
                raise ToolkitError(f"validation failed for {out}: {format_validation(cfg.task, stats)} is outside "
                                   f"the {cfg.dtype} tolerance {TOLERANCES[cfg.dtype]}")
            built.append(out)
    return built


def build_artifact(cfg: BuildConfig, backend: str, seq_len: int, model, tokenizer, checkpoint: Path, log) -> Path:
    """Export (and for TVM, compile) one artifact directory with its tokenizer and manifest (not yet validated)."""
    out = artifact_dir(cfg, backend, seq_len)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = (out if backend == "onnx" else Path(tmp)) / "model.onnx"
        spec = export_onnx(model, onnx_path, seq_len, cfg.batch)
        if backend == "onnx":
            engine = {"backend": "onnxruntime", "target": {"device": cfg.target, "provider":
                      "CPUExecutionProvider" if cfg.target == "cpu" else "CUDAExecutionProvider"}}
        else:
            from .tvm_compile import compile_tvm

            engine = compile_tvm(onnx_path, out, cfg.target, log=log)
            spec["model_file"] = engine.pop("model_file")
    tokenizer.save_pretrained(out / "tokenizer")
    write_manifest(out, {
        "name": cfg.name, "task": cfg.task, "seq_len": seq_len, "batch": cfg.batch, "dtype": cfg.dtype,
        "precision": {"weights": str(TORCH_DTYPES[cfg.dtype]).removeprefix("torch."),
                      "compute": "float32", "accumulation": "float32"},
        **engine, **spec,
        "model": {"checkpoint": cfg.checkpoint, "resolved": str(checkpoint), **checkpoint_info(checkpoint)},
    })
    return out


def cuda_available(backend: str) -> bool:
    if backend == "tvm":
        import tvm

        return bool(tvm.cuda(0).exist)
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def validate_artifact(artifact: Path, checkpoint: str | None = None) -> dict:
    """Re-run an artifact's validation (e.g. on the GPU host for a CUDA build) and record it in the manifest."""
    manifest = load_manifest(artifact)
    ckpt = resolve_checkpoint(checkpoint or source_checkpoint(artifact))
    stats = validate(open_backend(artifact), TorchReference(ckpt, manifest["task"]),
                     load_tokenizer(artifact / "tokenizer"), manifest["task"], manifest["dtype"])
    update_manifest(artifact, validation=stats)
    return stats


def format_validation(task: str, stats: dict) -> str:
    if task == "embedding":
        return (f"vs HF fp32: min cosine {stats['min_cosine']:.6f}, max |Δ| normalised "
                f"{stats['max_abs_diff_normalized']:.2e}, non-finite {stats['nonfinite']}")
    return f"vs HF fp32: max |Δ P(yes)| {stats['max_prob_diff']:.2e}, non-finite {stats['nonfinite']}"
