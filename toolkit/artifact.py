"""The artifact directory and its typed manifest: the contract between compile and everything that runs artifacts.

    ARTIFACT/manifest.json      `Manifest`: task, model, seq_len, batch, dtype, backend, target, inputs, outputs,
                                cached prompt prefix, files (sha256), tools (versions), validation, build; and the
                                sha256 of all that (`manifest_sha256`): a hand edit is refused like a changed file
    ARTIFACT/model.onnx[.data]  (onnx backend) or model.so + params.npz (tvm backend). The ONNX SEQs of one build are
                                one graph with symbolic axes, stored once in their bucket set: `model_file` is then
                                `../graph-DIGEST/model.onnx` (a set's layout: toolkit.artifact_set)
    ARTIFACT/tokenizer/         the checkpoint's tokenizer files: an artifact runs without the checkpoint

`Manifest.save` is the only writer of manifest.json. This module depends on nothing above it in the pipeline (only
on `toolkit.tasks`: the task names, and each task's line for a failed validation record, `Task.format_agreement`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.tasks import TASKS

MANIFEST = "manifest.json"
MAX_SETS_NAMED = 5  # a directory of many sets (/tmp) is refused naming this many
FORMAT = "qwen3-deploy-artifact/5"
BACKENDS = ("onnx", "tvm")  # one name per backend, everywhere: configs, CLI, manifests, directories
MODEL_FILE_SUFFIX = {"onnx": ".onnx", "tvm": ".so"}  # what each backend loads (an ONNX graph, a TVM library)
DEVICES = ("cpu", "cuda")


SELF_DIGEST = "manifest_sha256"  # the key of the manifest's digest of its other keys


def payload_sha256(payload: dict) -> str:
    """The digest of a manifest's JSON payload (all keys but its own digest), independent of key order and indent."""
    body = {k: v for k, v in payload.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_digests: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime) → digest


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 4 MiB chunks; once per process for a file and its hard links (the weights of a
    TVM bucket set's SEQs are one file)."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def weights_sha256(checkpoint_dir: Path) -> str:
    """One digest of a checkpoint directory's configuration and weight files (their names and bytes): what tells
    two checkpoints' weights apart, wherever they lie (a directory re-saved in place holds other weights)."""
    files = sorted({p for pattern in WEIGHT_FILES for p in Path(checkpoint_dir).glob(pattern) if p.is_file()})
    return hashlib.sha256("".join(f"{p.name} {sha256(p)}\n" for p in files).encode()).hexdigest()


def in_shared_graph(relative: str) -> bool:
    """Whether a path of a manifest (`files` key, `model_file`) lies in its bucket set's shared graph directory
    (`../graph-DIGEST/`, see artifact_set.share_graph) rather than in the artifact's own directory."""
    return relative.startswith("../")


def tool_versions() -> dict:
    """Versions of the packages an artifact's behaviour depends on."""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "apache-tvm", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class ModelSource:
    """The checkpoint an artifact was built from."""

    checkpoint: str  # as the build config named it (hub id or path)
    resolved: str  # the local directory it resolved to
    weights_sha256: str  # its configuration's and weights' digest (`weights_sha256`): a path can hold other weights
    model_type: str
    synthetic: bool
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int


@dataclass(frozen=True)
class Target:
    """Where the artifact runs: `device` cpu|cuda; for TVM also the exact compile target and, on CPU, the instruction
    set extensions of the CPU it was built on (`host.isa_flags`), which a host must have to run it."""

    device: str
    tvm_target: dict | None = None
    cpu_flags: list[str] | None = None


@dataclass
class Manifest:
    """manifest.json as a type. `path` (the artifact directory) is set by `load`/`save` and not serialised."""

    name: str
    task: str
    seq_len: int
    batch: int
    dtype: str
    backend: str
    target: Target
    model: ModelSource
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model_file: str
    precision: dict
    # the prompt prefix whose keys and values the graph holds: every row starts with it, padded after it
    # (`text.split_cached_prefix`, which the backends apply to left-padded rows)
    cached_prefix: list[int] = field(default_factory=list)
    # the instruction whose tokens end `cached_prefix` (a reranker's, or an embedding set's for queries): every input
    # carries it (None: any instruction)
    instruction: str | None = None
    backend_details: dict = field(default_factory=dict)  # tvm: params_file, primfuncs, ...
    validation: dict | None = None  # None: not validated (never loadable); {"skipped": ...}: CUDA without a GPU
    build: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    format: str = FORMAT
    path: Path | None = field(default=None, compare=False, repr=False)

    # ---- writing: the only writer ----------------------------------------------------------------------------------
    def save(self, directory: str | Path, hash_files: bool = True) -> "Manifest":
        """Write manifest.json into `directory`. With `hash_files`, record the sha256 and size of every other file
        first (once, after the files are written); without, keep the recorded hashes (e.g. adding validation)."""
        directory = Path(directory)
        if hash_files:
            self.files = {os.path.relpath(p, directory): {"sha256": sha256(p), "bytes": p.stat().st_size}
                          for p in self.file_paths(directory)}
            self.tools = tool_versions()
        payload = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "path"}))
        payload[SELF_DIGEST] = payload_sha256(payload)  # of the JSON values, as `load` reads them back
        partial = directory / f".{MANIFEST}.partial"  # replaced in one step: an interrupted save keeps the old one
        partial.write_text(json.dumps(payload, indent=2))
        os.replace(partial, directory / MANIFEST)
        self.path = directory
        return self

    # ---- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> "Manifest":
        """Read and type-check manifest.json; with `verify`, also check every file's size and sha256."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            inside = sorted(p.parent for p in directory.glob(f"*/{MANIFEST}") if not p.parent.name.startswith("."))
            if inside:
                raise ToolkitError(f"{directory} is an artifact set, not one artifact; pass one of its SEQ "
                                   f"directories, e.g. {inside[0]}")
            raise ToolkitError(f"{directory} is not an artifact (no {MANIFEST}); build one with `toolkit compile`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ToolkitError(f"{path} is a {raw.get('format')!r} manifest and this toolkit reads {FORMAT!r} ones "
                                   "(another version of the toolkit built it); recompile the artifact with "
                                   "`toolkit compile`")
            # before the fields: an edited `validation` would otherwise make a failed artifact loadable
            if raw.pop(SELF_DIGEST, None) != payload_sha256(raw):
                raise ToolkitError(f"{path} was edited after the build (its {SELF_DIGEST} does not match its "
                                   "contents); `toolkit compile` writes it and `toolkit validate` updates it: restore "
                                   "the file or recompile the artifact")
            manifest = cls(**{**raw, "target": Target(**raw["target"]), "model": ModelSource(**raw["model"]),
                              "inputs": [TensorSpec(**t) for t in raw["inputs"]],
                              "outputs": [TensorSpec(**t) for t in raw["outputs"]]})
            manifest.check_fields()
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise ToolkitError(f"{path} is not a valid {FORMAT} manifest ({type(e).__name__}: {e}); "
                               "recompile the artifact with `toolkit compile`") from None
        manifest.path = directory
        return manifest.verify() if verify else manifest

    def verify(self, under: str = "") -> "Manifest":
        """Raise ToolkitError unless the recorded files (those whose path starts with `under` only, e.g.
        "tokenizer/") are intact."""
        problems = self.verify_files(under)
        if problems:
            raise ToolkitError(f"artifact {self.path} does not match its manifest ({'; '.join(problems[:3])}); "
                               "it was modified or corrupted: recompile it with `toolkit compile`")
        return self

    def file_paths(self, directory: Path) -> list[Path]:
        """The artifact's files: those in its directory and, where the model file lies in a bucket set's shared graph
        directory (`../graph-DIGEST/`), that directory's."""
        shared = sorted((directory / self.model_file).parent.iterdir()) if in_shared_graph(self.model_file) else []
        return [p for p in sorted(directory.rglob("*")) + shared if p.is_file() and p.name != MANIFEST]

    def check_fields(self) -> None:
        """Raise ValueError when a field has a value no writer produces."""
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}")
        if self.backend not in BACKENDS or self.target.device not in DEVICES:
            raise ValueError(f"backend {self.backend!r} / device {self.target.device!r}")
        if not isinstance(self.model_file, str) or not self.model_file.endswith(MODEL_FILE_SUFFIX[self.backend]):
            raise ValueError(f"model file {self.model_file!r} is not a {self.backend} model")
        if not (isinstance(self.seq_len, int) and self.seq_len > 0 and isinstance(self.batch, int) and self.batch > 0):
            raise ValueError(f"seq_len {self.seq_len!r} / batch {self.batch!r}")
        if not isinstance(self.files, dict) or not self.files:
            raise ValueError("no files recorded")
        for name, info in self.files.items():
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                    or not isinstance(info.get("bytes"), int):
                raise ValueError(f"file {name!r} recorded as {info!r:.80}, not its sha256 and bytes")

    def verify_files(self, under: str = "") -> list[str]:
        """Problems (missing / size / hash mismatches) of the files whose path starts with `under`; empty when they
        are intact."""
        problems = []
        for rel, info in self.files.items():
            if not rel.startswith(under):
                continue
            p = self.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing" + (" (a file of the bucket set's shared graph: copy or move the "
                                                     "whole set directory, not one SEQ)" if in_shared_graph(rel)
                                                     else ""))
            elif p.stat().st_size != info["bytes"]:
                problems.append(f"{rel}: size {p.stat().st_size} != {info['bytes']}")
            elif sha256(p) != info["sha256"]:
                problems.append(f"{rel}: sha256 mismatch")
        return problems

    def deployment_problem(self) -> str | None:
        """Why this artifact must not be run, or None. Only artifacts whose validation passed (or was explicitly
        skipped for a CUDA build made without a GPU) are runnable."""
        v = self.validation
        if not v:
            return (f"artifact {self.path} has no validation result: its compile did not finish; recompile it with "
                    "`toolkit compile`")
        if v.get("passed") is False:
            against = f" {v['reference']}" if v.get("reference") else ""
            return (f"artifact {self.path} failed validation against the Hugging Face model{against} "
                    f"({TASKS[self.task].format_agreement(v)}; tolerance {v.get('tolerance')}); do not deploy it: "
                    "validate it against its own checkpoint (`toolkit validate`), or fix the cause and recompile")
        if v.get("passed") is None and not v.get("skipped"):
            return f"artifact {self.path} has an incomplete validation record; recompile it"
        return None

    def require_deployable(self) -> "Manifest":
        """Raise ToolkitError unless the artifact may be run."""
        problem = self.deployment_problem()
        if problem:
            raise ToolkitError(problem)
        return self

    @property
    def kernels(self) -> str:
        """Its weight dtype and, for a TVM build with AMX kernels, their kinds: `fp16 (AMX bf16x3)` (run labels)."""
        return f"{self.dtype} (AMX {', '.join(self.amx_kernels)})" if self.amx_kernels else self.dtype

    # ---- fields of the records (written by compile, quantize, validation) that other modules read ---------------
    @property
    def amx_kernels(self) -> list[str]:
        """TVM on CPU: the kinds of its linear-layer kernels that run on AMX tiles (`tvm_amx.KINDS`); empty: none."""
        return self.backend_details.get("amx_kernels") or []

    @property
    def params_file(self) -> str | None:
        """TVM: its weights file, relative to the artifact directory; None for ONNX."""
        return self.backend_details.get("params_file")

    @property
    def params_sha256(self) -> str | None:
        """TVM: its weights file's digest (the SEQs of a set that share weights share it); None for ONNX."""
        return self.backend_details.get("params_sha256")

    @property
    def quantization(self) -> dict:
        """An int8 artifact's quantization record (`quantize.QuantizationPlan.describe`); empty for other dtypes."""
        return self.precision.get("quantization") or {}

    @property
    def weight_type(self) -> str | None:
        """int8: how its linear weights are stored, "int8" or "uint8" (around zero point 128)."""
        return self.quantization.get("weight_type")

    @property
    def calibration_file(self) -> str | None:
        """int8: the calibration file its build read (None for other dtypes)."""
        return self.quantization.get("calibration", {}).get("file")

    @property
    def calibration_sha256(self) -> str | None:
        """int8: the SHA-256 of that file's bytes as the build read them (None for other dtypes)."""
        return self.quantization.get("calibration", {}).get("sha256")

    @property
    def validated_instruction(self) -> str | None:
        """The instruction the real texts of its validation carried: one its build fixed without caching it (recorded
        in its validation), else its cached one."""
        return (self.validation or {}).get("real_texts_instruction", self.instruction)

    @property
    def set_key(self) -> tuple:
        """What the artifacts of one bucket set share: the task, backend, dtype and cached instruction (the inputs
        they take) and the weights (their digest: the same checkpoint moved is the same set; re-saved in place, not)."""
        return self.task, self.backend, self.dtype, self.instruction, self.model.weights_sha256

    @property
    def size_bytes(self) -> int:
        """Bytes of all its files (weights dominate; a shared graph counted whole)."""
        return sum(f["bytes"] for f in self.files.values())

    def reference_checkpoint(self) -> str:
        """The checkpoint to compare against (demo/eval): the resolved local directory if it still exists, else what
        the build config named if that was a hub id (a build from a local directory that is gone is an error: its name
        would be taken for a hub id)."""
        resolved = self.model.resolved
        if resolved and Path(resolved).exists():
            return resolved
        if resolved and "snapshots" not in Path(resolved).parts:  # not the hub cache's copy: a local directory
            raise ToolkitError(f"{self.path} was built from the checkpoint {resolved}, which is gone; pass the "
                               "directory it moved to (the same weights) with --checkpoint")
        return self.model.checkpoint

    def built_at(self, checkpoint: str | Path) -> bool:
        """Whether `checkpoint` is the directory this artifact was built from, whatever its weights are now."""
        return Path(checkpoint).resolve() == Path(self.model.resolved).resolve()

    def built_from_another(self, checkpoint: str | Path) -> bool:
        """Whether the local checkpoint directory `checkpoint` holds other weights than this artifact was built from
        (by their digest: another path with the same weights is the same checkpoint, a path re-saved since is not)."""
        return weights_sha256(Path(checkpoint)) != self.model.weights_sha256

    def parity_failure_hint(self, checkpoint: str, named: bool) -> str:
        """The likely cause of a parity failure against the torch `checkpoint`: another checkpoint than the set was
        built from (`named`: the user passed it), that checkpoint re-saved with other weights since the build, or,
        where torch ran the build's weights, the artifact itself on these inputs."""
        if not Path(checkpoint).is_dir():  # a hub id: its files are the hub cache's, not hashed here
            return f"if {checkpoint} changed since the set was built, recompile the set from it"
        if not self.built_from_another(checkpoint):
            return (f"torch ran the weights the set was built from (the same SHA-256): the artifact itself is off on "
                    f"these inputs; its validation: `toolkit inspect {self.path}`")
        if named and not self.built_at(checkpoint):
            built = self.model.resolved
            return f"torch ran {checkpoint}, but the set was built from {built}: pass --checkpoint {built}"
        return (f"the weights at {checkpoint} changed since the set was built (their SHA-256 differs from the "
                "build's): recompile the set from them")


