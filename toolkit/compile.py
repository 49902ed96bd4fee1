"""The compile pipeline, top-down: build config → checkpoint → patched model → ONNX → (TVM) → artifact → validate.

Each (backend, seq) pair becomes one artifact directory, `WORKSPACE/NAME/BACKEND/seqSEQ/`, and a
`WORKSPACE/NAME/BACKEND/` directory is then a bucket set for the runtime. Every artifact of a build is staged beside
its set and validated before any is installed (how a build changes a set on disk: toolkit.artifact_set).

Memory: the patched model is never held whole. It is streamed (`from_pretrained(stream=True)`): int8 calibration reads
one decoder layer at a time from the checkpoint, and the export traces the model without its weights and writes each
weight as it reads it. Every graph is exported before anything else runs (folding, quantizing, TVM, validation); TVM
compiles in a process of its own (`compile_tvm_process`); the fp32 reference runs one layer at a time. The peak RSS of
each stage goes into the manifest (`build.stage_peak_rss_mb`).
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from toolkit.artifact import Manifest, ModelSource, Target, seq_dir_name
from toolkit.artifact_set import (
    build_dir,
    install,
    prune_graphs,
    remove_other_builds,
    remove_stale_staging,
    share_graph,
)
from toolkit.backends import LayerwiseReference, device_available
from toolkit.checkpoint import (
    check_task,
    context_length,
    load_tokenizer,
    model_source,
    read_hf_config,
    resolve_checkpoint,
)
from toolkit.config import LOW_PRECISION, WEIGHT_ROUNDINGS, BuildConfig
from toolkit.errors import ToolkitError
from toolkit.export import OnnxExport, export_onnx, fold_small_constants, fold_weights, io_specs
from toolkit.host import isa_flags, missing_tvm_extension
from toolkit.memory import StagePeaks, map_large_blocks, return_freed_memory
from toolkit.onnx_quantize import quantize_onnx
from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
from toolkit.quantize import CalibrationSet, Int8Scheme, QuantizationPlan, int8_scheme, plan_int8
from toolkit.tasks import Task, get_task
from toolkit.tokenizer import MAX_CONTEXT
from toolkit.validation import validate

# bf16 exports bf16 weights (exact for Qwen3's own bf16 checkpoints). int8 calibrates and exports the fp16-weight
# model (fp32 compute, as an fp16 artifact) and quantizes its graph: an fp32 copy of the model would double the build's
# peak, and fp16 storage costs int8 nothing (it rounds to 11 bits, int8 to 8)
TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float16}
TVM_FP32_COMPUTE = ("float32 (TVM on AMX, where backend_details.amx_kernels lists bf16x3: the linear layers' x·W as "
                    "three bf16 products, hi·hi + lo·hi + hi·lo of x's and W's high and low bf16 parts: each product "
                    "within 2^-15 of its size, where fp16 weights are themselves rounded to 2^-11)")
ONNX_FP32_COMPUTE = {
    "fp32": "float32 (ONNX Runtime)",
    # the export casts each fp16 matrix to fp32: ONNX Runtime's CPU kernels have no fp16 matmul (OnnxRuntimeBackend)
    "fp16": "float32 (ONNX Runtime: the graph casts the float16 weights to float32, on CPU once as the artifact loads)",
}


def precision(backend: str, dtype: str, scheme: Int8Scheme | None = None) -> dict:
    """The manifest's `precision`: how an artifact of `backend` and `dtype` stores its weights and computes (`scheme`:
    an int8 artifact's). ONNX Runtime and TVM compute fp16/fp32 weights differently, so the backend decides."""
    # int8's linear layers kept out of int8 compute as an fp16 artifact's
    fp32_compute = TVM_FP32_COMPUTE if backend == "tvm" else ONNX_FP32_COMPUTE["fp32" if dtype == "fp32" else "fp16"]
    if dtype == "bf16":  # TVM only (config.DTYPE_BACKENDS)
        return {"weights": "bfloat16", "compute": "bfloat16 x bfloat16 in the linear layers (AVX512-BF16 vdpbf16ps, "
                "or AMX tdpbf16ps where backend_details.amx_kernels lists bf16) and in attention's q·kᵀ and P·V "
                "(from SEQ 16, vdpbf16ps); float32 in the attention logits, norms, softmax, RoPE and the residual "
                "stream", "accumulation": "float32"}
    if dtype != "int8":
        return {"weights": {"fp16": "float16", "fp32": "float32"}[dtype], "compute": fp32_compute,
                "accumulation": "float32"}
    scale = f"dynamic activation scale per {scheme.scale_granularity}"
    linears = (f"uint8 x {scheme.weight_type} (linear layers: ONNX Runtime's {scheme.onnx_kernel}; {scale})"
               if backend == "onnx" else f"int8 x int8 (linear layers; {scale})")
    return {"weights": f"{scheme.weight_type} (linear layers, {scheme.weight_grid}); float16 for the linear layers "
                       "kept out of int8, the embedding table and the norms",
            "compute": f"{linears}; float32 elsewhere (the linear layers kept out of int8 as in an fp16 artifact: "
                       f"{fp32_compute})",
            "accumulation": "int32"}


