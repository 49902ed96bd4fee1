"""Validation: an artifact against the unpatched Hugging Face model in fp32, on left-padded edge cases.

Used by compile (`validate`, before an artifact is moved into place), by `toolkit validate` (`revalidate`), by int8
quantization (its preflight checks the edge cases, `validation_rows`) and by the tests. The measure and its tolerances
are the task's (`Task.agreement`, `Task.tolerances`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.artifact import Manifest
from toolkit.backends import Backend, LayerwiseReference, load_backend
from toolkit.checkpoint import check_task, load_tokenizer, read_hf_config, resolve_checkpoint
from toolkit.config import LOW_PRECISION
from toolkit.errors import ToolkitError
from toolkit.memory import return_freed_memory
from toolkit.tasks import Task, get_task
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

if TYPE_CHECKING:
    from toolkit.quantize import CalibrationSet

# Tokens (rows x padded length) per reference pass: the fp32 activations of one layer stay under ~0.5 GB at 8B
REFERENCE_TOKENS = 2048
VALIDATION_TEXT = ("The quick brown fox jumps over the lazy dog near the riverbank. "
                   "敏捷的棕色狐狸跳过了河边的懒狗。 Qwen3 embeddings, ranked & compiled: 1,024 dims!")


def validation_rows(task: Task, tokenizer, seq_len: int, prefix: list[int] = ()) -> list[list[int]]:
    """Left-padding edge cases of `task`'s inputs: no body, a typical sentence, and exactly SEQ tokens; each after
    `prefix` (the prompt start every input of the artifact has, which it caches: `Manifest.cached_prefix`) and ending
    with the task's prompt suffix, so the last position is the one the task reads."""
    suffix = task.prompt(tokenizer).suffix
    room = seq_len - len(prefix) - len(suffix)
    typical = tokenizer.encode_one(VALIDATION_TEXT)
    long = (typical * math.ceil(room / len(typical)))[:room]
    return [[*prefix, *body, *suffix] for body in ([], typical[:room], long)]


def measure(manifest: Manifest, reference: Backend, tokenizer, texts: list[list[int]] = ()) -> dict:
    """Run the artifact of `manifest` and the reference on the validation rows (and on `texts`, token rows of real
    text); the task's agreement, tolerance and verdict. The reference runs first, and the artifact is loaded after it:
    the two are never resident together (0.6B int8, from a 498 MB process: a 954 MB peak, 1,111 MB with both)."""
    task = get_task(manifest.task)
    prompt_start = task.prompt_start(tokenizer, manifest.instruction)  # what every input starts with
    rows = validation_rows(task, tokenizer, manifest.seq_len, prompt_start) + list(texts)
    refs = reference_outputs(reference, rows)
    broken = int((~np.isfinite(refs.reshape(len(rows), -1))).any(axis=1).sum())
    if broken:  # the checkpoint, not the artifact: nothing to compare against
        raise ToolkitError(f"the Hugging Face model itself gives non-finite outputs on {broken} of {len(rows)} "
                           "validation rows: its checkpoint's weights hold NaN or Inf; re-download or rebuild the "
                           "checkpoint")
    return_freed_memory()  # the reference's freed layers and activations, before the artifact's weights arrive
    # (0.6B int8: the process held 828 MB at the load, 902 MB untrimmed)
    backend = load_backend(manifest)
    outs = []
    try:
        for start in range(0, len(rows), backend.batch):
            chunk = rows[start:start + backend.batch]
            ids, mask = left_pad(chunk, backend.seq_len, ENDOFTEXT_ID)
            outs.append(backend.run(ids, mask)[: len(chunk)])
    finally:
        backend.close()  # a build validates SEQ after SEQ: nothing of one stays under the next (TVM's buffer pool)
    stats = task.agreement(task.finish(refs), task.finish(np.concatenate(outs)))
    stats["lengths"] = [len(r) for r in rows[:3]]
    stats["real_texts"] = len(texts)
    return task.judge(stats, manifest.dtype, sample_budget(stats["items"]) if texts else 1.0)


def sample_budget(items: int) -> float:
    """The share of the error budget a gate on real texts may use when it checked `items` of them: 1 - 1/sqrt(items).
    Its maximum is of a sample, and traffic holds more: on the tiny outlier reranker int8 without smoothing, rounded
    to nearest, gave max |dP(yes)| 0.0190 on the gate's 27 items then, 0.0221 on 200 MS MARCO pairs (`toolkit eval`
    failed what the gate had installed); with the bundled held-out texts (75 items) the gate allows 0.0177."""
    return 1 - 1 / math.sqrt(items)


