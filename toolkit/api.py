"""High-level API: `Embedder` and `Reranker` take text, speak the official Qwen3 formats, and run on an artifact,
a bucket set of artifacts (several SEQs), or the torch reference.

    emb = Embedder.from_artifacts("workspace/qwen3-embedding-0.6b-fp16/onnx")   # every seq* artifact = buckets
    q = emb.encode_queries(["What is the capital of China?"])                  # Instruct: ...\nQuery:...
    d = emb.encode_documents(["The capital of China is Beijing."])
    rr = Reranker.from_artifacts("workspace/qwen3-reranker-0.6b-fp16/onnx")
    rr.rerank("What is the capital of China?", ["Beijing is ...", "Gravity is ..."])  # P(yes) per document
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .artifact import MANIFEST, read_manifest
from .checkpoint import load_tokenizer, resolve_checkpoint
from .errors import ToolkitError
from .parity import l2_normalize, yes_probability
from .runtime import Engine
from .text import left_pad
from .tokenizer import ENDOFTEXT_ID

WEB_SEARCH_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{query}"
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                 "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
RERANK_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TRUNCATION = ("error", "truncate")


def find_artifacts(path: str | Path) -> list[Path]:
    """One artifact directory, or a directory of them (a bucket set: same task/backend/batch, several SEQs)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    found = sorted({p.parent for p in path.glob("*/" + MANIFEST)} | {p.parent for p in path.glob("*/*/" + MANIFEST)})
    if not found:
        raise ToolkitError(f"no artifact under {path}; compile one with `toolkit compile` (or `make quickstart`)")
    manifests = {p: read_manifest(p) for p in found}
    kinds = {(m["task"], m["backend"], m["batch"]) for m in manifests.values()}
    if len(kinds) > 1:
        raise ToolkitError(f"{path} mixes artifacts of different task/backend/batch {sorted(kinds)}; point at one set")
    return sorted(found, key=lambda p: manifests[p]["seq_len"])


class BucketedRunner:
    """Routes each token row to the smallest engine whose SEQ fits, pads to that engine's [batch, SEQ], submits every
    batch asynchronously and returns the outputs in input order. An engine with no fixed SEQ (torch reference) gets
    length-sorted batches of `dynamic_batch` padded to their longest row."""

    def __init__(self, engines: list[Engine], dynamic_batch: int = 8, max_length: int | None = None):
        self.engines = sorted(engines, key=lambda e: e.seq_len or 0)
        self.dynamic_batch = dynamic_batch
        self.max_length = max_length or self.engines[-1].seq_len

    def bucket_for(self, length: int) -> Engine:
        for engine in self.engines:
            if engine.seq_len is None or length <= engine.seq_len:
                return engine
        raise ToolkitError(f"{length} tokens do not fit the largest artifact (SEQ {self.engines[-1].seq_len})")

    def run(self, rows: list[list[int]], progress: bool = False) -> np.ndarray:
        by_engine: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_engine.setdefault(id(self.bucket_for(len(row))), []).append(i)
        jobs = []  # (row indices, future)
        for engine in self.engines:
            order = sorted(by_engine.get(id(engine), []), key=lambda i: len(rows[i]))
            step = engine.batch or self.dynamic_batch
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                chunk = [rows[i] for i in idx]
                seq = engine.seq_len or max(map(len, chunk))
                ids, mask = left_pad(chunk, seq, ENDOFTEXT_ID, engine.batch)
                jobs.append((idx, engine.run_async(ids, mask)))
        results: list = [None] * len(rows)
        for idx, future in tqdm(jobs, desc="batches", disable=not progress, leave=False):
            out = future.result()
            for k, i in enumerate(idx):
                results[i] = out[k]
        return np.stack(results) if results else np.zeros((0, 0), np.float32)

    def close(self):
        for e in self.engines:
            e.close()