@dataclass
class StagedArtifact:
    """An artifact in the making: its exported graph in a staging directory beside its final place."""

    backend: str
    seq_len: int
    final: Path
    staging: Path
    graph: Path | None  # the exported ONNX file: the artifact's model file, or the input of folding/quantizing/TVM
    exported: OnnxExport
    export_seconds: float
    first: "StagedArtifact | None" = None  # its backend's first artifact in this build (ONNX: the same graph)


def compile_config(cfg: BuildConfig, log=print) -> list[Path]:
    """Compile every (backend, seq) of `cfg`; returns the artifact directories. Raises if validation fails, leaving
    no empty directory it made (a mistyped --workspace is not left behind)."""
    set_dir = cfg.workspace / cfg.name
    made = [d for d in (set_dir, *set_dir.parents) if not d.exists()]  # innermost first
    set_dir.mkdir(parents=True, exist_ok=True)  # an unusable --workspace fails now, not after work
    try:
        return build_set(cfg, log)
    except BaseException:
        for directory in made:
            remove_empty_tree(directory)
        raise


def remove_empty_tree(directory: Path) -> None:
    """Remove `directory` and the directories under it where nothing else is left (a failed build's backend dirs)."""
    for d in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def build_set(cfg: BuildConfig, log) -> list[Path]:
    """`compile_config` in a workspace that exists."""
    task = get_task(cfg.task)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    hf_config = read_hf_config(checkpoint)
    check_task(task, checkpoint, hf_config, f"{cfg.source or 'the config'} builds {task.name} artifacts",
               lambda other: f"compile it with build_configs/{other}_config_fp16.yaml (or a config with `task: "
                             f"{other}`)", lambda message: log(f"warning: {message}"))
    tokenizer = load_tokenizer(checkpoint)
    check_seq_lens(task, tokenizer, cfg.seq_lens, context_length(hf_config))
    check_shapes_fit(cfg, hf_config, log)
    carried = task.fixed_instruction(cfg.instruction)  # the instruction every input of the build carries, if any
    instruction = instruction_to_cache(cfg, task, tokenizer, carried, log)  # before any model work: may refuse SEQs
    if "tvm" in cfg.backends and (missing := missing_tvm_extension(cfg.dtype)):
        feature, instead = missing
        raise ToolkitError(f"this CPU has no {feature} (see /proc/cpuinfo): TVM {cfg.dtype} artifacts are built on "
                           f"and for CPUs that have it; use {instead} here")
    if unused := cfg.unused_quantization():
        log(f"warning: {unused}")
    log(f"checkpoint {checkpoint} ({task.name}, {cfg.dtype})")
    checks = None  # the real texts of a low-precision build: read before any model work, as a refusal costs nothing
    if cfg.dtype in LOW_PRECISION:
        # a missing file came from the config (the command line's is checked by click)
        checks = CalibrationSet.load(cfg.calibration, f"quantization.calibration in {cfg.source} (a relative path is "
                                     "from the current directory, as frontend.checkpoint and workspace are)"
                                     if cfg.source else None)
    source = model_source(cfg.checkpoint, checkpoint)  # after the quick checks: it hashes the weights
    for backend in cfg.backends:
        remove_stale_staging(cfg.workspace / cfg.name / backend, log)
    map_large_blocks()  # per-layer temporaries freed back to the OS, not kept by the heap (compile's peak)
    peaks, staged, scratch = StagePeaks(), [], None
    try:
        with peaks.stage("load"):
            model = load_streamed(cfg, task, checkpoint)
        plan = None
        if cfg.dtype == "int8":
            # GPTQ's rounded weights wait there for the export: a build dir, so a SIGKILLed build's are removed by the
            # next build (`remove_stale_staging` of the first backend's set), not left in the workspace for good
            (cfg.workspace / cfg.name / cfg.backends[0]).mkdir(exist_ok=True)
            scratch = build_dir(cfg.workspace / cfg.name / cfg.backends[0], "export")
            with peaks.stage("calibrate"):
                model, plan = calibrate_int8(cfg, task, tokenizer, checks, carried, checkpoint, model, log, scratch)
        prefix, instruction = cached_prefix(task, tokenizer, cfg.seq_lens, instruction)
        if prefix:
            with peaks.stage("prefix"):
                model.cache_prefix(prefix, instruction)
            log(f"cached the first {len(prefix)} prompt tokens" + (f" (the instruction {instruction!r} in them)"
                                                                   if instruction is not None else "")
                + ": their keys and values are constants of the graph")
            if "tvm" in cfg.backends and (ragged := ragged_bodies(cfg.seq_lens, len(prefix))):
                log(f"warning: at SEQ {','.join(map(str, ragged))} the rows after the cached prefix are not whole "
                    f"{BODY_ROW_MULTIPLE}-row tiles: TVM's AVX-512 linear layers run them at about half speed; "
                    f"use SEQs that are all the same modulo {BODY_ROW_MULTIPLE} (--seq auto picks multiples of 4)")
        with peaks.stage("export"):
            for backend in cfg.backends:
                first = None
                for seq_len in cfg.seq_lens:
                    staged.append(stage_export(cfg, task, backend, seq_len, model, log, first))
                    first = first or staged[-1]
        del model  # from here on everything reads the exported graphs
        gc.collect()  # the exported programs and their graphs are reference cycles
        return_freed_memory()
        with peaks.stage("reference"):
            reference = LayerwiseReference(checkpoint, task, progress=True)
        for artifact in staged:  # all validated before any is installed: a set is never half old, half new
            finish_artifact(cfg, task, artifact, tokenizer, source, reference, log, plan, checks, carried, peaks.copy())
        for artifact in staged:
            install(artifact.staging, artifact.final)
        for set_dir in {artifact.final.parent for artifact in staged}:
            remove_other_builds(set_dir, [artifact.final for artifact in staged], log)
        return [artifact.final for artifact in staged]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        for artifact in staged:  # installed ones were moved away; what is left is a failed or interrupted build
            shutil.rmtree(artifact.staging, ignore_errors=True)
            if artifact.backend == "tvm" and artifact.graph:  # the build's one TVM export
                shutil.rmtree(artifact.graph.parent, ignore_errors=True)
        for set_dir in {artifact.final.parent for artifact in staged}:
            prune_graphs(set_dir)


