"""Synthetic Qwen3 checkpoints with random weights, for tests and the quickstart (no hub access needed).

They are ordinary Hugging Face checkpoints (config.json, bf16 safetensors like the real ones: `model.safetensors`, or
shards of at most `MAX_SHARD_BYTES` with a `model.safetensors.index.json`; tokenizer files) with the real Qwen3
tokenizer and vocabulary, so prompts, padding and yes/no scoring are exercised for real; only the weights are random,
so every metric computed with them is meaningless (parity is what they test). Every shape, from `tiny` to `8b`, is
written tensor by tensor, one decoder layer at a time, so memory holds at most one shard plus one layer (an 8B model
in bf16 is 16 GB; built whole by `from_config` it would be 32 GB of fp32 first).

Random weights are kind to quantizers; real LLMs are not. `outliers=True` injects the two kinds of outliers that break
naive int8 (the model's fp32 function stays a valid Qwen3 computation):
- outlier input channels (Dettmers et al. 2022, "LLM.int8()": 20-100x the other channels at the inputs of linear
  layers, in a few fixed channels of every layer): the RMSNorm weights of `OUTLIER_CHANNELS` are multiplied by
  `OUTLIER_SCALE` and the columns of the linear layers reading them divided by it, so the fp32 function is unchanged
  while the activations entering q/k/v and gate/up carry 60x channels;
- massive residual activations (Sun et al. 2024, "Massive Activations in Large Language Models": values in the hundreds
  to thousands, in a few fixed channels, on delimiter tokens, carried by the residual stream through every layer):
  the embedding rows of `MASSIVE_TOKENS` get `MASSIVE_VALUE` in `MASSIVE_CHANNELS`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from toolkit.errors import ToolkitError
from toolkit.tasks import get_task
from toolkit.tokenizer import ENDOFTEXT_ID, MAX_CONTEXT, VOCAB_SIZE, build_qwen3_tokenizer

SHAPES = {
    # The Hugging Face configs of Qwen3-Embedding / Qwen3-Reranker at each size (the vocabulary is VOCAB_SIZE for all).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, tie_word_embeddings=True),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728, tie_word_embeddings=True),
    # Untied: the reranker (a causal LM) has its own lm_head.weight; the embedding model has no head at all.
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288, tie_word_embeddings=False),
}
MAX_SHARD_BYTES = 2 * 10**9  # per safetensors file (Hugging Face's "2GB"); a bigger single tensor gets its own
RANDOM_CHUNK = 1 << 24  # elements drawn in fp32 at a time before the cast to bf16 (64 MB of scratch)

OUTLIER_INIT_RANGE = 0.02  # Qwen3's initializer_range
OUTLIER_CHANNELS = (5, 37)
OUTLIER_SCALE = 60.0
MASSIVE_CHANNELS = (11, 50)
MASSIVE_VALUE = 600.0
MASSIVE_TOKENS = (198, 13, 11)  # "\n", ".", "," in the Qwen3 vocabulary
# Each decoder layer's RMSNorms and the linear layers that read their output.
NORM_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def inject_outliers(weights: dict[str, torch.Tensor]) -> None:
    """Give Qwen3 weights realistic activation outliers (see the module docstring), in place.

    `weights` maps Hugging Face state-dict names (with or without the causal LM's `model.` prefix) to tensors: a whole
    state dict (`dict(model.named_parameters())` under `torch.no_grad()`), or any part of one made of whole decoder
    layers and/or the embedding, which is how the writer calls it, one layer at a time."""
    for name, weight in weights.items():
        for norm, readers in NORM_READERS:
            if name.endswith(f"{norm}.weight"):
                layer = name[:-len(f"{norm}.weight")]
                for c in OUTLIER_CHANNELS:
                    weight[c] *= OUTLIER_SCALE
                    for reader in readers:
                        weights[f"{layer}{reader}.weight"][:, c] /= OUTLIER_SCALE
        if name.endswith("embed_tokens.weight"):
            for token in MASSIVE_TOKENS:
                weight[token, list(MASSIVE_CHANNELS)] = MASSIVE_VALUE


def outlier_init_range(hidden_size: int) -> float:
    """The init std of an outlier checkpoint: Qwen's own 0.02 up to the 0.6B width, and above it the 0.6B width's
    gain per linear layer (std x sqrt(fan in)). A random network amplifies any perturbation where that gain is high,
    which would gate the checkpoint, not the quantizer: at 0.05 on the 0.6B shape, int8 weights alone (activations
    exact) ended at cosine 0.992; at 0.02 on the 4B shape, at 0.9871, and a relative noise of 1e-3 on every linear
    output at 0.99989 (0.6B: 0.999993). Trained models lose nothing measurable to int8 weights alone."""
    return OUTLIER_INIT_RANGE * min(1.0, (1024 / hidden_size) ** 0.5)


def _random_weight(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """A bf16 weight as Hugging Face initialises Qwen3's (linear and embedding weights normal(0, std)), except norms:
    uniform(0.5, 1.5), as norms at 1.0 make random activations too uniform. The embedding's pad row is a normal row
    like the others (HF zeroes it; in real Qwen3 <|endoftext|> is a trained token that ends every embedding input).
    Drawn in fp32 chunks of RANDOM_CHUNK elements, so the scratch stays small whatever the tensor."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), RANDOM_CHUNK):
        chunk = torch.empty(min(RANDOM_CHUNK, flat.numel() - start))
        if name.endswith("norm.weight"):
            chunk.uniform_(0.5, 1.5, generator=generator)
        else:
            chunk.normal_(0.0, std, generator=generator)
        flat[start:start + chunk.numel()] = chunk
    return out


def _layer_groups(names: list[str]) -> list[list[str]]:
    """State-dict names in runs of one decoder layer each (the embedding, and the final norm and head, alone)."""
    groups, keys = [], []
    for name in names:
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        key = int(match.group(1)) if match else None
        if groups and key == keys[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
            keys.append(key)
    return groups


def is_synthetic(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds a checkpoint `toolkit synth` wrote (its config.json carries the `synthetic` mark)."""
    try:
        return "synthetic" in json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, refused where writing would destroy something: an empty path (the current directory) or a
    non-empty directory that holds anything but an earlier synthetic checkpoint (its weights are replaced)."""
    if not str(out_dir).strip():
        raise ToolkitError("the output directory is empty: name a new directory for the checkpoint")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_synthetic(out_dir):
        raise ToolkitError(f"{out_dir} is not empty and holds no synthetic checkpoint: name a new or empty directory "
                           "(synth overwrites only the checkpoints it wrote)")
    return out_dir


def write_synthetic_checkpoint(out_dir: str | Path, task_name: str, shape: str = "tiny", seed: int = 0,
                               outliers: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                               progress: bool = False) -> Path:
    """Write a random-weight checkpoint of `shape` for the task called `task_name` into `out_dir`; with `outliers`,
    with realistic activation outliers injected. Shards hold at most `max_shard_bytes` each; `progress` shows a bar
    over the layers on stderr where it is a terminal (once a write takes more than a second)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    from toolkit.progress import progress_bar

    task = get_task(task_name)
    if shape not in SHAPES:
        raise ToolkitError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")
    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen3_tokenizer(task.eos_token, task.tokenizer_appends_eos)
    config = Qwen3Config(
        **SHAPES[shape], vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_CONTEXT, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        # Plain: a wider init than Qwen's 0.02 so random outputs spread (reranker probabilities far from 0.5). With
        # outliers: see outlier_init_range.
        initializer_range=outlier_init_range(SHAPES[shape]["hidden_size"]) if outliers else 0.05,
        bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID, eos_token_id=tokenizer.eos_token_id,
    )
    # The task's HF class on the meta device (no memory): its state dict names every tensor save_pretrained would write
    # and its shape; tied weights (the head when tie_word_embeddings) are one Parameter, written once, first name kept.
    with torch.device("meta"):
        model = task.hf_model_class().from_config(config).to(torch.bfloat16)
    specs, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            specs[name] = tensor
    split = split_torch_state_dict_into_shards(specs, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)

    for stale in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        stale.unlink()  # a previous checkpoint's weights (as save_pretrained does): its index would outlive it
    generator = torch.Generator().manual_seed(seed)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # shard file -> its tensors so far
    for group in progress_bar(_layer_groups(list(specs)), desc=f"synth {task.name} {shape}", unit="layer",
                              show=progress, leave=True, delay=1.0):
        weights = {name: _random_weight(name, specs[name].shape, config.initializer_range, generator)
                   for name in group}
        if outliers:
            inject_outliers(weights)
        for name, weight in weights.items():
            filename = split.tensor_to_filename[name]
            shard = pending.setdefault(filename, {})
            shard[name] = weight
            if len(shard) == len(split.filename_to_tensors[filename]):
                save_file(pending.pop(filename), out_dir / filename, metadata={"format": "pt"})
        del weights
    assert not pending, f"shards left unwritten: {sorted(pending)}"
    if split.is_sharded:  # the index save_pretrained writes
        index = {"metadata": {"total_parameters": sum(t.numel() for t in specs.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    model.config.architectures = [type(model).__name__]  # what save_pretrained records
    model.config.dtype = "bfloat16"
    model.config.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["synthetic"] = {"task": task.name, "shape": shape, "seed": seed, "outliers": outliers,
                        "note": "RANDOM WEIGHTS - for testing the toolkit only; metrics on it are meaningless"}
    config_path.write_text(json.dumps(cfg, indent=2))
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# Synthetic Qwen3-{task.name} checkpoint ({shape} shape)\n\nRandom weights (seed {seed}) written by "
        "`toolkit synth`. The tokenizer is the real Qwen3 one. Use it to test compile/run/eval plumbing; "
        "accuracy metrics computed with it mean nothing.\n")
    return out_dir