def format_quantization(q: dict) -> str:
    """An int8 artifact's quantization record in one line."""
    worst = max(q["worst_linear_errors"].values(), default=0.0)
    preflight = q["preflight"]  # None: turned off
    checked = (f", whole model in fake int8 on them: {preflight['budget_used']:.0%} of the gate's error budget "
               f"({preflight['rounds']} round(s))" if preflight else "")
    rounding = q["weight_rounding"]
    return (f"SmoothQuant alpha {q['smooth_alpha']}, {rounding} weight rounding, {len(q['keep_fp32'])} linear layers "
            f"kept out of int8, worst int8 layer error {worst:.4f}, calibration "
            f"{q['calibration']['calibration_records']} records"
            f"{checked} + {q['calibration']['holdout_records']} held out")


def format_manifest(m: Manifest) -> str:
    """The manifest as an aligned, readable summary (`toolkit inspect`)."""
    io = lambda specs: ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in specs)  # noqa: E731
    v = m.validation or {}
    target = m.target.device + (f" ({json.dumps(m.target.tvm_target)})" if m.target.tvm_target else "")
    lines = [
        f"name        {m.name}",
        f"task        {m.task}",
        f"model       {m.model.checkpoint}" + (" (synthetic)" if m.model.synthetic else "")
        + f", weights SHA-256 {m.model.weights_sha256[:16]}",
        f"backend     {m.backend}  target {target}",
        f"shape       batch {m.batch}{f' (any 1..{m.batch} rows)' if m.batch > 1 else ''} x seq "
        f"{m.seq_len}   dtype {m.kernels}",
        f"model file  {m.model_file}" + (" (the bucket set's shared graph)" if in_shared_graph(m.model_file) else ""),
        "precision   " + "; ".join(f"{k}: {m.precision[k]}" for k in ("weights", "compute", "accumulation")),
        *(["int8        " + format_quantization(m.quantization)] if m.quantization else []),
        *([f"cached      the first {len(m.cached_prefix)} prompt tokens (keys and values in the graph)"
           + (f", ending with the instruction {m.instruction!r}: every input carries it" if m.instruction is not None
              else "")] if m.cached_prefix else []),
        f"inputs      {io(m.inputs)}",
        f"outputs     {io(m.outputs)}",
        f"size        {m.size_bytes / 1e6:.1f} MB in {len(m.files)} files",
        "validation  " + (", ".join(f"{k}={v[k]}" for k in v if k != "lengths") or "none"),
        f"build       {json.dumps(m.build)}",
        "tools       " + ", ".join(f"{k} {ver}" for k, ver in m.tools.items()),
    ]
    return "\n".join(lines)


