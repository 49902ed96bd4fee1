"""Patched Qwen3 for deployment: the reference's `modeling_qwen3.py` changes, as a small export-friendly module.

What differs from Hugging Face's Qwen3 (and why):
- eager attention only, no KV cache (`use_cache` off): one static graph per `[batch, SEQ]`;
- the causal + padding mask is built from `attention_mask` with plain tensor ops (Transformers 5's mask helpers do
  not import into TVM), and masked scores use a large finite negative so fully padded rows never produce NaN;
- `insert_slice`: only the last position survives the last decoder layer (left padding puts every sequence's last
  real token at position SEQ-1), so the graph outputs `[batch, hidden]`: that layer computes keys and values for
  every position but its query, attention output, o_proj and MLP for the last one alone (the same result; 73% of the
  layer's FLOPs saved, 2.6% of a 28-layer forward);
- heads: the embedding model drops lm_head entirely; the reranker keeps only the "no"/"yes" rows of the (tied)
  lm_head, so it outputs `[batch, 2]` logits instead of `[batch, seq, 151669]`;
- fused projections: q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (weights concatenated at load), so
  each group is one larger GEMM that reads its input once;
- a cached prompt prefix (`cache_prefix`: the tokens every input starts with, the reranker's 39-token chat prefix
  and the build's instruction up to the query, or an embedding query set's instruction): its keys and values in every
  layer are computed once at build and held as constants, so the graph's rows carry the prefix first, then their
  padding, then the body (`split_cached_prefix`); only the body runs through the layers (a quarter of an MS MARCO
  pair's tokens saved), and its queries attend to the prefix's keys as to their own. The prefix's keys are stored
  before RoPE and rotated per row to where the reference puts them (after the row's left padding);
- RoPE, for graphs ONNX Runtime runs (`rotary_as_op`), as ONNX's RotaryEmbedding op (opset 23): one kernel where
  ONNX Runtime ran seven per rotation (0.6B reranker, `[5, 172]`: RoPE ~5% of a forward → 0.5%); TVM's graphs keep
  the plain form, which its compile fuses with the q/k norms;
- fp16 storage, fp32 compute: weights may be stored in fp16 but every linear layer upcasts them, so matmuls
  accumulate in fp32, and the residual stream, RMSNorm statistics and softmax stay fp32. Real Qwen3 checkpoints carry
  residual activations in the thousands; fp16 activations are how ollama/llama.cpp produced all-NaN embeddings.

Weights load unchanged from an ordinary Hugging Face Qwen3 checkpoint (keys with or without the `model.` prefix).
"""
from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from toolkit.errors import ToolkitError
from toolkit.tasks import EMBEDDING, RERANKER, TASKS

HEADS = tuple(task.output_name for task in TASKS.values())  # the graph outputs of the tasks
MASKED_SCORE = -1e9  # finite, so an all-masked (padding) row softmaxes to uniform instead of NaN


