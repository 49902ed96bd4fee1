"""High-level API: `Embedder` and `Reranker` take text, speak the official Qwen3 formats, and run on an artifact,
a bucket set of artifacts (several SEQs), or the torch reference.

    emb = Embedder.from_artifacts("workspace/qwen3-embedding-0.6b-fp16/onnx")   # every seq* artifact = buckets
    q = emb.encode_queries(["What is the capital of China?"])                  # Instruct: ...\nQuery:...
    d = emb.encode_documents(["The capital of China is Beijing."])
    rr = Reranker.from_artifacts("workspace/qwen3-reranker-0.6b-fp16/onnx")
    rr.rerank("What is the capital of China?", ["Beijing is ...", "Gravity is ..."])  # sorted, with corpus_id
    rr.score([("What is the capital of China?", "Beijing is ...")])                # P(yes), input order
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from toolkit.artifact import Manifest, find_artifacts
from toolkit.checkpoint import check_task, context_length, load_tokenizer, read_hf_config, resolve_checkpoint
from toolkit.errors import ToolkitError, check_int, clipped, is_integer
from toolkit.runner import BucketedRunner
from toolkit.runtime import Engine, check_engine_options
from toolkit.tasks import EMBEDDING, RERANKER, PromptLayout, Task, check_instruction_text, get_task
from toolkit.tokenizer import InvalidUnicodeError, check_unicode

REFERENCE_MAX_LENGTH = 8192  # what the torch reference accepts by default (Qwen3-Embedding/Reranker's usual cap)
TRUNCATION = ("error", "truncate")
PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn(message: str) -> None:
    """Warn pointing at the first caller outside the toolkit (the user's call), however deep in the public methods
    (encode_documents → encode → ... → frame_rows) the warning is raised: `skip_file_prefixes` before Python 3.12."""
    frame, level = sys._getframe(), 1  # level 1: this function
    while frame.f_back is not None and frame.f_code.co_filename.startswith(PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def max_token_chars(tokenizer) -> int:
    """The most characters one token covers (byte-level BPE: one character per byte of the token's string)."""
    return max(map(len, tokenizer.vocabulary()))


class InputTooLongError(ToolkitError):
    """An input has more tokens than the model takes, and the truncation policy is "error"."""

    def __init__(self, index: int, max_length: int):
        super().__init__(f"input #{index} has more than {max_length} tokens, the model's max input length (prompt "
                         "included: the largest SEQ, or the max_length it was opened with); pass "
                         "truncation='truncate', or open it with a larger max_length or compile a larger SEQ")
        self.index, self.max_length = index, max_length


def encode_bodies(layout: PromptLayout, tokenizer, bodies: list[str], max_length: int, max_chars: int | None = None,
                  offsets: bool = False) -> list:
    """`tokenizer.encode` of the bodies of rows of at most `max_length` tokens. A body longer than a row can use is
    cut (in characters, with the longest token's length as the bound) before it is tokenised, so a huge text costs
    what the row can hold, not its size."""
    cut = (max_length - layout.fixed + 1) * (max_chars or max_token_chars(tokenizer))
    return tokenizer.encode([b[:cut] for b in bodies], offsets)


def token_rows(layout: PromptLayout, tokenizer, bodies: list[str], max_length: int, truncation: str = "error",
               max_chars: int | None = None) -> list[list[int]]:
    """prefix + body + suffix token rows of at most `max_length` tokens under the truncation policy."""
    return frame_rows(layout, encode_bodies(layout, tokenizer, bodies, max_length, max_chars), max_length, truncation)


def frame_rows(layout: PromptLayout, bodies: list[list[int]], max_length: int,
               truncation: str = "error") -> list[list[int]]:
    """prefix + body + suffix rows from bodies already tokenised; a body that does not fit is cut, or refused with
    InputTooLongError, as `truncation` says."""
    room = max_length - layout.fixed
    rows, truncated = [], 0
    for i, ids in enumerate(bodies):
        if len(ids) > room:
            if truncation == "error":
                raise InputTooLongError(i, max_length)
            truncated += 1
            ids = ids[:room]
        rows.append(layout.prefix + list(ids) + layout.suffix)
    if truncated:
        _warn(f"{truncated} input(s) truncated to {max_length} tokens")
    return rows


def check_instruction(fixed: str | None, instruction: str) -> None:
    """Refuse inputs with another `instruction` than the one a set was compiled for (`fixed`, its tokens
    cached in the graph; None: any)."""
    if fixed is not None and instruction != fixed:
        raise ToolkitError(f"these artifacts were compiled for the instruction {fixed!r} (its tokens are cached in the "
                           f"graph), not {clipped(repr(instruction))}: use theirs, or compile with --instruction for "
                           "yours (--no-cache-instruction: any instruction, a little slower)")


class _TextModel:
    """What Embedder and Reranker share: construction, tokenisation with the truncation policy, lifetime."""

    task: Task
    manifests: tuple = ()  # the artifacts it runs, by SEQ (none for the torch reference)
    # the model's width, an embedding's size before any MRL cut (None: a model made straight from a runner, whose
    # outputs alone say it: `Task.finish` checks a cut against them)
    hidden_size: int | None = None

    def __init__(self, runner: BucketedRunner, tokenizer, truncation: str = "error"):
        # its engines' workers hold them, not it: one never closed releases them when dropped (the finalizer must not
        # hold it either); not at exit, where closing would first run every batch still queued (minutes at 8B, and a
        # Ctrl-C in `encode` would wait for them)
        self._release = weakref.finalize(self, runner.close)
        self._release.atexit = False
        for engine in runner.engines:  # their errors (closed, used in a forked child) name what the user holds
            engine.holder = f"this {type(self).__name__}"
        self.runner, self.tokenizer, self.truncation = runner, tokenizer, check_truncation(truncation)
        shortest = self.task.min_seq_len(tokenizer)
        if self.max_length < shortest:
            raise ToolkitError(f"the max input length here is {self.max_length} tokens, but every {self.task.name} "
                               f"input needs at least {shortest}: {self._longer_inputs_fix(shortest)}")

    @classmethod
    def from_artifacts(cls, path: str | Path, instances: int | str = 1, device_ids: tuple[int, ...] = (0,),
                       queue_size: int = 64, truncation: str = "error", max_length: int | None = None):
        """Run on one artifact or a bucket set (a directory of artifacts at several SEQs). `instances` per bucket: a
        count sharing the process's threads, or "auto" (one single-thread instance per core for TVM on CPU, else
        1: `toolkit.runtime.resolve_instances`). `max_length` caps the input length (prompt included) below the
        largest SEQ, e.g. a service's limit."""
        _check_path(path, "path", "an artifact directory or a bucket set's")
        check_truncation(truncation)  # before any engine opens
        manifests = check_set(path, cls.task, lambda found: f"pass {cls.task.a_name} set (or, in Python, load it with "
                              f"{model_class(get_task(found)).__name__})", max_length)
        instances, device_ids, queue_size = check_engine_options(instances, device_ids, queue_size,
                                                                 manifests[0].target.device)
        # checked first: a damaged tokenizer file would otherwise fail to load with the tokenizer's own error
        tokenizer = load_tokenizer(manifests[0].verify("tokenizer/").path / "tokenizer")
        engines = []
        try:
            for m in manifests:
                engines.append(Engine.from_artifact(m, instances, device_ids, queue_size))
            model = cls(BucketedRunner(engines, max_length=None if max_length is None else int(max_length)), tokenizer,
                        truncation)
            model.manifests, model.hidden_size = tuple(manifests), manifests[0].model.hidden_size
            return model
        except BaseException:
            for e in engines:
                e.close()
            raise

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, max_length: int | None = None, batch_size: int = 8,
                        truncation: str = "error"):
        """The torch reference: the unpatched Hugging Face model, same formats and truncation as the artifacts.
        `max_length` (None: REFERENCE_MAX_LENGTH, or the checkpoint's context where that is shorter) caps the input
        length; `batch_size` rows run at a time."""
        _check_path(checkpoint, "checkpoint", "a checkpoint directory or a hub id")
        check_int(batch_size, "batch_size", 1)
        check_truncation(truncation)  # before the model loads
        path = resolve_checkpoint(checkpoint)
        hf_config = read_hf_config(path)
        context = context_length(hf_config)
        max_length = min(REFERENCE_MAX_LENGTH, context) if max_length is None else \
            check_max_length(max_length, context, "the checkpoint's context, max_position_embeddings")
        check_task(cls.task, path, hf_config, f"{cls.__name__}.from_checkpoint runs {cls.task.name} models",
                   lambda other: f"load it with {model_class(get_task(other)).__name__}.from_checkpoint", _warn)
        tokenizer = load_tokenizer(path)
        engine = Engine.from_checkpoint(path, cls.task)
        model = cls(BucketedRunner([engine], int(batch_size), max_length), tokenizer, truncation)
        model.hidden_size = hf_config["hidden_size"]
        return model

    @property
    def max_length(self) -> int:
        """The longest input (in tokens, prompt included) this model takes."""
        return self.runner.max_length

    @property
    def fixed_instruction(self) -> str | None:
        """The instruction compiled into the artifacts (its tokens are cached after the prompt prefix): every input
        carries it. None: any (the torch reference; sets built without one, or with --no-cache-instruction)."""
        return self.manifests[0].instruction if self.manifests else None

    @cached_property
    def _layout(self):
        return self.task.prompt(self.tokenizer)

    @cached_property
    def _max_chars_per_token(self) -> int:
        return max_token_chars(self.tokenizer)

    def _check_room(self, head: str, what: str, text: str) -> None:
        """Refuse a body whose `head` (all before its `text`) fills the room the model has for bodies: truncation
        would cut all of the text, and every text would get the same answer."""
        used, room = len(self.tokenizer.encode_one(head.rstrip())), self.max_length - self._layout.fixed
        if used >= room:
            raise ToolkitError(f"{used} tokens of {what} leave no room for the {text}: this model has {room} for "
                               f"both (max input length {self.max_length}, prompt included); shorten {what}, or "
                               f"{self._longer_inputs_fix(self._layout.fixed + used + 1)}")

    def _longer_inputs_fix(self, needed: int) -> str:
        """How this model would take inputs of `needed` tokens: a larger max_length where it was opened with one below
        what its artifacts take (or is the torch reference), else a larger SEQ."""
        largest = self.runner.engines[-1].seq_len  # None: the torch reference, which takes its context
        if largest is None or needed <= largest:
            within = "" if largest is None else f" (the set takes up to {largest})"
            return f"raise max_length (a service's --max-input-length) to {needed} or more{within}"
        return f"compile with --seq {needed} or more"

    def _encode(self, bodies: list[str], origin=None, offsets: bool = False) -> list:
        """`encode_bodies` of the bodies. `origin(i)`: the user's own texts body i was made of and their names, so that
        a text that is not valid Unicode is named with its position in the user's text, not in the prompt."""
        try:
            return encode_bodies(self._layout, self.tokenizer, bodies, self.max_length, self._max_chars_per_token,
                                 offsets)
        except InvalidUnicodeError as e:
            if origin:
                check_unicode(*origin(e.index))
            raise

    def _rows(self, bodies: list[str], truncation: str | None = None, origin=None) -> list[list[int]]:
        """`token_rows` of the bodies (`origin`: as `_encode` takes it)."""
        truncation = check_truncation(truncation or self.truncation)
        return frame_rows(self._layout, self._encode(bodies, origin), self.max_length, truncation)

    def token_spans(self, bodies: list[str], truncation: str | None = None) -> tuple[list[list[int]], list[list]]:
        """The rows `_rows` makes of the bodies (formatted inputs, as the model reads them), and beside each row its
        tokens' (start, stop) characters in the body, as `Tokenizer.encode` gives them; None for the prompt's tokens
        around the body."""
        truncation = check_truncation(truncation or self.truncation)
        encoded = self._encode(bodies, offsets=True)
        rows = frame_rows(self._layout, [ids for ids, _ in encoded], self.max_length, truncation)
        prefix, suffix = [None] * len(self._layout.prefix), [None] * len(self._layout.suffix)
        return rows, [[*prefix, *offsets[:len(row) - self._layout.fixed], *suffix]
                      for (_, offsets), row in zip(encoded, rows)]

    def close(self):
        """Stop the engines now (dropping the model stops them too, once it is garbage)."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_truncation(truncation: str) -> str:
    """The truncation policy, or a ToolkitError naming the valid ones."""
    if truncation not in TRUNCATION:
        raise ToolkitError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    return truncation


def _check_path(path, name: str, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ToolkitError(f"{name} must be {what} (a str or Path), got {type(path).__name__}")


def check_max_length(max_length, largest: int, why: str, name: str = "max_length") -> int:
    """`max_length` as an int, or a ToolkitError naming `name` unless it is an integer in 1..`largest` (`why`: what
    sets that bound)."""
    if not is_integer(max_length) or not 1 <= max_length <= largest:
        raise ToolkitError(f"{name} must be an integer in 1..{largest} ({why}), got {max_length!r}")
    return int(max_length)


def check_set(path: str | Path, task: Task, fix: Callable[[str], str], max_length=None) -> list[Manifest]:
    """The manifests of the artifact or bucket set at `path` (`find_artifacts`: nothing loads), refused unless they
    are `task`'s (`fix(their task)`: how the caller's user passes a `task` set instead) and, with a `max_length`, their
    largest SEQ takes it."""
    manifests = find_artifacts(path)
    found = manifests[0].task
    if found != task.name:
        raise ToolkitError(f"{path} holds {found} artifacts, not {task.name} ones: {fix(found)}")
    if max_length is not None:
        check_max_length(max_length, manifests[-1].seq_len, f"the largest SEQ in {path}")
    return manifests


def _check_flag(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ToolkitError(f"{name} must be True or False, got {value!r}")


def _as_list_fix(value) -> str:
    """How to pass `value` (not a list) as one: a single text goes in a list, any other iterable (a generator, a
    numpy array) through list()."""
    if isinstance(value, (str, bytes)):
        return "; wrap a single text in a list"
    return "; convert it with list(...)" if isinstance(value, Iterable) else ""


def _check_texts(texts, method: str) -> list[str]:
    """`texts` as a list, or a ToolkitError naming `method` (the one the user called)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise ToolkitError(f"{method} takes a list of texts, got {type(texts).__name__}{_as_list_fix(texts)}")
    if not texts:
        raise ToolkitError(f"{method} got an empty list; pass at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ToolkitError(f"{method}: item #{i} is a {type(t).__name__}, not a text")
    return list(texts)


class Embedder(_TextModel):
    """Qwen3-Embedding: texts → L2-normalised vectors (queries with an instruction, documents bare)."""

    task = EMBEDDING

    def format(self, texts: list[str], instruction: str | None = None) -> list[str]:
        """The texts as the model reads them: with an `instruction`, in Qwen3-Embedding's query format. A set built
        for one instruction (`fixed_instruction`) takes only queries with it."""
        return self._format("format", texts, instruction)

    def _format(self, method: str, texts: list[str], instruction: str | None) -> list[str]:
        """`format`, its errors naming `method` (the one the user called)."""
        check_instruction_text(instruction)
        fixed = self.fixed_instruction
        if instruction:
            check_instruction(fixed, instruction)
        elif fixed is not None:
            raise ToolkitError(f"these artifacts embed queries with the instruction {fixed!r} (its tokens are cached "
                               "in the graph): pass it (encode_queries does); texts without it (documents) need a set "
                               "compiled without --instruction")
        texts = _check_texts(texts, method)
        if instruction:
            self._check_room(self.task.format_query("", instruction), "the instruction", "text")
        return [self.task.format_query(t, instruction) for t in texts]

    def tokenize(self, texts: list[str], truncation: str | None = None) -> list[list[int]]:
        """Token ids ending in exactly one <|endoftext|>, whatever the tokenizer's own post-processing does.
        `truncation` overrides the model's policy for this call."""
        return self._rows(_check_texts(texts, "tokenize"), truncation)

    def tokenize_ids(self, bodies: list[list[int]], truncation: str | None = None) -> list[list[int]]:
        """Rows for texts already tokenised (e.g. token ids a client sent): what `tokenize` makes of the texts."""
        vocabulary = len(self.tokenizer)
        for i, ids in enumerate(bodies):
            if not all(is_integer(t) and 0 <= t < vocabulary for t in ids):
                raise ToolkitError(f"input #{i}: token ids must be integers in 0..{vocabulary - 1}")
        return frame_rows(self._layout, bodies, self.max_length, check_truncation(truncation or self.truncation))

    def encode(self, texts: list[str], instruction: str | None = None, dim: int | None = None,
               normalize: bool = True, progress: bool = False) -> np.ndarray:
        """Embed texts `[n, dim]`; with an `instruction` they are formatted as queries. `dim` cuts (MRL) before
        normalising."""
        return self._embed("encode", texts, instruction, dim, normalize, progress)

    def _embed(self, method: str, texts: list[str], instruction: str | None, dim: int | None = None,
               normalize: bool = True, progress: bool = False) -> np.ndarray:
        """`encode`, its errors naming `method` (the one the user called)."""
        _check_flag(normalize, "normalize")
        _check_flag(progress, "progress")
        rows = self._rows(self._format(method, texts, instruction), origin=lambda i: ([texts[i]], [f"text #{i}"]))
        return self.task.finish(self.runner.run(rows, progress), dim=dim, normalize=normalize)

    @property
    def query_instruction(self) -> str:
        """The instruction queries get unless one is named: the set's fixed one, else web search."""
        return self.task.query_instruction(self.fixed_instruction)

    def encode_queries(self, queries: list[str], instruction: str | None = None, **kw) -> np.ndarray:
        """Embed search queries with the instruction (None: `query_instruction`)."""
        return self._embed("encode_queries", queries, self.query_instruction if instruction is None else instruction,
                           **kw)

    def encode_documents(self, documents: list[str], **kw) -> np.ndarray:
        """Embed documents (no instruction, as Qwen3-Embedding expects)."""
        return self._embed("encode_documents", documents, None, **kw)


class Reranker(_TextModel):
    """Qwen3-Reranker: (query, document) pairs → P(yes)."""

    task = RERANKER

    def tokenize(self, pairs: list[tuple[str, str]], instruction: str | None = None,
                 truncation: str | None = None) -> list[list[int]]:
        """prefix + body + suffix; only the body (instruction, query, document) is ever truncated. `instruction`: None
        for the artifacts' fixed one, else the web-search one. `truncation` overrides the model's policy for this
        call."""
        check_instruction_text(instruction)
        fixed = self.fixed_instruction
        if instruction is not None:
            check_instruction(fixed, instruction)
        instruction = fixed if instruction is None else instruction
        pairs = _check_pairs(pairs)
        try:
            rows = self._rows([self.task.format_body(q, d, instruction) for q, d in pairs], truncation,
                              lambda i: (pairs[i], [f"the query of pair #{i}", f"the document of pair #{i}"]))
        except InputTooLongError as e:  # a query and instruction that fill the room alone: truncating would not help
            self._check_room(self.task.format_body(pairs[e.index][0], "", instruction), "the query and instruction",
                             "document")
            raise
        for query in {q for (q, _), row in zip(pairs, rows) if len(row) == self.max_length}:  # cut ones: anything left?
            self._check_room(self.task.format_body(query, "", instruction), "the query and instruction", "document")
        return rows

    def score(self, pairs: list[tuple[str, str]], instruction: str | None = None, progress: bool = False) -> np.ndarray:
        """P(yes) for each (query, document) pair, in input order."""
        _check_flag(progress, "progress")
        return self.task.finish(self.runner.run(self.tokenize(pairs, instruction), progress))

    def rerank(self, query: str, documents: list[str], top_n: int | None = None, instruction: str | None = None,
               return_documents: bool = False, *, top_k: int | None = None) -> list[dict]:
        """Documents sorted by P(yes) for one query, as sentence-transformers' `CrossEncoder.rank`:
        `[{"corpus_id": index in documents, "score": P(yes)[, "text": document]}, ...]`, best first, `top_n` kept
        (or `top_k`, sentence-transformers' name for it)."""
        if not isinstance(query, str):
            raise ToolkitError(f"rerank takes one query text, got {type(query).__name__}")
        documents = _check_texts(documents, "rerank")
        name = "top_n"
        if top_k is not None:
            if top_n is not None:
                raise ToolkitError("pass top_k or top_n, not both: they are the same (top_k is sentence-transformers' "
                                   "name)")
            name, top_n = "top_k", top_k
        if top_n is not None:
            check_int(top_n, name, 1)
        _check_flag(return_documents, "return_documents")
        scores = self.score([(query, d) for d in documents], instruction)
        return [{"corpus_id": i, "score": float(scores[i]), **({"text": documents[i]} if return_documents else {})}
                for i in rank_order(scores, top_n)]


def rank_order(scores, top_n: int | None = None) -> list[int]:
    """Indices of `scores`, best first (ties in input order), the first `top_n` kept."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]


def _check_pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)):
        fix = "" if isinstance(pairs, str) else _as_list_fix(pairs)  # a text alone is no pair
        raise ToolkitError(f"score takes a list of (query, document) pairs, got {type(pairs).__name__}{fix}")
    if not pairs:
        raise ToolkitError("score got an empty list; pass at least one (query, document) pair")
    for i, p in enumerate(pairs):
        if isinstance(p, str) or not isinstance(p, (list, tuple)) or len(p) != 2 \
                or not all(isinstance(x, str) for x in p):
            raise ToolkitError(f"score: item #{i} must be a (query, document) pair of texts, got {p!r:.60}")
    return [tuple(p) for p in pairs]


def model_class(task: Task) -> type[_TextModel]:
    """The high-level class that runs `task`: Embedder or Reranker."""
    return {cls.task.name: cls for cls in (Embedder, Reranker)}[task.name]