def seq_dir_name(seq_len: int) -> str:
    """The directory of a set's artifact for one SEQ (compile's `WORKSPACE/NAME/BACKEND/seqSEQ`)."""
    return f"seq{seq_len}"


SEQ_DIR = re.compile(r"seq(\d+)")  # `seq_dir_name`'s names


def artifact_dirs(path: Path) -> list[Path]:
    """The artifact directories under `path` (a bucket set, or a workspace holding one), as `find_artifacts` looks
    for them: staging directories of unfinished compiles (dot-prefixed) are not artifacts."""
    return sorted({p.parent for pattern in ("*/", "*/*/", "*/*/*/") for p in path.glob(pattern + MANIFEST)
                   if not any(part.startswith(".") for part in p.relative_to(path).parts)})


def check_seq_dir(directory: Path) -> None:
    """Raise ToolkitError if `directory`, a set's SEQ directory, holds files but no manifest: a damaged artifact,
    which a set loaded without it would leave out (its inputs then refused or run at a larger SEQ). A build never
    leaves one so (it installs an artifact by renaming its staging directory, manifest and all); an empty one is no
    artifact."""
    try:
        damaged = not (directory / MANIFEST).is_file() and any(directory.iterdir())
    except OSError:  # not readable: loading names that
        return
    if damaged:
        raise ToolkitError(f"{directory} holds files but no {MANIFEST}: its SEQ's artifact is damaged; compile it "
                           f"again (compile --seq {SEQ_DIR.fullmatch(directory.name)[1]} rebuilds that SEQ alone, the "
                           "set keeps the others) or the whole set, or remove that directory")


