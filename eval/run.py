"""`toolkit eval`: the torch reference and the compiled artifact on the same inputs, metrics side by side, the deltas,
and how closely the two engines' outputs agree item by item (the task's own agreement measure).

    result = evaluate(EvalOptions(task="embedding", dataset="sts12-sample", artifact="workspace/.../onnx"))
    print(eval_tables(result))

Everything task-specific comes from the `Task` (`toolkit.tasks`): which datasets it takes, how it ranks passages or
scores sentence pairs, which class runs it and how two engines' outputs are compared. Nothing here branches on the
task's name.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.api import check_instruction, check_set, model_class
from toolkit.artifact import Manifest
from toolkit.errors import ToolkitError, check_int
from toolkit.eval.datasets import (
    DatasetSpec,
    check_format,
    check_kind,
    check_limit,
    check_scorable,
    names_of_kind,
    read_examples,
    resolve_dataset,
)
from toolkit.eval.metrics import (
    per_query_metrics,
    queries_lower,
    ranking_agreement,
    reranking_metrics,
    sts_correlations,
)
from toolkit.report import format_table
from toolkit.tasks import Task, check_instruction_text, get_task

RUN_SIDES = ("torch", "artifact")  # the engines; `result["runs"]` holds both keys, null for one that did not run
RUNS = ("both", *RUN_SIDES)
DEFAULT_MAX_DROP = 0.01  # the artifact may trail torch by at most this much on any metric (0..1 scale)


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate` runs. `task`: "embedding" | "reranker"; `dataset`: a name (`sts12`, `bq`, `msmarco`), a bundled
    sample (`sts12-sample`, ...) or a JSONL path; `artifact`: an artifact or bucket-set directory (needed unless
    `run="torch"`); `checkpoint`: the torch reference (default: the one the artifact was built from); `run`: "both" |
    "torch" | "artifact"; `limit`: the first N examples; `data_dir`: where `toolkit data download` wrote the JSONL;
    `max_drop`: how far the artifact may trail torch on any metric; `instances`: engine instances per artifact;
    `instruction`: overrides the dataset's instruction ("" means no instruction prefix at all); `data_format`: the
    format of a JSONL path (`sts12`, `bq`, `msmarco`; None: told by its first row and its file name)."""

    task: str
    dataset: str
    artifact: str | Path | None = None
    checkpoint: str | Path | None = None
    run: str = "both"
    limit: int | None = None
    data_dir: str | Path | None = None
    max_drop: float = DEFAULT_MAX_DROP
    instances: int = 1
    instruction: str | None = None
    data_format: str | None = None

    @property
    def sides(self) -> tuple[str, ...]:
        """The runs to do, in order: ("torch", "artifact"), ("torch",) or ("artifact",)."""
        return RUN_SIDES if self.run == "both" else (self.run,)

    def check(self) -> "EvalOptions":
        """Validate every option before anything is loaded; a bad one is a ToolkitError naming the fix."""
        get_task(self.task)
        if not isinstance(self.dataset, (str, Path)) or not str(self.dataset):
            raise ToolkitError(f"dataset must be a name or a JSONL path, got {self.dataset!r}")
        if self.run not in RUNS:
            raise ToolkitError(f"run must be one of {', '.join(RUNS)}, got {self.run!r}")
        check_limit(self.limit)
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise ToolkitError(f"max_drop must be a finite number >= 0 (e.g. {DEFAULT_MAX_DROP}), "
                               f"got {self.max_drop!r}")
        check_int(self.instances, "instances", 1)
        check_instruction_text(self.instruction)
        check_format(self.data_format)
        if self.artifact is None and "artifact" in self.sides:
            raise ToolkitError("--artifact DIR is required unless --run torch (with --checkpoint)")
        if self.artifact is None and self.checkpoint is None:
            raise ToolkitError("the torch run needs --checkpoint (or --artifact, whose manifest names its checkpoint)")
        return self


