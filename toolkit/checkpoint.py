"""Find a checkpoint (local directory or hub id) and load its tokenizer / the unpatched Hugging Face model."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ToolkitError


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    """A local directory is used as is; anything else is treated as a hub id and downloaded (or found in the cache)."""
    local = Path(path_or_hub_id).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ToolkitError(f"{local} is not a Hugging Face checkpoint directory (no config.json)")
        return local
    hub_id = str(path_or_hub_id)
    if hub_id.startswith((".", "/", "~")) or hub_id.count("/") != 1:
        raise ToolkitError(f"checkpoint {hub_id!r} does not exist locally and is not a hub id like 'Qwen/Qwen3-Embedding-0.6B'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, gated, typo: all end in the same advice
        raise ToolkitError(
            f"cannot fetch checkpoint {hub_id!r} from the hub ({type(e).__name__}). Either download it where the hub "
            f"is reachable and pass the local directory (--checkpoint /path/to/{hub_id.split('/')[-1]}, or "
            f"CHECKPOINT_EMB=/path / CHECKPOINT_RERANK=/path for make), or build a synthetic one to try the toolkit: "
            f"toolkit synth --task embedding|reranker --shape tiny|0.6b OUT_DIR") from None


def checkpoint_info(checkpoint_dir: Path) -> dict:
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    return {"model_type": cfg.get("model_type"), "synthetic": "synthetic" in cfg,
            "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
            "vocab_size": cfg.get("vocab_size")}


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise ToolkitError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from None


def load_hf_model(checkpoint_dir: Path, task: str):
    """The unpatched Hugging Face model in fp32, as users run it today (AutoModel / AutoModelForCausalLM)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cls = AutoModel if task == "embedding" else AutoModelForCausalLM
    return cls.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
