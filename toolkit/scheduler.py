"""Cross-request batching: token rows from concurrent callers merged into the same engine batches.

A service receives many small requests at once (one sentence each, say); run one at a time, each would fill an engine's
`[batch, SEQ]` with a single row. `BatchScheduler` collects the rows of concurrent callers and hands them, in rounds,
to a `BucketedRunner`, which packs them by length into its bucket engines' shapes. Each caller's future resolves with
the outputs of its own rows, in its order, as soon as the batches holding them are done.

A round is dispatched when an engine instance is free and either the waiting rows fill the token budget or the oldest
has waited `max_wait_ms`. While every instance is busy, rows wait here, where they can still join a fuller batch,
rather than as small batches in the engines' queues.

    scheduler = BatchScheduler(embedder.runner, max_batch_tokens=16384, max_wait_ms=2)
    raw = scheduler.submit(embedder.tokenize(texts)).result()   # == embedder.runner.run(...)
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from toolkit.api import Batch, BucketedRunner
from toolkit.errors import ToolkitError
from toolkit.runtime import EngineClosedError


class SchedulerObserver:
    """What a scheduler reports as it works (e.g. to metrics); every hook does nothing by default. Hooks run on the
    scheduler's and the engines' threads."""

    def batch_submitted(self, batch: Batch) -> None:
        """One engine batch was queued."""

    def request_finished(self, queued_s: float, inference_s: float) -> None:
        """A request's outputs are all in: seconds it waited for its round, and from then until its last batch."""


@dataclass(eq=False)
class _Request:
    rows: list[list[int]]
    future: Future
    submitted: float
    tokens: int
    dispatched: float = 0.0
    outputs: list = field(default_factory=list)
    remaining: int = 0  # rows whose outputs have not arrived
    failed: bool = False


class BatchScheduler:
    """Merges the token rows of concurrent `submit` calls into shared rounds on `runner`'s engines.

    `max_batch_tokens`: the most tokens one round takes (at least the runner's `max_length`, so any row fits);
    `max_wait_ms`: how long the oldest waiting row may wait for others before its round goes, when an instance is
    free. The runner's engines stay the caller's to close, after this scheduler."""

    def __init__(self, runner: BucketedRunner, max_batch_tokens: int = 16384, max_wait_ms: float = 2.0,
                 observer: SchedulerObserver | None = None):
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) \
                or max_batch_tokens < runner.max_length:
            raise ToolkitError(f"max_batch_tokens must be an integer >= the max input length {runner.max_length}, "
                               f"got {max_batch_tokens!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ToolkitError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.runner, self.max_batch_tokens, self.max_wait = runner, max_batch_tokens, max_wait_ms / 1000
        self.observer = observer or SchedulerObserver()
        # batches that can run at once: every instance holds its share of the CPU budget while it runs
        self.slots = max(e.instances for e in runner.engines)
        self._pending: deque[_Request] = deque()
        self._pending_tokens = 0
        self.pending_rows = 0  # rows waiting for a round (the queue depth)
        self._in_flight = 0  # batches queued on the engines, not finished
        self._closed = False
        self._state = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batch-scheduler")
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether rows submitted now will be run."""
        return not self._closed and self._thread.is_alive()

    def submit(self, rows: list[list[int]]) -> Future:
        """Queue token rows for the next rounds; the future resolves to their raw outputs `[len(rows), ...]` in
        order, or to the exception their batch raised."""
        if not rows:
            raise ToolkitError("no rows to run; pass at least one")
        for i, row in enumerate(rows):
            if not 1 <= len(row) <= self.runner.max_length:
                raise ToolkitError(f"row {i} has {len(row)} tokens; it must have 1..{self.runner.max_length}")
        request = _Request(rows, Future(), time.monotonic(), sum(map(len, rows)))
        with self._state:
            if self._closed:
                raise EngineClosedError("the scheduler is closed; the service is shutting down")
            self._pending.append(request)
            self._pending_tokens += request.tokens
            self.pending_rows += len(rows)
            self._state.notify_all()
        return request.future

    def close(self) -> None:
        """Refuse new rows and dispatch every waiting one at once; their outputs arrive as the engines finish (close
        the engines afterwards: that waits for them). Idempotent."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._thread.join()

    # ---- the scheduling thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            requests = self._next_round()
            if requests is None:
                return
            self._dispatch(requests)

    def _next_round(self) -> list[_Request] | None:
        """Wait until a round is due and take its requests; None once closed with nothing waiting."""
        with self._state:
            while not self._closed:
                if not self._pending:
                    self._state.wait()
                    continue
                free = self._in_flight < self.slots
                wait = self._pending[0].submitted + self.max_wait - time.monotonic()
                if free and (self._pending_tokens >= self.max_batch_tokens or wait <= 0):
                    break
                self._state.wait(wait if free else None)  # new rows or a finished batch wake it early
            if not self._pending:
                return None
            return self._take()

    def _take(self) -> list[_Request]:
        """The oldest requests that fit the token budget (at least one); a caller that cancelled is dropped."""
        taken, tokens = [], 0
        while self._pending and (not taken or tokens + self._pending[0].tokens <= self.max_batch_tokens):
            request = self._pending.popleft()
            tokens += request.tokens
            self.pending_rows -= len(request.rows)
            if request.future.set_running_or_notify_cancel():
                taken.append(request)
        self._pending_tokens -= tokens
        return taken

    def _dispatch(self, requests: list[_Request]) -> None:
        owners = []  # for each row of the round: (request, position in its rows)
        now = time.monotonic()
        for request in requests:
            request.dispatched, request.outputs, request.remaining = now, [None] * len(request.rows), len(request.rows)
            owners += [(request, k) for k in range(len(request.rows))]
        try:
            batches = self.runner.submit([r.rows[k] for r, k in owners])
        except BaseException as e:  # e.g. the engines closed: this round's callers get the error
            for request in requests:
                request.future.set_exception(e)
            return
        for batch in batches:
            with self._state:
                self._in_flight += 1
            self.observer.batch_submitted(batch)
            batch.future.add_done_callback(lambda future, batch=batch: self._finished(batch, owners))

    def _finished(self, batch: Batch, owners: list) -> None:
        """An engine batch is done: hand each row's output to its request; resolve the requests now complete."""
        error = batch.future.exception()
        outputs = None if error else batch.future.result()
        resolved = []
        with self._state:
            self._in_flight -= 1
            self._state.notify_all()
            for k, i in enumerate(batch.indices):
                request, position = owners[i]
                if request.failed:
                    continue
                if error:
                    request.failed = True
                    resolved.append((request, error))
                    continue
                request.outputs[position] = outputs[k]
                request.remaining -= 1
                if request.remaining == 0:
                    resolved.append((request, None))
        finished = time.monotonic()
        for request, failure in resolved:
            if failure:
                request.future.set_exception(failure)
            else:
                request.future.set_result(np.stack(request.outputs))
                self.observer.request_finished(request.dispatched - request.submitted, finished - request.dispatched)