def run_model(model, task: Task, spec: DatasetSpec, examples: list, instruction: str) -> dict:
    """One engine on the dataset: `items` (the finished outputs compared between engines: embeddings or P(yes)),
    `per_query` scores and `per_query_metrics` (ranking data), `metrics`, `seconds` and the count of non-finite output
    values."""
    started = time.perf_counter()
    if spec.kind == "pairs":
        items, similarity = task.score_pairs(model, examples, instruction)
        metrics = sts_correlations(similarity, np.array([e.score for e in examples]), spec.score_range)
        per_query = per_query_values = None
    else:
        items, per_query = task.rank_passages(model, [e.query for e in examples], [e.passages for e in examples],
                                              instruction)
        labels = [e.labels for e in examples]
        per_query_values = per_query_metrics(per_query, labels)
        metrics = reranking_metrics(per_query, labels, per_query_values)
    items = np.asarray(items)
    return {"items": items, "per_query": per_query, "per_query_metrics": per_query_values, "metrics": metrics,
            "seconds": time.perf_counter() - started, "nonfinite": int((~np.isfinite(items)).sum())}


def parity(task: Task, torch_run: dict, artifact_run: dict, dtype: str) -> dict:
    """Item-by-item agreement of the two engines (the task's measure) judged against the artifact's `dtype`
    (`Task.judge`), their non-finite counts and, on ranking data, Kendall tau between their per-query rankings."""
    out = {**task.judge(task.agreement(torch_run["items"], artifact_run["items"]), dtype),
           "nonfinite_torch": torch_run["nonfinite"], "nonfinite_artifact": artifact_run["nonfinite"]}
    if torch_run["per_query"] is not None:
        out.update(ranking_agreement(torch_run["per_query"], artifact_run["per_query"]))
    return out


def metric_keys(metrics: dict) -> list[str]:
    """The metric values (floats; counts such as `queries` are not metrics)."""
    return [k for k, v in metrics.items() if isinstance(v, float)]


def metric_deltas(torch_metrics: dict, artifact_metrics: dict) -> dict:
    """artifact - torch for every metric (NaN when either side is NaN)."""
    return {k: artifact_metrics[k] - torch_metrics[k] for k in metric_keys(torch_metrics) if k in artifact_metrics}


def output_failures(runs: dict) -> dict:
    """`{"<run> outputs": reason}` for each run whose outputs hold NaN or inf: no metric computed from them means
    anything, whichever engine it is (a checkpoint with a NaN weight fails the torch run too)."""
    return {f"{side} outputs": f"{r['nonfinite']} non-finite values" for side, r in runs.items() if r["nonfinite"]}


def gate(metrics: dict, delta: dict | None, max_drop: float, side: str = "artifact",
         lower: dict[str, tuple[int, int]] | None = None) -> dict:
    """Why the metrics of the `side` run fail, `{what: reason}` (empty: they pass). They fail on any metric that is not
    finite, on any delta that is missing or not finite (with `delta=None`, i.e. one run only, deltas are not checked),
    and on any metric more than `max_drop` below torch: on ranking data `lower` (`queries_lower`) says on how many of
    the queries, as a mean that drops on one query in 30 is another finding than one that drops on all."""
    failures = {}
    keys = metric_keys(metrics) + [k for k in (delta or {}) if k not in metrics]
    for k in keys:
        value = metrics.get(k)
        if not isinstance(value, float) or not math.isfinite(value):
            failures[k] = f"{side} value is {value}"
        elif delta is None:
            continue
        elif not isinstance(delta.get(k), float) or not math.isfinite(delta[k]):
            failures[k] = f"delta is {delta.get(k)} (the torch value is not finite)"
        elif -delta[k] > max_drop:
            where = f" on {lower[k][0]} of {lower[k][1]} queries" if lower and k in lower else ""
            failures[k] = f"{-delta[k]:.4f} below torch{where} (max drop {max_drop})"
            if lower and k in lower and (coarse := coarse_resolution(lower[k][1], max_drop)):
                failures[k] += f"; {coarse}"
    return failures