@dataclass(frozen=True)
class Qwen3Shape:
    """The architecture numbers of a Qwen3 checkpoint."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False

    @property
    def query_groups(self) -> int:
        """Query heads per kv head (grouped-query attention): the row blocks of a kv head's attention and its mask."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Qwen3Shape":
        """The shape in a Hugging Face config.json; refuses what the patched model does not implement."""
        if cfg.get("model_type") != "qwen3":
            raise ToolkitError(f"expected a Qwen3 checkpoint (model_type 'qwen3'), got {cfg.get('model_type')!r}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ToolkitError(f"rope scaling {rope!r} is not supported by the patched model")
        return cls(
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )


class Linear(nn.Module):
    """y = x @ W^T (+ b) with W stored in any dtype and upcast to the activation dtype (fp32 accumulation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in the activation dtype (fp32)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        # x / sqrt(...) rather than x * rsqrt(...): ONNX Runtime fuses this form into one SimplifiedLayerNormalization
        return x / torch.sqrt(variance + self.eps) * self.weight.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation: (x1, x2) → (-x2, x1) over the two halves of the head dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Rotary:
    """RoPE's cos and sin tables for the rows' own positions (`[1, 1, T, D]`) and, with a cached prefix, for the
    prefix's positions in each row (`[b, 1, P, D]`: they depend on the row's padding)."""

    cos: torch.Tensor
    sin: torch.Tensor
    prefix_cos: torch.Tensor | None = None
    prefix_sin: torch.Tensor | None = None

    def rotate(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """RoPE of `x` (`[b, heads, T, D]`, or the last position's `[b, heads, 1, D]` with `last_only`)."""
        cos, sin = (self.cos[..., -1:, :], self.sin[..., -1:, :]) if last_only else (self.cos, self.sin)
        return x * cos + rotate_half(x) * sin

    def rotate_prefix(self, keys: torch.Tensor, keys_rotated: torch.Tensor) -> torch.Tensor:
        """RoPE of a cached prefix's `keys` (`[1, kv, P, D]`, and their `rotate_half`) at each row's positions."""
        return keys * self.prefix_cos + keys_rotated * self.prefix_sin


@dataclass
class RotaryOp:
    """RoPE as ONNX's RotaryEmbedding op (opset 23): one kernel where ONNX Runtime ran seven (two Slices, Neg, Concat,
    two Muls, Add). `Rotary`'s interface; the tables by position (`[positions, D / 2]`) and each row's positions
    (`[b, T]`, the prefix's `[b, P]`)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    prefix_positions: torch.Tensor | None = None

    def rotate(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`Rotary.rotate`."""
        positions = self.positions[:, -1:] if last_only else self.positions
        return torch.onnx.ops.rotary_embedding(x, self.cos, self.sin, positions)

    def rotate_prefix(self, keys: torch.Tensor, keys_rotated: torch.Tensor) -> torch.Tensor:
        """`Rotary.rotate_prefix` (the op rotates `keys` itself)."""
        keys = keys.expand(self.prefix_positions.shape[0], -1, -1, -1)
        return torch.onnx.ops.rotary_embedding(keys, self.cos, self.sin, self.prefix_positions)


def rope_angles(positions: torch.Tensor, s: "Qwen3Shape") -> torch.Tensor:
    """RoPE's angles at `positions` (`[..., T]`, float32), as `[..., T, head_dim / 2]`."""
    inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
    return positions.unsqueeze(-1) * inv_freq


def rope_tables(positions: torch.Tensor, s: "Qwen3Shape") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles at `positions` (`[..., T]`, float32), as `[..., T, head_dim]`."""
    angles = rope_angles(positions, s)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    """Grouped-query self-attention with q/k RMSNorm and RoPE, explicit additive mask."""

    def __init__(self, s: Qwen3Shape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.groups = s.query_groups
        self.qkv_proj = Linear(s.hidden_size, (s.num_attention_heads + 2 * s.num_key_value_heads) * s.head_dim,
                               s.attention_bias)
        self.o_proj = Linear(s.num_attention_heads * s.head_dim, s.hidden_size, s.attention_bias)
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
        # a cached prefix's keys (normed, before RoPE) and the keys' `rotate_half`, and its values: `[1, kv, P, D]`
        for name in ("prefix_keys", "prefix_keys_rotated", "prefix_values"):
            self.register_buffer(name, None)

    def project(self, x):
        """q (`[b, t, heads * D]`, as projected), k normed in `[b, kv, t, D]` (before RoPE), v in `[b, kv, t, D]`."""
        b, t, _ = x.shape
        # Slices, not split/chunk: the exporter turns those into SplitToSequence + SequenceAt, which ONNX Runtime runs
        # as copies through a tensor sequence (7% of a 0.6B forward at [8, 128], `perf profile`).
        qkv, q_end = self.qkv_proj(x), self.heads * self.head_dim
        kv_end = q_end + self.kv_heads * self.head_dim
        k = self.k_norm(qkv[..., q_end:kv_end].reshape(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        return qkv[..., :q_end], k, qkv[..., kv_end:].reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)

    def hold_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Attend to a prefix's `keys` (normed, before RoPE) and `values` (`[1, kv, P, D]`) before every row's own."""
        self.prefix_keys, self.prefix_keys_rotated, self.prefix_values = keys, rotate_half(keys), values

    @override
    def forward(self, x, rotary: Rotary, mask, last_only: bool = False):
        """`last_only`: attend from the last position alone (its output is `[b, 1, hidden]`)."""
        b = x.shape[0]
        q, k, v = self.project(x)
        if last_only:
            q, mask = q[:, -1:], mask[..., -1:, :]
        queries = q.shape[1]
        q = rotary.rotate(self.q_norm(q.reshape(b, queries, self.heads, self.head_dim)).transpose(1, 2), last_only)
        k = rotary.rotate(k)
        if self.prefix_keys is not None:  # RoPE at the prefix's positions in each row, then its keys before the row's
            k = torch.cat((rotary.rotate_prefix(self.prefix_keys, self.prefix_keys_rotated), k), dim=2)
            v = torch.cat((self.prefix_values.expand(b, -1, -1, -1), v), dim=2)
        # Grouped-query attention: query head h reads kv head h // groups, so a kv head's `groups` query heads are one
        # matrix of groups * queries rows against it (the mask has a causal block per group: `prepare`). Copying k and
        # v out to every query head instead (repeat_interleave) cost TVM 1% more time ([9, 28] embedding and [2, 256]
        # reranker, bf16; the same outputs bit for bit); ONNX Runtime runs either form in the same time.
        q = q.reshape(b, self.kv_heads, self.groups * queries, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim)) + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).reshape(b, self.heads, queries, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, queries, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, s: Qwen3Shape):
        super().__init__()
        self.gate_up_proj = Linear(s.hidden_size, 2 * s.intermediate_size, False)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size, False)

    @override
    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        half = gate_up.shape[-1] // 2
        return self.down_proj(F.silu(gate_up[..., :half]) * gate_up[..., half:])  # slices: see Attention.forward


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention and MLP, each with a residual."""

    def __init__(self, s: Qwen3Shape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    @override
    def forward(self, x, rotary: Rotary, mask, last_only: bool = False):
        """`last_only`: the layer's output at the last position alone, `[b, 1, hidden]`."""
        attended = self.self_attn(self.input_layernorm(x), rotary, mask, last_only)
        x = (x[:, -1:] if last_only else x) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3ForDeployment(nn.Module):
    """`forward(input_ids [B,T] int64, attention_mask [B,T] int64)` → with head `last_hidden`, `[B, hidden]` (the
    un-normalised last-token state: embeddings); with head `yes_no_logits`, `[B, 2]` ("no", "yes") logits at the last
    token (reranker). Inputs must be left-padded, as the Qwen3-Embedding/Reranker tokenizers do; with a cached prefix
    (`cache_prefix`), every row starts with the prefix and its padding comes after it (`split_cached_prefix`)."""

    def __init__(self, shape: Qwen3Shape, head: str, insert_slice: bool = True):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.shape, self.head, self.insert_slice = shape, head, insert_slice
        self.weights: PatchedWeights | None = None  # where `from_pretrained` reads the parameters from
        self.fakes: dict[str, torch.Tensor] = {}  # a streamed model's parameters when not resident
        self.cached_prefix: list[int] = []  # the prompt prefix whose keys and values the layers hold (`cache_prefix`)
        self.cached_instruction: str | None = None  # the instruction whose tokens end it, if they do
        # RoPE as ONNX's RotaryEmbedding op (`RotaryOp`): for graphs ONNX Runtime runs; TVM's compile matches the
        # plain form (`Rotary`) to fuse it with the q/k norms
        self.rotary_op = False
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        if head == RERANKER.output_name:
            self.yes_no_head = nn.Parameter(torch.empty(2, shape.hidden_size), requires_grad=False)

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x, rotary, mask = self.prepare(input_ids, attention_mask)
        for layer in self.layers:
            x = self.run_layer(layer, x, rotary, mask)
        return self.finish(x)

    def run_layer(self, layer: "DecoderLayer", x, rotary: Rotary, mask) -> torch.Tensor:
        """One decoder layer as the model runs it (calibration runs them one at a time too): with `insert_slice`, the
        last layer at the last position alone."""
        return layer(x, rotary, mask, last_only=self.insert_slice and layer is self.layers[-1])

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                         Rotary | RotaryOp,
                                                                                         torch.Tensor]:
        """What the decoder layers take: the embedded tokens, RoPE's tables, the additive attention mask (`[b, 1,
        groups * T, P + T]`: the cached prefix's P keys, open to every row, then a causal block per query head of a
        kv head). With a cached prefix, the rows' first P columns (the prefix) are dropped here."""
        prefix = len(self.cached_prefix)
        if prefix:
            input_ids, attention_mask = input_ids[:, prefix:], attention_mask[:, prefix:]
        b, t = input_ids.shape
        x = self.embed_tokens(input_ids).float()
        # Positions P..P+T-1 (0..T-1 as Hugging Face uses without position_ids, after the prefix); RoPE is relative,
        # so the left-pad offset cancels
        if self.rotary_op:  # tables for every position a row's tokens or its prefix (after padding) can take
            angles = rope_angles(torch.arange(prefix + t, dtype=torch.float32), self.shape)
            rotary = RotaryOp(angles.cos(), angles.sin(), torch.arange(prefix, prefix + t).expand(b, t))
        else:
            cos, sin = rope_tables(torch.arange(prefix, prefix + t, dtype=torch.float32), self.shape)
            rotary = Rotary(cos[None, None], sin[None, None])
        # one causal block per query head of a kv head, the rows `Attention.forward` puts them in; its last row (all
        # keys) is what the last position sees in every group
        causal = torch.ones(t, t, dtype=torch.bool).tril().repeat(self.shape.query_groups, 1)
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = torch.where(allowed, 0.0, MASKED_SCORE).to(torch.float32)
        if prefix:  # the reference puts the prefix after the row's padding: its keys' RoPE at those positions
            padding = t - attention_mask.sum(dim=1)
            if self.rotary_op:
                rotary.prefix_positions = padding[:, None] + torch.arange(prefix)
            else:
                cos, sin = rope_tables(padding.to(torch.float32)[:, None] + torch.arange(prefix, dtype=torch.float32),
                                       self.shape)
                rotary.prefix_cos, rotary.prefix_sin = cos[:, None], sin[:, None]
            mask = torch.cat((mask.new_zeros(b, 1, mask.shape[2], prefix), mask), dim=-1)
        return x, rotary, mask

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The head on the last decoder layer's output (`run_layer`'s): the final norm of the last position, then
        (reranker) the yes/no logits."""
        x = self.norm(x)[:, -1, :]
        if self.head == EMBEDDING.output_name:
            return x
        return F.linear(x, self.yes_no_head.to(x.dtype))

    @contextmanager
    def rotary_as_op(self, enabled: bool = True):
        """RoPE as ONNX's RotaryEmbedding op (`RotaryOp`) within the block."""
        self.rotary_op = enabled
        try:
            yield
        finally:
            self.rotary_op = False

    @torch.no_grad()
    def cache_prefix(self, prefix: list[int], instruction: str | None = None) -> None:
        """Compute the keys and values of `prefix` (token ids every input starts with) in every layer, once, and hold
        them: from now on rows start with `prefix` and are padded after it, and only the rest runs through the layers.
        `instruction`: the instruction whose tokens `prefix` ends with (None: the prompt prefix alone). A
        streamed model reads one layer at a time for it."""
        if self.cached_prefix:
            raise ValueError("this model already holds a cached prefix")
        ids = torch.tensor([prefix], dtype=torch.int64)
        with self.resident("embed_tokens."):
            x, rotary, mask = self.prepare(ids, torch.ones_like(ids))
        for i, layer in enumerate(self.layers):
            with self.resident(f"layers.{i}."):
                _, keys, values = layer.self_attn.project(layer.input_layernorm(x))
                if layer is not self.layers[-1]:
                    x = layer(x, rotary, mask)
            layer.self_attn.hold_prefix(keys.clone(), values.clone())
        self.cached_prefix = list(prefix)
        self.cached_instruction = instruction

    # ---- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, head: str, dtype: torch.dtype = torch.float32,
                        insert_slice: bool = True, stream: bool = False) -> "Qwen3ForDeployment":
        """Build from a local Hugging Face Qwen3 checkpoint directory (config.json + *.safetensors, one or sharded).

        The module is built on the meta device and each tensor is read on demand (`PatchedWeights`) straight into
        `dtype`, never as a second full copy in another dtype. With `stream`, nothing is read: the parameters are fake
        tensors (shape and dtype only), enough to export the graph (`export.export_onnx` then writes each weight from
        `model.weights` as it saves it), and `resident(...)` reads a part of the model for a block (calibration runs
        one decoder layer at a time): the model never holds its weights whole."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        checkpoint_dir = Path(checkpoint_dir)
        hf_config = json.loads((checkpoint_dir / "config.json").read_text())
        with torch.device("meta"):
            model = cls(Qwen3Shape.from_hf_config(hf_config), head, insert_slice)
        model.weights = PatchedWeights(checkpoint_dir, hf_config, model, dtype)
        if stream:
            with FakeTensorMode(allow_non_fake_inputs=True):
                model.fakes = {name: torch.empty(p.shape, dtype=dtype) for name, p in model.named_parameters()}
            model.load_state_dict(model.fakes, assign=True)
        else:
            model.load_state_dict(model.weights.load(list(model.weights.sources)), assign=True)
        return model.eval()

    @contextmanager
    def resident(self, *prefixes: str):
        """Within the block, the parameters named `prefix...` of a streamed model hold their weights, read from the
        checkpoint (with the weights' adjustments: `PatchedWeights.adjust`); the embedding table reads only the rows a
        batch uses (a gather: the same values). Dropped after the block. A model in memory is left as it is."""
        from toolkit.checkpoint import embedding_lookup
        from toolkit.memory import return_freed_memory

        if not self.fakes:
            yield
            return
        names = [name for name in self.fakes if name.startswith(prefixes) and name != "embed_tokens.weight"]
        if "embed_tokens." in prefixes:
            self.embed_tokens.forward = partial(embedding_lookup, self.weights, "embed_tokens.weight")
        self.load_state_dict(self.weights.load(names), strict=False, assign=True)
        try:
            yield
        finally:
            self.load_state_dict({name: self.fakes[name] for name in names}, strict=False, assign=True)
            self.embed_tokens.__dict__.pop("forward", None)  # the class's lookup again
            # a layer's tensors are a few MiB each, on the heap: untrimmed, their holes stay resident
            return_freed_memory()


class PatchedWeights:
    """The patched model's parameters, read from a Hugging Face checkpoint on demand, each in the model's dtype: q/k/v
    and gate/up concatenated into the fused projections, the reranker's head as the "no"/"yes" rows of the (tied)
    lm_head (separate in 8B). `adjust` registers a transform of a parameter (SmoothQuant's factors, folded into the
    weights) applied on every later read, and `replace` gives it new values (GPTQ's rounded weights): a layer read
    again, and the weights an export writes, are the adjusted ones."""

    def __init__(self, checkpoint_dir: Path, hf_config: dict, model: "Qwen3ForDeployment", dtype: torch.dtype):
        from toolkit.checkpoint import CheckpointTensors

        self.dtype = dtype
        self.tensors = CheckpointTensors(checkpoint_dir, bool(hf_config.get("tie_word_embeddings")))
        self.adjustments: dict[str, list] = {}
        self.replaced: dict[str, Path] = {}  # parameter -> the file `replace` left its values in
        self.replacements = None  # the temporary directory of those files, made on first use
        self.sources = {name: self._sources(name) for name, _ in model.named_parameters()}
        used = {source for sources, _ in self.sources.values() for source in sources}
        unexpected = [name for name in self.tensors.where if name not in used and name != "lm_head.weight"]
        missing = [source for sources, _ in self.sources.values() for source in sources
                   if self.tensors.source(source) not in self.tensors.where]
        if missing or unexpected:
            raise ToolkitError(f"checkpoint {checkpoint_dir} does not match Qwen3: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        for name, param in model.named_parameters():
            sources, taken = self.sources[name]
            shapes = [self.tensors.shapes[self.tensors.source(source)] for source in sources]
            rows = len(taken) if taken else sum(shape[0] for shape in shapes)
            if any(shape[1:] != shapes[0][1:] for shape in shapes) or (rows, *shapes[0][1:]) != tuple(param.shape):
                raise ToolkitError(f"{checkpoint_dir}: tensors {sources} are {[list(s) for s in shapes]}, its "
                                   f"config.json makes {name!r} {list(param.shape)}; the weights and config.json do "
                                   "not belong together")

    def _sources(self, name: str) -> tuple[list[str], list[int] | None]:
        """The checkpoint tensors parameter `name` is made of (concatenated), and the rows taken (None: all)."""
        if name == "yes_no_head":
            vocab = "lm_head.weight" if "lm_head.weight" in self.tensors.where else "embed_tokens.weight"
            return [vocab], list(RERANKER.answer_token_ids)
        for fused, parts in FUSED_PROJECTIONS.items():
            prefix, dot, kind = name.rpartition(f"{fused}.")
            if dot:
                return [f"{prefix}{part}.{kind}" for part in parts], None
        return [name], None

    def load(self, names: list[str], rows: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The named parameters (or the given rows of each, for a lookup), adjusted."""
        out = {}
        for name in names:
            if name in self.replaced:
                tensor = torch.load(self.replaced[name], weights_only=True)
                tensor = tensor if rows is None else tensor[rows]
            else:
                sources, taken = self.sources[name]
                parts = self.tensors.load(sources, rows if rows is not None else taken, self.dtype)
                tensor = parts[sources[0]] if len(sources) == 1 else torch.cat([parts[s] for s in sources])
            for adjust in self.adjustments.get(name, ()):
                tensor = adjust(tensor)
            out[name] = tensor
        return out

    def adjust(self, name: str, transform) -> None:
        """Apply `transform` (a tensor → the same shape and dtype) to parameter `name` on every read from now on."""
        self.adjustments.setdefault(name, []).append(transform)

    def replace(self, name: str, values: torch.Tensor, scratch: Path | None = None) -> None:
        """Parameter `name` reads as `values` from now on (earlier adjustments are taken to be in them). They wait on
        disk, in a temporary directory made in `scratch` (None: the system's) and removed with these weights: the
        replaced parameters of a whole model are never held in memory."""
        if self.replacements is None:
            if scratch is not None:
                Path(scratch).mkdir(parents=True, exist_ok=True)
            # the build may remove `scratch` before these weights go (a failed build's cleanup)
            self.replacements = tempfile.TemporaryDirectory(prefix="replaced-weights-", dir=scratch,
                                                            ignore_cleanup_errors=True)
        self.replaced[name] = Path(self.replacements.name) / f"{name}.pt"
        torch.save(values.detach().clone(), self.replaced[name])
        self.adjustments.pop(name, None)  # in the values now; later ones apply on top


FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
