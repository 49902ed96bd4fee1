"""A bucket set on disk, and how a build changes it. A set is the directory of one model's artifacts for one backend
(compile's `WORKSPACE/NAME/BACKEND/`), one per SEQ:

    SET/seqSEQ/              one artifact (its files and manifest: toolkit.artifact)
    SET/graph-DIGEST/        the ONNX graph (model.onnx, model.onnx.data) the SEQs of one ONNX build share: their
                             manifests' `model_file` is `../graph-DIGEST/model.onnx` (`share_graph`); a build of one
                             SEQ keeps its graph in its own directory
    SET/.KIND-PID-RANDOM/    a build's work in progress (`build_dir`): a SEQ's staging directory, a TVM export, a
                             graph on its way; removed by the next build once that process is gone

An artifact is built in a staging directory beside its final place, and the build's artifacts are moved there
(`install`) only once all of them passed validation (or it was explicitly skipped for a CUDA build made without a
GPU): a failed or interrupted compile leaves nothing loadable, and the previous set stays as it was. The SEQs an
earlier build of other weights, dtype or cached instruction left are then removed (`remove_other_builds`), and the
graphs no artifact points at any more (`prune_graphs`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from toolkit.artifact import MANIFEST, Manifest, sha256
from toolkit.errors import ToolkitError

# the directories a build makes beside its set's artifacts (`build_dir`), named after the process that owns them:
# compile's staging directories and TVM exports, `share_graph`'s graph on its way. An older toolkit's names
# have no process id.
BUILD_DIR = re.compile(r"\.(?:seq\d+\.staging|export|graph-staging)-(?:(\d+)-)?\w+")


def build_dir(set_dir: Path, kind: str) -> Path:
    """A new directory `.KIND-PID-RANDOM` in `set_dir` for this build: a later build removes it once this process is
    gone (`remove_stale_staging`). Readable like any compile output (mkdtemp makes it private)."""
    path = Path(tempfile.mkdtemp(prefix=f".{kind}-{os.getpid()}-", dir=set_dir))
    path.chmod(0o755)
    return path


def remove_stale_staging(set_dir: Path, log) -> None:
    """Remove the directories (`build_dir`'s) that builds left in `set_dir` when killed before their cleanup ran
    (SIGKILL, a power cut): those whose build process is gone, or whose name has no process id."""
    for stale in sorted(set_dir.glob(".*")):
        if not (name := BUILD_DIR.fullmatch(stale.name)):
            continue
        if name[1] and Path(f"/proc/{name[1]}").exists():
            continue  # a build running now
        shutil.rmtree(stale, ignore_errors=True)
        log(f"removed {stale}: left by an interrupted build")
    prune_graphs(set_dir)  # the graphs only those staging directories pointed at


def share_graph(out: Path, model_file: str) -> str:
    """Move the ONNX model files out of `out` (a staging artifact) into its set's graph directory, named by their
    digest, which every SEQ of the build points at; returns the model file's path relative to `out`. One copy on disk,
    hashed once per process at load, where a copy per SEQ took 1.2 GB each at 0.6B, 16 GB at 8B (the onnx package
    refuses external data that is a hard or symbolic link or lies outside the model file's directory, and ONNX Runtime
    the last two: the graph and its data move together)."""
    set_dir, names = out.parent, (model_file, f"{model_file}.data")
    moving = build_dir(set_dir, "graph-staging")
    try:
        for name in names:
            (out / name).rename(moving / name)
        digests = [sha256(moving / name) for name in names]  # after the move: a file's rename changes its ctime
        graph_dir = set_dir / f"graph-{hashlib.sha256(''.join(digests).encode()).hexdigest()[:16]}"
        if all((graph_dir / n).is_file() and sha256(graph_dir / n) == d for n, d in zip(names, digests)):
            shutil.rmtree(moving)  # the same graph from an earlier build: keep that one
        else:
            shutil.rmtree(graph_dir, ignore_errors=True)  # none, or damaged
            moving.rename(graph_dir)
    except BaseException:
        shutil.rmtree(moving, ignore_errors=True)
        raise
    return f"../{graph_dir.name}/{model_file}"


def prune_graphs(set_dir: Path) -> None:
    """Remove the shared graph directories of `set_dir` that no artifact there points at any more (replaced by a
    recompile, or left by a build that failed validation). Staging artifacts of a build in progress count; with a
    manifest it cannot read, it removes nothing."""
    try:
        used = {Path(Manifest.load(m.parent, verify=False).model_file).parent.name
                for m in set_dir.glob(f"*/{MANIFEST}")}
    except (ToolkitError, OSError):
        return
    for graph_dir in set_dir.glob("graph-*"):
        if graph_dir.name not in used:
            shutil.rmtree(graph_dir, ignore_errors=True)


def remove_other_builds(set_dir: Path, built: list[Path], log) -> None:
    """Remove the SEQ artifacts of `set_dir` left by earlier builds whose inputs or weights differ from this build's
    (`Manifest.set_key`: another checkpoint, dtype or cached instruction): the runtime would send the inputs of their
    lengths to other weights. Those of the same kind stay (a set can grow a SEQ at a time)."""
    key = Manifest.load(built[0], verify=False).set_key
    for manifest_file in set_dir.glob(f"seq*/{MANIFEST}"):
        if manifest_file.parent in built:
            continue
        try:
            other = Manifest.load(manifest_file.parent, verify=False).set_key
        except ToolkitError:  # not readable: not an artifact any runner would load
            other = None
        if other != key:
            shutil.rmtree(manifest_file.parent, ignore_errors=True)
            log(f"removed {manifest_file.parent}: an earlier build's, of other weights, dtype or cached instruction")


def install(staging: Path, final: Path) -> None:
    """Move a validated staging directory to its final place, replacing any previous artifact there in one step
    (`exchange`: no moment without an artifact at `final`)."""
    if final.exists() and exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous artifact
        return
    old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the C library or the file system
    cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_cwd, rename_exchange = -100, 2
    return libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0
