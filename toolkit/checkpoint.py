"""Find a checkpoint (local directory or hub id), check it is a Qwen3 checkpoint, and load its tokenizer, its
tensors (on demand) or the unpatched Hugging Face model."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from toolkit.artifact import MANIFEST, ModelSource, artifact_dirs, weights_sha256
from toolkit.errors import ToolkitError
from toolkit.tasks import TASKS, Task
from toolkit.tokenizer import ENDOFTEXT_ID, MAX_CONTEXT, Tokenizer

MIN_VOCABULARY = 1000  # a real Qwen3 tokenizer has 151,669 entries; an empty or stub one has a handful


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    """A local directory is used as is; anything else is treated as a hub id and downloaded (or found in the cache)."""
    local = Path(path_or_hub_id).expanduser()
    if str(path_or_hub_id) == "":  # Path("") is the current directory
        raise ToolkitError("the checkpoint path is empty; name a checkpoint directory or a hub id like "
                           "'Qwen/Qwen3-Embedding-0.6B'")
    if local.exists():
        if not (local / "config.json").is_file():
            compiled = (local / MANIFEST).is_file() or (local.is_dir() and artifact_dirs(local))
            raise ToolkitError(f"{local} is not a Hugging Face checkpoint directory (no config.json)" + (
                f": it holds compiled artifacts ({MANIFEST}); run them with Embedder/Reranker.from_artifacts (on the "
                "command line, --artifact), or pass the checkpoint they were built from" if compiled else ""))
        return local
    hub_id = str(path_or_hub_id)
    if hub_id.startswith((".", "/", "~")) or hub_id.count("/") != 1:
        raise ToolkitError(f"checkpoint {hub_id!r} does not exist locally and is not a hub id like "
                           "'Qwen/Qwen3-Embedding-0.6B'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, gated, typo: all end in the same advice
        raise ToolkitError(
            f"cannot fetch checkpoint {hub_id!r} from the hub ({type(e).__name__}). Either download it where the hub "
            f"is reachable and pass the local directory (--checkpoint /path/to/{hub_id.split('/')[-1]}, or "
            f"CHECKPOINT_EMB=/path / CHECKPOINT_RERANK=/path for make), or build a synthetic one to try the toolkit: "
            f"toolkit synth --task embedding|reranker --shape tiny|0.6b|4b|8b OUT_DIR") from None


def read_hf_config(checkpoint_dir: Path) -> dict:
    """config.json of a Qwen3 checkpoint; anything else is refused with the reason."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ToolkitError(f"{path} is not readable JSON ({e}); re-download the checkpoint") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "qwen3":
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise ToolkitError(f"{checkpoint_dir} is a {found!r} checkpoint; this toolkit deploys Qwen3 "
                           "(model_type 'qwen3': Qwen3-Embedding / Qwen3-Reranker)")
    return cfg


def context_length(hf_config: dict) -> int:
    """The tokens a checkpoint's positions reach (config.json's max_position_embeddings; Qwen3's context where it does
    not say)."""
    return hf_config.get("max_position_embeddings", MAX_CONTEXT)


# a checkpoint's weights, by whether they were saved as a causal LM's (`CheckpointTensors.causal_lm`)
WEIGHT_LAYOUTS = {True: "a causal LM's weights (named model.*, or with an lm_head)",
                  False: "a bare Qwen3Model's weights (saved without an LM head)"}


