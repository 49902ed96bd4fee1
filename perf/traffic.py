"""`perf traffic`: real requests from an evaluation set replayed through the public API (what users call), torch
eager against artifact sets, side by side in one process.

For each run: requests/s, real tokens/s, the share of computed token slots that were padding, the effective GFLOP/s
on real tokens (FLOPs of each row at its real length) against this machine's measured fp32 matmul peak, the ratio to
the best torch run, the agreement with torch (the task's measure: min cosine / max |ΔP(yes)|, over the requests both
ran whole or cut alike: torch is cut at the largest SEQ of all the sets, so a request longer than a smaller set's
largest SEQ ran other tokens there, and is left out of that set's agreement and counted), and the memory the
run's model holds (resident MB given back when it is unloaded after the run: its weights, buffers and caches, not the
runtime libraries a first load brings in for good).

With `rounds` > 1 every run goes that many times, the order reversed each round, and each figure is the median; a
run's ratio to torch is taken within each round (runs minutes apart on a shared machine drift by 10-20%, more than the
gaps being measured) and the table shows the median with the range over the rounds.

    result = run_traffic(TrafficOptions(data="data/sts12_test.jsonl", artifacts=("ws/emb/tvm",), rounds=3))
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.api import model_class
from toolkit.artifact import find_artifacts
from toolkit.buckets import token_lengths
from toolkit.checkpoint import read_hf_config, resolve_checkpoint
from toolkit.errors import ToolkitError, check_int
from toolkit.eval.datasets import load_dataset
from toolkit.memory import resident_mb, return_freed_memory
from toolkit.perf.common import check_instances, judge_agreement, median
from toolkit.perf.compare import forward_flops, matmul_peak_gflops
from toolkit.report import format_columns
from toolkit.runner import RunnerStats
from toolkit.runtime import check_threads, set_cpu_threads
from toolkit.tasks import check_instruction_text, get_task

WARMUP_REQUESTS = 48  # spread over the length range, so every bucket has run before the clock starts


@dataclass(frozen=True)
class TrafficOptions:
    """What `perf traffic` replays. `data`: an evaluation JSONL path or name; `artifacts`: artifact-set directories
    (same task); `checkpoint`: the torch reference (default: the one the first artifact was built from);
    `torch_batches`: torch eager's dynamic batch sizes; `limit`: the first N requests; `instances`: engine instances
    per artifact; `threads`: the process's compute-thread budget (default: all cores); `rounds`: times every run
    goes (the figures are medians); `instruction`: every request's (embedding: the texts as queries with it;
    reranker: instead of web search), by default the one a set was compiled for, if any."""

    data: str
    artifacts: tuple[str | Path, ...] = ()
    checkpoint: str | None = None
    torch_batches: tuple[int, ...] = (8, 32)
    limit: int | None = 256
    instances: int | str = 1
    threads: int | None = None
    rounds: int = 1
    instruction: str | None = None

    def check(self) -> "TrafficOptions":
        """Raise ToolkitError (naming the option) for the first invalid field; return self."""
        if not self.artifacts:
            raise ToolkitError("give at least one --artifact SET (torch eager runs beside it)")
        for b in self.torch_batches:
            check_int(b, "--torch-batch", 1)
        if self.limit is not None:
            check_int(self.limit, "--limit", 1)
        check_instances(self.instances)
        check_int(self.rounds, "--rounds", 1)
        check_threads(self.threads)
        check_instruction_text(self.instruction)  # not minutes later, when the first model has loaded
        return self


def run_traffic(options: TrafficOptions, progress: bool = True) -> dict:
    """Replay the requests through every run; returns the result dict (`traffic_report` prints it)."""
    options.check()
    if options.threads:
        set_cpu_threads(options.threads)
    sets = [find_artifacts(a) for a in options.artifacts]
    tasks = {s[0].task for s in sets}
    if len(tasks) > 1:
        raise ToolkitError(f"the artifact sets hold different tasks {sorted(tasks)}; compare one task at a time")
    checkpoint = resolve_checkpoint(options.checkpoint or sets[0][0].reference_checkpoint())
    config = read_hf_config(checkpoint)
    task = get_task(tasks.pop())
    _, _, examples = load_dataset(options.data, task=task)
    requests = task.traffic(examples)[: options.limit]
    fixed = [s[0].instruction for s in sets if s[0].instruction is not None]
    instruction = options.instruction if options.instruction is not None or not fixed else fixed[0]
    # torch cuts where the set of the largest SEQ does; a set of a smaller one cuts more, which its agreement leaves
    # out (`same_inputs`)
    max_length = max(s[-1].seq_len for s in sets)
    cls = model_class(task)
    runs = [(f"torch eager fp32, batch {b}",
             lambda b=b: cls.from_checkpoint(checkpoint, max_length=max_length, batch_size=b, truncation="truncate"))
            for b in options.torch_batches]
    labels = [f"{s[0].backend} {s[0].kernels} SEQ {','.join(str(m.seq_len) for m in s)}" for s in sets]
    names = [s[0].name for s in sets]
    # named by their config; two sets of one config (before and after a change) by their directories
    runs += [(f"{label} ({name if names.count(name) == 1 else path})",
              lambda path=path: cls.from_artifacts(path, instances=options.instances, truncation="truncate"))
             for path, label, name in zip(options.artifacts, labels, names)]
    result = {"task": task.name, "data": str(options.data), "requests": len(requests), "instruction": instruction,
              "checkpoint": str(checkpoint),
              "matmul_peak_gflops": matmul_peak_gflops(), "rounds": options.rounds}
    rounds = []
    for k in range(options.rounds):
        # reversed every other round: on a machine that drifts during the run, no run is always first
        order = list(range(len(runs)))[:: 1 if k % 2 == 0 else -1]
        timed = {i: time_run(task, *runs[i], requests, instruction, config, progress) for i in order}
        rounds.append(round_figures([timed[i] for i in range(len(runs))], task, result["matmul_peak_gflops"]))
    result["runs"] = [median_over_rounds([r[i] for r in rounds]) for i in range(len(runs))]
    result["gate_key"] = task.gate_key
    if options.torch_batches:  # the first run is torch fp32, what the dtypes' tolerances are against
        for run, manifests in zip(result["runs"][len(options.torch_batches):], sets):
            if run["agreement_vs_first"] is not None:
                judge_agreement(task, run["agreement_vs_first"], manifests[0], str(checkpoint),
                                options.checkpoint is not None)
    return result


def time_run(task, name: str, make, requests: list, instruction: str | None, config: dict,
             progress: bool) -> tuple[dict, list, np.ndarray]:
    """Load one run's model, warm it up, replay the requests (with `instruction`), unload it; its figures, its
    outputs and the requests' token lengths (before its model cut them to its largest SEQ, `max_length`)."""
    with make() as model:
        full_lengths = token_lengths(task, model.tokenizer, requests, instruction)
        max_length = model.max_length
        lengths = full_lengths.clip(max=max_length)
        task.run_requests(model, warmup_subset(requests, lengths), instruction)
        model.runner.stats = RunnerStats()
        started = time.perf_counter()
        outputs = task.run_requests(model, requests, instruction, progress=progress)
        seconds = time.perf_counter() - started
        stats = model.runner.stats
        loaded = settled_resident_mb()  # the run's freed temporaries handed back: what the model itself keeps
    del model  # one run's weights in memory at a time
    # what unloading gives back: the growth since before the load charged the first run of each runtime with the
    # libraries it loads for good
    held = loaded - settled_resident_mb()
    flops = sum(forward_flops(config, int(n), 1) for n in lengths)
    return {"name": name, "seconds": seconds, "requests_per_s": len(requests) / seconds,
            "real_tokens_per_s": stats.real_tokens / seconds, "padding": stats.padding_fraction,
            "batches_per_seq": stats.batches_per_seq, "gflops": flops / seconds / 1e9, "resident_mb": held,
            "max_length": max_length, "truncated": int((full_lengths > max_length).sum())}, outputs, full_lengths


