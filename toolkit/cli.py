"""The `toolkit` command line. Each command is a thin shell over one pipeline module."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from toolkit.artifact import BACKENDS, DEVICES
from toolkit.buckets import DEFAULT_COUNT, DEFAULT_STEP
from toolkit.cli_base import INSTANCES, ToolkitGroup
from toolkit.config import DTYPES, FP32_LINEARS
from toolkit.errors import ToolkitError
from toolkit.serve.server import ServeOptions
from toolkit.serve.server import serve as run_server
from toolkit.serve.service import Limits
from toolkit.tasks import TASKS, get_task


@click.group(cls=ToolkitGroup)
def main():
    """qwen3-deploy: compile, run and evaluate Qwen3-Embedding / Qwen3-Reranker artifacts."""


@main.command()
@click.option("--task", type=click.Choice(sorted(TASKS)), required=True)
@click.option("--shape", type=click.Choice(["tiny", "0.6b", "4b", "8b"]), default="tiny", show_default=True,
              help="the real models' shapes (4b: ~8 GB on disk, 8b: ~16 GB), written one layer at a time")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--outliers", is_flag=True, help="inject realistic activation outliers (outlier input channels and "
              "massive residual activations), as real LLMs carry: what low-precision accuracy gates are tested on")
@click.argument("out_dir", type=click.Path(file_okay=False))
def synth(task, shape, seed, outliers, out_dir):
    """Write a synthetic (random-weight) Qwen3 checkpoint with the real Qwen3 tokenizer."""
    from toolkit.synth import write_synthetic_checkpoint

    click.echo(write_synthetic_checkpoint(out_dir, task, shape, seed, outliers, progress=True))


@main.command()
@click.argument("config", type=click.Path())
@click.option("--seq", help="sequence length(s), e.g. 512 or 64,128,256,512, or `auto` with --lengths (overrides "
              "the config)")
@click.option("--lengths", "lengths_data", help="with --seq auto: a dataset (JSONL path or name) whose token lengths "
              "choose the bucket set")
@click.option("--buckets", "bucket_count", type=int, help=f"with --seq auto: how many SEQs [default: {DEFAULT_COUNT}]")
@click.option("--bucket-step", type=int, help=f"with --seq auto: SEQs are multiples of this [default: {DEFAULT_STEP}]")
@click.option("--batch-tokens", type=int, help="token budget per batch: each SEQ's batch is this // SEQ "
              "(overrides --batch and the config)")
@click.option("--checkpoint", help="hub id or local checkpoint directory (overrides the config)")
@click.option("--backend", type=click.Choice([*BACKENDS, "all"]), help="overrides the config")
@click.option("--dtype", type=click.Choice(DTYPES), help="weights: fp16/fp32 (fp32 "
              "compute), bf16 (bf16 x bf16 linear layers, fp32 accumulation; TVM backend, AVX512-BF16 CPUs) or "
              "int8 (W8A8, calibrated on the bundled real texts; ONNX Runtime, or TVM on AVX512-VNNI CPUs); "
              "overrides the config")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), help="int8: calibration JSONL "
              "(query, document, split per line) instead of the bundled set; bf16 and int8 gates also check its "
              "held-out texts")
@click.option("--fp32-linears", type=click.Choice(FP32_LINEARS), help="TVM CPU, fp16/fp32 weights (int8: its "
              "layers kept out of int8): bf16x3 "
              "(on CPUs with AMX, linear layers as three bf16 products on AMX tiles, each within 2^-15 of its size; "
              "weights 4 bytes each in memory) or fma (AVX-512 fp32; weights stay in their dtype); overrides the "
              "config")
@click.option("--instruction", help="the instruction every input carries, its tokens cached in the graph: the "
              "reranker's (default: Qwen's web-search one), or an embedding set's queries (a set for queries only; "
              "default: none); overrides the config")
@click.option("--cache-instruction/--no-cache-instruction", default=None, help="cache the instruction's tokens "
              "after the prompt prefix (the default; inputs must then carry it), or not (any instruction at run "
              "time); overrides the config")
@click.option("--target", type=click.Choice(DEVICES), help="overrides the config")
@click.option("--batch", type=int, help="most rows per call, for every SEQ (the batch axis is dynamic up to it; "
              "--batch-tokens sizes it per SEQ instead); overrides the config")
@click.option("--workspace", type=click.Path(file_okay=False), help="overrides the config")
@click.option("--name", help="artifact set name under the workspace (overrides the config)")
def compile(config, seq, lengths_data, bucket_count, bucket_step, batch_tokens, checkpoint, backend, dtype,
            calibration, fp32_linears, instruction, cache_instruction, target, batch, workspace, name):
    """Compile CONFIG into one artifact directory per (backend, seq); prints their paths."""
    from toolkit.compile import compile_config
    from toolkit.config import load_build_config, parse_seq_lens

    base = load_build_config(config)
    cfg = base.with_overrides(
        seq_lens=parse_seq_lens(seq) if seq is not None and seq != "auto" else None, checkpoint=checkpoint, dtype=dtype,
        calibration=calibration, fp32_linears=fp32_linears, instruction=instruction,
        cache_instruction=cache_instruction, target=target, batch=batch, batch_tokens=batch_tokens,
        workspace=Path(workspace) if workspace else None,
        name=name if name is not None or dtype is None else base.name_for(dtype),
        backends={"all": BACKENDS}.get(backend, (backend,)) if backend else None)
    if (seq == "auto") != bool(lengths_data):
        raise ToolkitError("--seq auto and --lengths DATA go together: the dataset's token lengths choose the SEQs")
    if seq != "auto" and (bucket_count is not None or bucket_step is not None):
        raise ToolkitError("--buckets and --bucket-step shape the SEQs --seq auto chooses: add --seq auto --lengths "
                           "DATA, or leave them out")
    cfg.refuse_unused(calibration=bool(calibration), fp32_linears=bool(fp32_linears))
    if lengths_data:
        from toolkit.buckets import suggest_for_dataset

        cfg = cfg.with_overrides(seq_lens=suggest_for_dataset(
            cfg.task, cfg.checkpoint, lengths_data, DEFAULT_COUNT if bucket_count is None else bucket_count,
            DEFAULT_STEP if bucket_step is None else bucket_step, cfg.instruction,
            log=lambda msg: click.echo(msg, err=True)))
    # SIGTERM (timeout, kill, a service manager) ends the build as Ctrl-C does: through compile's cleanup, not past it.
    # An exit raised inside a weakref callback or __del__ is swallowed (a Ctrl-C's too: the build went on to exit 0)
    # with a traceback: the next log line (one precedes every install) raises it again, and the traceback is left out
    stopped = []

    def stop(signum):
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def on_signal(signum, frame):
        stopped.append(signum)
        stop(signum)

    def log(msg):
        click.echo(msg, err=True)
        if stopped:
            stop(stopped[0])

    def unraisable(report):
        if not (stopped and isinstance(report.exc_value, (KeyboardInterrupt, SystemExit))):
            previous_unraisable(report)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_unraisable, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        for path in compile_config(cfg, log=log):
            click.echo(path)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_unraisable


@main.command()
@click.argument("artifact_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
def validate(artifact_dir, checkpoint):
    """Re-run an artifact's validation against the fp32 Hugging Face model (e.g. a CUDA build on its GPU host)."""
    from toolkit.artifact import Manifest
    from toolkit.validation import revalidate

    stats = revalidate(artifact_dir, checkpoint)
    task = get_task(Manifest.load(artifact_dir, verify=False).task)
    click.echo(f"{artifact_dir}: vs HF fp32: {task.format_agreement(stats)} ({stats['tolerance']}): "
               f"{'OK' if stats['passed'] else 'FAIL'}")
    sys.exit(0 if stats["passed"] else 1)


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the raw manifest")
def inspect(artifact_dir, as_json):
    """Summarise an artifact's manifest, verify its file hashes and its validation (exit 1 if either fails)."""
    from toolkit.artifact import MANIFEST, Manifest, format_manifest

    m = Manifest.load(artifact_dir, verify=False)
    click.echo((Path(artifact_dir) / MANIFEST).read_text() if as_json else format_manifest(m))
    problems = m.verify_files()
    # with --json, stdout is the manifest alone (parseable); the checks go to stderr
    for p in problems:
        click.secho(f"MISMATCH {p}", fg="red", err=as_json)
    click.echo(f"files: {len(m.files)} checked, {len(problems)} mismatched", err=as_json)
    unusable = m.deployment_problem()
    if unusable:
        click.secho(f"NOT DEPLOYABLE: {unusable}", fg="red", err=as_json)
    sys.exit(1 if problems or unusable else 0)