def coarse_resolution(queries: int, max_drop: float) -> str | None:
    """Why a mean over `queries` cannot resolve `max_drop`, or None where it can: one query ranking its positive
    passage otherwise moves a metric such as recall@k by 1/queries."""
    if not 1 / queries > max_drop:
        return None
    return (f"with {queries} queries the metrics move in steps of up to 1/{queries} = {1 / queries:.4f}, over max drop "
            f"{max_drop}: one query ranked otherwise fails it; use more queries (a larger --limit) or a larger "
            "--max-drop")


def nearest_limit(task: Task, manifests: list[Manifest]) -> Manifest:
    """The artifact of a set whose gate used most of its error budget: where a parity failure likely comes from (its
    validation is the one to inspect); the first where none has a figure (validation skipped)."""
    def used(m: Manifest) -> float:
        v = m.validation or {}
        return task.tolerance_used(v, m.dtype) if isinstance(v.get(task.gate_key), float) else -math.inf

    return max(manifests, key=used)


def refuse_bare_inputs(task: Task, path: str | Path, manifests: list[Manifest], kind: str, what: str) -> None:
    """Refuse the set at `path` where it was compiled for one instruction (its tokens cached: every input must carry
    it) and `what` (e.g. "msmarco", "the demo") feeds it data of `kind`, which holds texts without it
    (`Task.bare_inputs`). The message says what a CLI user runs instead; checked before any model loads."""
    fixed = manifests[0].instruction
    if fixed is None or not task.bare_inputs(kind):
        return
    usable = [n for k in task.dataset_kinds if not task.bare_inputs(k) for n in names_of_kind(k)]
    raise ToolkitError(f"{path} was compiled with --instruction {fixed!r}: it takes only texts carrying it (its tokens "
                       f"are cached), and {what} also has texts without it: for {what}, use a set compiled without "
                       f"--instruction (`toolkit compile CONFIG` without it); this set runs `toolkit eval --dataset "
                       f"{'|'.join(usable)} --instruction {fixed!r}`")


