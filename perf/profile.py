"""`perf profile`: where one artifact's time goes, kernel by kernel.

ONNX artifacts run under ONNX Runtime's own profiler (`SessionOptions.enable_profiling`): each graph node's kernel
time comes from its Chrome trace (`cat == "Node"`, `*_kernel_time` events). TVM artifacts run on the Relax VM with an
instrument (`VirtualMachine.set_instrument`, called before and after every call the VM makes; apache-tvm 0.27's Relax VM
has no built-in profiler): each PrimFunc call is timed between its two callbacks, so a kernel's time includes a few
microseconds of callback overhead, and the VM's own `vm.builtin.*` calls (allocation, reshapes, shape checks) are
timed apart from the kernels. On CUDA, TVM kernels are timed after a device sync (serialised); ONNX Runtime's node
times there are launch times.

Only the measured iterations count (warm-up runs are left out). Per kernel (ONNX: graph node; TVM: PrimFunc) and per
op type (ONNX: the node's op; TVM: the PrimFunc name without its shapes and copy numbers, its dtypes kept,
`tvm_op_type`): calls, time and share of the wall time per iteration, and GFLOP/s for matmuls (2*M*N*K from the
shapes each call saw). Wall time is `backend.run` as the caller sees it; wall minus the kernels' sum is framework
overhead. The model's effective GFLOP/s is over the unprofiled wall time (the median run), on either backend: the
measured runs again with the profiler off (ONNX Runtime's stopped, TVM's instrument removed), as the profilers
themselves cost time; the profiler's cost is the profiled runs' median wall against theirs.

    result = run_profile(ProfileOptions(artifact="ws/.../onnx/seq128", iterations=10, trace="trace.json"))
"""
from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from toolkit.artifact import Manifest
from toolkit.checkpoint import read_hf_config
from toolkit.errors import ToolkitError, check_int
from toolkit.perf.common import make_inputs
from toolkit.perf.compare import forward_flops
from toolkit.report import format_columns
from toolkit.runtime import check_threads

# ONNX Runtime ops whose first input is A of A @ B (as [..., M, K], or [..., K, M] transposed); weights stored as
# initializers are not in the profiler's shapes, the activation always is
ORT_MATMUL_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "MatMulIntegerToFloat",
                            "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul"})
TVM_BUILTIN_PREFIX = "vm.builtin."
ORT_PROFILER_MAX_EVENTS = 1_000_000  # onnxruntime's Profiler::global_max_num_events_: later events are dropped


@dataclass(frozen=True)
class ProfileOptions:
    """What `perf profile` measures. `check()` validates every field before a model is loaded.

    - `artifact`: one artifact directory (one SEQ).
    - `iterations`: profiled runs; `warmup`: runs first, not counted.
    - `top`: how many kernels (and op types) the report lists; the JSON has them all.
    - `input`: "random" (full-length random ids), or a dataset (JSONL path or name such as `sts12-sample`): its
      requests for the artifact's task (`common.make_inputs`).
    - `threads`: compute threads (default: all cores).
    - `trace`: where to write the Chrome trace (chrome://tracing, Perfetto); None: no trace.
    """

    FLAGS: ClassVar[dict] = {"artifact": "--artifact", "iterations": "--iterations", "warmup": "--warmup",
                             "top": "--top", "input": "--input", "threads": "--threads", "trace": "--trace"}

    artifact: str | Path
    iterations: int = 10
    warmup: int = 2
    top: int = 15
    input: str = "random"
    threads: int | None = None
    trace: str | Path | None = None

    def check(self) -> "ProfileOptions":
        """Raise ToolkitError (naming the command-line option) for the first invalid field; return self."""
        flag = self.FLAGS
        if not isinstance(self.artifact, (str, Path)) or not str(self.artifact):
            raise ToolkitError(f"{flag['artifact']} must be an artifact directory, got {self.artifact!r}")
        check_int(self.iterations, flag["iterations"], 1)
        check_int(self.warmup, flag["warmup"], 0)
        check_int(self.top, flag["top"], 1)
        check_threads(self.threads)
        if not isinstance(self.input, str) or not self.input.strip():
            raise ToolkitError(f"{flag['input']} must be 'random' or a dataset (JSONL path or name such as "
                               f"sts12-sample), got {self.input!r}")
        if self.trace is not None and (not isinstance(self.trace, (str, Path)) or not str(self.trace)
                                       or Path(self.trace).is_dir()):
            raise ToolkitError(f"{flag['trace']} must be a file path (e.g. trace.json), got {self.trace!r}")
        return self


