"""BatchScheduler: rows of concurrent callers merged into shared engine batches, each caller's outputs in its order,
the fullest batch first and no row passed over more than MAX_PASSED_OVER times, failures confined to the requests they
hit, a cancelled request's waiting rows dropped, a batch dispatched when full, on a full budget or at close, bad
arguments refused; a scheduler that fails on an error of its own fails what waits and refuses what comes, rather than
leave its callers waiting."""
import math
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from toolkit.backends import Backend
from toolkit.errors import ToolkitError
from toolkit.runner import BucketedRunner
from toolkit.runtime import Engine, EngineClosedError
from toolkit.scheduler import MAX_PASSED_OVER, MAX_WAIT_MS, BatchScheduler, SchedulerObserver, SchedulerStopped
from toolkit.tasks import EMBEDDING

TIMEOUT = 60
POISON = 666  # a row holding this token makes EchoBackend fail


class EchoBackend(Backend):
    """Outputs [last token, real length] per row; waits for `gate` before each run; fails on POISON."""

    task, batch = EMBEDDING, 4

    def __init__(self, seq_len: int, gate: threading.Event):
        self.seq_len, self.gate = seq_len, gate

    def run(self, input_ids, attention_mask):
        self.gate.wait(TIMEOUT)
        if (input_ids == POISON).any():
            raise RuntimeError("backend exploded")
        return np.stack([input_ids[:, -1], attention_mask.sum(-1)], axis=-1).astype(np.float32)


class Recorder(SchedulerObserver):
    def __init__(self):
        self.batches, self.finished = [], 0

    def batch_submitted(self, batch):
        self.batches.append(batch)

    def request_finished(self, queued_s, inference_s):
        assert queued_s >= 0 and inference_s >= 0
        self.finished += 1


@pytest.fixture
def echo():
    """Engines at SEQ 8 and 16, batch 4, that run while the returned gate is set (it is)."""
    gate = threading.Event()
    gate.set()
    runner = BucketedRunner([Engine(lambda i, dev, s=s: EchoBackend(s, gate)) for s in (8, 16)])
    yield runner, gate
    runner.close()


def seq(batch) -> int:
    """The SEQ a batch ran at: EchoBackend's rows are padded to their engine's SEQ."""
    return batch.computed_tokens // len(batch.indices)


def expected(rows):
    return np.array([[row[-1], len(row)] for row in rows], np.float32)


def test_concurrent_callers_share_batches_and_get_their_own_rows_in_order(echo):
    runner, gate = echo
    recorder = Recorder()
    scheduler = BatchScheduler(runner, max_batch_tokens=64, max_wait_ms=0, observer=recorder)
    gate.clear()  # the first round blocks the only instance: the others' rows wait and merge
    rng = np.random.default_rng(0)
    requests = [[[int(t) for t in rng.integers(1, 500, rng.integers(1, 17))] for _ in range(rng.integers(1, 4))]
                for _ in range(40)]
    futures = [scheduler.submit(rows) for rows in requests]
    gate.set()
    for rows, future in zip(requests, futures):
        assert np.array_equal(future.result(TIMEOUT), expected(rows))
    scheduler.close()
    assert recorder.finished == 40
    assert sum(len(b.indices) for b in recorder.batches) == sum(map(len, requests))
    assert len(recorder.batches) < sum(map(len, requests)) / 2  # rows were packed together, across requests
    assert {seq(b) for b in recorder.batches} == {8, 16}


def test_the_fullest_batch_goes_first_and_a_passed_over_row_goes_within_max_passed_over(echo):
    runner, gate = echo
    recorder = Recorder()
    scheduler = BatchScheduler(runner, max_batch_tokens=1024, max_wait_ms=0, observer=recorder)
    gate.clear()
    blocker = scheduler.submit([[1]])  # holds the only instance: what comes next waits in the pool
    wait_until(lambda: len(recorder.batches) == 1)
    long_row = scheduler.submit([[2] * 12])  # SEQ 16: 3 short rows fill its batch, 30 of 64 slots real
    shorts = [scheduler.submit([[3] * 6]) for _ in range(4 * MAX_PASSED_OVER + 4)]  # SEQ 8: 24 of 32 slots real
    assert scheduler.pending_rows == 4 * MAX_PASSED_OVER + 5
    gate.set()
    for future in [blocker, *shorts]:
        future.result(TIMEOUT)
    assert np.array_equal(long_row.result(TIMEOUT), expected([[2] * 12]))
    order = [seq(b) for b in recorder.batches[1:]]
    # fuller SEQ 8 batches go first, until the long row has watched MAX_PASSED_OVER of them go; then its batch
    assert order == [8] * MAX_PASSED_OVER + [16, 8], order
    scheduler.close()