class _TextModel:
    task: str

    def __init__(self, runner: BucketedRunner, tokenizer, truncation: str = "error"):
        if truncation not in TRUNCATION:
            raise ToolkitError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        self.runner, self.tokenizer, self.truncation = runner, tokenizer, truncation

    @classmethod
    def from_artifacts(cls, path: str | Path, instances: int = 1, device_ids: tuple[int, ...] = (0,),
                       queue_size: int = 64, truncation: str = "error"):
        dirs = find_artifacts(path)
        task = read_manifest(dirs[0])["task"]
        if task != cls.task:
            raise ToolkitError(f"{path} holds {task} artifacts; use {'Embedder' if task == 'embedding' else 'Reranker'}")
        engines = [Engine.from_artifact(d, instances, device_ids, queue_size) for d in dirs]
        return cls(BucketedRunner(engines), load_tokenizer(dirs[0] / "tokenizer"), truncation)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, max_length: int = 8192, batch_size: int = 8,
                        truncation: str = "error"):
        """The torch reference: the unpatched Hugging Face model, same formats and truncation as the artifacts."""
        path = resolve_checkpoint(checkpoint)
        engine = Engine.from_checkpoint(path, cls.task)
        return cls(BucketedRunner([engine], batch_size, max_length), load_tokenizer(path), truncation)

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def _fit(self, body: list[int], fixed: int, i: int, counter: list) -> list[int]:
        """Apply the truncation policy to a row whose non-truncatable parts take `fixed` tokens."""
        room = self.max_length - fixed
        if len(body) <= room:
            return body
        if self.truncation == "error":
            raise ToolkitError(f"input #{i} has {len(body) + fixed} tokens but the largest artifact takes "
                               f"{self.max_length}; pass truncation='truncate' or compile a larger SEQ")
        counter[0] += 1
        return body[:room]

    def _warn_truncated(self, counter: list) -> None:
        if counter[0]:
            warnings.warn(f"{counter[0]} input(s) truncated to {self.max_length} tokens", stacklevel=3)

    def close(self):
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Embedder(_TextModel):
    task = "embedding"

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids ending in exactly one <|endoftext|>, whatever the tokenizer's own post-processing does."""
        counter = [0]
        encoded = self.tokenizer(list(texts), add_special_tokens=False).input_ids
        rows = [self._fit(ids, 1, i, counter) + [ENDOFTEXT_ID] for i, ids in enumerate(encoded)]
        self._warn_truncated(counter)
        return rows

    def encode(self, texts: list[str], instruction: str | None = None, dim: int | None = None,
               normalize: bool = True, progress: bool = False) -> np.ndarray:
        """Embed texts; with `instruction` they are formatted as queries. `dim` cuts (MRL) before normalising."""
        if isinstance(texts, str):
            raise ToolkitError("encode takes a list of texts")
        if instruction is not None:
            texts = [QUERY_TEMPLATE.format(instruction=instruction, query=t) for t in texts]
        hidden = self.runner.run(self.tokenize(texts), progress)
        if dim is not None:
            if not 0 < dim <= hidden.shape[-1]:
                raise ToolkitError(f"dim must be in 1..{hidden.shape[-1]}, got {dim}")
            hidden = hidden[:, :dim]
        return l2_normalize(hidden) if normalize else hidden

    def encode_queries(self, queries, instruction: str = WEB_SEARCH_INSTRUCTION, **kw) -> np.ndarray:
        return self.encode(queries, instruction=instruction, **kw)

    def encode_documents(self, documents, **kw) -> np.ndarray:
        return self.encode(documents, instruction=None, **kw)


class Reranker(_TextModel):
    task = "reranker"

    def tokenize(self, pairs: list[tuple[str, str]], instruction: str | None = None) -> list[list[int]]:
        """prefix + body + suffix; only the body (instruction, query, document) is ever truncated."""
        prefix = self.tokenizer(RERANK_PREFIX, add_special_tokens=False).input_ids
        suffix = self.tokenizer(RERANK_SUFFIX, add_special_tokens=False).input_ids
        bodies = [RERANK_BODY.format(instruction=instruction or WEB_SEARCH_INSTRUCTION, query=q, document=d)
                  for q, d in pairs]
        counter = [0]
        encoded = self.tokenizer(bodies, add_special_tokens=False).input_ids
        rows = [prefix + self._fit(ids, len(prefix) + len(suffix), i, counter) + suffix
                for i, ids in enumerate(encoded)]
        self._warn_truncated(counter)
        return rows

    def score(self, pairs: list[tuple[str, str]], instruction: str | None = None, progress: bool = False) -> np.ndarray:
        """P(yes) for each (query, document) pair."""
        return yes_probability(self.runner.run(self.tokenize(pairs, instruction), progress))

    def rerank(self, query: str, documents: list[str], instruction: str | None = None) -> np.ndarray:
        """P(yes) of each document for one query (one call, batched)."""
        return self.score([(query, d) for d in documents], instruction)
