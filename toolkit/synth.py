"""Synthetic Qwen3 checkpoints with random weights, for tests and the quickstart (no hub access needed).

They are ordinary Hugging Face checkpoints (config.json, model.safetensors in bf16 like the real ones, tokenizer
files) with the real Qwen3 tokenizer and vocabulary, so prompts, padding and yes/no scoring are exercised for real;
only the weights are random, so every metric computed with them is meaningless (parity is what they test).

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
from pathlib import Path

import torch

from toolkit.errors import ToolkitError
from toolkit.tasks import get_task
from toolkit.tokenizer import ENDOFTEXT_ID, VOCAB_SIZE, build_qwen3_tokenizer

SHAPES = {
    # hidden, layers, heads, kv heads, head_dim, ffn
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072),
}


OUTLIER_INIT_RANGE = 0.02  # Qwen3's initializer_range
OUTLIER_CHANNELS = (5, 37)
OUTLIER_SCALE = 60.0
MASSIVE_CHANNELS = (11, 50)
MASSIVE_VALUE = 600.0
MASSIVE_TOKENS = (198, 13, 11)  # "\n", ".", "," in the Qwen3 vocabulary


def inject_outliers(model) -> None:
    """Give a Hugging Face Qwen3 model realistic activation outliers (see the module docstring), in place."""
    for layer in model.base_model.layers:
        for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj)),
                              (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            for c in OUTLIER_CHANNELS:
                norm.weight[c] *= OUTLIER_SCALE
                for linear in linears:
                    linear.weight[:, c] /= OUTLIER_SCALE
    embeddings = model.get_input_embeddings().weight
    for token in MASSIVE_TOKENS:
        embeddings[token, list(MASSIVE_CHANNELS)] = MASSIVE_VALUE


def write_synthetic_checkpoint(out_dir: str | Path, task_name: str, shape: str = "tiny", seed: int = 0,
                               outliers: bool = False) -> Path:
    """Write a random-weight checkpoint of `shape` for the task called `task_name` into `out_dir`; with `outliers`,
    with realistic activation outliers injected."""
    from transformers import Qwen3Config

    task = get_task(task_name)
    if shape not in SHAPES:
        raise ToolkitError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen3Config(
        **SHAPES[shape], vocab_size=VOCAB_SIZE, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True,
        # Plain: a wider init than Qwen's 0.02 so random outputs spread (reranker probabilities far from 0.5). With
        # outliers: Qwen's own 0.02, because at 0.05 a 28-layer random network amplifies any perturbation (weight-only
        # int8 alone ends at cosine 0.992 on the 0.6B shape), which would gate the checkpoint, not the quantizer.
        initializer_range=OUTLIER_INIT_RANGE if outliers else 0.05,
        bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
    )
    tokenizer = build_qwen3_tokenizer(task.eos_token, task.tokenizer_appends_eos)
    config.eos_token_id = tokenizer.eos_token_id
    model = task.hf_model_class().from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms at 1.0 make random activations too uniform; vary them
                p.uniform_(0.5, 1.5)
        # HF zero-inits the pad row; in real Qwen3 <|endoftext|> is a trained token (and ends every embedding input).
        model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
        if outliers:
            inject_outliers(model)
    model.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["synthetic"] = {"task": task.name, "shape": shape, "seed": seed, "outliers": outliers,
                        "note": "RANDOM WEIGHTS - for testing the toolkit only; metrics on it are meaningless"}
    config_path.write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# Synthetic Qwen3-{task.name} checkpoint ({shape} shape)\n\nRandom weights (seed {seed}) written by "
        "`toolkit synth`. The tokenizer is the real Qwen3 one. Use it to test compile/run/eval plumbing; "
        "accuracy metrics computed with it mean nothing.\n")
    return out_dir