def evaluate(options: EvalOptions) -> dict:
    """Run torch and/or the artifact on the dataset; returns the result record: metrics and wall time per run, the
    instruction used, with both runs the deltas and the parity, and the verdict (`passed`, `failures`): non-finite
    outputs of either run, parity outside the task's tolerance for the artifact's dtype, and the metrics' `gate`."""
    if not isinstance(options, EvalOptions):
        raise ToolkitError(f"evaluate takes an EvalOptions, got {type(options).__name__}")
    options.check()
    task = get_task(options.task)
    name, spec, source = resolve_dataset(str(options.dataset), options.data_dir, options.data_format)
    check_kind(task, name, spec)
    manifests = None if options.artifact is None else \
        check_set(options.artifact, task, lambda found: f"pass --task {found}, or a set of {task.name} artifacts")
    examples = read_examples(name, spec, source, options.limit)
    check_scorable(name, spec, examples)  # before any model runs: an undefined metric is the data's fault
    if spec.kind != "pairs" and "artifact" in options.sides and "torch" in options.sides \
            and (coarse := coarse_resolution(len(examples), options.max_drop)):
        warnings.warn(coarse, stacklevel=2)  # up front: the verdict may turn on a single query
    instruction = spec.instruction if options.instruction is None else options.instruction
    if manifests and "artifact" in options.sides:  # before any model runs; the data first: no instruction fits it
        refuse_bare_inputs(task, options.artifact, manifests, spec.kind, name)
        check_instruction(manifests[0].instruction, instruction)
    cls = model_class(task)
    # the same keys whatever ran: null for an engine that did not
    result = {"task": task.name, "dataset": name, "source": str(options.dataset), "examples": len(examples),
              "instruction": instruction, "checkpoint": None, "artifact": None, "runs": dict.fromkeys(RUN_SIDES),
              "delta": None, "parity": None}
    runs = {}
    compiled = None
    if "artifact" in options.sides:
        compiled = cls.from_artifacts(options.artifact, instances=options.instances, truncation="truncate")
    try:
        if "torch" in options.sides:
            checkpoint = result["checkpoint"] = str(options.checkpoint or manifests[0].reference_checkpoint())
            # the artifact's truncation: the same token rows for both engines (alone: the reference's default)
            max_length = max(m.seq_len for m in manifests) if manifests else None
            with cls.from_checkpoint(checkpoint, max_length=max_length, truncation="truncate") as reference:
                runs["torch"] = run_model(reference, task, spec, examples, instruction)
        if compiled is not None:
            runs["artifact"] = run_model(compiled, task, spec, examples, instruction)
            result["artifact"] = str(options.artifact)
    finally:
        if compiled is not None:
            compiled.close()
    for k, r in runs.items():
        result["runs"][k] = {"metrics": r["metrics"], "seconds": r["seconds"], "nonfinite": r["nonfinite"]}
    delta = lower = None
    failures = output_failures(runs)
    if len(runs) == 2:
        delta = result["delta"] = metric_deltas(runs["torch"]["metrics"], runs["artifact"]["metrics"])
        dtype = manifests[0].dtype
        agreement = result["parity"] = parity(task, runs["torch"], runs["artifact"], dtype)
        # metrics can match while the outputs do not (other weights score alike): the engines must agree item by item
        if not agreement["passed"]:
            failures["parity"] = (f"{task.format_agreement(agreement)}; {dtype} needs {agreement['tolerance']}; "
                                  + nearest_limit(task, manifests).parity_failure_hint(
                                      checkpoint, options.checkpoint is not None))
        if runs["torch"]["per_query_metrics"] is not None:
            lower = queries_lower(runs["torch"]["per_query_metrics"], runs["artifact"]["per_query_metrics"])
    judged = "artifact" if "artifact" in runs else "torch"
    failures.update(gate(runs[judged]["metrics"], delta, options.max_drop, judged, lower))
    result.update(max_drop=options.max_drop, passed=not failures, failures=failures)
    return result


def _parity_value(v):
    # cosines near 1 and P(yes) differences near 0: show the digits that matter
    if isinstance(v, float):
        return f"{v:.7f}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return v


def eval_tables(result: dict) -> str:
    """The printed report: the metric table (with deltas), wall times, the parity table and the verdict line."""
    runs = result["runs"]
    names = [n for n, r in runs.items() if r is not None]
    rows = []
    for k in metric_keys(runs[names[0]]["metrics"]):
        row = [k] + [runs[n]["metrics"][k] for n in names]
        if result["delta"] is not None:
            row.append(result["delta"].get(k, float("nan")))
        rows.append(row)
    headers = ["metric"] + names + (["delta"] if result["delta"] is not None else [])
    title = (f"{result['task']} on {result['dataset']} ({result['examples']} examples from {result['source']}), "
             f"instruction {result['instruction']!r}")
    out = format_table(headers, rows, title=title)
    out += "\nwall time: " + ", ".join(f"{n} {runs[n]['seconds']:.2f} s" for n in names)
    skipped = runs[names[0]]["metrics"].get("queries_without_positive")
    if skipped:
        out += f"\n{skipped} queries without a positive passage left out of the means"
    if result["parity"] is not None:
        out += "\n\n" + format_table(["parity (torch vs artifact)", "value"],
                                     [[k, _parity_value(v)] for k, v in result["parity"].items()])
        if untied := result["parity"].get("queries_without_kendall_tau"):
            out += (f"\n{untied} queries without a Kendall tau (one passage, or all of them tied in an engine) left "
                    "out of its mean and min")
    what = "artifact vs torch" if result["delta"] is not None else names[0]
    verdict = "OK" if result["passed"] else "FAIL (" + "; ".join(
        f"{k}: {why}" for k, why in result["failures"].items()) + ")"
    return out + f"\n\n{what}: {verdict}"
