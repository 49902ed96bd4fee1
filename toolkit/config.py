"""Build configs (YAML), validated on load. One file per model, in the spirit of the reference's build configs:

    name: qwen3-embedding-0.6b-fp16
    task: embedding                      # embedding | reranker
    frontend:
      checkpoint: Qwen/Qwen3-Embedding-0.6B   # hub id or local path
      input_ids: [[512], []]             # reference style: [[SEQ, ...], []]; or `seq: [128, 512]`
      batch: 1
    backend:
      kind: onnx                         # onnx | tvm (or a list of both)
      dtype: fp16                        # fp16 | fp32 (weights; compute and accumulation stay fp32)
      target: cpu                        # cpu | cuda
    workspace: ./workspace
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import ToolkitError

TASKS = ("embedding", "reranker")
BACKENDS = ("onnx", "tvm")
DTYPES = ("fp16", "fp32")
TARGETS = ("cpu", "cuda")


@dataclass(frozen=True)
class BuildConfig:
    name: str
    task: str
    checkpoint: str
    seq_lens: tuple[int, ...]
    batch: int = 1
    backends: tuple[str, ...] = ("onnx",)
    dtype: str = "fp16"
    target: str = "cpu"
    workspace: Path = field(default_factory=lambda: Path("workspace"))
    source: Path | None = None  # the YAML file it came from

    def with_overrides(self, **overrides) -> "BuildConfig":
        """Apply CLI overrides (None means "keep the config's value") and re-validate."""
        cfg = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        where = f" in {self.source}" if self.source else ""
        if self.task not in TASKS:
            raise ToolkitError(f"task must be one of {TASKS}, got {self.task!r}{where}")
        if not self.seq_lens or any(not isinstance(s, int) or s < 1 or s > 32768 for s in self.seq_lens):
            raise ToolkitError(f"sequence lengths must be integers in 1..32768, got {list(self.seq_lens)}{where}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ToolkitError(f"batch must be a positive integer, got {self.batch!r}{where}")
        for b in self.backends:
            if b not in BACKENDS:
                raise ToolkitError(f"backend must be one of {BACKENDS}, got {b!r}{where}")
        if self.dtype not in DTYPES:
            raise ToolkitError(f"dtype must be one of {DTYPES}, got {self.dtype!r}{where}")
        if self.target not in TARGETS:
            raise ToolkitError(f"target must be one of {TARGETS}, got {self.target!r}{where}")
        if not self.checkpoint:
            raise ToolkitError(f"frontend.checkpoint is empty{where}: give a hub id or a local path")


def parse_seq_lens(value) -> tuple[int, ...]:
    """Accept 512, "128,512", [128, 512] or the reference's [[512], []]."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ToolkitError(f"sequence lengths must be comma-separated integers, got {value!r}") from None
    if isinstance(value, int):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]  # [[SEQ, ...], []]: the second list names dynamic dims, and we have none
    return tuple(sorted(set(value))) if isinstance(value, list) else ()


def load_build_config(path: str | Path) -> BuildConfig:
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"build config {path} not found; the bundled ones are in build_configs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ToolkitError(f"{path} is not valid YAML: {e}") from None
    unknown = set(raw) - {"name", "task", "frontend", "backend", "workspace"}
    if unknown:
        raise ToolkitError(f"unknown keys {sorted(unknown)} in {path}")
    front, back = raw.get("frontend") or {}, raw.get("backend") or {}
    seq = front.get("seq", front.get("input_ids"))
    if seq is None:
        raise ToolkitError(f"{path}: frontend needs `input_ids: [[SEQ], []]` or `seq: [SEQ, ...]`")
    kinds = back.get("kind", "onnx")
    cfg = BuildConfig(
        name=str(raw.get("name") or path.stem),
        task=raw.get("task"),
        checkpoint=str(front.get("checkpoint") or ""),
        seq_lens=parse_seq_lens(seq),
        batch=front.get("batch", 1),
        backends=tuple(kinds) if isinstance(kinds, list) else (kinds,),
        dtype=back.get("dtype", "fp16"),
        target=back.get("target", "cpu"),
        workspace=Path(raw.get("workspace") or "workspace"),
        source=path,
    )
    cfg.validate()
    return cfg
