"""Low-level engine, the counterpart of the reference runtime's Model/Stream/run_sync/run_async.

An `Engine` holds `instances` copies of one backend (an artifact, or the torch reference), each owned by one worker
thread that drains a shared bounded queue. `run_async` returns a `Future` bound to that request, so results always go
back to the caller that sent them; `run_sync` is `run_async(...).result()`.

Closing is race-free: a request is either accepted (and then run before the workers stop) or refused with
`EngineClosedError`; `close()` waits for submissions already past the closed check before it queues the stop markers.
The workers exist only in the process that made the engine: a forked child's requests are refused with
`ForkedProcessError` (queued, they would wait forever).
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.artifact import Manifest
from toolkit.backends import Backend, TorchReference, open_backend
from toolkit.checkpoint import read_hf_config
from toolkit.errors import ToolkitError, check_int, is_integer
from toolkit.tasks import Task


class QueueFullError(ToolkitError):
    """The bounded request queue is full and the caller asked not to wait."""


class EngineClosedError(ToolkitError):
    """The engine was closed before the request was accepted."""


class ForkedProcessError(ToolkitError):
    """The engine is used in a process forked from the one that made it, where its worker threads do not exist."""


_STOP = object()


class ComputeBudget:
    """The compute threads that may be busy at once in this process (default: the cores). Every engine worker holds
    its backend's thread count from the budget while it runs a batch, so however many buckets, engines and instances
    a process has, their thread pools never run more threads than cores (they spin: oversubscribed, they crawl)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.busy = 0
        self.peak = 0  # the most threads ever busy at once: read by the test that busy threads never exceed cores
        self._state = threading.Condition()

    @contextmanager
    def use(self, threads: int):
        """Hold `threads` (at most the whole budget) for the duration of the block; waits until they are free."""
        threads = min(threads, self.threads)
        with self._state:
            self._state.wait_for(lambda: self.busy + threads <= self.threads)
            self.busy += threads
            self.peak = max(self.peak, self.busy)
        try:
            yield
        finally:
            with self._state:
                self.busy -= threads
                self._state.notify_all()


CORES = os.cpu_count() or 1
CPU_BUDGET = ComputeBudget(CORES)


def set_cpu_threads(threads: int) -> None:
    """Pin the process's compute budget (e.g. `--threads`); engines created afterwards split it between instances.
    More threads than cores are refused, as `--threads` is."""
    check_threads(threads, threads_flag="threads")
    CPU_BUDGET.threads = int(threads)


def check_threads(threads, replicas: int = 1, replicas_flag: str = "--replicas",
                  threads_flag: str = "--threads") -> None:
    """Raise ToolkitError naming the flag to change unless `threads` compute threads in each of `replicas` processes
    (None: the cores shared between them, at least one each) fit in this machine's cores, as `CPU_BUDGET` keeps them
    within one process. `threads_flag` without dashes names a Python argument (`set_cpu_threads`'s)."""

    def given(count: int) -> str:  # `--threads 4` on a command line, `threads=4` in Python
        return f"{threads_flag} {count}" if threads_flag.startswith("-") else f"{threads_flag}={count}"

    if threads is not None:
        check_int(threads, threads_flag, 1)
    if replicas > CORES:
        raise ToolkitError(f"{replicas_flag} {replicas} is more than this machine's {CORES} cores (every replica "
                           f"computes with at least one thread); pass {replicas_flag} {CORES} or fewer")
    if threads is not None and threads * replicas > CORES:
        what, default = (given(threads), "all cores") if replicas == 1 else \
            (f"{given(threads)} per replica x {replicas} replicas is {threads * replicas} compute threads, which",
             "the cores divided between the replicas")
        raise ToolkitError(f"{what} is more than this machine's {CORES} cores: compute threads beyond the cores crawl "
                           f"(TVM's thread pool spins); pass {given(CORES // replicas)} or fewer, or leave it out "
                           f"({default})")