def check_task(task: Task, checkpoint: Path, hf_config: dict, used_by: str, fix: Callable[[str], str],
               warn: Callable[[str], None]) -> None:
    """Refuse a checkpoint that states another task than `task`, the one `used_by` (what takes it, as a clause:
    "CONFIG builds reranker artifacts") runs; `fix(other)` says how to take a checkpoint of task `other` instead. A
    synthetic checkpoint states its task in config.json's `synthetic.task`; a real one by the class its weights were
    saved from. config.json's `architectures` cannot tell: Qwen3-Embedding's and Qwen3-Reranker's both list
    Qwen3ForCausalLM. Their weights can: Qwen3-Embedding's are a bare Qwen3Model's (`embed_tokens`, `layers.N`, `norm`:
    no LM head), Qwen3-Reranker's a causal LM's (`model.`-prefixed; its own `lm_head` where untied). Weights saved the
    other way than `task`'s are refused or only `warn`ed about, as the task says (`Task.refuses_other_layout`: an
    embedding model fine-tuned and saved as a causal LM is taken as it is)."""
    def instead(other: str) -> str:
        return f"{fix(other)}, or pass a checkpoint of the {task.name} task"

    stated = (hf_config.get("synthetic") or {}).get("task")
    if stated and stated != task.name:
        raise ToolkitError(f"{checkpoint} is a synthetic {stated} checkpoint and {used_by}: {instead(stated)}")
    # the layout is read from safetensors: a pytorch_model.bin (from_pretrained, so the torch reference, loads one)
    # goes unchecked, and compile refuses it where it reads the weights (CheckpointTensors)
    if stated or not holds_safetensors(checkpoint):
        return
    causal_lm = CheckpointTensors(checkpoint, bool(hf_config.get("tie_word_embeddings"))).causal_lm
    if causal_lm == task.saved_as_causal_lm:
        return
    other = next(t for t in TASKS.values() if t.saved_as_causal_lm == causal_lm)
    held = f"{checkpoint} holds {WEIGHT_LAYOUTS[causal_lm]}, as {other.family} does"
    if task.refuses_other_layout:
        raise ToolkitError(f"{held}, and {used_by}: {instead(other.name)}")
    warn(f"{held}, not {WEIGHT_LAYOUTS[task.saved_as_causal_lm]} as {task.family} does: if it is a {other.family} "
         f"model, {instead(other.name)}; a {task.family} model saved this way is taken as it is")


