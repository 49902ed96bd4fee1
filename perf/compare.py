"""`perf compare`: torch eager (the unpatched Hugging Face model, what users run today) against compiled artifacts,
same inputs, one process, run one after another or in alternating rounds (`--interleave`); prints latency,
throughput, the ratios and achieved GFLOP/s against this machine's measured fp32 matmul peak (numpy/OpenBLAS on all
cores).

Each measured model is a "run" (`result["runs"]`, each with a `name` and a `backend`: torch | onnx | tvm); "engine"
is kept for `toolkit.runtime.Engine`. Every run after the first carries its agreement with the first
(`Task.agreement` on finished outputs: normalised embeddings or P(yes)).

    result = run_compare(CompareOptions(artifacts=("ws/.../onnx/seq128", "ws/.../tvm/seq128"), iterations=10))
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from toolkit.artifact import Manifest
from toolkit.backends import TorchReference, open_backend
from toolkit.checkpoint import check_task, read_hf_config, resolve_checkpoint
from toolkit.errors import ToolkitError, check_int
from toolkit.perf.common import judge_agreement, random_rows
from toolkit.report import format_columns
from toolkit.tasks import get_task
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

TORCH_RUN = "torch eager (HF, fp32)"


@dataclass(frozen=True)
class CompareOptions:
    """What `perf compare` runs. `check()` validates every field before a model is loaded.

    - `artifacts`: artifact directories of the same task, SEQ and batch (e.g. the onnx and tvm builds).
    - `checkpoint`: what torch eager runs (hub id or directory); None: the one the first artifact was built from.
    - `iterations`: timed forwards per run; `warmup`: untimed forwards first.
    - `torch_eager`: include the torch reference (first, so the artifacts' agreement is measured against it).
    - `interleave`: load every run at once and time them in alternating rounds (A B, B A, ...), so a machine whose
      speed drifts during the comparison (a shared VM: 10-20% within minutes) moves every run alike. Needs all the
      models' memory at once; one after another (the default) needs one at a time. ONNX Runtime's threads then
      sleep as soon as a run ends (`open_backend(idle_spin=False)`), as they would not alone.
    """

    FLAGS: ClassVar[dict] = {"artifacts": "--artifact", "checkpoint": "--checkpoint", "iterations": "--iterations",
                             "warmup": "--warmup"}

    artifacts: tuple[str | Path, ...]
    checkpoint: str | Path | None = None
    iterations: int = 10
    warmup: int = 2
    torch_eager: bool = True
    interleave: bool = False

    def check(self) -> "CompareOptions":
        """Raise ToolkitError (naming the command-line option) for the first invalid field; return self."""
        if isinstance(self.artifacts, (str, Path)) or not isinstance(self.artifacts, (tuple, list)) \
                or not self.artifacts:
            raise ToolkitError(f"{self.FLAGS['artifacts']}: pass at least one artifact directory, got "
                               f"{self.artifacts!r}")
        check_int(self.iterations, self.FLAGS["iterations"], 1)
        check_int(self.warmup, self.FLAGS["warmup"], 0)
        return self


def forward_flops(config: dict, seq_len: int, batch: int) -> float:
    """Multiply-adds x2 of one forward pass over [batch, seq_len] (projections, MLP, attention scores and values), as
    Hugging Face computes it: the work every engine's effective GFLOP/s is counted against."""
    h, f = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    qkv, rest = 2 * h * (q + 2 * kv), 2 * (q * h + 3 * h * f)  # per position: the fused q/k/v projection; the rest
    layer = seq_len * (qkv + rest) + 2 * 2 * seq_len * seq_len * q
    return batch * config["num_hidden_layers"] * layer


def matmul_peak_gflops(size=(512, 1024, 3072), repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (numpy/BLAS, best of `repeats`), the yardstick for achieved GFLOP/s."""
    m, k, n = size
    a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_manifests(artifacts) -> list[Manifest]:
    """The artifacts' manifests (hash-checked, deployable), which must share task, SEQ and batch."""
    manifests = [Manifest.load(a).require_deployable() for a in artifacts]
    shapes = {(m.task, m.seq_len, m.batch) for m in manifests}
    if len(shapes) != 1:
        listed = ", ".join(f"{m.path}: {m.task} seq {m.seq_len} batch {m.batch}" for m in manifests)
        raise ToolkitError(f"artifacts must share task, seq and batch to be compared ({listed}); pass artifacts "
                           "built with the same --seq and --batch")
    return manifests


def run_compare(options: CompareOptions) -> dict:
    """Time torch eager (unless `torch_eager` is off) and each artifact on the same random full-length batch.

    Returns `{"task", "seq_len", "batch", "gflop_per_forward", "matmul_peak_gflops", "reference", "runs": [...]}`
    plus `tvm_vs_onnx` (ONNX Runtime median latency / TVM median latency, the first run of each: named in
    `tvm_vs_onnx_runs`) when both backends ran. Each run has `name` (backend, dtype, artifact set), `backend`,
    `dtype`, latency/throughput/GFLOP/s, `speedup_vs_first` and, after the first, `parity_vs_first` (the task's
    agreement; when torch eager ran first, what the dtypes' tolerances are against, with `tolerance` and `passed`
    for the run's dtype and, off it, the likely cause as `hint`)."""
    options.check()
    manifests = load_manifests(options.artifacts)
    first = manifests[0]
    task = get_task(first.task)
    seq_len, batch = first.seq_len, first.batch
    ckpt = resolve_checkpoint(options.checkpoint or first.reference_checkpoint())
    hf_config = read_hf_config(ckpt)
    check_task(task, ckpt, hf_config, f"the artifacts are {task.name} ones",
               lambda other: f"compare {other} artifacts with it", warnings.warn)
    flops = forward_flops(hf_config, seq_len, batch)
    ids, mask = left_pad(random_rows(first, batch, np.random.default_rng(0)), seq_len, ENDOFTEXT_ID, batch)

    candidates = [(TORCH_RUN, "torch", None, lambda: TorchReference(ckpt, task))] if options.torch_eager else []
    # named by their set too: two artifacts of one backend and dtype (before and after a change) stay apart
    # interleaved, ONNX Runtime's threads sleep when a run ends: spinning, they held the cores the next run needed
    candidates += [(f"{m.backend} {m.kernels} ({m.name})", m.backend, m,
                    lambda m=m: open_backend(m, idle_spin=not options.interleave)) for m in manifests]
    result = {"task": task.name, "seq_len": seq_len, "batch": batch, "checkpoint": str(ckpt),
              "artifacts": [str(m.path) for m in manifests], "gflop_per_forward": flops / 1e9,
              "matmul_peak_gflops": matmul_peak_gflops(), "iterations": options.iterations,
              "interleaved": options.interleave, "reference": candidates[0][0], "runs": []}
    makers = [make for *_, make in candidates]
    measured = (_measure(makers, ids, mask, options) if options.interleave  # one at a time: each alone, in turn
                else [m for make in makers for m in _measure([make], ids, mask, options)])
    reference = None
    for (name, backend_name, manifest, _), (out, times) in zip(candidates, measured):
        median = float(np.median(times))
        run = {"name": name, "backend": backend_name, "dtype": manifest.dtype if manifest else "fp32",
               "latency_ms_median": median * 1e3, "latency_ms_min": float(times.min() * 1e3),
               "sequences_per_s": batch / median, "gflops": flops / median / 1e9}
        run["fraction_of_matmul_peak"] = run["gflops"] / result["matmul_peak_gflops"]
        finished = task.finish(out)
        if reference is None:
            reference = finished
        else:
            parity = task.agreement(reference, finished)
            # the tolerances are against the fp32 Hugging Face model: an artifact first is no yardstick for them
            named = options.checkpoint is not None
            run["parity_vs_first"] = judge_agreement(task, parity, manifest, str(ckpt), named) \
                if options.torch_eager else parity
        result["runs"].append(run)
    base = result["runs"][0]["latency_ms_median"]
    for run in result["runs"]:
        run["speedup_vs_first"] = base / run["latency_ms_median"]
    by_backend = {}
    for run in result["runs"]:
        by_backend.setdefault(run["backend"], run)
    if "tvm" in by_backend and "onnx" in by_backend:
        result["tvm_vs_onnx"] = by_backend["onnx"]["latency_ms_median"] / by_backend["tvm"]["latency_ms_median"]
        result["tvm_vs_onnx_runs"] = [by_backend["tvm"]["name"], by_backend["onnx"]["name"]]
    return result


def _measure(makers, ids, mask, options) -> list[tuple[np.ndarray, np.ndarray]]:
    """(output, forward times) per run, all loaded at once and timed in rounds, every other round in reverse order
    (no run always goes first). The first, untimed forward of each gives the output compared."""
    backends = []
    try:
        for make in makers:
            backends.append(make())
        outs = [b.run(ids, mask) for b in backends]
        for _ in range(options.warmup):
            for b in backends:
                b.run(ids, mask)
        times: list[list[float]] = [[] for _ in backends]
        for round_ in range(options.iterations):
            order = range(len(backends)) if round_ % 2 == 0 else reversed(range(len(backends)))
            for k in order:
                times[k].append(_timed(lambda b=backends[k]: b.run(ids, mask)))
        return [(out, np.array(t)) for out, t in zip(outs, times)]
    finally:
        for b in backends:
            b.close()


def compare_report(result: dict) -> str:
    """The `run_compare` result as a table, the TVM vs ONNX Runtime ratio and a line per run off tolerance."""
    task = get_task(result["task"])
    key = task.gate_key
    rows = [[r["name"], r["latency_ms_median"], r["latency_ms_min"], r["sequences_per_s"], r["gflops"],
             r["fraction_of_matmul_peak"], r["speedup_vs_first"],
             r["parity_vs_first"][key] if "parity_vs_first" in r else "-"] for r in result["runs"]]
    lines = [format_columns(["run", "median ms", "min ms", "seq/s", "GFLOP/s", "of peak", "speed-up",
                             f"{key} vs first"], [None, ",.3f", ",.3f", ",.1f", ",.1f", ".1%", ",.3f",
                                                  task.agreement_format], rows,
                            title=f"{result['task']} batch {result['batch']} x seq {result['seq_len']}: "
                                  f"{result['gflop_per_forward']:.3g} GFLOP per forward, fp32 matmul peak "
                                  f"{result['matmul_peak_gflops']:,.0f} GFLOP/s (numpy, same machine); "
                                  f"first run: {result['reference']}; "
                                  + ("timed in alternating rounds" if result["interleaved"] else "timed in turn"))]
    if "tvm_vs_onnx" in result:
        tvm_run, onnx_run = result["tvm_vs_onnx_runs"]
        lines.append(f"TVM vs ONNX Runtime: {result['tvm_vs_onnx']:.2f}x ({tvm_run} against {onnx_run})")
    for r in result["runs"]:
        stats = r.get("parity_vs_first")
        if stats and stats.get("passed") is False:
            lines.append(f"warning: {r['name']} is off tolerance vs {result['reference']} ({stats['tolerance']}): "
                         f"{task.format_agreement(stats)}; {stats['hint']}")
    return "\n".join(lines)
