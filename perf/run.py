"""`perf run`: throughput and latency percentiles of one artifact, like the reference's performance.py.

Latency mode (`queue_size=0`): each instance has exactly one request in flight (one client thread per instance calling
run_sync), so latency is pure compute. Throughput mode (`queue_size=Q>0`): one producer keeps the bounded queue full
with run_async; latency then includes queueing, and throughput is what a saturated service gets.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..artifact import load_manifest
from ..checkpoint import load_tokenizer
from ..errors import ToolkitError
from ..eval.datasets import load_dataset
from ..runtime import Engine
from ..text import left_pad
from ..tokenizer import ENDOFTEXT_ID

def dataset_texts(path: Path, limit: int | None = None) -> list[str]:
    """Texts of an evaluation-format JSONL file (STS/BQ sentence pairs, MS MARCO queries and passages), read with the
    evaluation loaders so malformed rows get the same line-numbered errors."""
    _, spec, examples = load_dataset(str(path), limit)  # each example gives at least one text
    texts = []
    for e in examples:
        texts += [e.sentence1, e.sentence2] if spec.kind == "pairs" else [e.query, *e.passages]
    return texts[:limit] if limit else texts


def make_inputs(manifest: dict, artifact_dir: Path, source: str, count: int, seed: int = 0):
    """`count` padded batches: random full-length ids, or real token lengths from a JSONL file."""
    batch, seq = manifest["batch"], manifest["seq_len"]
    rng = np.random.default_rng(seed)
    if source == "random":
        rows = [list(rng.integers(0, 151643, seq - 1)) + [ENDOFTEXT_ID] for _ in range(batch * count)]
    else:
        tokenizer = load_tokenizer(artifact_dir / "tokenizer")
        texts = dataset_texts(Path(source), limit=batch * count)
        encoded = tokenizer(texts, add_special_tokens=False).input_ids
        rows = [ids[: seq - 1] + [ENDOFTEXT_ID] for ids in encoded]
        rows = [rows[i % len(rows)] for i in range(batch * count)]
    return [left_pad(rows[i:i + batch], seq, ENDOFTEXT_ID, batch) for i in range(0, len(rows), batch)]


def run_perf(artifact_dir: str | Path, instances: int = 1, batch_size: int | None = None, iterations: int = 100,
             queue_size: int = 0, percentiles=(50, 90, 99), device_ids=(0,), source: str = "random",
             warmup: int = 3, progress: bool = True) -> dict:
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    if batch_size is not None and batch_size != manifest["batch"]:
        raise ToolkitError(f"{artifact_dir} was compiled for batch {manifest['batch']}, not {batch_size}; "
                           f"recompile with `toolkit compile ... --batch {batch_size}`")
    inputs = make_inputs(manifest, artifact_dir, source, min(iterations, 64))
    engine = Engine.from_artifact(artifact_dir, instances, tuple(device_ids), queue_size=max(queue_size, 1))
    try:
        for i in range(warmup * instances):
            engine.run_sync(*inputs[i % len(inputs)])
        latencies = np.zeros(iterations)
        bar = tqdm(total=iterations, desc="perf", disable=not progress, leave=False)
        started = time.perf_counter()
        if queue_size == 0:
            _latency_mode(engine, inputs, latencies, instances, bar)
        else:
            _throughput_mode(engine, inputs, latencies, bar)
        wall = time.perf_counter() - started
        bar.close()
    finally:
        engine.close()
    tokens = sum(int(inputs[i % len(inputs)][1].sum()) for i in range(iterations))
    sequences = iterations * manifest["batch"]
    ms = latencies * 1e3
    return {
        "artifact": str(artifact_dir), "backend": manifest["backend"], "task": manifest["task"],
        "seq_len": manifest["seq_len"], "batch": manifest["batch"], "instances": instances,
        "queue_size": queue_size, "mode": "latency" if queue_size == 0 else "throughput", "input": source,
        "iterations": iterations, "wall_s": wall,
        "throughput": {"sequences_per_s": sequences / wall, "tokens_per_s": tokens / wall,
                       "batches_per_s": iterations / wall},
        "latency_ms": {"avg": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max()),
                       **{f"p{p:g}": float(np.percentile(ms, p)) for p in percentiles}},
    }


def _latency_mode(engine: Engine, inputs, latencies, instances: int, bar) -> None:
    next_index = iter(range(len(latencies)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t0 = time.perf_counter()
            engine.run_sync(*inputs[i % len(inputs)])
            latencies[i] = time.perf_counter() - t0
            bar.update(1)

    threads = [threading.Thread(target=client) for _ in range(instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _throughput_mode(engine: Engine, inputs, latencies, bar) -> None:
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
    from ..report import format_table

    lat, thr = result["latency_ms"], result["throughput"]
    rows = [["sequences/s", thr["sequences_per_s"]], ["tokens/s", thr["tokens_per_s"]]]
    rows += [[f"latency {k} (ms)", v] for k, v in lat.items()]
    title = (f"{result['backend']} {result['task']} batch {result['batch']} x seq {result['seq_len']}, "
             f"{result['instances']} instance(s), {result['mode']} mode (queue {result['queue_size']}), "
             f"{result['iterations']} iterations, input {result['input']}")
    return format_table(["metric", "value"], rows, title=title)
