"""`perf compare`: torch eager (the unpatched Hugging Face model, what users run today) against compiled artifacts,
same inputs, one process, run one after another; prints latency, throughput, the ratios and achieved GFLOP/s
against this machine's measured fp32 matmul peak (numpy/OpenBLAS on all cores)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..artifact import load_manifest, open_backend
from ..backends import TorchReference
from ..checkpoint import resolve_checkpoint
from ..errors import ToolkitError
from ..parity import compare
from ..text import left_pad
from ..tokenizer import ENDOFTEXT_ID


def forward_flops(config: dict, seq_len: int, batch: int) -> float:
    """Multiply-adds x2 of one forward pass over [batch, seq_len] (projections, MLP, attention scores and values)."""
    h, f = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * f)
    attention = 2 * 2 * seq_len * seq_len * q
    return batch * config["num_hidden_layers"] * (seq_len * per_token + attention)


def matmul_peak_gflops(size=(512, 1024, 3072), repeats: int = 5) -> float:
    m, k, n = size
    a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_compare(checkpoint: str, artifacts: list[str | Path], iterations: int = 10, warmup: int = 2,
                torch_eager: bool = True) -> dict:
    manifests = [load_manifest(a) for a in artifacts]
    shapes = {(m["task"], m["seq_len"], m["batch"]) for m in manifests}
    if len(shapes) != 1:
        raise ToolkitError(f"artifacts must share task, seq and batch to be compared, got {sorted(shapes)}")
    task, seq_len, batch = shapes.pop()
    ckpt = resolve_checkpoint(checkpoint)
    config = json.loads((ckpt / "config.json").read_text())
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 151643, seq_len - 1)) + [ENDOFTEXT_ID] for _ in range(batch)]
    ids, mask = left_pad(rows, seq_len, ENDOFTEXT_ID, batch)
    flops = forward_flops(config, seq_len, batch)
    engines = ([("torch eager (HF, fp32)", lambda: TorchReference(ckpt, task))] if torch_eager else []) + [
        (f"{m['backend']} artifact ({m['dtype']})", lambda a=a: open_backend(a)) for a, m in zip(artifacts, manifests)]
    result = {"task": task, "seq_len": seq_len, "batch": batch, "gflop_per_forward": flops / 1e9,
              "matmul_peak_gflops": matmul_peak_gflops(), "engines": []}
    reference_out = None
    for name, make in engines:
        backend = make()
        for _ in range(warmup):
            out = backend.run(ids, mask)
        times = np.array([_timed(lambda: backend.run(ids, mask)) for _ in range(iterations)])
        backend.close()
        entry = {"engine": name, "latency_ms_median": float(np.median(times) * 1e3),
                 "latency_ms_min": float(times.min() * 1e3), "sequences_per_s": batch / float(np.median(times)),
                 "gflops": flops / float(np.median(times)) / 1e9}
        entry["fraction_of_matmul_peak"] = entry["gflops"] / result["matmul_peak_gflops"]
        if reference_out is None:
            reference_out = out
        else:
            entry["parity_vs_first"] = compare(task, reference_out, out)
        result["engines"].append(entry)
        del backend
    base = result["engines"][0]["latency_ms_median"]
    for e in result["engines"]:
        e["speedup_vs_first"] = base / e["latency_ms_median"]
    by_name = {e["engine"].split(" ")[0]: e for e in result["engines"]}
    if "tvm" in by_name and "onnxruntime" in by_name:
        result["tvm_vs_onnxruntime"] = by_name["onnxruntime"]["latency_ms_median"] / by_name["tvm"]["latency_ms_median"]
    return result