def find_artifacts(path: str | Path) -> list[Manifest]:
    """One artifact directory, or a directory of them (a bucket set: same task, backend and dtype, several SEQs, each
    with its own batch), as manifests sorted by SEQ; also a compile's workspace holding one set (model/backend/SEQ).
    Staging directories of unfinished compiles (dot-prefixed) are not artifacts; a SEQ directory without its manifest
    is refused (`check_seq_dir`). A directory holding several sets is refused naming them, before any of their
    manifests is read (one of another toolkit version's is no reason)."""
    if str(path) == "":  # Path("") is the current directory
        raise ToolkitError("the artifact path is empty; name an artifact directory or a bucket set (e.g. "
                           "workspace/qwen3-embedding-0.6b-fp16/onnx)")
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [Manifest.load(path, verify=False)]
    found = artifact_dirs(path)
    sets = sorted({str(p.parent) for p in found})
    if len(sets) > 1:  # not one set (a workspace of several, a directory such as /tmp): no manifest of theirs is read
        listed = ", ".join(sets[:MAX_SETS_NAMED]) + (f" (and {len(sets) - MAX_SETS_NAMED} more)"
                                                      if len(sets) > MAX_SETS_NAMED else "")
        raise ToolkitError(f"{path} is not a bucket set but holds {len(sets)}; point at one of the sets {listed}")
    for set_dir in {path, *map(Path, sets)}:
        for directory in [set_dir, *set_dir.glob("seq*/")]:
            if SEQ_DIR.fullmatch(directory.name) and directory.is_dir():
                check_seq_dir(directory)
    if not found:
        raise ToolkitError(f"no artifact under {path}; compile one with `toolkit compile` (or `make quickstart`)")
    manifests = [Manifest.load(p, verify=False) for p in found]
    one_set = "compile the set again (a build removes the SEQs other builds left in it)"
    kinds = {m.set_key for m in manifests}
    if len(kinds) > 1:
        raise ToolkitError(f"{path} mixes artifacts of different task/backend/dtype/cached instruction/checkpoint "
                           f"{sorted(kinds, key=str)}; {one_set}")
    seq_lens = [m.seq_len for m in manifests]
    if len(set(seq_lens)) < len(seq_lens):
        raise ToolkitError(f"{path} holds several artifacts for one SEQ ({sorted(seq_lens)}); {one_set}")
    return sorted(manifests, key=lambda m: m.seq_len)
