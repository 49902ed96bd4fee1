"""Cross-request batching: token rows from concurrent callers merged into the same engine batches.

A service receives many small requests at once (one sentence each, say); run one at a time, each would fill an engine's
`[batch, SEQ]` with a single row. `BatchScheduler` keeps the rows of concurrent callers in one pool and, each time an
engine instance is free, runs the one batch of the pool with the most real tokens per token slot: for each engine of
the `BucketedRunner`, the longest waiting rows of its bucket, as many as its batch takes. Each caller's future
resolves with the outputs of its own rows, in its order, as soon as the batches holding them are done.

One batch at a time, not a round of batches: rows that arrive while a batch runs join the pool and can fill the next
one, so a closed loop of clients never splits into a full round and its stragglers. Token slots computed beyond an
offline run's on the same STS12 sentences, 64 single-row clients: 14% in rounds, 9% taking the batches the runner's
plan made of the pool (the shortest rows of a bucket first), 3% taking the longest rows (1,024 sentences, a TVM set
of the former static batch, whose batches also took the rows of smaller buckets: 29,704 slots against offline's
28,792, and 31,440). A row passed over `MAX_PASSED_OVER` times goes in the next batch, so a row of a rare length waits
a few batches at most.

A batch goes when an instance is free and either it is full, the pool holds the token budget, or the oldest row has
waited `max_wait_ms`. While every instance is busy, rows wait here, where they can still join a fuller batch, rather
than as small batches in the engines' queues.

    scheduler = BatchScheduler(embedder.runner, max_batch_tokens=16384, max_wait_ms=2)
    raw = scheduler.submit(embedder.tokenize(texts)).result()   # == embedder.runner.run(...)
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ToolkitError, clipped, is_integer
from toolkit.runner import Batch, BucketedRunner
from toolkit.runtime import EngineClosedError


class SchedulerObserver:
    """What a scheduler reports as it works (e.g. to metrics); every hook does nothing by default. Hooks run on the
    scheduler's and the engines' threads."""

    def batch_submitted(self, batch: Batch) -> None:
        """One engine batch was queued."""

    def request_finished(self, queued_s: float, inference_s: float) -> None:
        """A request's outputs are all in: seconds it waited for its first batch, and from then until its last batch."""


MAX_PASSED_OVER = 4  # batches a waiting row may watch go without it; then its own batch goes next
MAX_WAIT_MS = 60_000  # a longer wait for company is no batching policy (and past ~1e13 ms, a wait the OS refuses)


class SchedulerStopped(ToolkitError):
    """The scheduler stopped on an error of its own: rows submitted to it would never run."""


def check_max_batch_tokens(value, max_length: int, name: str = "max_batch_tokens") -> None:
    """Raise ToolkitError naming the option (`name`, as its user sets it) unless `value` is an integer of at least
    `max_length`: a batch's token budget holds any row."""
    if not is_integer(value) or value < max_length:
        raise ToolkitError(f"{name} must be an integer >= the max input length {max_length}, got {value!r}; raise it "
                           f"to at least {max_length}")