def load_streamed(cfg: BuildConfig, task: Task, checkpoint: Path) -> Qwen3ForDeployment:
    """The patched model of `checkpoint` in the build's dtype, streamed (never held whole: see the module docstring)."""
    return Qwen3ForDeployment.from_pretrained(checkpoint, task.output_name, TORCH_DTYPES[cfg.dtype], stream=True)


def calibrate_int8(cfg: BuildConfig, task: Task, tokenizer, calibration: CalibrationSet, instruction: str | None,
                   checkpoint: Path, model: Qwen3ForDeployment, log,
                   scratch: Path | None = None) -> tuple[Qwen3ForDeployment, QuantizationPlan]:
    """`plan_int8` on rows carrying the build's `instruction`, with the build config's weight rounding; if its
    preflight finds the plan over the gate's whole error budget (the build would fail), calibration runs once more
    with the other rounding, on the model as it came (the first run smoothed and rounded its weights), and the plan
    using less of the budget is kept with its model. Which rounding passes is a draw: the 0.6B outlier reranker's GPTQ
    plan used 120% on an AMD EPYC (its gate failed at 0.026), round-to-nearest's 58%, which passed at 0.0087-0.0130;
    on an AMX Xeon GPTQ's passed. GPTQ's rounded weights wait in `scratch` (None: the system's temporary
    directory)."""
    # layer errors are measured for the scheme that will run: per-tensor scales (ONNX Runtime) err more
    scheme = int8_scheme(cfg.backends, cfg.activation_scales)

    def plan_with(model, rounding):
        return plan_int8(model, task, tokenizer, calibration, max(cfg.seq_lens), scheme, cfg.smooth_alpha,
                         cfg.max_linear_error, rounding, cfg.preflight, scratch, log, instruction)

    plan = plan_with(model, cfg.weight_rounding)
    if plan.preflight is None or plan.preflight["budget_used"] <= 1:
        return model, plan
    other = next(rounding for rounding in WEIGHT_ROUNDINGS if rounding != cfg.weight_rounding)
    log(f"the {cfg.weight_rounding} plan uses {plan.preflight['budget_used']:.0%} of the gate's error budget: "
        f"calibrating again with {other} rounding")
    fresh = load_streamed(cfg, task, checkpoint)
    retry = plan_with(fresh, other)
    if retry.preflight["budget_used"] < plan.preflight["budget_used"]:
        log(f"kept the {other} plan ({retry.preflight['budget_used']:.0%} of the budget)")
        return fresh, retry
    log(f"kept the {cfg.weight_rounding} plan: the {other} one used {retry.preflight['budget_used']:.0%}")
    return model, plan


