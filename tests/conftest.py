"""Shared fixtures: tiny synthetic Qwen3 checkpoints (real tokenizer, random weights) and artifacts built once."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# this process compiles and runs artifacts in any order: TVM with its compiler library, whatever is imported first
# (the runtime-only import of a process that only runs artifacts is tested in a subprocess, test_memory.py)
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "0")

import pytest  # noqa: E402

from toolkit.config import BuildConfig  # noqa: E402

TASKS = ("embedding", "reranker")
SEQ_LENS = {"embedding": (32, 64), "reranker": (64, 128)}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from toolkit.synth import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {task: write_synthetic_checkpoint(root / task, task, "tiny") for task in TASKS}


@pytest.fixture(scope="session")
def outlier_checkpoints(tmp_path_factory):
    """Tiny checkpoints with realistic activation outliers (`toolkit synth --outliers`): what int8 is gated on."""
    from toolkit.synth import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("outlier-checkpoints")
    return {task: write_synthetic_checkpoint(root / task, task, "tiny", outliers=True) for task in TASKS}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


def model_path(artifact):
    """An artifact's model file (ONNX bucket sets keep it in the set's shared graph directory)."""
    from toolkit.artifact import Manifest

    manifest = Manifest.load(artifact, verify=False)
    return manifest.path / manifest.model_file


def copy_artifact(artifact, directory):
    """A copy of `artifact` under `directory`, with its bucket set (the SEQs of an ONNX set share one graph)."""
    import shutil

    shutil.copytree(artifact.parent, directory / artifact.parent.name)
    return directory / artifact.parent.name / artifact.name


def signed(raw_manifest: dict) -> dict:
    """A manifest payload edited by a test, with the digest its writer would give it (so that the check under test,
    not the digest's, sees the edit)."""
    from toolkit.artifact import SELF_DIGEST, payload_sha256

    return {**raw_manifest, SELF_DIGEST: payload_sha256(raw_manifest)}


def build(checkpoints, workspace, task, backends=("onnx",), seq_lens=(32, 64), batch=2, dtype="fp16", **options):
    from toolkit.compile import compile_config

    cfg = BuildConfig(name=f"{task}-{dtype}-b{batch}", task=task, checkpoint=str(checkpoints[task]),
                      seq_lens=seq_lens, batch=batch, backends=backends, dtype=dtype, workspace=workspace, **options)
    return compile_config(cfg, log=lambda m: None)


@pytest.fixture(scope="session")
def onnx_artifacts(checkpoints, workspace):
    """fp16 ONNX artifacts, batch 2: embedding at SEQ 32 and 64; reranker at 64 and 128 (its template alone is ~50
    tokens)."""
    return {task: build(checkpoints, workspace, task, seq_lens=SEQ_LENS[task]) for task in TASKS}


@pytest.fixture(scope="session")
def tokenizers(checkpoints):
    from toolkit.checkpoint import load_tokenizer

    return {task: load_tokenizer(checkpoints[task]) for task in TASKS}


@pytest.fixture(scope="session")
def tvm_artifacts(checkpoints, workspace):
    """fp16 TVM (llvm, host CPU) artifacts, batch 2, one SEQ per task."""
    return {task: build(checkpoints, workspace, task, backends=("tvm",), seq_lens=SEQ_LENS[task][1:])
            for task in TASKS}


def held_out_texts(task: str) -> int:
    """How many real texts a bf16/int8 gate checks with the bundled calibration set (no fixed instruction): the
    distinct bodies of its held-out records (the embedding's query and document each, a query with several passages
    once)."""
    from toolkit.quantize import CalibrationSet
    from toolkit.tasks import TASKS

    return len(set(TASKS[task].calibration_bodies(CalibrationSet.load().holdout)))