def test_a_batch_takes_the_longest_rows_of_its_bucket(echo):
    runner, gate = echo
    recorder = Recorder()
    scheduler = BatchScheduler(runner, max_batch_tokens=1024, max_wait_ms=0, observer=recorder)
    gate.clear()
    blocker = scheduler.submit([[1]])  # holds the only instance: what comes next waits in the pool
    wait_until(lambda: len(recorder.batches) == 1)
    lengths = [9, 16, 10, 14, 15, 3]
    futures = [scheduler.submit([[4] * n]) for n in lengths]
    gate.set()
    blocker.result(TIMEOUT)
    for n, future in zip(lengths, futures):
        assert np.array_equal(future.result(TIMEOUT), expected([[4] * n]))
    scheduler.close()
    # SEQ 16, 4 rows: 16, 15, 14 and 10 (55 real tokens), not the 4 shortest of its bucket (48). The 3-token row is
    # not taken into SEQ 16's last batch (it would cost 16 slots there): SEQ 8 runs it alone
    assert [(seq(b), len(b.indices), b.real_tokens) for b in recorder.batches[1:]] == [(16, 4, 55), (16, 1, 9),
                                                                                       (8, 1, 3)]


def test_a_full_batch_goes_at_once_while_a_lone_row_waits(echo):
    runner, _ = echo
    scheduler = BatchScheduler(runner, max_batch_tokens=64, max_wait_ms=MAX_WAIT_MS)  # waits "forever" for company
    lonely = scheduler.submit([[5] * 12])  # SEQ 16
    full = scheduler.submit([[7] * 3] * 4)  # 4 rows: a full SEQ 8 batch (12 of 32 slots real; with the lone row, at
    # SEQ 16, 21 of 64)
    assert np.array_equal(full.result(TIMEOUT), expected([[7] * 3] * 4))
    assert not lonely.done() and scheduler.pending_rows == 1
    scheduler.close()
    assert np.array_equal(lonely.result(TIMEOUT), expected([[5] * 12]))


