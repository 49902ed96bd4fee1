"""Low-level engine, the counterpart of the reference runtime's Model/Stream/run_sync/run_async.

An `Engine` holds `instances` copies of one backend (an artifact, or the torch reference), each owned by one worker
thread that drains a shared bounded queue. `run_async` returns a `Future` bound to that request, so results always go
back to the caller that sent them; `run_sync` is `run_async(...).result()`.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import Backend, TorchReference
from .errors import ToolkitError


class QueueFullError(ToolkitError):
    pass


class EngineClosedError(ToolkitError):
    pass


_STOP = object()


def threads_per_instance(instances: int) -> int:
    """Split the cores between instances so they do not oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // instances)


class Engine:
    def __init__(self, make_backend: Callable[[int, int], Backend], instances: int = 1,
                 device_ids: tuple[int, ...] = (0,), queue_size: int = 64):
        """`make_backend(instance_index, device_id)` builds one backend copy; instances go round-robin over
        `device_ids`. `queue_size` bounds the requests waiting (not counting those being run)."""
        if instances < 1 or queue_size < 1:
            raise ToolkitError("instances and queue_size must be >= 1")
        self.backends = [make_backend(i, device_ids[i % len(device_ids)]) for i in range(instances)]
        first = self.backends[0]
        self.task, self.seq_len, self.batch = first.task, first.seq_len, first.batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(b,), daemon=True, name=f"engine-{i}")
                         for i, b in enumerate(self.backends)]
        for w in self._workers:
            w.start()

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path, instances: int = 1, device_ids: tuple[int, ...] = (0,),
                      queue_size: int = 64, threads: int | None = None) -> "Engine":
        from .artifact import load_manifest, open_backend

        load_manifest(artifact_dir, verify=True)  # hash once, not once per instance
        threads = threads or threads_per_instance(instances)
        return cls(lambda i, dev: open_backend(artifact_dir, threads, dev, verify=False), instances, device_ids,
                   queue_size)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, task: str, queue_size: int = 64) -> "Engine":
        """The torch reference (unpatched Hugging Face model) behind the same interface; one instance."""
        return cls(lambda i, dev: TorchReference(Path(checkpoint_dir), task), 1, (0,), queue_size)

    # ---- requests ---------------------------------------------------------------------------------------------------
    def check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ToolkitError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same 2-D shape")
        if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(mask.dtype, np.integer):
            raise ToolkitError(f"inputs must be integer arrays, got {ids.dtype} / {mask.dtype}")
        expected = (self.batch or ids.shape[0], self.seq_len or ids.shape[1])
        if ids.shape != expected:
            raise ToolkitError(f"input shape {ids.shape} does not match the artifact's [batch, seq] = {list(expected)};"
                               " pad the batch and left-pad to the sequence length (Embedder/Reranker do this)")

    def run_async(self, input_ids, attention_mask, block: bool = True, timeout: float | None = None) -> Future:
        """Queue one batch. With `block=False` (or after `timeout`) a full queue raises QueueFullError."""
        self.check_inputs(input_ids, attention_mask)
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed; create a new one")
        try:
            self._queue.put((input_ids, attention_mask, future), block=block, timeout=timeout)
        except queue.Full:
            raise QueueFullError(f"request queue is full ({self._queue.maxsize} waiting); wait for results, "
                                 "raise queue_size, or submit with block=True") from None
        return future

    def run_sync(self, input_ids, attention_mask) -> np.ndarray:
        return self.run_async(input_ids, attention_mask).result()

    def _work(self, backend: Backend) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            ids, mask, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(backend.run(ids, mask))
            except BaseException as e:  # delivered to the caller that sent this request
                future.set_exception(e)

    def close(self) -> None:
        """Finish queued requests, stop the workers and release the backends. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)
        for w in self._workers:
            w.join()
        for b in self.backends:
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