BODY_ROW_MULTIPLE = 4  # the rows of TVM's matmul register tile (tvm_schedules.Matmul's `mr`)


def instruction_to_cache(cfg: BuildConfig, task: Task, tokenizer, carried: str | None, log) -> str | None:
    """The instruction whose tokens the graph caches after the prompt prefix: the one every input `carried`
    (`Task.fixed_instruction`: the reranker's, web search by default), or None: `cache_instruction` is off, or the
    shortest SEQ cannot hold it with a query and a document (an error when the config names the instruction; else only
    the chat prefix is cached)."""
    instruction = carried if cfg.cache_instruction else None
    if instruction is None or min(cfg.seq_lens) >= (shortest := task.min_seq_len(tokenizer, instruction)):
        return instruction
    if max(cfg.seq_lens) < shortest:  # every input carries it: no SEQ of the set could run one
        raise ToolkitError(f"no SEQ of {','.join(map(str, cfg.seq_lens))} holds {task.a_name} input with the "
                           f"instruction {instruction!r} ({shortest} tokens with a one-token query and document): use "
                           f"--seq {shortest} or more, --instruction with a shorter one, or --no-cache-instruction "
                           "(only the chat prefix cached: inputs carry their instruction at run time)")
    if cfg.instruction is not None:
        raise ToolkitError(f"SEQ {min(cfg.seq_lens)} cannot hold {task.a_name} input with the instruction "
                           f"{instruction!r}: use --seq {shortest} or more, or --no-cache-instruction")
    log(f"SEQ {min(cfg.seq_lens)} cannot hold the default instruction with a body ({shortest} tokens): only the chat "
        "prefix is cached, and inputs may carry any instruction")
    return None