def load_artifact(path: str | Path) -> Manifest:
    """The deployable artifact at `path`, its files hash-checked (a corrupt one is refused before any runtime reads
    it); a bucket set (a directory of artifacts) is refused with one to pick (`Manifest.load`)."""
    return Manifest.load(path, verify=True).require_deployable()


# ---- FLOPs from shapes -----------------------------------------------------------------------------------------------
def _prod(shape) -> int:
    return math.prod(int(d) for d in shape)


def ort_matmul_flops(inputs: list[list[int]], output: list[int]) -> int | None:
    """2*M*N*K of an ONNX Runtime matmul-like node from its first input A ([..., M, K] or, transposed, [..., K, M])
    and its output [..., M, N]; None where the shapes do not say."""
    if not inputs or not output:
        return None
    a = inputs[0]
    if len(a) == 1:
        k = a[0]
    elif len(output) >= 2 and a[-2] == output[-2]:
        k = a[-1]
    elif len(output) >= 2 and a[-1] == output[-2]:
        k = a[-2]
    else:
        return None
    return 2 * _prod(output) * int(k)


def _broadcast(a, b) -> tuple | None:
    """numpy's broadcast of two batch shapes, or None."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x, y = (a[-i] if i <= len(a) else 1), (b[-i] if i <= len(b) else 1)
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(reversed(out))


# Our bf16 / int8 / bf16x3 linear kernels (`tvm_compile.pack_linear_weights`): their operands are packed (pairs,
# quads, planes), and their names end in the GEMM's `rows_K_N`, then their epilogue if any (a GLU one's output is
# [rows, N/64, 32]: SiLU(gate) * up, half the product's columns)
PACKED_LINEAR = re.compile(r"^(?:bf16|int8|bf16x3)_matmul_.*_(\d+)_(\d+)(_residual|_glu)?$")
BF16_ATTENTION = re.compile(r"^bf16_attention_(?:scores|values)_")  # `tvm_compile.bf16_attention_kernels`


def tvm_matmul_flops(name: str, inputs: list[tuple], output: tuple) -> int | None:
    """2*M*N*K of a TVM matmul PrimFunc call (destination-passing: the output is its last argument). A packed linear
    kernel (PACKED_LINEAR) has K and N in its name and M rows out. Otherwise some ordered pair of its inputs must
    multiply as numpy's matmul does into the output's shape, A [..., M, K] @ B [..., K, N] (packed weight panels
    [N/64, K, 64] included, with the output [..., N/64, M, 64]); epilogue inputs (residuals, masks) do not. bf16
    attention's kernels (BF16_ATTENTION) take bf16 pairs first, K/2 in their last axis. None where no pair fits, or
    pairs disagree on K."""
    if len(output) < 2:
        return None
    if BF16_ATTENTION.match(name):
        return 2 * _prod(output) * 2 * int(inputs[0][-1])
    if (packed := PACKED_LINEAR.match(name)) and int(packed[2]) == _prod(output[1:]) * (2 if packed[3] == "_glu"
                                                                                        else 1):
        return 2 * output[0] * int(packed[2]) * int(packed[1])
    ks = set()
    for i, a in enumerate(inputs):
        for j, b in enumerate(inputs):
            if i == j or len(a) < 2 or len(b) < 2:
                continue
            if a[-1] == b[-2] and (a[-2], b[-1]) == tuple(output[-2:]) \
                    and _broadcast(a[:-2], b[:-2]) == tuple(output[:-2]):
                ks.add(int(a[-1]))
    return 2 * _prod(output) * ks.pop() if len(ks) == 1 else None


# ---- op types --------------------------------------------------------------------------------------------------------
DTYPE_WORD = re.compile(r"^(?:bf|fp|int|uint|float)\d+(?:x\d+)?$")  # bf16, bf16x3, int8, fp16, float32


def tvm_op_type(name: str) -> str:
    """A PrimFunc's op type: its name's `_`-separated words without their trailing numbers (TVM's copy numbers,
    `matmul1`, `softmax_2`; our kernels' shapes, `batchx32_64_128`), dtype words kept whole, so that
    `bf16x3_matmul_batchx32_64_128` and `bf16x3_matmul_batchx32_128_64` are both `bf16x3_matmul_batchx`."""
    words = (word if DTYPE_WORD.match(word) else word.rstrip("0123456789") for word in name.split("_"))
    return "_".join(word for word in words if word)


# ---- profiling -------------------------------------------------------------------------------------------------------
class _Kernels:
    """Calls, seconds and FLOPs per kernel over the measured iterations."""

    def __init__(self):
        self.calls, self.seconds, self.flops, self.op_type = defaultdict(int), defaultdict(float), {}, {}

    def add(self, name: str, op_type: str, seconds: float, flops: int | None) -> None:
        self.calls[name] += 1
        self.seconds[name] += seconds
        self.op_type[name] = op_type
        if flops is not None:
            self.flops[name] = self.flops.get(name, 0) + flops


def _profile_onnx(manifest: Manifest, options: ProfileOptions, inputs,
                  bar) -> tuple[_Kernels, list[float], list[float], dict]:
    """ONNX Runtime with its profiler on: kernels from the trace's node events inside the measured runs."""
    from toolkit.backends import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory(prefix="perf-profile-") as tmp:
        backend = OnnxRuntimeBackend(manifest, options.threads, profile_prefix=Path(tmp) / "ort")
        try:
            walls = _run(backend, options, inputs, bar)
            trace_file = backend.session.end_profiling()  # which also stops the profiler
            unprofiled = _unprofiled_walls(backend, options, inputs)
        finally:
            backend.close()
        events = json.loads(Path(trace_file).read_text())
        if options.trace:
            Path(options.trace).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trace_file, options.trace)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    made = options.warmup + options.iterations
    if len(runs) != made:  # its profiler drops the events past ORT_PROFILER_MAX_EVENTS, runs included
        raise ToolkitError(f"ONNX Runtime's profiler recorded {len(runs)} of the {made} runs (it keeps "
                           f"{ORT_PROFILER_MAX_EVENTS:,} events, about {len(events) // max(len(runs), 1):,} a run "
                           f"here); profile fewer runs: --iterations plus --warmup at most {max(len(runs), 1)}")
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs[options.warmup:]]
    kernels = _Kernels()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(start <= e["ts"] <= end for start, end in windows):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        flops = None
        if op in ORT_MATMUL_OPS:
            shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
            out = [list(d.values())[0] for d in args.get("output_type_shape", [])]
            flops = ort_matmul_flops(shapes, out[0] if out else [])
        kernels.add(e["name"].removesuffix("_kernel_time"), op, e["dur"] / 1e6, flops)
    info = {"profiler": "onnxruntime", "ort_model_run_ms_per_iteration": sum(r["dur"] for r in runs[options.warmup:])
            / 1e3 / options.iterations}
    return kernels, walls, unprofiled, info