def settled_resident_mb() -> int:
    """Resident MB once unreachable objects are collected and the heap's free pages handed back."""
    gc.collect()
    return_freed_memory()
    return resident_mb()


def round_figures(timed: list[tuple[dict, list, np.ndarray]], task, peak_gflops: float) -> list[dict]:
    """One round's runs (in run order) with their share of the peak, their ratio to the round's best torch run and
    their agreement with the round's first run (`same_inputs`; None where no request ran the same in both)."""
    runs = [run for run, *_ in timed]
    best_torch = max((r["requests_per_s"] for r in runs if r["name"].startswith("torch")), default=None)
    first, reference, _ = timed[0]
    for k, (run, outputs, lengths) in enumerate(timed):
        run["fraction_of_peak"] = run["gflops"] / peak_gflops
        run["vs_best_torch"] = run["requests_per_s"] / best_torch if best_torch else None
        if k:
            same = same_inputs(lengths, first["max_length"], run["max_length"])
            agreement = task.agreement(reference[same], outputs[same]) if same.any() else None
            run["agreement_vs_first"] = agreement
            run["agreement_left_out"] = int((~same).sum())
    return runs


def same_inputs(lengths: np.ndarray, max_length: int, other_max_length: int) -> np.ndarray:
    """Which requests (of these token lengths) two models cutting inputs at these lengths ran alike: whole in both,
    or cut at the same length. Another request ran other tokens in each, so comparing their outputs measures the cut,
    not the artifact."""
    return (lengths <= min(max_length, other_max_length)) | (max_length == other_max_length)