def cached_prefix(task: Task, tokenizer, seq_lens, instruction: str | None = None) -> tuple[list[int], str | None]:
    """The tokens every input starts with whose keys and values the graph computes once and holds, and the instruction
    they end with (None if they stop before it): the longest start of the task's prompt start (the reranker's 39-token
    chat prefix, then with `instruction` its 21 tokens for the web-search one; for an embedding set only with one, the
    query head up to the text) that leaves the most SEQs a body of whole register tiles (SEQ - cached tokens a
    multiple of BODY_ROW_MULTIPLE). Measured on the 0.6B reranker: with the 39-token prefix, SEQ 260 left 221 rows
    per sequence and the linear layers ran at 107 GFLOP/s instead of 203 (a row tile of 1); 36 of them kept SEQs that
    are multiples of 4 at full speed."""
    start = task.prompt_start(tokenizer, instruction)
    length = max(range(len(start) + 1), key=lambda n: (-len(ragged_bodies(seq_lens, n)), n))
    return start[:length], instruction if length > len(task.prompt_start(tokenizer)) else None


def ragged_bodies(seq_lens, cached: int) -> list[int]:
    """The SEQs whose bodies (SEQ - `cached` prefix tokens) are not whole register tiles of rows."""
    return [s for s in seq_lens if (s - cached) % BODY_ROW_MULTIPLE]


def check_seq_lens(task: Task, tokenizer, seq_lens, context: int = MAX_CONTEXT) -> None:
    """Refuse sequence lengths that cannot hold the task's fixed prompt (the reranker's template alone is ~58), or
    are longer than the checkpoint's `context` (its max_position_embeddings)."""
    if max(seq_lens) > context:
        raise ToolkitError(f"SEQ {max(seq_lens)} is longer than the checkpoint's context ({context} tokens, "
                           f"max_position_embeddings in its config.json): use --seq {context} or less")
    shortest = task.min_seq_len(tokenizer)
    too_short = [s for s in seq_lens if s < shortest]
    if too_short:
        raise ToolkitError(f"SEQ {too_short} cannot hold {task.a_name} input: its prompt alone takes "
                           f"{shortest - 1} tokens; use --seq {shortest} or more")


def check_shapes_fit(cfg: BuildConfig, hf_config: dict, log) -> None:
    """Refuse a (batch, SEQ) whose attention scores alone (batch x heads x SEQ^2 fp32, one layer's) exceed the memory
    available now: validation would otherwise crash in the runtime's allocator after the export. A token budget
    below a SEQ gives that SEQ batch 1 (`BuildConfig.batch_for`), said in the log."""
    if over := [s for s in cfg.seq_lens if cfg.batch_tokens and cfg.batch_tokens < s]:
        log(f"warning: --batch-tokens {cfg.batch_tokens} is below SEQ {','.join(map(str, over))}: built at batch 1 "
            f"(for a budget there, use --batch-tokens {max(over)} or more)")
    available = psutil.virtual_memory().available  # what the machine can give a process now
    heads = hf_config.get("num_attention_heads", 1)
    for seq_len in cfg.seq_lens:
        batch = cfg.batch_for(seq_len)
        needed = batch * heads * seq_len**2 * 4
        if needed > available:
            raise ToolkitError(f"SEQ {seq_len} at batch {batch} needs {needed / 1e9:.1f} GB for its attention scores "
                               f"alone ({batch} x {heads} heads x {seq_len}^2 x 4 bytes), over the "
                               f"{available / 1e9:.1f} GB available: use a smaller --seq or --batch/--batch-tokens")


def artifact_dir(cfg: BuildConfig, backend: str, seq_len: int) -> Path:
    """Where the (backend, seq) artifact of `cfg` lives."""
    return cfg.workspace / cfg.name / backend / seq_dir_name(seq_len)


