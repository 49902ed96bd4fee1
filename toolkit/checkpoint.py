"""Find a checkpoint (local directory or hub id), check it is a Qwen3 checkpoint, and load its tokenizer or the
unpatched Hugging Face model."""
from __future__ import annotations

import json
from pathlib import Path

from toolkit.artifact import ModelSource
from toolkit.errors import ToolkitError
from toolkit.tokenizer import ENDOFTEXT_ID

MIN_VOCABULARY = 1000  # a real Qwen3 tokenizer has 151,669 entries; an empty or stub one has a handful


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    """A local directory is used as is; anything else is treated as a hub id and downloaded (or found in the cache)."""
    local = Path(path_or_hub_id).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ToolkitError(f"{local} is not a Hugging Face checkpoint directory (no config.json)")
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


def model_source(named: str, checkpoint_dir: Path) -> ModelSource:
    """What the manifest records about the checkpoint an artifact is built from."""
    cfg = read_hf_config(checkpoint_dir)
    return ModelSource(checkpoint=str(named), resolved=str(Path(checkpoint_dir).resolve()),
                       model_type=cfg["model_type"], synthetic="synthetic" in cfg, hidden_size=cfg.get("hidden_size"),
                       num_hidden_layers=cfg.get("num_hidden_layers"), vocab_size=cfg.get("vocab_size"))


def load_tokenizer(tokenizer_dir: str | Path):
    """The Hugging Face fast tokenizer in `tokenizer_dir`, checked to be a real (non-empty) Qwen3 tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise ToolkitError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None
    if len(tokenizer) < MIN_VOCABULARY or tokenizer.convert_ids_to_tokens(ENDOFTEXT_ID) != "<|endoftext|>" \
            or not tokenizer("Hello world", add_special_tokens=False).input_ids:
        raise ToolkitError(f"{tokenizer_dir} has no usable Qwen3 tokenizer ({len(tokenizer)} entries, no "
                           "<|endoftext|> at 151643): copy tokenizer.json and tokenizer_config.json from the original "
                           "checkpoint into it")
    return tokenizer


def load_hf_model(checkpoint_dir: Path, task):
    """The unpatched Hugging Face model in fp32, as users run it today (the task's auto class)."""
    import torch
    from transformers.utils import logging as hf_logging

    read_hf_config(checkpoint_dir)
    hf_logging.disable_progress_bar()
    try:
        return task.hf_model_class().from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ToolkitError(f"cannot load the Hugging Face model from {checkpoint_dir} ({type(e).__name__}: "
                           f"{str(e)[:200]}); re-download or rebuild the checkpoint") from None