@main.command()
@click.option("--task", type=click.Choice(sorted(TASKS)), required=True)
@click.option("--artifact", type=click.Path(exists=True, file_okay=False),
              help="artifact or bucket-set directory (default: the quickstart's)")
@click.option("--checkpoint", help="torch reference checkpoint (default: the one the artifact was built from)")
def demo(task, artifact, checkpoint):
    """The reference demo through torch and the artifact side by side; exit 1 if parity is off tolerance."""
    from toolkit.demo import run_demo

    sys.exit(0 if run_demo(TASKS[task], artifact, checkpoint, echo=click.echo) else 1)


@main.group()
def data():
    """Evaluation datasets."""


@data.command("download")
@click.option("--out", "out_dir", default="data", show_default=True, type=click.Path(file_okay=False))
def data_download(out_dir):
    """Fetch STS12, C-MTEB/BQ and MS MARCO dev from the hub into JSONL files (needs the network)."""
    from toolkit.eval.datasets import download

    for path in download(out_dir):
        click.echo(path)


@main.command()
@click.option("--embedding", "embedding_dir", type=click.Path(), help="embedding bucket set, e.g. WORKSPACE/NAME/onnx")
@click.option("--reranker", "reranker_dir", type=click.Path(), help="reranker bucket set")
@click.option("--host", default=ServeOptions.host, show_default=True)
@click.option("--port", type=int, default=ServeOptions.port, show_default=True)
@click.option("--max-batch-tokens", type=int, default=Limits.max_batch_tokens, show_default=True,
              help="tokens of waiting rows (oldest first) the batcher packs from; a pool this full goes at once")