def stage_export(cfg: BuildConfig, task: Task, backend: str, seq_len: int, model, log,
                 first: StagedArtifact | None = None) -> StagedArtifact:
    """Export `model` for (backend, seq) into a new staging directory. Graphs get symbolic batch and sequence axes,
    so each backend exports once per build; given the backend's first artifact (`first`), this one exports nothing:
    - ONNX (ONNX Runtime takes any shape: a partial batch computes no padding rows): it points at the first's model
      files once they are written (folded or quantized too, and shared: `share_graph`), and the runtime opens one
      session for both (backends.py);
    - TVM: it is compiled from the first's graph at its own static shape (our schedules are built for static
      shapes), which lies in a dot-prefixed `.export-*` directory beside the set until the build ends.
    A graph that is not the artifact's model file (int8's fp16 graph) goes into `graph/`, removed once it is used."""
    final = artifact_dir(cfg, backend, seq_len)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = build_dir(final.parent, f"{final.name}.staging")
    batch = cfg.batch_for(seq_len)
    if first:
        inputs, outputs = io_specs(task, seq_len, batch, model.shape.hidden_size)
        exported = replace(first.exported, inputs=inputs, outputs=outputs)
        return StagedArtifact(backend, seq_len, final, staging, first.graph if backend == "tvm" else None, exported,
                              0.0, first)
    started = time.perf_counter()
    if backend == "tvm":
        graph_dir = build_dir(final.parent, "export")
    else:
        graph_dir = staging if cfg.dtype != "int8" else staging / "graph"
    try:
        graph_dir.mkdir(exist_ok=True)
        exported = export_onnx(model, task, graph_dir / "model.onnx", seq_len, batch, rotary_op=backend == "onnx")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backend == "tvm":
            shutil.rmtree(graph_dir, ignore_errors=True)
        raise
    log(f"exported {backend} ({time.perf_counter() - started:.0f} s)")
    return StagedArtifact(backend, seq_len, final, staging, graph_dir / "model.onnx", exported,
                          time.perf_counter() - started, first)


def finish_artifact(cfg: BuildConfig, task: Task, artifact: StagedArtifact, tokenizer, source: ModelSource,
                    reference: LayerwiseReference, log, plan: QuantizationPlan | None, holdout: CalibrationSet | None,
                    instruction: str | None, peaks: StagePeaks) -> None:
    """Make a staged export an artifact and validate it, in its staging directory (raises if validation fails). An int8
    build takes its quantization `plan`, and its validation also covers the `holdout` texts calibration never saw
    (carrying the build's `instruction`).
    `peaks` holds the stages already run for it (loading, calibration, export); the manifest records each stage's
    peak RSS."""
    started = time.perf_counter()
    final, staging = artifact.final, artifact.staging
    manifest = write_artifact(cfg, task, artifact, tokenizer, source, log, plan, peaks)
    if device_available(artifact.backend, cfg.target):
        with peaks.stage("validate"):
            manifest.validation = validate(manifest, reference, tokenizer, holdout, instruction)
    else:
        manifest.validation = {"skipped": "no CUDA device on the build machine; run `toolkit validate "
                                          f"{final} --checkpoint CKPT` on the GPU host", "passed": None}
        log(f"warning: {final}: built but not validated ({manifest.validation['skipped']})")
    manifest.build = {"config": str(cfg.source) if cfg.source else None,
                      "seconds": round(artifact.export_seconds + time.perf_counter() - started, 2),
                      "peak_rss_mb": peaks.peak(), "stage_peak_rss_mb": dict(peaks.mb)}
    manifest.save(staging, hash_files=False)
    cost = (f"{manifest.build['seconds']} s, peak RSS {peaks.peak()} MB: "
            + ", ".join(f"{stage} {mb}" for stage, mb in peaks.mb.items()))
    if manifest.validation["passed"] is False:  # the manifest goes with the staging directory: say what it held
        raise ToolkitError(f"validation failed for {final}: {task.format_agreement(manifest.validation)} is "
                           f"outside the {cfg.dtype} tolerance ({manifest.validation['tolerance']}); nothing was "
                           f"installed ({cost}){precision_fix(cfg.dtype, plan)}")
    if manifest.validation["passed"]:
        log(f"{final} ({manifest.backend} {manifest.kernels}): vs HF fp32: {task.format_agreement(manifest.validation)}"
            f" ({cost})")