def holds_safetensors(checkpoint_dir: Path) -> bool:
    """Whether the checkpoint's weights are in safetensors files (one, or shards and their index)."""
    return any((checkpoint_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


LOAD_BLOCK = 1 << 22  # elements read (and converted) at a time when loading a tensor


class CheckpointTensors:
    """A checkpoint's safetensors tensors (one file or sharded), read on demand. Names drop the `model.` prefix, so a
    file saved from `AutoModel` (`layers.0...`) and one saved from `AutoModelForCausalLM` (`model.layers.0...`) read
    alike."""

    def __init__(self, checkpoint_dir: Path, tie_word_embeddings: bool):
        if not holds_safetensors(checkpoint_dir):
            expected = "model.safetensors, or shards and model.safetensors.index.json"
            if held := ", ".join(sorted(p.name for p in checkpoint_dir.glob("*.bin"))):
                raise ToolkitError(f"{checkpoint_dir} has no safetensors weights ({expected}); it holds {held}: the "
                                   "toolkit reads safetensors: convert it (from_pretrained, then save_pretrained)")
            raise ToolkitError(f"{checkpoint_dir} has no model weights ({expected}): re-download the checkpoint")
        index = checkpoint_dir / "model.safetensors.index.json"
        if index.is_file():  # sharded: the files the index names, as from_pretrained reads them
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ToolkitError(f"{index} is not a readable safetensors index ({type(e).__name__}: {e}); "
                                   "re-download the checkpoint") from None
        else:
            files = ["model.safetensors"]
        self.checkpoint_dir = checkpoint_dir
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with self.open(checkpoint_dir / file) as f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    self.where[name] = (checkpoint_dir / file, key)
                    self.shapes[name] = tuple(f.get_slice(key).get_shape())
        # from_pretrained ties symmetrically: a tied lm_head without its own tensor reads the embedding, and the
        # reverse; one that has its own tensor keeps it.
        self.tied = {"lm_head.weight": "embed_tokens.weight", "embed_tokens.weight": "lm_head.weight"} \
            if tie_word_embeddings else {}

    @property
    def causal_lm(self) -> bool:
        """Whether the weights were saved from a causal LM class (names prefixed `model.`, or an `lm_head` of their
        own), as Qwen3-Reranker's are; Qwen3-Embedding's are a bare Qwen3Model's (`embed_tokens`, `layers.N`,
        `norm`)."""
        return "lm_head.weight" in self.where or any(key.startswith("model.") for _, key in self.where.values())

    def open(self, path: Path):
        """`safe_open` on one file (lazy, memory-mapped), with a one-line error for a missing or damaged file."""
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise ToolkitError(f"cannot read {path} ({e}): it is missing, truncated or corrupt; re-download or "
                               "rebuild the checkpoint") from None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a checkpoint that lacks the model's parameter `name`, or holds it in another shape."""
        found = self.shapes.get(self.source(name))
        if found is None:
            raise ToolkitError(f"{self.checkpoint_dir} has no tensor {name!r} (nor 'model.{name}'); re-download or "
                               "rebuild the checkpoint")
        if found != tuple(shape):
            raise ToolkitError(f"{self.checkpoint_dir}: tensor {name!r} is {list(found)}, its config.json says "
                               f"{list(shape)}; the weights and config.json do not belong together")

    def source(self, name: str) -> str:
        """The stored tensor that parameter `name` is loaded from (its own, or the tied one's)."""
        return name if name in self.where or name not in self.tied else self.tied[name]

    def load(self, names: list[str], rows: list[int] | None = None, dtype=None) -> dict:
        """The named tensors (or the given rows of each) converted to `dtype` (default fp32), exactly as
        `from_pretrained(dtype=...)` converts them.

        A tensor is read in blocks of rows, each through its own short-lived mapping of the file: a mapping's pages
        count as resident while it is open, and a big tensor (a vocabulary-sized head) is then never held twice."""
        import torch
        from safetensors import SafetensorError

        dtype = dtype or torch.float32
        out = {}
        for name in names:
            path, key = self.where[self.source(name)]
            try:
                if rows is not None:
                    with self.open(path) as f:
                        stored = f.get_slice(key)
                        out[name] = torch.cat([stored[i:i + 1] for i in rows]).to(dtype)
                    continue
                shape = self.shapes[self.source(name)]
                out[name] = torch.empty(shape, dtype=dtype)
                step = max(1, LOAD_BLOCK // max(1, math.prod(shape[1:])))
                for start in range(0, shape[0], step):
                    with self.open(path) as f:
                        out[name][start:start + step] = f.get_slice(key)[start:start + step]
            except (SafetensorError, RuntimeError) as e:  # the file read at the start is not the one there now
                raise ToolkitError(f"{path} no longer holds tensor {key!r} as it did when the build started ({e}): "
                                   "the checkpoint changed while it was read; rerun once a complete checkpoint of "
                                   "this task is in place") from None
        return out


def embedding_lookup(weights, name: str, input_ids):
    """nn.Embedding's forward reading only the rows the batch uses from `weights` (`CheckpointTensors`, or the
    patched model's `PatchedWeights`): a gather, so exactly the same values."""
    import torch

    ids, inverse = torch.unique(input_ids, return_inverse=True)
    return weights.load([name], ids.tolist())[name][inverse]


def model_source(named: str, checkpoint_dir: Path) -> ModelSource:
    """What the manifest records about the checkpoint an artifact is built from."""
    cfg = read_hf_config(checkpoint_dir)
    return ModelSource(checkpoint=str(named), resolved=str(Path(checkpoint_dir).resolve()),
                       weights_sha256=weights_sha256(checkpoint_dir),
                       model_type=cfg["model_type"], synthetic="synthetic" in cfg, hidden_size=cfg.get("hidden_size"),
                       num_hidden_layers=cfg.get("num_hidden_layers"), vocab_size=cfg.get("vocab_size"))


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer's, a slow one's (with merges.txt)


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The tokenizer in `tokenizer_dir`, checked to be a real (non-empty) Qwen3 tokenizer."""
    # else transformers takes a missing directory for a hub id, and lists the hub's tokenizer formats for an empty one
    if not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
        missing = f"no {' or '.join(TOKENIZER_FILES)}" if Path(tokenizer_dir).is_dir() else "the directory is missing"
        raise ToolkitError(f"no tokenizer at {tokenizer_dir} ({missing}): an artifact's comes with it from `toolkit "
                           "compile` (copy the whole set, or recompile it); a checkpoint's from its source")
    try:
        tokenizer = Tokenizer.load(tokenizer_dir)
    except Exception as e:
        raise ToolkitError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None
    if len(tokenizer) < MIN_VOCABULARY or tokenizer.token(ENDOFTEXT_ID) != "<|endoftext|>" \
            or not tokenizer.encode_one("Hello world"):
        raise ToolkitError(f"{tokenizer_dir} has no usable Qwen3 tokenizer ({len(tokenizer)} entries, no "
                           "<|endoftext|> at 151643): copy tokenizer.json and tokenizer_config.json from the original "
                           "checkpoint into it")
    return tokenizer


def load_hf_model(checkpoint_dir: Path, task):
    """The unpatched Hugging Face model in fp32, as users run it today (the task's auto class)."""
    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    read_hf_config(checkpoint_dir)
    hf_logging.disable_progress_bar()
    try:
        return task.hf_model_class().from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated weights file
        raise ToolkitError(f"cannot load the Hugging Face model from {checkpoint_dir} ({type(e).__name__}: "
                           f"{str(e)[:200]}); re-download or rebuild the checkpoint") from None