def check_max_wait_ms(value, name: str = "max_wait_ms") -> None:
    """Raise ToolkitError naming the option (`name`, as its user sets it) unless `value` is a finite wait: the
    scheduling thread waits this long."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT_MS:
        raise ToolkitError(f"{name} must be a number of milliseconds in 0..{MAX_WAIT_MS}, got {value!r}")


def _holds_token_ids(row) -> bool:
    """Whether `row` is a flat sequence of integers: one pass in C (rows arrive with every request)."""
    try:
        ids = np.asarray(row)
    except ValueError:  # ragged nesting
        return False
    return ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer)


@dataclass(eq=False)
class _Request:
    rows: list[list[int]]
    future: Future
    submitted: float
    outputs: list
    remaining: int  # rows whose outputs have not arrived
    dispatched: float | None = None  # when its first row went to an engine
    failed: bool = False


@dataclass(eq=False)
class _Row:
    request: _Request
    position: int  # in the request's rows
    passed_over: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.request.rows[self.position]


class BatchScheduler:
    """Merges the token rows of concurrent `submit` calls into shared batches on `runner`'s engines.

    `max_batch_tokens`: the most tokens of waiting rows (oldest first) one choice of batch looks at, and the pool size
    at which a batch goes without waiting (at least the runner's `max_length`, so any row fits); `max_wait_ms`: how
    long the oldest waiting row may wait for a full batch when an instance is free. The runner's engines stay the
    caller's to close, after this scheduler."""

    def __init__(self, runner: BucketedRunner, max_batch_tokens: int = 16384, max_wait_ms: float = 2.0,
                 observer: SchedulerObserver | None = None):
        check_max_batch_tokens(max_batch_tokens, runner.max_length)
        check_max_wait_ms(max_wait_ms)
        self.runner, self.max_batch_tokens, self.max_wait = runner, max_batch_tokens, max_wait_ms / 1000
        self.observer = observer or SchedulerObserver()
        # batches that can run at once: every instance holds its share of the CPU budget while it runs
        self.slots = max(e.instances for e in runner.engines)
        self._pool: list[_Row] = []  # waiting rows, oldest first
        self._pool_tokens = 0
        self._in_flight = 0  # batches queued on the engines, not finished
        self._closed = False
        self._stopped_by: str | None = None  # the error the scheduler stopped on, if it did
        self._state = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batch-scheduler")
        self._thread.start()

    @property
    def pending_rows(self) -> int:
        """Rows waiting for a batch (the queue depth)."""
        return len(self._pool)

    @property
    def alive(self) -> bool:
        """Whether rows submitted now will be run."""
        return not self._closed and self._thread.is_alive()

    def submit(self, rows: list[list[int]]) -> Future:
        """Queue token rows for the next batches; the future resolves to their raw outputs `[len(rows), ...]` in
        order, or to the exception their batch raised (SchedulerStopped if the scheduler fails on an error of its own:
        then it takes no more rows)."""
        self.runner.engines[0].check_process()  # this scheduler's thread, as the engines' workers, is the loader's
        takes = "submit takes a list of token rows, each a list of token ids (what Embedder/Reranker.tokenize make)"
        if not isinstance(rows, (list, tuple)):
            raise ToolkitError(f"{takes}, got {type(rows).__name__}")
        if not rows:
            raise ToolkitError("no rows to run; pass at least one")
        for i, row in enumerate(rows):
            if not isinstance(row, (list, tuple, np.ndarray)):
                raise ToolkitError(f"{takes}; row {i} is a {type(row).__name__}")
            if not 1 <= len(row) <= self.runner.max_length:
                raise ToolkitError(f"row {i} has {len(row)} tokens; it must have 1..{self.runner.max_length}")
            if not _holds_token_ids(row):
                raise ToolkitError(f"{takes}; row {i} is {clipped(repr(row))}")
        request = _Request(rows, Future(), time.monotonic(), [None] * len(rows), len(rows))
        with self._state:
            if self._stopped_by:
                raise SchedulerStopped(self._stopped_by)
            if self._closed:
                raise EngineClosedError("the scheduler is closed; the service is shutting down")
            self._pool += [_Row(request, k) for k in range(len(rows))]
            self._pool_tokens += sum(map(len, rows))
            if self._in_flight < self.slots:  # else a finished batch wakes the thread: a wake-up costs compute time
                self._state.notify_all()
        return request.future

    def cancel(self, future: Future) -> None:
        """Drop the waiting rows of the request `future` came from (its caller left): they never run. Its rows already
        in a batch finish, their outputs discarded. The future is cancelled (or, where a row of it had started, fails
        with CancelledError: a running future cannot be cancelled). A request with no row waiting is left as it is."""
        with self._state:
            waiting = [r for r in self._pool if r.request.future is future]
            if not waiting:
                return
            request = waiting[0].request
            request.failed = True  # what its running batches return is dropped
            self._pool = [r for r in self._pool if r.request is not request]
            self._pool_tokens -= sum(len(r.tokens) for r in waiting)
        if not future.cancel():
            future.set_exception(CancelledError())

    def drain(self) -> None:
        """Stop waiting for fuller batches: waiting rows, and rows submitted from now on, go as soon as an engine is
        free (a server that is stopping answers what it holds without waiting up to max wait for each)."""
        with self._state:
            self.max_wait = 0.0
            self._state.notify_all()

    def close(self) -> None:
        """Refuse new rows and dispatch every waiting one at once; their outputs arrive as the engines finish (close
        the engines afterwards: that waits for them). Idempotent."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._thread.join()

    # ---- the scheduling thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while (chosen := self._next_batches()) is not None:
                self._dispatch_or_stop(*chosen)
        except BaseException as e:  # a bug: stop, rather than leave every caller waiting for a thread that is gone
            self._stop(e, [])

    def _next_batches(self) -> tuple[list[_Row], list[tuple]] | None:
        """Wait until a batch is due and take it: (the rows it was chosen from, [(engine, their positions)]); once
        closed, every waiting row at once; None once closed with nothing waiting."""
        with self._state:
            while True:
                if self._closed:
                    self._drop_dead()
                    while self._pool and not self._start(self._pool, range(len(self._pool))):
                        pass  # a request was cancelled meanwhile: _start dropped its rows
                    if not self._pool:
                        return None
                    rows = self._pool
                    return self._take(rows, self.runner.plan([r.tokens for r in rows]))
                due = self._due()
                if isinstance(due, tuple):
                    return due
                self._state.wait(due)

    def _due(self) -> tuple[list[_Row], list[tuple]] | float | None:
        """Under the lock: take the batch due now, if any; else the seconds until one may be (None: until rows
        arrive or a batch finishes)."""
        while self._pool and self._in_flight < self.slots:
            rows = self._window()
            engine, indices = best = self._choose(rows)
            wait = self._pool[0].request.submitted + self.max_wait - time.monotonic()
            if len(indices) < self.runner.batch_rows(engine) and wait > 0 \
                    and self._pool_tokens < self.max_batch_tokens:
                return wait
            if self._start(rows, indices):
                return self._take(rows, [best])
            # a request was cancelled meanwhile: choose again without it
        return None

    def _window(self) -> list[_Row]:
        """The oldest waiting rows within the token budget (at least one): what one choice looks at."""
        tokens, end = 0, 0
        while end < len(self._pool) and (not end or tokens + len(self._pool[end].tokens) <= self.max_batch_tokens):
            tokens += len(self._pool[end].tokens)
            end += 1
        return self._pool[:end]

    def _choose(self, rows: list[_Row]) -> tuple:
        """The batch with the most real tokens per token slot of the engine's full batch: for each engine, the longest
        rows of its own bucket, as many as its batch takes (the oldest row passed over too often among them, if there
        is one). Not the rows of smaller buckets: one it adds costs SEQ slots (with `dynamic_seq`, the longest row's),
        and its batch holds the rows its token budget was sized for. Ties: the smaller SEQ, then the older rows."""
        overdue = next((i for i, r in enumerate(rows) if r.passed_over >= MAX_PASSED_OVER), None)
        lengths = [len(r.tokens) for r in rows]
        longest_first = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
        # each row's own bucket, once per choice (not once per engine: a window holds hundreds of rows)
        home = [self.runner.bucket_for(n) for n in lengths]
        best, best_fill = None, -1.0
        for engine in self.runner.engines:
            fits = [i for i in longest_first if home[i] is engine]
            if overdue is not None:
                if overdue not in fits:
                    continue
                fits.remove(overdue)
                fits.insert(0, overdue)
            chosen = fits[:self.runner.batch_rows(engine)]
            if not chosen:
                continue
            chosen_lengths = [lengths[i] for i in chosen]
            fill = sum(chosen_lengths) / (self.runner.batch_rows(engine) * (engine.seq_len or max(chosen_lengths)))
            if fill > best_fill:
                best, best_fill = (engine, sorted(chosen)), fill
        return best

    def _start(self, rows: list[_Row], indices: Iterable[int]) -> bool:
        """Mark the requests of these rows running; False if one was cancelled (its rows are then dropped)."""
        now = time.monotonic()
        for i in indices:
            request = rows[i].request
            if request.dispatched is None:
                if not request.future.set_running_or_notify_cancel():
                    self._drop_dead()
                    return False
                request.dispatched = now
        return True

    def _take(self, rows: list[_Row], batches: list[tuple]) -> tuple[list[_Row], list[tuple]]:
        """Remove the batches' rows from the pool; the rest of `rows` were passed over once more."""
        taken = {id(rows[i]) for _, indices in batches for i in indices}
        for row in rows:
            if id(row) not in taken:
                row.passed_over += 1
        self._pool = [r for r in self._pool if id(r) not in taken]
        self._pool_tokens -= sum(len(rows[i].tokens) for _, indices in batches for i in indices)
        self._in_flight += len(batches)
        return rows, batches

    def _drop_dead(self) -> None:
        """Forget the waiting rows of requests that failed, or that their callers cancelled before any row ran."""
        if any(r.request.failed or r.request.future.cancelled() for r in self._pool):
            self._pool = [r for r in self._pool if not (r.request.failed or r.request.future.cancelled())]
            self._pool_tokens = sum(len(r.tokens) for r in self._pool)

    def _dispatch_or_stop(self, rows: list[_Row], batches: list[tuple]) -> None:
        try:
            self._dispatch(rows, batches)
        except BaseException as e:  # a bug (in an observer, say): these rows' batches may never report back
            self._stop(e, rows)

    def _stop(self, error: BaseException, rows: list[_Row]) -> None:
        """Stop for good on `error`: fail the requests of `rows` and of the pool that are not done, refuse new ones."""
        with self._state:
            self._stopped_by = self._stopped_by or f"the batch scheduler stopped on {type(error).__name__}: {error}"
            self._closed = True
            self._state.notify_all()
            failed = {r.request for r in self._pool + rows if not r.request.failed and r.request.remaining}
            for request in failed:
                request.failed = True
            self._pool, self._pool_tokens = [], 0
        for request in failed:
            if request.dispatched is not None or request.future.set_running_or_notify_cancel():
                request.future.set_exception(SchedulerStopped(self._stopped_by))

    def _dispatch(self, rows: list[_Row], batches: list[tuple]) -> None:
        tokens = [r.tokens for r in rows]
        for engine, indices in batches:
            try:
                batch = self.runner.run_batch(engine, tokens, indices)
            except BaseException as e:  # e.g. the engines closed: these rows' callers get the error
                with self._state:
                    self._in_flight -= 1
                    self._state.notify_all()
                self._fail({rows[i].request for i in indices}, e)
                continue
            self.observer.batch_submitted(batch)
            batch.future.add_done_callback(lambda future, batch=batch: self._finished(batch, rows))

    def _fail(self, requests, error: BaseException) -> None:
        with self._state:
            failed = [r for r in requests if not r.failed]
            for request in failed:
                request.failed = True
            self._drop_dead()
        for request in failed:
            request.future.set_exception(error)

    def _finished(self, batch: Batch, rows: list[_Row]) -> None:
        """An engine batch is done: hand each row's output to its request; resolve the requests now complete."""
        error = batch.future.exception()
        outputs = None if error else batch.future.result()
        resolved = []
        with self._state:
            self._in_flight -= 1
            self._state.notify_all()
            for k, i in enumerate(batch.indices):
                row = rows[i]
                request = row.request
                if request.failed:
                    continue
                if error:
                    request.failed = True
                    resolved.append((request, error))
                    continue
                request.outputs[row.position] = outputs[k]
                request.remaining -= 1
                if request.remaining == 0:
                    resolved.append((request, None))
            if error:
                self._drop_dead()
            # the next batch is chosen here, on the engine's thread: no hand-off to the scheduling thread (which
            # waits for the GIL behind HTTP work) while the instance idles
            due = None if self._closed else self._due()
        finished = time.monotonic()
        for request, failure in resolved:
            if failure:
                request.future.set_exception(failure)
            else:
                request.future.set_result(np.stack(request.outputs))
                self.observer.request_finished(request.dispatched - request.submitted, finished - request.dispatched)
        if isinstance(due, tuple):
            self._dispatch_or_stop(*due)