def threads_per_instance(instances: int) -> int:
    """Split the budget between instances so they do not oversubscribe the CPU."""
    return max(1, CPU_BUDGET.threads // instances)


AUTO_INSTANCES = "auto"


def resolve_instances(instances: int | str, manifest: Manifest) -> int:
    """`instances`, or for "auto": one single-thread instance per thread of the budget for TVM on CPU, else one
    instance of all the threads (instances share one copy of the weights either way). Measured on 2 cores, 0.6B int8
    sets: single-thread TVM instances run 5% more sentences/s offline and serve 0.92 of that against 0.86-0.90 (no
    thread-pool barrier for a preempted thread to hold up, so the HTTP work beside them costs only its own CPU), and a
    sentence alone takes the same 59 ms (memory-bound). ONNX Runtime's also gain 5%, but a sentence alone takes 63 ms
    against 45: its two-thread kernels are faster at batch 1. A GPU runs one batch at a time."""
    if instances != AUTO_INSTANCES:
        return instances
    single_thread = manifest.backend == "tvm" and manifest.target.device == "cpu"
    return CPU_BUDGET.threads if single_thread else 1


def check_device_ids(device_ids, name: str = "device_ids", device: str | None = None) -> tuple[int, ...]:
    """`device_ids` as a tuple (one number is one device, as `--device-ids 0` is), or a one-line error naming `name`
    (the API's argument or the command-line option). `device`: the artifact's target device where known; a CPU
    artifact takes no device ids but the default, which pick GPUs."""
    devices = (device_ids,) if is_integer(device_ids) else device_ids
    if not isinstance(devices, (list, tuple)) or not devices or any(not is_integer(d) or d < 0 for d in devices):
        raise ToolkitError(f"{name} must be a device number or a non-empty list of them, like 0 or [0, 1], got "
                           f"{device_ids!r}")
    devices = tuple(map(int, devices))
    if device == "cpu" and devices != (0,):
        raise ToolkitError(f"device ids {list(devices)} pick GPUs, and this is a CPU artifact (its instances share "
                           f"the CPU's cores): leave {name} at its default, 0")
    return devices


def check_engine_options(instances, device_ids, queue_size,
                         device: str | None = None) -> tuple[int | str, tuple[int, ...], int]:
    """One-line errors for engine options a user can get wrong; the options as ints, `device_ids` as a tuple
    (`check_device_ids`, with `device`)."""
    if instances != AUTO_INSTANCES and (not is_integer(instances) or instances < 1):
        raise ToolkitError(f"instances must be an integer >= 1 or {AUTO_INSTANCES!r}, got {instances!r}")
    check_int(queue_size, "queue_size", 1)
    devices = check_device_ids(device_ids, "device_ids", device)
    return (instances if instances == AUTO_INSTANCES else int(instances)), devices, int(queue_size)


class Engine:
    """`instances` copies of one backend behind a bounded queue; `run_async` → Future, `run_sync` → outputs."""

    def __init__(self, make_backend: Callable[[int, int], Backend], instances: int = 1,
                 device_ids: tuple[int, ...] = (0,), queue_size: int = 64, threads: int = 1,
                 budget: ComputeBudget = CPU_BUDGET, vocab_size: int | None = None):
        """`make_backend(instance_index, device_id)` builds one backend copy; instances go round-robin over
        `device_ids`. `queue_size` bounds the requests waiting (not counting those being run). Each run holds
        `threads` (the backend's compute threads) from `budget` (the process's `CPU_BUDGET`; another is a test seam, to
        check the limit at a budget of the test's size, whatever the machine's cores). `vocab_size`: the model's
        embedding rows, which token ids must index (None: not checked)."""
        instances, device_ids, queue_size = check_engine_options(instances, device_ids, queue_size)
        self.threads, self.budget, self.instances, self.vocab_size = threads, budget, instances, vocab_size
        # what the user holds, as its errors name it: Embedder/Reranker name themselves (`toolkit.api`)
        self.holder = "this engine"
        self.pid = os.getpid()  # the process its workers run in (`check_process`)
        self.backends = [make_backend(i, device_ids[i % len(device_ids)]) for i in range(instances)]
        first = self.backends[0]
        self.task, self.seq_len, self.batch = first.task, first.seq_len, first.batch
        self.dynamic_seq = first.dynamic_seq
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._submitting = 0  # submissions past the closed check, not yet queued
        self._state = threading.Condition()
        self.runs_per_instance = [0] * instances  # batches each instance has run (observability, tests)
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"engine-{i}")
                         for i in range(instances)]
        for w in self._workers:
            w.start()

    @classmethod
    def from_artifact(cls, artifact: str | Path | Manifest, instances: int | str = 1,
                      device_ids: tuple[int, ...] = (0,), queue_size: int = 64, threads: int | None = None) -> "Engine":
        """An engine over one artifact (a directory, or its manifest); files are hash-checked once here. `instances`:
        a count, or "auto" (`resolve_instances`)."""
        directory = artifact.path if isinstance(artifact, Manifest) else artifact
        manifest = Manifest.load(directory, verify=False)  # its target device, before its files are hashed
        instances, device_ids, queue_size = check_engine_options(instances, device_ids, queue_size,
                                                                 manifest.target.device)
        manifest = manifest.verify().require_deployable()
        instances = resolve_instances(instances, manifest)
        threads = threads or threads_per_instance(instances)
        return cls(lambda i, dev: open_backend(manifest, threads, dev), instances, device_ids, queue_size, threads,
                   vocab_size=manifest.model.vocab_size)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, task: Task, queue_size: int = 64) -> "Engine":
        """The torch reference (unpatched Hugging Face model) behind the same interface; one instance using the
        whole budget."""
        threads = CPU_BUDGET.threads
        return cls(lambda i, dev: TorchReference(Path(checkpoint_dir), task, threads), 1, (0,), queue_size, threads,
                   vocab_size=read_hf_config(Path(checkpoint_dir)).get("vocab_size"))

    # ---- requests ---------------------------------------------------------------------------------------------------
    def check_process(self) -> None:
        """Raise ForkedProcessError in a process other than the one that made the engine (a forked child: os.fork,
        a multiprocessing 'fork' pool, a server's preloaded workers), where no worker would ever run the request."""
        if os.getpid() != self.pid:
            raise ForkedProcessError(f"{self.holder} was loaded in process {self.pid} and is used in process "
                                     f"{os.getpid()} (a forked child): its engine threads exist only in the process "
                                     "that loaded it; load it in the child (or use multiprocessing's 'spawn' start "
                                     "method)")

    def check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Raise ToolkitError unless the arrays are integer `[rows, seq]` this engine takes: 1..batch rows (any with no
        batch), of its SEQ (1..SEQ with `dynamic_seq`, any with no SEQ)."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ToolkitError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same 2-D shape")
        if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(mask.dtype, np.integer):
            raise ToolkitError(f"inputs must be integer arrays, got {ids.dtype} / {mask.dtype}")
        rows, seq = ids.shape
        rows_ok = self.batch is None or 1 <= rows <= self.batch
        seq_ok = self.seq_len is None or seq == self.seq_len or (self.dynamic_seq and 1 <= seq <= self.seq_len)
        if not (rows_ok and seq_ok):
            takes = ["any" if self.batch is None else f"1..{self.batch}",
                     "any" if self.seq_len is None else f"1..{self.seq_len}" if self.dynamic_seq else str(self.seq_len)]
            raise ToolkitError(f"input shape {ids.shape} does not match the artifact's [batch, seq] = "
                               f"[{', '.join(takes)}]; split the rows into batches and left-pad them to the sequence "
                               "length (Embedder/Reranker do this)")
        # an id past the embedding table fails deep in ONNX Runtime, where a negative one wraps around; TVM reads the
        # table's last (first) row for it
        if self.vocab_size and ids.size and not (0 <= ids.min() and ids.max() < self.vocab_size):
            raise ToolkitError(f"token ids must be in 0..{self.vocab_size - 1} (the model's vocabulary), got "
                               f"{ids.min()}..{ids.max()}; tokenize with the model's tokenizer (Embedder/Reranker do)")
        # the models read the last position and count positions from the first real token: a right-padded row, or one
        # with no token, returns wrong outputs without an error
        if mask.size and not (((mask == 0) | (mask == 1)).all() and (mask[:, -1] == 1).all()
                              and (np.diff(mask, axis=1) >= 0).all()):
            raise ToolkitError("each attention_mask row must be 0...0 1...1 (left-padded, at least one token); pad "
                               "rows on the left (toolkit.text.left_pad does, as Embedder/Reranker do)")

    def run_async(self, input_ids, attention_mask, block: bool = True, timeout: float | None = None) -> Future:
        """Queue one batch. With `block=False` (or after `timeout`) a full queue raises QueueFullError."""
        self.check_process()
        self.check_inputs(input_ids, attention_mask)
        future: Future = Future()
        with self._state:
            if self._closed:
                raise EngineClosedError(f"{self.holder} is closed (close(), or the end of its with block, stopped "
                                        "its engine threads); load it again")
            self._submitting += 1
        try:
            self._queue.put((input_ids, attention_mask, future), block=block, timeout=timeout)
        except queue.Full:
            raise QueueFullError(f"request queue is full ({self._queue.maxsize} waiting); wait for results, "
                                 "raise queue_size, or submit with block=True") from None
        finally:
            with self._state:
                self._submitting -= 1
                self._state.notify_all()
        return future

    def run_sync(self, input_ids, attention_mask) -> np.ndarray:
        """Run one batch and wait for its outputs."""
        return self.run_async(input_ids, attention_mask).result()

    def _work(self, index: int) -> None:
        """Worker loop: run queued requests on this instance's backend until the stop marker."""
        backend = self.backends[index]
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            ids, mask, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with self.budget.use(self.threads):
                    output = backend.run(ids, mask)
                self.runs_per_instance[index] += 1
                future.set_result(output)
            except BaseException as e:  # delivered to the caller that sent this request
                future.set_exception(e)

    def close(self) -> None:
        """Refuse new requests, finish every accepted one, stop the workers and release the backends. Idempotent.
        Called on one of its own workers (a finalizer the garbage collector ran there), it returns at once and a
        helper thread does the rest: the worker cannot wait for itself, nor for the queue it drains."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        if threading.current_thread() in self._workers:
            threading.Thread(target=self._shut_down, daemon=True, name="engine-close").start()
        else:
            self._shut_down()

    def _shut_down(self) -> None:
        with self._state:
            # workers keep draining meanwhile, so a submission blocked on a full queue gets in and is run
            self._state.wait_for(lambda: self._submitting == 0)
        for _ in self._workers:
            self._queue.put(_STOP)
        for w in self._workers:
            w.join()
        for b in self.backends:
            b.close()
        self.backends = []  # the sessions and weights go with the last reference (GBs per bucket at 0.6B)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
