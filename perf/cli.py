"""The `perf` command (also `toolkit perf`): thin shells that build an options dataclass by keyword, run it, print
the table and write the JSON. Heavy imports wait until a command runs."""
from __future__ import annotations

import signal
from pathlib import Path

import click

from toolkit.cli_base import INSTANCES, OutputFile, ToolkitGroup
from toolkit.errors import ToolkitError
from toolkit.report import write_json
from toolkit.serve.service import Limits

TERMINATED = 128 + signal.SIGTERM  # the exit status after SIGTERM, as shells give it


def number_list(value: str, flag: str, example: str, kind=float) -> tuple:
    """`"50,90,99"` → `(50.0, 90.0, 99.0)` (or ints with `kind=int`). An empty item (`50,,99`, a trailing comma),
    an unparsable one or an empty list is a ToolkitError naming `flag` and a valid value of it (`example`). The
    values' ranges are the options' `check()`'s business."""
    items = [v.strip() for v in value.split(",")]
    try:
        if all(items):
            return tuple(kind(v) for v in items)
    except ValueError:
        pass
    raise ToolkitError(f"{flag} must be a comma-separated list of {'integers' if kind is int else 'numbers'} "
                       f"such as {example}, got {value!r}")


@click.group(cls=ToolkitGroup)
def perf():
    """Throughput / latency tools."""


@perf.command("run")
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--percentiles", default="50,90,99", show_default=True, help="latency percentiles, each > 0 and <= 100")
@click.option("--instances", "--instance", "instances", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, help="rows per call, 1..the artifact's batch (default: its batch)")
@click.option("--iterations", type=int, default=100, show_default=True)
@click.option("--queue-size", type=int, default=0, show_default=True,
              help="0 = latency mode (one request in flight per instance); Q > 0 = throughput mode")
@click.option("--device-ids", default="0", show_default=True,
              help="GPUs, comma-separated, e.g. 0,1 (a CPU artifact: 0 only)")
@click.option("--input", "source", default="random", show_default=True,
              help="random | a dataset: JSONL PATH or a name such as sts12-sample, msmarco-sample for a reranker "
              "(its requests at their real token lengths)")
@click.option("--warmup", type=int, default=3, show_default=True, help="untimed batches per instance first")
@click.option("--json", "json_out", type=OutputFile())
def run_cmd(artifact, percentiles, instances, batch_size, iterations, queue_size, device_ids, source, warmup,
            json_out):
    """Throughput (sequences/s, tokens/s) and latency avg/min/max/percentiles of one artifact."""
    from toolkit.perf.run import PerfRunOptions, perf_table, run_perf

    options = PerfRunOptions(artifact=artifact, instances=instances, batch_size=batch_size, iterations=iterations,
                             queue_size=queue_size, percentiles=number_list(percentiles, "--percentiles", "50,90,99"),
                             device_ids=number_list(device_ids, "--device-ids", "0 or 0,1", int), source=source,
                             warmup=warmup).check()
    result = run_perf(options, progress=True)
    click.echo(perf_table(result))
    write_json(json_out, result)


@perf.command("profile")
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False),
              help="one artifact directory (one SEQ), onnx or tvm")
@click.option("--iterations", type=int, default=10, show_default=True, help="profiled runs")
@click.option("--warmup", type=int, default=2, show_default=True, help="runs first, not counted")
@click.option("--top", type=int, default=15, show_default=True, help="kernels and op types listed")
@click.option("--input", "source", default="random", show_default=True,
              help="random | a dataset: JSONL PATH or a name such as sts12-sample, msmarco-sample for a reranker "
              "(its requests at their real token lengths)")
@click.option("--threads", type=int, help="compute threads, at most the cores (default: all cores)")
@click.option("--trace", type=OutputFile(),
              help="write a Chrome trace here (chrome://tracing, ui.perfetto.dev)")
@click.option("--json", "json_out", type=OutputFile())
def profile_cmd(artifact, iterations, warmup, top, source, threads, trace, json_out):
    """Time per kernel (ONNX Runtime's profiler, TVM's VM instrument): top kernels and op types, GFLOP/s, trace."""
    from toolkit.perf.profile import ProfileOptions, profile_report, run_profile

    if trace and json_out and Path(trace).resolve() == Path(json_out).resolve():  # the JSON, written last, would win
        raise ToolkitError(f"--trace and --json both name {json_out}; give the trace and the JSON different files")
    options = ProfileOptions(artifact=artifact, iterations=iterations, warmup=warmup, top=top, input=source,
                             threads=threads, trace=trace).check()
    result = run_profile(options, progress=True)
    click.echo(profile_report(result))
    write_json(json_out, result)


@perf.command("buckets")
@click.option("--fixed", required=True, type=click.Path(exists=True, file_okay=False),
              help="one embedding artifact at a large SEQ (e.g. .../onnx/seq512)")
@click.option("--buckets", required=True, type=click.Path(exists=True, file_okay=False),
              help="a bucket set: directory of embedding artifacts at several SEQs")
@click.option("--data", required=True,
              help="a dataset: JSONL PATH (e.g. sts12_test.jsonl) or a name such as sts12-sample")
@click.option("--limit", type=int, help="first N texts")
@click.option("--instances", "--instance", "instances", type=int, default=1, show_default=True)
@click.option("--json", "json_out", type=OutputFile())
def buckets_cmd(fixed, buckets, data, limit, instances, json_out):
    """Embed a dataset with a fixed-SEQ artifact and with a bucket set; print times and the ratio."""
    from toolkit.perf.buckets import BucketOptions, bucket_report, run_bucket_benchmark

    options = BucketOptions(fixed=fixed, buckets=buckets, data=data, limit=limit, instances=instances).check()
    result = run_bucket_benchmark(options, progress=True)
    click.echo(bucket_report(result))
    write_json(json_out, result)


