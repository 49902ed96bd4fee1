"""The `perf` command (also `toolkit perf`)."""
from __future__ import annotations

import click

from ..cli_base import ToolkitGroup
from ..report import format_table, write_json


def int_list(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


@click.group(cls=ToolkitGroup)
def perf():
    """Throughput / latency tools."""


@perf.command("run")
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--percentiles", default="50,90,99", show_default=True)
@click.option("--instance", "instances", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, help="must equal the artifact's static batch (default: that batch)")
@click.option("--iterations", type=int, default=100, show_default=True)
@click.option("--queue-size", type=int, default=0, show_default=True,
              help="0 = latency mode (one request in flight per instance); Q > 0 = throughput mode")
@click.option("--device-ids", default="0", show_default=True)
@click.option("--input", "source", default="random", show_default=True, help="random | PATH to a JSONL dataset")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def run_cmd(artifact, percentiles, instances, batch_size, iterations, queue_size, device_ids, source, warmup,
            json_out):
    """Throughput (sequences/s, tokens/s) and latency avg/min/max/percentiles of one artifact."""
    from .run import perf_table, run_perf

    result = run_perf(artifact, instances, batch_size, iterations, queue_size,
                      tuple(float(p) for p in percentiles.split(",")), int_list(device_ids), source, warmup)
    click.echo(perf_table(result))
    write_json(json_out, result)


@perf.command("buckets")
@click.option("--fixed", required=True, type=click.Path(exists=True, file_okay=False),
              help="one embedding artifact at a large SEQ (e.g. .../onnx/seq512)")
@click.option("--buckets", required=True, type=click.Path(exists=True, file_okay=False),
              help="a bucket set: directory of embedding artifacts at several SEQs")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="JSONL, e.g. sts12_test.jsonl")
@click.option("--limit", type=int, help="first N texts")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def buckets_cmd(fixed, buckets, data, limit, json_out):
    """Embed a dataset with a fixed-SEQ artifact and with a bucket set; print times and the ratio."""
    from .buckets import run_bucket_benchmark

    r = run_bucket_benchmark(fixed, buckets, data, limit)
    rows = [[name, str(r[name]["seq_lens"]), str(r[name]["rows_per_bucket"]), r[name]["seconds"],
             r[name]["texts_per_s"]] for name in ("fixed", "buckets")]
    click.echo(format_table(["run", "SEQs", "texts per bucket", "seconds", "texts/s"], rows,
                            title=f"{r['texts']} texts from {r['data']} (tokens mean {r['token_lengths']['mean']:.1f}, "
                                  f"max {r['token_lengths']['max']})"))
    click.echo(f"bucket speed-up: {r['speedup']:.2f}x   (min cosine fixed vs buckets {r['min_cosine_fixed_vs_buckets']:.6f})")
    write_json(json_out, r)


@perf.command("compare")
@click.option("--checkpoint", required=True, help="the checkpoint the artifacts were built from (torch eager runs it)")
@click.option("--artifact", "artifacts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="repeat for each artifact (same task, seq and batch)")
@click.option("--iterations", type=int, default=10, show_default=True)
@click.option("--no-torch", is_flag=True, help="skip torch eager (e.g. to compare artifacts only)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def compare_cmd(checkpoint, artifacts, iterations, no_torch, json_out):
    """torch eager vs ONNX Runtime vs TVM on the same inputs: latency, throughput, ratios, GFLOP/s."""
    from .compare import run_compare

    r = run_compare(checkpoint, list(artifacts), iterations, torch_eager=not no_torch)
    rows = [[e["engine"], e["latency_ms_median"], e["latency_ms_min"], e["sequences_per_s"], e["gflops"],
             e["fraction_of_matmul_peak"], e["speedup_vs_first"]] for e in r["engines"]]
    click.echo(format_table(["engine", "median ms", "min ms", "seq/s", "GFLOP/s", "of peak", "speed-up"], rows,
                            title=f"{r['task']} batch {r['batch']} x seq {r['seq_len']}: "
                                  f"{r['gflop_per_forward']:.1f} GFLOP per forward, fp32 matmul peak "
                                  f"{r['matmul_peak_gflops']:.0f} GFLOP/s (numpy, same machine)"))
    if "tvm_vs_onnxruntime" in r:
        click.echo(f"TVM vs ONNX Runtime: {r['tvm_vs_onnxruntime']:.2f}x")
    write_json(json_out, r)
