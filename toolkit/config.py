"""Build configs (YAML), checked strictly on load. One file per model, in the spirit of the reference's build configs:

    name: qwen3-embedding-0.6b-fp16
    task: embedding                      # embedding | reranker
    frontend:
      checkpoint: Qwen/Qwen3-Embedding-0.6B   # hub id or local path
      input_ids: [[512], []]             # reference style: [[SEQ, ...], []]; or `seq: [128, 512]`
      batch: 1
      instruction: TEXT                  # the instruction every input carries, its tokens cached in the graph: the
                                         # reranker's (default: Qwen's web search); an embedding set's queries (a
                                         # set for queries only; default none: documents bare, queries any)
      cache_instruction: true            # false: not cached, inputs may carry any instruction
    backend:
      kind: onnx                         # onnx | tvm (or a list of both; a kind named twice is built once)
      dtype: fp16                        # fp16 | fp32 (weights; compute and accumulation stay fp32) | int8 (W8A8)
                                         # | bf16 (bf16 linear layers, fp32 accumulation; TVM on AVX512-BF16 CPUs)
      quantization:                      # int8 only (another dtype's build warns it is unused); all optional
        calibration: FILE                # (query, document, split) JSONL; default: the bundled real-text set
        smooth_alpha: 0.5                # SmoothQuant migration strength (0 = none)
        weight_rounding: gptq            # gptq (rounding errors compensated on the calibration inputs) | nearest
        max_linear_error: 0.1            # linear layers whose int8 output error exceeds this stay fp32
        preflight: true                  # the whole model in fake int8 first; worst layers fp32 until it has margin
        activation_scales: tensor        # ONNX: tensor (ONNX Runtime's fused DynamicQuantizeMatMul) | row (a scale
                                         # per token: a row's result does not depend on the rows batched with it,
                                         # about 30% slower). TVM's are always per row.
      fp32_linears: bf16x3               # TVM CPU, fp16/fp32 weights: bf16x3 (on CPUs with AMX, each linear layer's
                                         # x·W as three bf16 products on AMX tiles, each within 2^-15 of its size; its
                                         # weights held as two bf16 planes, 4 bytes each) | fma (fp32 FMAs on
                                         # AVX-512; the weights stay in their dtype in memory). No AMX: fma.
      target: cpu                        # cpu | cuda
    workspace: ./workspace

Unknown or mistyped keys at any level are refused with the key's path (a typo must not silently build defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from toolkit.artifact import BACKENDS, DEVICES
from toolkit.errors import ToolkitError, is_integer
from toolkit.tasks import TASKS, check_instruction_text
from toolkit.tokenizer import MAX_CONTEXT

DTYPES = ("fp16", "fp32", "bf16", "int8")
# where each low-precision dtype has kernels (ONNX Runtime has no bf16 MatMul on CPU)
DTYPE_BACKENDS = {"int8": ("onnx", "tvm"), "bf16": ("tvm",)}
LOW_PRECISION = ("bf16", "int8")  # also validated on real texts (int8: texts calibration never saw)
# TVM's bf16 / int8 kernels are x86 CPU instructions: the cpuinfo flag each needs, and what to build without it
TVM_CPU_KERNELS = {"bf16": ("avx512_bf16", "--dtype fp16"), "int8": ("avx512_vnni", "--backend onnx")}
SCHEMA = {"name": str, "task": str, "workspace": str,
          "frontend": {"checkpoint": str, "input_ids": list, "seq": (list, int), "batch": int, "batch_tokens": int,
                       "instruction": str, "cache_instruction": bool},
          "backend": {"kind": (str, list), "dtype": str, "target": str, "fp32_linears": str,
                      "quantization": {"calibration": str, "smooth_alpha": (float, int), "weight_rounding": str,
                                       "max_linear_error": (float, int), "preflight": bool,
                                       "activation_scales": str}}}
# the dtypes each quantization setting changes (the rest ignore it); the calibration file's held-out texts also gate
# bf16
QUANTIZATION_DTYPES = {key: LOW_PRECISION if key == "calibration" else ("int8",)
                       for key in SCHEMA["backend"]["quantization"]}
# the backends each quantization setting changes, where not all: per-token ONNX Runtime scales (TVM's always are)
QUANTIZATION_BACKENDS = {"activation_scales": ("onnx",)}
# the `toolkit compile` option that overrides each field: a bad value it gave is blamed on it, not on the config file
OPTIONS = {"seq_lens": "--seq", "batch": "--batch", "batch_tokens": "--batch-tokens", "backends": "--backend",
           "dtype": "--dtype", "target": "--target", "fp32_linears": "--fp32-linears", "calibration": "--calibration",
           "instruction": "--instruction", "checkpoint": "--checkpoint", "name": "--name"}
ACTIVATION_SCALES = ("tensor", "row")
FP32_LINEARS = ("bf16x3", "fma")
WEIGHT_ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class BuildConfig:
    """What to compile: one model, one task, its sequence lengths, batch, backends, weight dtype and target."""

    name: str
    task: str
    checkpoint: str
    seq_lens: tuple[int, ...]
    batch: int = 1
    batch_tokens: int | None = None  # if set, each SEQ's batch is batch_tokens // SEQ (a token budget, as TEI's)
    instruction: str | None = None  # the instruction every input carries (None: `Task.fixed_instruction`)
    cache_instruction: bool = True  # cache its tokens after the prompt prefix (inputs must then carry it)
    backends: tuple[str, ...] = ("onnx",)
    dtype: str = "fp16"
    target: str = "cpu"
    calibration: str | None = None  # int8: calibration JSONL (None: the bundled set)
    smooth_alpha: float = 0.5
    weight_rounding: str = "gptq"  # int8: GPTQ onto the int8 grid (quantize.gptq_round), or round to nearest
    max_linear_error: float = 0.1
    preflight: bool = True  # int8: check the whole model in fake int8 before compiling (quantize.plan_int8)
    activation_scales: str = "tensor"  # int8 on ONNX Runtime: per "tensor" (its fused op), or per "row"
    fp32_linears: str = "bf16x3"  # TVM CPU fp16/fp32 linear layers: AMX bf16x3 where the CPU has AMX, or "fma"
    workspace: Path = field(default_factory=lambda: Path("workspace"))
    source: Path | None = None  # the YAML file it came from

    def with_overrides(self, **overrides) -> "BuildConfig":
        """Apply CLI overrides (None means "keep the config's value") and check the result."""
        given = {k: v for k, v in overrides.items() if v is not None}
        cfg = replace(self, **given)
        cfg.check(overridden=frozenset(given))
        return cfg

    def refuse_unused(self, calibration: bool = False, fp32_linears: bool = False) -> None:
        """Raise ToolkitError where an option the command line gave (`--calibration`, `--fp32-linears`) would change
        nothing in this build."""
        if calibration and self.dtype not in LOW_PRECISION:
            raise ToolkitError(f"--calibration is for --dtype {' or '.join(LOW_PRECISION)} builds (a {self.dtype} "
                               "build is validated on the edge cases alone): leave it out, or add --dtype int8")
        if fp32_linears and (unused := self.fp32_linears_unused()):
            raise ToolkitError(f"--fp32-linears chooses how TVM computes fp16/fp32-weight linear layers on CPU, and "
                               f"{unused}")

    def unused_quantization(self) -> str | None:
        """A warning naming the quantization settings (those changed from their defaults) that this build's dtype
        ignores, or None. Not refused as `refuse_unused` refuses `--calibration`: a config's block for int8 builds
        stays right when the same config builds another dtype (`--dtype` overrides its own)."""
        defaults = {f.name: f.default for f in fields(self)}
        changed = [key for key in QUANTIZATION_DTYPES if getattr(self, key) != defaults[key]]
        where = f" in {self.source}" if self.source else ""
        unused = [f"quantization.{key}" for key in changed if self.dtype not in QUANTIZATION_DTYPES[key]]
        if unused:
            return (f"{', '.join(unused)}{where}: unused by a {self.dtype} build (the quantization block applies to "
                    "--dtype int8 builds, its calibration also to bf16)")
        unused = {f"quantization.{key}": QUANTIZATION_BACKENDS[key] for key in changed
                  if key in QUANTIZATION_BACKENDS and not set(self.backends) & set(QUANTIZATION_BACKENDS[key])}
        if unused:
            return (f"{', '.join(unused)}{where}: unused by a {'+'.join(self.backends)} build (it applies to "
                    f"{' and '.join(sorted({b for bs in unused.values() for b in bs}))} artifacts)")
        return None

    def fp32_linears_unused(self) -> str | None:
        """Why `fp32_linears` changes nothing in this build (the rest of `refuse_unused`'s refusal), or None."""
        if "tvm" not in self.backends:
            return "ONNX Runtime computes them in float32 alone: leave it out, or add --backend tvm"
        if self.dtype == "bf16":
            return "a bf16 build's linear layers are all bf16 x bf16: leave it out, or build --dtype fp16"
        if self.target != "cpu":
            return "TVM's CUDA kernels compute them in float32 alone: leave it out, or build --target cpu"
        return None

    def name_for(self, dtype: str) -> str:
        """The set name of this config built with weights in `dtype`: its name with the dtype suffix swapped
        (`qwen3-embedding-0.6b-fp16` → `…-int8`), or suffixed; so a build of another dtype gets a set of its own
        instead of replacing this one's SEQs."""
        if dtype == self.dtype:
            return self.name
        stem = self.name.removesuffix(f"-{self.dtype}")
        return f"{stem}-{dtype}"

    def batch_for(self, seq_len: int) -> int:
        """The most rows the SEQ artifact takes in one call (its batch axis is dynamic, 1..this): from the token
        budget when one is set, else `batch`."""
        return max(1, self.batch_tokens // seq_len) if self.batch_tokens else self.batch

    def check(self, overridden: frozenset[str] = frozenset()) -> None:
        """Raise ToolkitError naming the first field with a value outside its domain: by its command-line option
        where `overridden` (the fields `with_overrides` set) holds it, else by its key, in the config file."""
        source = f" in {self.source}" if self.source else ""

        def named(key: str, words: str) -> str:  # how the message names field `key` (`words`: as the file has it)
            return OPTIONS.get(key, words) if key in overridden else words

        def where(*keys: str) -> str:  # the file, unless every value the check read came from the command line
            return "" if set(keys) <= overridden else source

        if self.task not in TASKS:
            raise ToolkitError(f"task must be one of {sorted(TASKS)}, got {self.task!r}{where('task')}")
        # the set's directory under the workspace: a path of its own would write outside it, or into its root
        if self.name in ("", ".", "..") or "/" in self.name:
            raise ToolkitError(f"{named('name', 'the set name')} must be one plain directory name (no '/', not '.' or "
                               f"'..'), got {self.name!r}{where('name')}: e.g. --name my-set")
        if not self.seq_lens or any(not is_integer(s) or not 1 <= s <= MAX_CONTEXT for s in self.seq_lens):
            raise ToolkitError(f"{named('seq_lens', 'sequence lengths')} must be integers in 1..{MAX_CONTEXT}, got "
                               f"{list(self.seq_lens)}{where('seq_lens')}")
        if not is_integer(self.batch) or self.batch < 1:
            raise ToolkitError(f"{named('batch', 'batch')} must be a positive integer, got {self.batch!r}"
                               f"{where('batch')}")
        if self.batch_tokens is not None and (not is_integer(self.batch_tokens) or self.batch_tokens < 1):
            raise ToolkitError(f"{named('batch_tokens', 'batch_tokens')} must be a positive integer, got "
                               f"{self.batch_tokens!r}{where('batch_tokens')}")
        if not self.backends:
            raise ToolkitError(f"backend.kind is empty{where('backends')}: name onnx, tvm or both ([onnx, tvm])")
        for b in self.backends:
            if b not in BACKENDS:
                raise ToolkitError(f"{named('backends', 'backend')} must be one of {BACKENDS}, got {b!r}"
                                   f"{where('backends')}")
        if self.dtype not in DTYPES:
            raise ToolkitError(f"{named('dtype', 'dtype')} must be one of {DTYPES}, got {self.dtype!r}"
                               f"{where('dtype')}")
        supported = DTYPE_BACKENDS.get(self.dtype, BACKENDS)
        if set(self.backends) - set(supported):
            raise ToolkitError(f"{self.dtype} artifacts are built for the {' and '.join(supported)} backend only; use "
                               f"--backend {supported[0]}{where('dtype', 'backends')}")
        if self.dtype in TVM_CPU_KERNELS and "tvm" in self.backends and self.target != "cpu":
            feature, instead = TVM_CPU_KERNELS[self.dtype]
            raise ToolkitError(f"TVM {self.dtype} artifacts are built for CPUs with {feature} only; use --target cpu, "
                               f"or {instead} for CUDA{where('dtype', 'backends', 'target')}")
        if not 0 <= self.smooth_alpha <= 1:
            raise ToolkitError(f"quantization.smooth_alpha must be in [0, 1], got {self.smooth_alpha!r}"
                               f"{where('smooth_alpha')}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ToolkitError(f"quantization.weight_rounding must be one of {WEIGHT_ROUNDINGS}, got "
                               f"{self.weight_rounding!r}{where('weight_rounding')}")
        if not self.max_linear_error > 0:
            raise ToolkitError(f"quantization.max_linear_error must be > 0, got {self.max_linear_error!r}"
                               f"{where('max_linear_error')}")
        if self.activation_scales not in ACTIVATION_SCALES:
            raise ToolkitError(f"quantization.activation_scales must be one of {ACTIVATION_SCALES}, got "
                               f"{self.activation_scales!r}{where('activation_scales')}")
        if self.fp32_linears not in FP32_LINEARS:
            raise ToolkitError(f"{named('fp32_linears', 'backend.fp32_linears')} must be one of {FP32_LINEARS}, got "
                               f"{self.fp32_linears!r}{where('fp32_linears')}")
        if self.target not in DEVICES:
            raise ToolkitError(f"{named('target', 'target')} must be one of {DEVICES}, got {self.target!r}"
                               f"{where('target')}")
        if not self.checkpoint:
            raise ToolkitError(f"{named('checkpoint', 'frontend.checkpoint')} is empty{where('checkpoint')}: give a "
                               "hub id or a local path")
        try:  # a set caching an instruction the runtime refuses would be unusable
            check_instruction_text(self.instruction)
        except ToolkitError as e:
            raise ToolkitError(f"{e}{where('instruction')}") from None


def parse_seq_lens(value) -> tuple[int, ...]:
    """Accept 512, "128,512", [128, 512] or the reference's [[512], []]; anything else is an error."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]  # an empty item ("", "32,,64") is a typo: refused
        except ValueError:
            raise ToolkitError(f"sequence lengths must be comma-separated integers, got {value!r}") from None
    if is_integer(value):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]  # [[SEQ, ...], []]: the second list names dynamic dims, and we have none
    if not isinstance(value, list) or not value or not all(is_integer(v) and 1 <= v <= MAX_CONTEXT for v in value):
        raise ToolkitError(f"sequence lengths must be integers in 1..{MAX_CONTEXT} (e.g. 512, 128,512 or "
                           f"[[512], []]), got {value!r}")
    return tuple(sorted(set(value)))


def check_schema(raw, schema: dict, path: str, where: Path) -> None:
    """Unknown keys and wrong types, at any level, named by their dotted path."""
    if not isinstance(raw, dict):
        raise ToolkitError(f"{where}: {path or 'the file'} must be a mapping of keys, got {type(raw).__name__}")
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise ToolkitError(f"{where}: unknown key {key_path!r}; allowed here: {sorted(schema)}")
        expected = schema[key]
        if isinstance(expected, dict):
            if value is not None:  # an empty block (`quantization:`) is null in YAML: its keys take their defaults
                check_schema(value, expected, key_path, where)
        # a bool is an int to isinstance: accepted only where a bool is expected
        elif value is not None and (not isinstance(value, expected)
                                    or isinstance(value, bool) and expected is not bool):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise ToolkitError(f"{where}: {key_path} must be of type {names}, got {value!r}")


def load_build_config(path: str | Path) -> BuildConfig:
    """Read and check a YAML build config."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"build config {path} not found; the bundled ones are in build_configs/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path} is not valid YAML: {e}") from None
    check_schema(raw, SCHEMA, "", path)
    front, back = raw.get("frontend") or {}, raw.get("backend") or {}
    seq = front.get("seq", front.get("input_ids"))
    if seq is None:
        raise ToolkitError(f"{path}: frontend needs `input_ids: [[SEQ], []]` or `seq: [SEQ, ...]`")
    kinds = back.get("kind")
    given = {**{key: front.get(key) for key in ("batch", "batch_tokens", "instruction", "cache_instruction")},
             **{key: back.get(key) for key in ("dtype", "target", "fp32_linears")},
             **(back.get("quantization") or {}),
             # a kind named twice would be built and validated twice (as a SEQ named twice is not); not by set():
             # the order stays the file's, and an unhashable item gets check()'s message
             "backends": tuple(k for i, k in enumerate(kinds) if k not in kinds[:i]) if isinstance(kinds, list)
             else (kinds,) if kinds is not None else None,
             "workspace": Path(raw["workspace"]) if raw.get("workspace") else None}
    cfg = BuildConfig(  # a key left out (or null) takes BuildConfig's default
        name=str(raw.get("name") or path.stem),
        task=raw.get("task"),
        checkpoint=str(front.get("checkpoint") or ""),
        seq_lens=parse_seq_lens(seq),
        source=path,
        **{key: value for key, value in given.items() if value is not None},
    )
    cfg.check()
    return cfg