def precision_fix(dtype: str, plan: QuantizationPlan | None) -> str:
    """What a user can do when a low-precision build fails its gate (nothing for fp16/fp32: they should not)."""
    if dtype == "bf16":
        return ". Build --dtype fp16 (fp32 compute) for this model"
    if dtype != "int8" or plan is None:
        return ""
    # smoothing turned off is the likeliest cause where it was: named before the layers kept out of int8
    unsmoothed = (". quantization.smooth_alpha is 0 in the build config: without smoothing the outlier channels spend "
                  "the activations' int8 range; leave it out (default 0.5)" if plan.smooth_alpha == 0 else "")
    if plan.preflight is None:
        return (". Turn quantization.preflight on in the build config (it keeps the most harmful layers out of int8 "
                f"until the model in fake int8 fits the gate), or build --dtype bf16{unsmoothed}")
    kept, total = len(plan.keep_fp32), len(plan.linear_errors)
    return (f". Its preflight kept {kept} of {total} linear layers out of int8 and left "
            f"{plan.preflight['budget_used']:.0%} of the gate's error budget used on the calibration rows and the "
            "gate's edge cases: int8 is at its limit on this model. Build --dtype bf16, or keep more layers out of "
            f"int8 (a lower quantization.max_linear_error in the build config){unsmoothed}")


def write_artifact(cfg: BuildConfig, task: Task, artifact: StagedArtifact, tokenizer, source: ModelSource, log,
                   plan: QuantizationPlan | None, peaks: StagePeaks) -> Manifest:
    """Turn the staged export into the artifact's files (fp32 ONNX: folded; fp16 ONNX: all but its weights' casts
    folded; int8 ONNX: folded so, then quantized; TVM: compiled) with the tokenizer; write its manifest, not yet
    validated."""
    out, exported = artifact.staging, artifact.exported
    model_file, target, details = exported.model_file, Target(cfg.target), {}
    scheme = int8_scheme([artifact.backend], cfg.activation_scales) if plan else None
    record = precision(artifact.backend, cfg.dtype, scheme)
    if plan:
        record["quantization"] = plan.describe(scheme)
    if artifact.graph is None:  # the first's graph: its folded / quantized files are this one's too
        model_file = Manifest.load(artifact.first.staging, verify=False).model_file
    elif cfg.dtype == "fp32" and artifact.backend == "onnx":  # for stock ONNX tools; TVM packs the weights itself
        with peaks.stage("fold"):
            fold_weights(artifact.graph)
    elif cfg.dtype == "fp16" and artifact.backend == "onnx":  # for ONNX Runtime's fusions
        with peaks.stage("fold"):
            fold_small_constants(artifact.graph)
    elif plan and artifact.backend == "onnx":
        with peaks.stage("quantize"):
            # the exporter's shape arithmetic folded first: ONNX Runtime cannot fold all of it (CastLike: a warning on
            # every load)
            fold_small_constants(artifact.graph)
            quantize_onnx(artifact.graph, out / "model.onnx", plan, scheme)
    if artifact.backend == "onnx" and artifact.graph and len(cfg.seq_lens) > 1:
        model_file = share_graph(out, model_file)
    if artifact.backend == "tvm":
        same_params = None
        if artifact.first:  # its weights file, which this one's will be a hard link to if the same
            first = Manifest.load(artifact.first.staging, verify=False)
            same_params = (str(artifact.first.staging / first.params_file), first.params_sha256)
        with peaks.stage("tvm") as stage:
            built, stage.child_mb = compile_tvm_process(
                artifact.final, onnx_path=str(artifact.graph), out_dir=str(out), device=cfg.target,
                batch=cfg.batch_for(artifact.seq_len), seq_len=artifact.seq_len,
                int8_layers=plan.int8_layers() if plan else [], fp32_linears=cfg.fp32_linears,
                same_params=same_params)
        if built["unscheduled"]:
            log(f"warning: {len(built['unscheduled'])} PrimFunc(s) left unscheduled: "
                + ", ".join(built["unscheduled"]))
        model_file = built["model_file"]
        target = Target(cfg.target, built["tvm_target"], isa_flags() if built["tvm_target"]["kind"] == "llvm" else None)
        details = {key: built[key] for key in ("params_file", "params_sha256", "primfuncs", "unscheduled",
                                               "amx_kernels", "compile_seconds")}
    # onnx_ir's graphs are reference cycles: uncollected, the quantized weights would still be resident while
    # validation loads the artifact (0.6B: 737 MB held after quantizing, 286 MB once collected; 4B: validation peaked
    # at 9.2 GB for a 4.3 GB artifact that loads at 4.1 GB)
    gc.collect()
    return_freed_memory()
    shutil.rmtree(out / "graph", ignore_errors=True)
    tokenizer.save(out / "tokenizer")
    return Manifest(
        name=cfg.name, task=task.name, seq_len=artifact.seq_len, batch=cfg.batch_for(artifact.seq_len),
        cached_prefix=exported.cached_prefix,
        instruction=exported.cached_instruction, dtype=cfg.dtype, backend=artifact.backend,
        target=target,
        model=source, inputs=exported.inputs, outputs=exported.outputs, model_file=model_file, precision=record,
        backend_details=details,
    ).save(out)


