"""The compile pipeline, top-down: build config → checkpoint → patched model → ONNX → (TVM) → artifact → validate.

Each (backend, seq) pair becomes one self-contained artifact directory, `WORKSPACE/NAME/BACKEND/seqSEQ/`, and a
`WORKSPACE/NAME/BACKEND/` directory is then a bucket set for the runtime. An artifact is built in a dot-prefixed
staging directory beside its final place and moved there only once validation passed (or was explicitly skipped for a
CUDA build made without a GPU): a failed or interrupted compile leaves nothing loadable, and the previous artifact at
that place stays as it was.
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from toolkit.artifact import Manifest, ModelSource, Target
from toolkit.backends import TorchReference, device_available, load_backend
from toolkit.checkpoint import load_tokenizer, model_source, resolve_checkpoint
from toolkit.config import BuildConfig
from toolkit.errors import ToolkitError
from toolkit.export import export_onnx
from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
from toolkit.quantize import CalibrationSet, QuantizationPlan, plan_int8, quantize_onnx
from toolkit.tasks import Task, get_task
from toolkit.validation import measure

TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int8": torch.float32}  # int8 quantizes an fp32 graph
PRECISION = {
    "fp16": {"weights": "float16", "compute": "float32", "accumulation": "float32"},
    "fp32": {"weights": "float32", "compute": "float32", "accumulation": "float32"},
    "int8": {"weights": "int8 (linear layers, per output channel); embedding table float16", "compute":
             "int8 x int8 (linear layers, dynamic per-tensor activation scale); float32 elsewhere",
             "accumulation": "int32"},
}


def compile_config(cfg: BuildConfig, log=print) -> list[Path]:
    """Compile every (backend, seq) of `cfg`; returns the artifact directories. Raises if validation fails."""
    task = get_task(cfg.task)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    source = model_source(cfg.checkpoint, checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    check_seq_lens(task, tokenizer, cfg.seq_lens)
    log(f"checkpoint {checkpoint} ({task.name}, {cfg.dtype})")
    model = Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, TORCH_DTYPES[cfg.dtype])
    plan, checks = None, None
    if cfg.dtype == "int8":
        calibration = CalibrationSet.load(cfg.calibration)
        plan = plan_int8(model, task, tokenizer, calibration, max(cfg.seq_lens), cfg.smooth_alpha,
                         cfg.max_linear_error, log)
        model.embed_tokens.half()  # a gather: fp16 storage costs no accuracy in the arithmetic
        checks = calibration
    reference = TorchReference(checkpoint, task)
    return [build_artifact(cfg, task, backend, seq_len, model, tokenizer, source, reference, log, plan, checks)
            for backend in cfg.backends for seq_len in cfg.seq_lens]


def check_seq_lens(task: Task, tokenizer, seq_lens) -> None:
    """Refuse sequence lengths that cannot hold the task's fixed prompt (the reranker's template alone is ~58)."""
    shortest = task.min_seq_len(tokenizer)
    too_short = [s for s in seq_lens if s < shortest]
    if too_short:
        raise ToolkitError(f"SEQ {too_short} cannot hold a {task.name} input: its prompt alone takes "
                           f"{shortest - 1} tokens; use --seq {shortest} or more")


def artifact_dir(cfg: BuildConfig, backend: str, seq_len: int) -> Path:
    """Where the (backend, seq) artifact of `cfg` lives."""
    return cfg.workspace / cfg.name / backend / f"seq{seq_len}"


def build_artifact(cfg: BuildConfig, task: Task, backend: str, seq_len: int, model, tokenizer, source: ModelSource,
                   reference: TorchReference, log, plan: QuantizationPlan | None = None,
                   holdout: CalibrationSet | None = None) -> Path:
    """Build, validate and install one artifact (atomically: see the module docstring). An int8 build takes its
    quantization `plan`, and its validation also covers the `holdout` texts calibration never saw."""
    final = artifact_dir(cfg, backend, seq_len)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an installed artifact is readable like any compile output
    try:
        started = time.perf_counter()
        manifest = write_artifact(cfg, task, backend, seq_len, model, tokenizer, source, staging, log, plan)
        if device_available(backend, cfg.target):
            texts = holdout.rows(task, tokenizer, "holdout", seq_len) if holdout else []
            manifest.validation = measure(load_backend(manifest), reference, tokenizer, cfg.dtype, texts)
        else:
            manifest.validation = {"skipped": "no CUDA device on the build machine; run `toolkit validate "
                                              f"{final} --checkpoint CKPT` on the GPU host", "passed": None}
            log(f"warning: {final}: built but not validated ({manifest.validation['skipped']})")
        manifest.build = {"config": str(cfg.source) if cfg.source else None,
                          "seconds": round(time.perf_counter() - started, 2),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        manifest.save(staging, hash_files=False)
        if manifest.validation["passed"] is False:
            raise ToolkitError(f"validation failed for {final}: {task.format_agreement(manifest.validation)} is "
                               f"outside the {cfg.dtype} tolerance ({task.tolerance_text(cfg.dtype)}); nothing was "
                               "installed")
        if manifest.validation["passed"]:
            log(f"{final}: vs HF fp32: {task.format_agreement(manifest.validation)} "
                f"({manifest.build['seconds']} s, peak RSS {manifest.build['peak_rss_mb']} MB)")
        install(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def write_artifact(cfg: BuildConfig, task: Task, backend: str, seq_len: int, model, tokenizer, source: ModelSource,
                   out: Path, log, plan: QuantizationPlan | None = None) -> Manifest:
    """Export (and for TVM, compile; for int8, quantize) into `out` with the tokenizer; write its manifest, not yet
    validated. ONNX artifacts get a dynamic batch (ONNX Runtime takes any shape: a partial batch computes no padding
    rows); TVM artifacts a static one (our schedules are built for fixed shapes)."""
    dynamic_batch = backend == "onnx"
    straight_to_artifact = backend == "onnx" and plan is None
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, task, (out if straight_to_artifact else Path(tmp)) / "model.onnx", seq_len,
                               cfg.batch_for(seq_len), dynamic_batch, fold=cfg.dtype != "fp16")
        model_file, target, details = exported.model_file, Target(cfg.target), {"external_data": exported.external_data}
        precision = dict(PRECISION[cfg.dtype])
        if plan:
            quantize_onnx(Path(tmp) / "model.onnx", out / "model.onnx", plan)
            precision["quantization"] = plan.describe()
        if backend == "tvm":
            from toolkit.tvm_compile import compile_tvm

            built = compile_tvm(Path(tmp) / "model.onnx", out, cfg.target, log=log)
            model_file, target = built.model_file, Target(cfg.target, built.tvm_target)
            details = {"params_file": built.params_file, "primfuncs": built.primfuncs,
                       "unscheduled": built.unscheduled, "compile_seconds": built.compile_seconds}
    tokenizer.save_pretrained(out / "tokenizer")
    return Manifest(
        name=cfg.name, task=task.name, seq_len=seq_len, batch=cfg.batch_for(seq_len), dynamic_batch=dynamic_batch,
        dtype=cfg.dtype, backend=backend, target=target, model=source, inputs=exported.inputs,
        outputs=exported.outputs, model_file=model_file,
        precision=precision,
        backend_details=details,
    ).save(out)


def install(staging: Path, final: Path) -> None:
    """Move a validated staging directory to its final place, replacing any previous artifact there."""
    old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