MEDIAN_FIGURES = ("seconds", "requests_per_s", "real_tokens_per_s", "gflops", "fraction_of_peak", "resident_mb")


def median_over_rounds(runs: list[dict]) -> dict:
    """One run's rounds as one: the median of each timed figure and of the ratio to torch, the ratio's range, and
    the first round's padding and agreement (every round computes the same batches)."""
    run = {**runs[0], **{key: median(r[key] for r in runs) for key in MEDIAN_FIGURES}}
    run["resident_mb"] = int(run["resident_mb"])
    if run["vs_best_torch"] is not None:
        ratios = [r["vs_best_torch"] for r in runs]
        run["vs_best_torch"] = median(ratios)
        run["vs_best_torch_range"] = [min(ratios), max(ratios)]
    if len(runs) > 1:
        run["per_round"] = [{key: r[key] for key in ("requests_per_s", "vs_best_torch")} for r in runs]
    return run


def warmup_subset(requests: list, lengths) -> list:
    """About WARMUP_REQUESTS of the requests, spread over their token lengths: run once before the clock starts,
    they make every bucket run."""
    by_length = sorted(range(len(requests)), key=lambda i: lengths[i])
    return [requests[i] for i in by_length[::max(1, len(requests) // WARMUP_REQUESTS)]]


def traffic_report(result: dict) -> str:
    """The side-by-side table, then a warning line for each set off its dtype's tolerance of torch, with the likely
    cause."""
    task = get_task(result["task"])
    key = task.gate_key
    rows = [[r["name"], r["requests_per_s"], r["real_tokens_per_s"], r["padding"], r["gflops"], r["fraction_of_peak"],
             ratio_cell(r), agreement_cell(r, key), r["resident_mb"]]
            for r in result["runs"]]
    instruction = result.get("instruction")
    title = (f"{result['task']}: {result['requests']} requests from {result['data']}"
             + (f" with the instruction {instruction!r}" if instruction is not None else "") + "; fp32 matmul peak "
             f"{result['matmul_peak_gflops']:,.0f} GFLOP/s (numpy, same machine)"
             + (f"; medians of {result['rounds']} rounds, ratio range in brackets" if result["rounds"] > 1 else ""))
    lines = [format_columns(["run", "requests/s", "real tokens/s", "padding", "GFLOP/s", "of peak", "vs torch",
                             f"{key} vs first", "memory MB"],
                            [None, ",.1f", ",.0f", ".1%", ",.1f", ".1%", ",.3f", task.agreement_format, ",d"], rows,
                            title=title)]
    first = result["runs"][0]
    for r in result["runs"]:
        if r.get("truncated"):  # fewer tokens computed than a run that took them whole: a smaller job, not a faster one
            lines.append(f"note: {r['name']} cut {r['truncated']} of {result['requests']} requests to "
                         f"{r['max_length']} tokens: it computed fewer tokens than a run taking them whole")
        if r.get("agreement_left_out"):
            lines.append(f"note: {r['name']}'s agreement leaves out the {r['agreement_left_out']} requests it and "
                         f"{first['name']} cut differently (their largest SEQs: {r['max_length']}, "
                         f"{first['max_length']}): the two ran other tokens there"
                         + ("; no request is left to compare" if r["agreement_vs_first"] is None else ""))
        agreement = r.get("agreement_vs_first") or {}
        if agreement.get("passed") is False:
            lines.append(f"warning: {r['name']} is off tolerance vs {result['runs'][0]['name']} "
                         f"({agreement['tolerance']}): {task.format_agreement(agreement)}; {agreement['hint']}")
    return "\n".join(lines)


def agreement_cell(run: dict, key: str):
    """The run's agreement with the first run, "(reference)" for the first, "-" where no request compared."""
    if "agreement_vs_first" not in run:
        return "(reference)"
    return "-" if run["agreement_vs_first"] is None else run["agreement_vs_first"][key]


def ratio_cell(run: dict) -> str:
    """The ratio to torch, with its range over the rounds where there were several."""
    if run["vs_best_torch"] is None:
        return "-"
    if "per_round" not in run:
        return f"{run['vs_best_torch']:.3f}"
    low, high = run["vs_best_torch_range"]
    return f"{run['vs_best_torch']:.3f} ({low:.3f}-{high:.3f})"