@click.option("--max-wait-ms", type=float, default=Limits.max_wait_ms, show_default=True,
              help="how long a request may wait for a full batch, when an engine is free")
@click.option("--max-concurrent-requests", type=int, default=Limits.max_concurrent_requests, show_default=True,
              help="requests in flight per model; more are answered 429")
@click.option("--max-client-batch-size", type=int, default=Limits.max_client_batch_size, show_default=True,
              help="inputs per request")
@click.option("--max-input-length", type=int, help="tokens per input, prompt included; each model takes at most its "
              "set's largest SEQ (default: the largest SEQ)")
@click.option("--payload-limit", type=int, default=Limits.payload_limit, show_default=True, help="request body bytes")
@click.option("--instances", type=INSTANCES, default="auto", show_default=True,
              help="engine instances per bucket; auto: one single-thread instance per core for TVM on CPU, else 1")
@click.option("--threads", type=int, help="compute threads of the process (per replica with --ray); "
              "default: the cores (divided by --replicas)")
@click.option("--ray", "use_ray", is_flag=True, help="deploy on Ray Serve instead of uvicorn")
@click.option("--replicas", type=int, default=1, show_default=True, help="with --ray: replicas, each its own engines")
@click.option("--ray-address", help="with --ray: a running cluster (`ray start --head`); default: a local one")
def serve(embedding_dir, reranker_dir, host, port, max_batch_tokens, max_wait_ms, max_concurrent_requests,
          max_client_batch_size, max_input_length, payload_limit, instances, threads, use_ray, replicas, ray_address):
    """Serve artifacts over HTTP (TEI and OpenAI APIs, cross-request batching, Prometheus metrics)."""
    limits = Limits(max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                    max_concurrent_requests=max_concurrent_requests, max_client_batch_size=max_client_batch_size,
                    max_input_length=max_input_length, payload_limit=payload_limit)
    run_server(ServeOptions(embedding=embedding_dir, reranker=reranker_dir, host=host, port=port, limits=limits,
                            instances=instances, threads=threads, ray=use_ray, replicas=replicas,
                            ray_address=ray_address),
               echo=lambda line: click.echo(line, err=True))


# `toolkit eval ...` and `toolkit perf ...` (also the `perf` command) live beside their modules
from toolkit.eval.cli import eval_cmd  # noqa: E402
from toolkit.perf.cli import perf  # noqa: E402

main.add_command(eval_cmd, "eval")
main.add_command(perf, "perf")

if __name__ == "__main__":
    main()