def wait_until(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_failing_batch_fails_only_its_requests(echo):
    runner, _ = echo
    scheduler = BatchScheduler(runner, max_batch_tokens=16, max_wait_ms=0)
    bad = scheduler.submit([[1, POISON]])
    with pytest.raises(RuntimeError, match="exploded"):
        bad.result(TIMEOUT)
    good = scheduler.submit([[1, 2, 3], [4]])
    assert np.array_equal(good.result(TIMEOUT), expected([[1, 2, 3], [4]]))
    scheduler.close()


def test_a_full_budget_goes_at_once_and_close_flushes_what_waits(echo):
    runner, _ = echo
    scheduler = BatchScheduler(runner, max_batch_tokens=16, max_wait_ms=MAX_WAIT_MS)  # waits "forever" for company
    full = scheduler.submit([[7] * 8, [9] * 8])  # 16 tokens: the budget is full, no need to wait
    assert np.array_equal(full.result(TIMEOUT), expected([[7] * 8, [9] * 8]))
    lonely = scheduler.submit([[5]])
    cancelled = scheduler.submit([[6]])
    assert cancelled.cancel() and scheduler.pending_rows == 2
    scheduler.close()  # dispatches the waiting row at once; the cancelled one is dropped
    assert np.array_equal(lonely.result(TIMEOUT), expected([[5]]))
    assert scheduler.pending_rows == 0 and not scheduler.alive
    with pytest.raises(EngineClosedError, match="shutting down"):
        scheduler.submit([[1]])


def test_a_cancelled_request_drops_its_waiting_rows_and_the_outputs_of_its_running_ones(echo):
    runner, gate = echo
    recorder = Recorder()
    scheduler = BatchScheduler(runner, max_batch_tokens=1024, max_wait_ms=0, observer=recorder)
    gate.clear()
    partly_running = scheduler.submit([[2] * 3] * 5)  # a SEQ 8 batch takes 4 rows and holds the only instance
    wait_until(lambda: len(recorder.batches) == 1)
    waiting = scheduler.submit([[3] * 3])
    assert scheduler.pending_rows == 2
    scheduler.cancel(partly_running)
    scheduler.cancel(waiting)
    assert scheduler.pending_rows == 0 and waiting.cancelled()
    with pytest.raises(CancelledError):  # a running future cannot be cancelled: it fails with CancelledError
        partly_running.result(TIMEOUT)
    gate.set()
    after = scheduler.submit([[4]])
    assert np.array_equal(after.result(TIMEOUT), expected([[4]]))
    scheduler.cancel(after)  # done: nothing to drop
    scheduler.close()
    assert [len(b.indices) for b in recorder.batches] == [4, 1] and recorder.finished == 1


def test_bad_arguments_are_one_line_errors(echo):
    runner, _ = echo
    for kwargs, message in (({"max_batch_tokens": 8}, "max_batch_tokens must be an integer >= the max input length"),
                            ({"max_batch_tokens": True}, "max_batch_tokens"),
                            ({"max_wait_ms": -1}, "max_wait_ms must be a number of milliseconds in 0..60000, got -1"),
                            ({"max_wait_ms": math.inf}, "max_wait_ms must be a number of milliseconds in 0..60000, got "
                                                        "inf"),
                            ({"max_wait_ms": math.nan}, "got nan"), ({"max_wait_ms": MAX_WAIT_MS + 1}, "got 60001")):
        with pytest.raises(ToolkitError, match=message):
            BatchScheduler(runner, **kwargs)
    scheduler = BatchScheduler(runner)
    with pytest.raises(ToolkitError, match="no rows"):
        scheduler.submit([])
    with pytest.raises(ToolkitError, match="row 1 has 17 tokens; it must have 1..16"):
        scheduler.submit([[1], [1] * 17])
    scheduler.close()


class FailsOnSecondBatch(SchedulerObserver):
    """A hook with a bug that shows at the second batch."""

    def __init__(self):
        self.batches = 0

    def batch_submitted(self, batch):
        self.batches += 1
        if self.batches == 2:
            raise RuntimeError("hook bug")


def test_a_scheduling_thread_that_dies_fails_the_waiting_rows_and_refuses_new_ones(echo):
    runner, _ = echo
    scheduler = BatchScheduler(runner, max_batch_tokens=64, max_wait_ms=MAX_WAIT_MS)
    scheduler.max_wait = math.inf  # what an unchecked --max-wait-ms inf did: the thread's wait overflows
    lonely = scheduler.submit([[5]])
    with pytest.raises(SchedulerStopped, match="the batch scheduler stopped on OverflowError"):
        lonely.result(TIMEOUT)
    assert_stopped_for_good(scheduler, "OverflowError")


def test_a_scheduler_failing_on_an_engine_thread_fails_its_requests_and_stops(echo):
    """The batch after a finished one is chosen and dispatched on the engine's thread: a failure there fails the rows
    it took and those still waiting, and stops the scheduler."""
    runner, gate = echo
    scheduler = BatchScheduler(runner, max_batch_tokens=1024, max_wait_ms=0, observer=FailsOnSecondBatch())
    gate.clear()
    first = scheduler.submit([[1]])  # holds the only instance: what comes next waits in the pool
    wait_until(lambda: scheduler.pending_rows == 0)
    waiting = [scheduler.submit([[2] * 6]) for _ in range(6)]  # two SEQ 8 batches' worth
    gate.set()
    assert np.array_equal(first.result(TIMEOUT), expected([[1]]))
    for future in waiting:
        with pytest.raises(SchedulerStopped, match="RuntimeError: hook bug"):
            future.result(TIMEOUT)
    assert_stopped_for_good(scheduler, "hook bug")


def assert_stopped_for_good(scheduler, cause: str) -> None:
    """A stopped scheduler is unhealthy and refuses new rows at once, naming what stopped it."""
    assert not scheduler.alive
    with pytest.raises(SchedulerStopped, match=cause):
        scheduler.submit([[1]])
    scheduler.close()


def test_rows_that_are_not_token_ids_are_refused_saying_what_submit_takes(echo):
    """submit("abc") or submit([["a"]]) failed the future with a bare ValueError("invalid literal for int()...")."""
    runner, _ = echo
    scheduler = BatchScheduler(runner)
    takes = r"^submit takes a list of token rows, each a list of token ids \(what Embedder/Reranker.tokenize make\)"
    for rows, message in (("abc", f"{takes}, got str$"), ([["a"]], f"{takes}; row 0 is \\['a'\\]$"),
                          ([[1, 2], [3, "a"]], f"{takes}; row 1 is \\[3, 'a'\\]$"), ([[[1, 2]]], f"{takes}; row 0 is"),
                          ([[1, [2]]], f"{takes}; row 0 is"), ([[1.0]], f"{takes}; row 0 is"),
                          ([None], f"{takes}; row 0 is a NoneType$")):
        with pytest.raises(ToolkitError, match=message):
            scheduler.submit(rows)
    assert np.array_equal(scheduler.submit([[1, 2], np.array([3])]).result(TIMEOUT), expected([[1, 2], [3]]))
    scheduler.close()