def _profile_tvm(manifest: Manifest, options: ProfileOptions, inputs,
                 bar) -> tuple[_Kernels, list[float], list[float], dict]:
    """The Relax VM with an instrument timing every call it makes; PrimFuncs are the kernels."""
    from toolkit.tvm_backend import TvmBackend

    backend = TvmBackend(manifest, options.threads)
    sync = backend.device.sync if manifest.target.device != "cpu" else None
    kernels, builtin_seconds, trace_events = _Kernels(), [0.0], []
    state = {"on": False, "origin": 0.0, "start": []}
    clock = time.perf_counter

    def instrument(func, name, before_run, ret_value, *args):
        if not state["on"]:
            return 0
        if before_run:
            if sync is not None:
                sync()
            state["start"].append(clock())
            return 0
        if sync is not None:
            sync()
        end = clock()
        start = state["start"].pop()
        if name.startswith(TVM_BUILTIN_PREFIX):
            builtin_seconds[0] += end - start
            category = "vm.builtin"
        else:
            shapes = [tuple(int(d) for d in a.shape) for a in args if hasattr(a, "shape")]
            is_matmul = "matmul" in name or BF16_ATTENTION.match(name)
            flops = tvm_matmul_flops(name, shapes[:-1], shapes[-1]) if is_matmul and shapes else None
            kernels.add(name, tvm_op_type(name), end - start, flops)
            category = "kernel"
        if options.trace:
            trace_events.append({"name": name, "cat": category, "ph": "X", "pid": 0, "tid": 0,
                                 "ts": (start - state["origin"]) * 1e6, "dur": (end - start) * 1e6})
        return 0

    backend.vm.set_instrument(instrument)
    try:
        def on_measured():
            state["on"], state["origin"] = True, clock()

        walls = _run(backend, options, inputs, bar, on_measured, trace_events if options.trace else None,
                     lambda: state["origin"])
        backend.vm.set_instrument(None)
        unprofiled = _unprofiled_walls(backend, options, inputs)
    finally:
        backend.vm.set_instrument(None)
        backend.close()
    if options.trace:
        Path(options.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(options.trace).write_text(json.dumps({"traceEvents": trace_events, "displayTimeUnit": "ms"}))
    info = {"profiler": "tvm-vm-instrument",
            "vm_builtin_ms_per_iteration": builtin_seconds[0] * 1e3 / options.iterations}
    return kernels, walls, unprofiled, info


def _timed(backend, batch) -> float:
    t0 = time.perf_counter()
    backend.run(*batch)
    return time.perf_counter() - t0


def _unprofiled_walls(backend, options: ProfileOptions, inputs) -> list[float]:
    """The measured runs again, the profiler off: each one's wall seconds."""
    return [_timed(backend, inputs[i % len(inputs)]) for i in range(options.iterations)]


def _run(backend, options: ProfileOptions, inputs, bar, on_measured=None, trace_events=None, origin=None) -> list:
    """Warm-up runs, then the measured ones; returns each measured run's wall seconds."""
    for i in range(options.warmup):
        backend.run(*inputs[i % len(inputs)])
        bar.update(1)
    if on_measured is not None:
        on_measured()
    walls = []
    for i in range(options.iterations):
        t0 = time.perf_counter()
        walls.append(_timed(backend, inputs[i % len(inputs)]))
        if trace_events is not None:
            trace_events.append({"name": f"iteration {i}", "cat": "run", "ph": "X", "pid": 0, "tid": 0,
                                 "ts": (t0 - origin()) * 1e6, "dur": walls[-1] * 1e6})
        bar.update(1)
    return walls


def model_gflop(manifest: Manifest) -> float | None:
    """GFLOP of one forward at the artifact's shape (`perf compare`'s count), when the checkpoint it was built from
    is still here to say the model's sizes; None otherwise (nothing is downloaded)."""
    if not manifest.model.resolved:
        return None
    try:
        config = read_hf_config(manifest.model.resolved)
    except ToolkitError:
        return None
    return forward_flops(config, manifest.seq_len, manifest.batch) / 1e9


def run_profile(options: ProfileOptions, progress: bool = True) -> dict:
    """Profile one artifact as `options` says; returns the result dict (`profile_report` prints it).

    `kernels` (every kernel, slowest first) and `op_types` each carry `calls_per_iteration`, `ms_per_iteration`,
    `share` (of the wall time per iteration), `gflop_per_iteration` and `gflops` (None where not a matmul).
    `model_gflops` is over the time `model_gflops_time` names: the unprofiled wall time, on either backend."""
    options.check()
    manifest = load_artifact(options.artifact)
    inputs = make_inputs(manifest, options.input, min(options.warmup + options.iterations, 64))
    profile = _profile_tvm if manifest.backend == "tvm" else _profile_onnx
    with tqdm(total=options.warmup + options.iterations, desc="profile", disable=not progress, leave=False) as bar:
        kernels, walls, unprofiled, info = profile(manifest, options, inputs, bar)
    n = options.iterations
    wall_ms = sum(walls) * 1e3 / n  # the kernels' times are sums: their shares are of the mean wall
    # profiled against unprofiled, and the model's rate: medians, which one run slowed by other load does not move
    # (means gave the profiled runs as faster than the same runs unprofiled on a loaded host)
    wall_median_ms, unprofiled_ms = statistics.median(walls) * 1e3, statistics.median(unprofiled) * 1e3

    def row(seconds: float, calls: int, flops: int | None) -> dict:
        ms = seconds * 1e3 / n
        return {"calls_per_iteration": calls // n if calls % n == 0 else calls / n, "ms_per_iteration": ms,
                "share": ms / wall_ms, "gflop_per_iteration": None if flops is None else flops / n / 1e9,
                "gflops": None if flops is None or seconds <= 0 else flops / seconds / 1e9}

    rows = sorted(({"name": k, "op_type": kernels.op_type[k],
                    **row(kernels.seconds[k], kernels.calls[k], kernels.flops.get(k))} for k in kernels.calls),
                  key=lambda r: -r["ms_per_iteration"])
    by_op = defaultdict(list)
    for k in kernels.calls:
        by_op[kernels.op_type[k]].append(k)
    op_rows = []
    for op, names in by_op.items():
        flops = [kernels.flops[k] for k in names if k in kernels.flops]
        op_rows.append({"op_type": op, "kernels": len(names),
                        **row(sum(kernels.seconds[k] for k in names), sum(kernels.calls[k] for k in names),
                              sum(flops) if flops else None)})
    op_rows.sort(key=lambda r: -r["ms_per_iteration"])
    kernel_ms = sum(r["ms_per_iteration"] for r in rows)
    gflop = model_gflop(manifest)
    matmul_gflop = sum(r["gflop_per_iteration"] or 0.0 for r in rows)
    return {
        "artifact": str(manifest.path), "backend": manifest.backend, "task": manifest.task,
        "seq_len": manifest.seq_len, "batch": manifest.batch, "dtype": manifest.dtype,
        "device": manifest.target.device, "input": options.input, "iterations": n, "warmup": options.warmup,
        "threads": options.threads, **info,
        "wall_ms_per_iteration": wall_ms, "wall_ms_min": min(walls) * 1e3, "wall_ms_median": wall_median_ms,
        "kernel_ms_per_iteration": kernel_ms, "overhead_ms_per_iteration": wall_ms - kernel_ms,
        "unprofiled_wall_ms_median": unprofiled_ms,
        # the model's rate at its real speed, on either backend: the profilers cost time
        "model_gflop": gflop, "model_gflops": None if gflop is None else gflop / (unprofiled_ms / 1e3),
        "model_gflops_time": "unprofiled_wall_ms_median",
        "matmul_gflop_per_iteration": matmul_gflop,
        "top": options.top, "trace": str(options.trace) if options.trace else None,
        "op_types": op_rows, "kernels": rows,
    }


NAME_WIDTH = 60  # longer kernel names (TVM's fused PrimFuncs) are cut in the table; the JSON has them whole


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def profile_report(result: dict) -> str:
    """The top op types and kernels as tables, then the wall-time / kernel-time / GFLOP/s summary."""
    top = result["top"]

    def table(first_headers, first_formats, rows, first, title):
        """`first` columns, then calls/iter, ms/iter, share and GFLOP/s, each number column in one format."""
        # calls per iteration are whole unless a kernel ran a different number of times in different iterations
        calls = ",.0f" if all(float(r["calls_per_iteration"]).is_integer() for r in rows) else ",.2f"
        return format_columns([*first_headers, "calls/iter", "ms/iter", "share", "GFLOP/s"],
                              [*first_formats, calls, ",.3f", ".1%", ",.1f"],
                              [[*first(r), r["calls_per_iteration"], r["ms_per_iteration"], r["share"],
                                "-" if r["gflops"] is None else r["gflops"]] for r in rows], title=title)

    title = (f"{result['backend']} {result['dtype']} {result['task']} batch {result['batch']} x seq "
             f"{result['seq_len']}, {result['iterations']} iterations (+{result['warmup']} warm-up), input "
             f"{result['input']}, profiler {result['profiler']}; share = of the wall time per iteration")
    ops = table(["op type", "kernels"], [None, ",d"], result["op_types"][:top],
                lambda r: (_short(r["op_type"]), r["kernels"]),
                f"{title}\n\ntop {min(top, len(result['op_types']))} of {len(result['op_types'])} op types")
    kernels = table(["kernel", "op type"], [None, None], result["kernels"][:top],
                    lambda r: (_short(r["name"]), _short(r["op_type"])),
                    f"top {min(top, len(result['kernels']))} of {len(result['kernels'])} kernels")
    wall, kern = result["wall_ms_per_iteration"], result["kernel_ms_per_iteration"]
    lines = [ops, "", kernels, "",
             f"wall {wall:.3f} ms per iteration (min {result['wall_ms_min']:.3f}); kernels {kern:.3f} ms "
             f"({100 * kern / wall:.1f}%), framework overhead {wall - kern:.3f} ms ({100 * (wall - kern) / wall:.1f}%)"]
    if "vm_builtin_ms_per_iteration" in result:
        lines.append(f"the overhead holds the VM's builtins (allocation, reshapes, checks: "
                     f"{result['vm_builtin_ms_per_iteration']:.3f} ms) and the instrument's callbacks")
    unprofiled, profiled = result["unprofiled_wall_ms_median"], result["wall_ms_median"]
    # the profiler's cost, whichever way the runs' noise leaves it
    lines.append(f"unprofiled wall {unprofiled:.3f} ms per iteration (median; profiled {profiled:.3f}): the same runs "
                 f"with the profiler off ({abs(profiled - unprofiled):.3f} ms "
                 f"{'less' if unprofiled <= profiled else 'more'})")
    if result["model_gflop"] is not None:
        lines.append(f"model {result['model_gflop']:.3g} GFLOP per forward (matmul kernels: "
                     f"{result['matmul_gflop_per_iteration']:.3g}): {result['model_gflops']:.1f} GFLOP/s effective, "
                     "over the unprofiled wall time")
    else:
        lines.append(f"matmul kernels: {result['matmul_gflop_per_iteration']:.3g} GFLOP per iteration (the model's "
                     "FLOP count needs the checkpoint it was built from, which is not here)")
    if result["trace"]:
        lines.append(f"trace: {result['trace']}")
    return "\n".join(lines)

