"""The artifact directory and its manifest: the contract between compile and everything that runs artifacts.

    ARTIFACT/manifest.json      task, model, seq_len, batch, dtype, backend, target, inputs, outputs,
                                files (sha256), tools (versions), validation
    ARTIFACT/model.onnx[.data]  (onnx backend) or model.so + params.npz (tvm backend)
    ARTIFACT/tokenizer/         the checkpoint's tokenizer files: an artifact runs without the checkpoint
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from .errors import ToolkitError

MANIFEST = "manifest.json"
FORMAT = "qwen3-deploy-artifact/1"
REQUIRED_KEYS = ("format", "task", "seq_len", "batch", "dtype", "backend", "target", "inputs", "outputs", "files")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "apache-tvm", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def io_spec(task: str, seq_len: int, batch: int, hidden_size: int) -> tuple[list, list]:
    inputs = [{"name": n, "shape": [batch, seq_len], "dtype": "int64"} for n in ("input_ids", "attention_mask")]
    out = ({"name": "last_hidden", "shape": [batch, hidden_size], "dtype": "float32"} if task == "embedding" else
           {"name": "yes_no_logits", "shape": [batch, 2], "dtype": "float32"})
    return inputs, [out]


def write_manifest(artifact_dir: Path, manifest: dict) -> dict:
    """Hash every file in the directory (except the manifest itself) and write manifest.json."""
    files = sorted(p for p in artifact_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, **manifest,
                "files": {str(p.relative_to(artifact_dir)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                          for p in files},
                "tools": tool_versions()}
    (artifact_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def update_manifest(artifact_dir: Path, **fields) -> dict:
    """Add fields (e.g. validation numbers) without rehashing: the manifest is not among the hashed files."""
    manifest = read_manifest(artifact_dir)
    manifest.update(fields)
    (artifact_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(artifact_dir: str | Path) -> dict:
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{artifact_dir} is not an artifact (no {MANIFEST}); build one with `toolkit compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolkitError(f"{path} is corrupt ({e}); recompile the artifact") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing or manifest.get("format") != FORMAT:
        raise ToolkitError(f"{path} is not a {FORMAT} manifest (missing {missing}); recompile the artifact")
    return manifest


def verify_files(artifact_dir: str | Path, manifest: dict) -> list[str]:
    """Return a list of problems (missing / size / hash mismatches); empty when the artifact is intact."""
    artifact_dir = Path(artifact_dir)
    problems = []
    for rel, info in manifest["files"].items():
        p = artifact_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} != {info['bytes']}")
        elif sha256(p) != info["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def load_manifest(artifact_dir: str | Path, verify: bool = True) -> dict:
    manifest = read_manifest(artifact_dir)
    if verify:
        problems = verify_files(artifact_dir, manifest)
        if problems:
            raise ToolkitError(f"artifact {artifact_dir} does not match its manifest ({'; '.join(problems[:3])}); "
                               "it was modified or corrupted: recompile it with `toolkit compile`")
    return manifest


def source_checkpoint(artifact_dir: str | Path) -> str:
    """The checkpoint an artifact was built from (the torch reference for demo/eval): the resolved local directory if
    it still exists, else what the build config named (e.g. a hub id)."""
    model = read_manifest(artifact_dir).get("model", {})
    resolved = model.get("resolved")
    return resolved if resolved and Path(resolved).exists() else model.get("checkpoint") or ""


def open_backend(artifact_dir: str | Path, threads: int | None = None, device_id: int = 0, verify: bool = True):
    """Load an artifact with the backend its manifest names."""
    from .backends import OnnxRuntimeBackend

    artifact_dir = Path(artifact_dir)
    m = load_manifest(artifact_dir, verify=verify)
    if (m.get("validation") or {}).get("passed") is False:
        raise ToolkitError(f"artifact {artifact_dir} failed validation against the Hugging Face model "
                           f"({m['validation']}); do not deploy it: fix the cause and recompile")
    device = m["target"]["device"]
    if m["backend"] == "onnxruntime":
        return OnnxRuntimeBackend(artifact_dir / m["model_file"], m["task"], m["seq_len"], m["batch"], threads,
                                  device, device_id)
    if m["backend"] == "tvm":
        from .tvm_backend import TvmBackend

        return TvmBackend(artifact_dir, m, threads, device_id)
    raise ToolkitError(f"artifact {artifact_dir} names unknown backend {m['backend']!r}")
