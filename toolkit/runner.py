"""Token rows to engines: `BucketedRunner` routes each row to the smallest engine whose SEQ takes it, batches and pads
the rows per engine, submits the batches asynchronously and gives the outputs back in input order; `RunnerStats`
counts what it computed. Below the text API (`toolkit.api`), above the engines (`toolkit.runtime`)."""
from __future__ import annotations

from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from toolkit.errors import ToolkitError
from toolkit.runtime import Engine
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID


@dataclass
class RunnerStats:
    """What a runner has computed so far: real tokens, the token slots run (padding included), batches per SEQ."""

    real_tokens: int = 0
    computed_tokens: int = 0
    batches_per_seq: dict = field(default_factory=dict)

    def add(self, real: int, computed: int, seq: int) -> None:
        """Count one submitted batch."""
        self.real_tokens += real
        self.computed_tokens += computed
        self.batches_per_seq[seq] = self.batches_per_seq.get(seq, 0) + 1

    @property
    def padding_fraction(self) -> float:
        """Share of the computed token slots that were padding (0 when nothing ran)."""
        return 1 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


@dataclass
class Batch:
    """One engine run a runner submitted: the positions of its rows in the submitted list, its real and computed token
    counts, and the future that carries its outputs (one row per position, in that order)."""

    indices: list[int]
    real_tokens: int
    computed_tokens: int
    future: Future


@contextmanager
def cancelled_on_error(batches: list[Batch]):
    """On any exception in the block (KeyboardInterrupt included), cancel the futures of `batches` that have not
    started (those running finish, their outputs dropped), then re-raise."""
    try:
        yield
    except BaseException:
        for batch in batches:
            batch.future.cancel()
        raise


class BucketedRunner:
    """Routes each token row to the smallest engine whose SEQ fits, batches each engine's rows (as many as its batch
    takes, fewer in its last batch), left-pads them to the engine's SEQ, submits every batch asynchronously and returns
    the outputs in input order. An engine with no fixed batch and SEQ (torch reference) gets length-sorted batches of
    `reference_batch_size` rows padded to their longest row; one whose SEQ is the longest it takes (`dynamic_seq`:
    ONNX Runtime) gets its batches padded to their longest row too."""

    def __init__(self, engines: list[Engine], reference_batch_size: int = 8, max_length: int | None = None):
        self.engines = sorted(engines, key=lambda e: e.seq_len or 0)
        self.reference_batch_size = reference_batch_size
        self.max_length = self.engines[-1].seq_len if max_length is None else max_length
        self.stats = RunnerStats()

    def bucket_for(self, length: int) -> Engine:
        """The smallest engine that takes a row of `length` tokens."""
        for engine in self.engines:
            if engine.seq_len is None or length <= engine.seq_len:
                return engine
        raise ToolkitError(f"{length} tokens do not fit the largest artifact (SEQ {self.engines[-1].seq_len})")

    def plan(self, rows: list[list[int]]) -> list[tuple[Engine, list[int]]]:
        """The batches the rows make, smallest SEQ first: (engine, positions of its rows, sorted by length)."""
        by_engine: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_engine.setdefault(id(self.bucket_for(len(row))), []).append(i)
        planned = []
        for engine in self.engines:
            order = sorted(by_engine.get(id(engine), []), key=lambda i: len(rows[i]))
            step = self.batch_rows(engine)
            planned += [(engine, order[start:start + step]) for start in range(0, len(order), step)]
        return planned

    def batch_rows(self, engine: Engine) -> int:
        """The most rows one batch of `engine` takes (its artifact's batch, or `reference_batch_size`)."""
        return engine.batch or self.reference_batch_size

    def run_batch(self, engine: Engine, rows: list[list[int]], indices: list[int]) -> Batch:
        """Queue one batch of `engine` holding `rows[i]` for i in `indices` (as `plan` made it)."""
        chunk = [rows[i] for i in indices]
        seq = max(map(len, chunk)) if engine.seq_len is None or engine.dynamic_seq else engine.seq_len
        ids, mask = left_pad(chunk, seq, ENDOFTEXT_ID)
        real = sum(map(len, chunk))
        self.stats.add(real, ids.size, engine.seq_len or seq)
        return Batch(indices, real, ids.size, engine.run_async(ids, mask))

    def submit(self, rows: list[list[int]]) -> list[Batch]:
        """Queue every batch the rows make; does not wait for outputs. Interrupted (Ctrl-C while a full queue blocks
        it, a batch refused), it cancels the batches it queued before it re-raises."""
        batches: list[Batch] = []
        with cancelled_on_error(batches):
            for engine, indices in self.plan(rows):
                batches.append(self.run_batch(engine, rows, indices))
        return batches

    def run(self, rows: list[list[int]], progress: bool = False) -> np.ndarray:
        """Raw outputs for token rows, in input order. On a failed batch or an interrupt, the batches not started yet
        are cancelled: the engines do not run them for a caller that has gone (nor make the next call wait)."""
        results: list = [None] * len(rows)
        batches = self.submit(rows)
        with cancelled_on_error(batches):
            for batch in tqdm(batches, desc="batches", disable=not progress, leave=False):
                out = batch.future.result()
                for k, i in enumerate(batch.indices):
                    results[i] = out[k]
        return np.stack(results)

    def close(self):
        """Close every engine."""
        for e in self.engines:
            e.close()
