"""`perf run`: throughput and latency percentiles of one artifact, like the reference's performance.py.

Latency mode (`queue_size=0`): each instance has exactly one request in flight (one client thread per instance calling
run_sync), so latency is pure compute. Throughput mode (`queue_size=Q>0`): one producer keeps the bounded queue full
with run_async; latency then includes queueing, and throughput is what a saturated service gets.

Options are a frozen dataclass checked before anything is loaded or run:

    result = run_perf(PerfRunOptions(artifact="workspace/.../onnx/seq128", instances=2, queue_size=8))
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from toolkit.artifact import Manifest
from toolkit.errors import ToolkitError, check_int
from toolkit.perf.common import make_inputs
from toolkit.report import format_columns
from toolkit.runtime import Engine, check_device_ids


@dataclass(frozen=True)
class PerfRunOptions:
    """What `perf run` measures and how. `check()` validates every field before a model is loaded.

    - `artifact`: one artifact directory.
    - `instances`: engine instances (latency mode runs one client thread per instance).
    - `batch_size`: rows per call, 1..the artifact's batch (None: its batch).
    - `iterations`: measured batches; `warmup`: batches per instance run first, not measured.
    - `queue_size`: 0 = latency mode, Q > 0 = throughput mode with a queue of Q waiting batches.
    - `percentiles`: latency percentiles to report, each in (0, 100] (the minimum is reported anyway).
    - `device_ids`: GPUs the instances go round-robin over (non-negative integers; a CPU artifact takes only (0,)).
    - `source`: "random" (full-length random ids), or a dataset (JSONL path or name such as `sts12-sample`) whose
      requests for the artifact's task are used, at their real token lengths (`common.make_inputs`).
    """

    FLAGS: ClassVar[dict] = {"instances": "--instances", "batch_size": "--batch-size", "iterations": "--iterations",
                             "queue_size": "--queue-size", "percentiles": "--percentiles",
                             "device_ids": "--device-ids", "source": "--input", "warmup": "--warmup"}

    artifact: str | Path
    instances: int = 1
    batch_size: int | None = None
    iterations: int = 100
    queue_size: int = 0
    percentiles: tuple[float, ...] = (50, 90, 99)
    device_ids: tuple[int, ...] = (0,)
    source: str = "random"
    warmup: int = 3

    def check(self) -> "PerfRunOptions":
        """Raise ToolkitError (naming the command-line option) for the first invalid field; return self."""
        flag = self.FLAGS
        check_int(self.instances, flag["instances"], 1)
        if self.batch_size is not None:
            check_int(self.batch_size, flag["batch_size"], 1)
        check_int(self.iterations, flag["iterations"], 1)
        check_int(self.queue_size, flag["queue_size"], 0)
        check_int(self.warmup, flag["warmup"], 0)
        check_percentiles(self.percentiles, flag["percentiles"])
        check_device_ids(self.device_ids, flag["device_ids"])
        if not isinstance(self.source, str) or not self.source.strip():
            raise ToolkitError(f"{flag['source']} must be 'random' or a dataset (JSONL path or name such as "
                               f"sts12-sample), got {self.source!r}")
        return self

    @property
    def mode(self) -> str:
        """The mode name: "latency" (queue_size 0) or "throughput"."""
        return "latency" if self.queue_size == 0 else "throughput"


def check_percentiles(percentiles, flag: str = "--percentiles") -> None:
    """Raise ToolkitError unless `percentiles` is a non-empty sequence of numbers in (0, 100]: p0 would repeat the
    minimum, which the report has already."""
    if isinstance(percentiles, (str, bytes)) or not isinstance(percentiles, (tuple, list)) or not percentiles:
        raise ToolkitError(f"{flag} must be a non-empty list of numbers > 0 and <= 100 such as 50,90,99, "
                           f"got {percentiles!r}")
    for p in percentiles:
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not math.isfinite(p) \
                or not 0 < p <= 100:
            shown = f"{p:g}" if isinstance(p, (int, float, np.integer, np.floating)) else repr(p)
            raise ToolkitError(f"{flag}: each percentile must be a number > 0 and <= 100 (the minimum is reported "
                               f"anyway), got {shown}")


# ---- the benchmark ---------------------------------------------------------------------------------------------------
def run_perf(options: PerfRunOptions, progress: bool = False) -> dict:
    """Measure one artifact as `options` says; returns the result dict (`perf_table` prints it).

    `runs_per_instance` counts the measured batches each engine instance ran (warm-up excluded); they sum to
    `iterations`."""
    options.check()
    manifest = Manifest.load(options.artifact, verify=False).require_deployable()
    batch = options.batch_size or manifest.batch
    if batch > manifest.batch:
        raise ToolkitError(f"{manifest.path} takes 1..{manifest.batch} rows a call, not {batch}; pass --batch-size "
                           f"{manifest.batch} or fewer, or recompile with `toolkit compile ... --batch {batch}`")
    device_ids = check_device_ids(options.device_ids, PerfRunOptions.FLAGS["device_ids"], manifest.target.device)
    inputs = make_inputs(manifest, options.source, min(options.iterations, 64), batch)
    instances, iterations = options.instances, options.iterations
    latencies = np.zeros(iterations)
    with Engine.from_artifact(manifest, instances, device_ids,
                              queue_size=max(options.queue_size, 1)) as engine:
        # warm-up: one client per instance, so every instance (and its thread pool) runs before the clock starts
        _latency_mode(engine, inputs, np.zeros(options.warmup * instances), instances, None)
        before = list(engine.runs_per_instance)
        bar = tqdm(total=iterations, desc="perf", disable=not progress, leave=False)
        started = time.perf_counter()
        if options.queue_size == 0:
            _latency_mode(engine, inputs, latencies, instances, bar)
        else:
            _throughput_mode(engine, inputs, latencies, bar)
        wall = time.perf_counter() - started
        bar.close()
        runs = [after - b for after, b in zip(engine.runs_per_instance, before)]
    tokens = sum(int(inputs[i % len(inputs)][1].sum()) for i in range(iterations))
    sequences = iterations * batch
    ms = latencies * 1e3
    return {
        "artifact": str(manifest.path), "backend": manifest.backend, "task": manifest.task,
        "seq_len": manifest.seq_len, "batch": batch, "dtype": manifest.dtype, "instances": instances,
        "device_ids": list(device_ids), "queue_size": options.queue_size, "mode": options.mode,
        "input": options.source, "iterations": iterations, "warmup": options.warmup, "wall_s": wall,
        "runs_per_instance": runs,
        "throughput": {"sequences_per_s": sequences / wall, "tokens_per_s": tokens / wall,
                       "batches_per_s": iterations / wall},
        "latency_ms": {"avg": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max()),
                       **{f"p{p:g}": float(np.percentile(ms, p)) for p in options.percentiles}},
    }


def _latency_mode(engine: Engine, inputs, latencies: np.ndarray, clients: int, bar) -> None:
    """`clients` threads, each with one request in flight, run `len(latencies)` batches; fills in their latencies."""
    next_index = iter(range(len(latencies)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client():
        try:
            while not errors:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                engine.run_sync(*inputs[i % len(inputs)])
                latencies[i] = time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
        except BaseException as e:  # re-raised in the caller's thread, not lost in this one
            errors.append(e)

    threads = [threading.Thread(target=client, name=f"perf-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _throughput_mode(engine: Engine, inputs, latencies: np.ndarray, bar) -> None:
    """One producer keeps the engine's bounded queue full; latency runs from submission to result."""
    futures = []
    for i in range(len(latencies)):
        t0 = time.perf_counter()
        future = engine.run_async(*inputs[i % len(inputs)])  # blocks while the bounded queue is full

        def done(_, i=i, t0=t0):
            latencies[i] = time.perf_counter() - t0
            bar.update(1)

        future.add_done_callback(done)
        futures.append(future)
    for f in futures:
        f.result()


def perf_table(result: dict) -> str:
    """The `run_perf` result as an aligned table (throughput, latency statistics) with a one-line summary title."""
    lat, thr = result["latency_ms"], result["throughput"]
    rows = [["sequences/s", thr["sequences_per_s"]], ["tokens/s", thr["tokens_per_s"]]]
    rows += [[f"latency {k} (ms)", v] for k, v in lat.items()]
    title = (f"{result['backend']} {result['task']} batch {result['batch']} x seq {result['seq_len']}, "
             f"{result['instances']} instance(s), {result['mode']} mode (queue {result['queue_size']}), "
             f"{result['iterations']} iterations, input {result['input']}")
    per_instance = ", ".join(str(n) for n in result["runs_per_instance"])
    return format_columns(["metric", "value"], [None, ",.2f"], rows, title=title) + \
        f"\nbatches per instance: {per_instance}"