@perf.command("compare")
@click.option("--checkpoint", help="what torch eager runs (default: the checkpoint the first artifact was built from)")
@click.option("--artifact", "artifacts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="repeat for each artifact (same task, seq and batch)")
@click.option("--iterations", type=int, default=10, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed forwards per run first")
@click.option("--no-torch", is_flag=True, help="skip torch eager (e.g. to compare artifacts only)")
@click.option("--interleave", is_flag=True,
              help="load every run at once and time them in alternating rounds (robust to a drifting machine); "
              "ONNX Runtime's threads then sleep when a run ends, not spin and hold the cores the next run needs")
@click.option("--json", "json_out", type=OutputFile())
def compare_cmd(checkpoint, artifacts, iterations, warmup, no_torch, interleave, json_out):
    """torch eager vs ONNX Runtime vs TVM on the same inputs: latency, throughput, ratios, GFLOP/s, agreement."""
    from toolkit.perf.compare import CompareOptions, compare_report, run_compare

    options = CompareOptions(artifacts=tuple(artifacts), checkpoint=checkpoint, iterations=iterations, warmup=warmup,
                             torch_eager=not no_torch, interleave=interleave).check()
    result = run_compare(options)
    click.echo(compare_report(result))
    write_json(json_out, result)


@perf.command("traffic")
@click.option("--data", required=True, help="evaluation JSONL path or name (sts12, bq, msmarco, *-sample)")
@click.option("--artifact", "artifacts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="artifact set (repeat to compare several)")
@click.option("--checkpoint", help="torch reference (default: the one the first artifact was built from)")
@click.option("--torch-batch", default="8,32", show_default=True, help="torch eager dynamic batch sizes")
@click.option("--limit", type=int, default=256, show_default=True, help="first N requests")
@click.option("--instances", "--instance", "instances", type=INSTANCES, default=1, show_default=True,
              help="engine instances per bucket (auto: as `toolkit serve`)")
@click.option("--threads", type=int,
              help="compute threads for the whole process, at most the cores (default: all cores)")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="run everything N times, the order reversed each round; medians, ratios within each round")
@click.option("--instruction", help="every request's: embedding texts as queries with it, reranker pairs with it "
              "(default: the one a set was compiled for; else texts bare, pairs with web search)")
@click.option("--json", "json_out", type=OutputFile())
def traffic_cmd(data, artifacts, checkpoint, torch_batch, limit, instances, threads, rounds, instruction, json_out):
    """Real requests through torch eager and artifact sets: throughput, padding, GFLOP/s vs peak, agreement."""
    from toolkit.perf.traffic import TrafficOptions, run_traffic, traffic_report

    options = TrafficOptions(data=data, artifacts=tuple(artifacts), checkpoint=checkpoint,
                             torch_batches=number_list(torch_batch, "--torch-batch", "8,32", int), limit=limit,
                             instances=instances, threads=threads, rounds=rounds, instruction=instruction).check()
    result = run_traffic(options)
    click.echo(traffic_report(result))
    write_json(json_out, result)


@perf.command("serve")
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False),
              help="an embedding bucket set, e.g. WORKSPACE/NAME/onnx")
@click.option("--data", default="sts12", show_default=True, help="evaluation JSONL path or name: its sentences")
@click.option("--limit", type=int, default=256, show_default=True, help="first N sentences")
@click.option("--clients", type=int, default=64, show_default=True, help="concurrent clients at saturation")
@click.option("--instances", "--instance", "instances", type=INSTANCES, default="auto", show_default=True,
              help="engine instances per bucket, the server's and the offline run's (auto: as `toolkit serve`)")
@click.option("--threads", type=int,
              help="compute threads (per replica with Ray), at most the cores in all (default: the cores)")
@click.option("--max-wait-ms", type=float, default=Limits.max_wait_ms, show_default=True,
              help="the server's batching wait")
@click.option("--max-batch-tokens", type=int, default=Limits.max_batch_tokens, show_default=True,
              help="the server's token budget per batch, at least the set's largest SEQ")
@click.option("--ray-replicas", type=int, help="also measure Ray Serve with this many replicas")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="run it all N times and report medians (each served run against the offline runs around it)")
@click.option("--json", "json_out", type=OutputFile())
def serve_cmd(artifact, data, limit, clients, instances, threads, max_wait_ms, max_batch_tokens, ray_replicas, repeat,
              json_out):
    """Served throughput (single-sentence requests) vs the offline Embedder, and latency at half that load. SIGTERM
    stops it as Ctrl-C does (its children too), exit 143."""
    from toolkit.perf.serve_load import ServeLoadOptions, run_serve_load, serve_load_report
    from toolkit.serve.server import exit_on_signals

    options = ServeLoadOptions(artifact=artifact, data=data, limit=limit, clients=clients, instances=instances,
                               threads=threads, max_wait_ms=max_wait_ms, max_batch_tokens=max_batch_tokens,
                               ray_replicas=ray_replicas, repeat=repeat).check()
    # SIGTERM unhandled would end this process alone: the offline run's child and the server would go on
    with exit_on_signals(statuses={signal.SIGTERM: TERMINATED}):
        result = run_serve_load(options)
    click.echo(serve_load_report(result))
    write_json(json_out, result)