def validate(manifest: Manifest, reference: Backend, tokenizer, holdout: CalibrationSet | None = None,
             instruction: str | None = None) -> dict:
    """The artifact's validation record, as its build and `toolkit validate` both make it: `measure` on the edge
    cases and, given a `holdout` set (bf16 and int8 builds), on its held-out texts carrying the build's `instruction`,
    which the record keeps (an uncached one is recorded nowhere else)."""
    task = get_task(manifest.task)
    texts = holdout.rows(task, tokenizer, "holdout", manifest.seq_len, instruction) if holdout else []
    stats = measure(manifest, reference, tokenizer, texts)
    if texts:
        stats["real_texts_instruction"] = instruction
        stats["real_texts_file"] = str(holdout.path)  # the build's, or the bundled set `toolkit validate` fell back on
    return stats


def revalidate(artifact: str | Path, checkpoint: str | None = None) -> dict:
    """Re-run an artifact's validation as its build did (e.g. on the GPU host for a CUDA build) and record it in its
    manifest. bf16 and int8 artifacts are also checked on held-out real texts: those of the calibration file their
    build recorded where it is here, else the bundled set's (warned, as a file changed since the build is). A
    checkpoint of the other task is refused before anything runs; another checkpoint than the build's is warned
    about (a failure against it says little about the artifact)."""
    from toolkit.quantize import CalibrationSet  # not at the top: quantize imports this module

    manifest = Manifest.load(artifact)
    task = get_task(manifest.task)
    reference_dir = resolve_checkpoint(checkpoint or manifest.reference_checkpoint())
    check_task(task, reference_dir, read_hf_config(reference_dir),
               f"{manifest.path} is an artifact of the {task.name} task",
               lambda other: f"validate a {other} artifact with it", _warn)
    if manifest.built_from_another(reference_dir):
        built = manifest.model.resolved
        if manifest.built_at(reference_dir):
            _warn(f"the weights at {built} changed since {manifest.path} was built (their SHA-256 differs from the "
                  "build's): a failure would be theirs, and it replaces the record; recompile the set from them")
        else:
            _warn(f"validating against {reference_dir}, but {manifest.path} was built from {built}: a failure would "
                  f"be the other weights', and it replaces the record; pass --checkpoint {built}, or leave it out")
    tokenizer = load_tokenizer(manifest.path / "tokenizer")
    holdout = None
    if manifest.dtype in LOW_PRECISION:
        recorded = manifest.calibration_file
        present = bool(recorded) and Path(recorded).is_file()
        if recorded and not present:
            _warn(f"the calibration file the build recorded, {recorded}, is not here: the held-out texts checked are "
                  "the bundled set's, not the build's")
        holdout = CalibrationSet.load(recorded if present else None)
        if present and holdout.sha256 != manifest.calibration_sha256:
            _warn(f"{recorded} changed since the build (its SHA-256 differs from the manifest's): its held-out texts "
                  "are not the ones the build checked")
    reference = LayerwiseReference(reference_dir, task, progress=True)
    manifest.validation = validate(manifest, reference, tokenizer, holdout,
                                   task.fixed_instruction(manifest.validated_instruction))  # the build's
    manifest.validation["reference"] = str(reference_dir.resolve())  # a failure against other weights says so
    manifest.save(manifest.path, hash_files=False)
    return manifest.validation


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def reference_outputs(reference: Backend, rows: list[list[int]]) -> np.ndarray:
    """The reference's raw outputs for `rows`, in their order. Rows run shortest first, as many per pass as fit
    REFERENCE_TOKENS padded to the pass's longest, whatever the artifact's batch: a layer-by-layer reference reads
    every layer from the checkpoint once per pass (4B, batch 1: 51 rows took 20 min, one pass per row)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list = [None] * len(rows)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(rows[order[end]]) <= REFERENCE_TOKENS:
            end += 1
        chunk = order[start:end]
        ids, mask = left_pad([rows[i] for i in chunk], len(rows[chunk[-1]]), ENDOFTEXT_ID)
        for i, output in zip(chunk, reference.run(ids, mask)):
            outputs[i] = output
        start = end
    return np.stack(outputs)