TVM_BUILD_PROCESS = ("import sys; sys.path[0] = sys.argv[2]\n"  # this toolkit, not one in the working directory
                     "from toolkit.tvm_compile import build_process_main; build_process_main(sys.argv[1])")


def compile_tvm_process(final: Path, **request) -> tuple[dict, int]:
    """`tvm_compile.compile_tvm(**request)` (JSON arguments) run in a process of its own, for the artifact that will
    be `final`; returns its build (the fields of `TvmBuild`) and that process's peak RSS in MB.

    Why a process: what TVM's compiler leaves behind would otherwise stay resident under the validation that loads the
    artifact next: its library (137 MB with LLVM) and Python objects that neither gc nor malloc_trim hand back (0.6B
    int8, one SEQ: validation peaked at 1,556 MB after an in-process build, 1,400 MB after this one). This process
    then never loads TVM's compiler and validates on its runtime library alone, as a serving process runs; and a build
    the kernel kills for memory is reported, not this process killed."""
    import signal
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="toolkit-tvm-build-") as scratch:
        request_file = Path(scratch) / "request.json"
        request_file.write_text(json.dumps(request))
        package_root = str(Path(__file__).resolve().parent.parent)
        status = subprocess.run([sys.executable, "-c", TVM_BUILD_PROCESS, str(request_file), package_root]).returncode
        result_file = request_file.with_name("result.json")
        if status == -signal.SIGKILL:
            raise ToolkitError(f"TVM's build of {final} was killed by SIGKILL (the kernel's out-of-memory killer sends "
                               "it): free memory, or compile on a machine with more, and run it again")
        if status < 0:  # SIGABRT: LLVM or TVM aborted, their message is printed above
            raise ToolkitError(f"TVM's build of {final} was killed by {signal.Signals(-status).name} (its error is "
                               "printed above): please report it with that message")
        if status or not result_file.is_file():
            raise ToolkitError(f"TVM's build of {final} failed (its process ended with status {status}; "
                               "its error is printed above)")
        result = json.loads(result_file.read_text())
    return result["build"], result["peak_rss_mb"]
