"""The `toolkit` command line. Each command is a thin shell over one pipeline module."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_base import ToolkitGroup


@click.group(cls=ToolkitGroup)
def main():
    """qwen3-deploy: compile, run and evaluate Qwen3-Embedding / Qwen3-Reranker artifacts."""


@main.command()
@click.option("--task", type=click.Choice(["embedding", "reranker"]), required=True)
@click.option("--shape", type=click.Choice(["tiny", "0.6b"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.argument("out_dir", type=click.Path(file_okay=False))
def synth(task, shape, seed, out_dir):
    """Write a synthetic (random-weight) Qwen3 checkpoint with the real Qwen3 tokenizer."""
    from .synth import write_synthetic_checkpoint

    click.echo(write_synthetic_checkpoint(out_dir, task, shape, seed))


@main.command()
@click.argument("config", type=click.Path())
@click.option("--seq", help="sequence length(s), e.g. 512 or 64,128,256,512 (overrides the config)")
@click.option("--checkpoint", help="hub id or local checkpoint directory (overrides the config)")
@click.option("--backend", type=click.Choice(["onnx", "tvm", "all"]), help="overrides the config")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), help="overrides the config")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), help="overrides the config")
@click.option("--batch", type=int, help="static batch size (overrides the config)")
@click.option("--workspace", type=click.Path(file_okay=False), help="overrides the config")
@click.option("--name", help="artifact set name under the workspace (overrides the config)")
def compile(config, seq, checkpoint, backend, dtype, target, batch, workspace, name):
    """Compile CONFIG into one artifact directory per (backend, seq); prints their paths."""
    from .compile import compile_config
    from .config import load_build_config, parse_seq_lens

    cfg = load_build_config(config).with_overrides(
        seq_lens=parse_seq_lens(seq) if seq else None, checkpoint=checkpoint, dtype=dtype, target=target,
        batch=batch, workspace=Path(workspace) if workspace else None, name=name,
        backends={"all": ("onnx", "tvm")}.get(backend, (backend,)) if backend else None)
    for path in compile_config(cfg, log=lambda msg: click.echo(msg, err=True)):
        click.echo(path)


@main.command()
@click.argument("artifact_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
def validate(artifact_dir, checkpoint):
    """Re-run an artifact's validation against the fp32 Hugging Face model (e.g. a CUDA build on its GPU host)."""
    from .compile import format_validation, validate_artifact
    from .artifact import read_manifest

    stats = validate_artifact(Path(artifact_dir), checkpoint)
    click.echo(f"{artifact_dir}: {format_validation(read_manifest(artifact_dir)['task'], stats)}: "
               f"{'OK' if stats['passed'] else 'FAIL'}")
    sys.exit(0 if stats["passed"] else 1)


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the raw manifest")
def inspect(artifact_dir, as_json):
    """Summarise an artifact's manifest and verify its file hashes (exit 1 on a mismatch)."""
    from .artifact import read_manifest, verify_files

    m = read_manifest(artifact_dir)
    if as_json:
        click.echo(json.dumps(m, indent=2))
    else:
        click.echo(format_manifest(m))
    problems = verify_files(artifact_dir, m)
    for p in problems:
        click.secho(f"MISMATCH {p}", fg="red")
    click.echo(f"files: {len(m['files'])} checked, {len(problems)} mismatched")
    sys.exit(1 if problems else 0)


def format_manifest(m: dict) -> str:
    total = sum(f["bytes"] for f in m["files"].values())
    io = lambda specs: ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in specs)  # noqa: E731
    v = m.get("validation") or {}
    lines = [
        f"name        {m.get('name')}",
        f"task        {m['task']}",
        f"model       {m.get('model', {}).get('checkpoint')}" + (" (synthetic)" if m.get("model", {}).get("synthetic") else ""),
        f"backend     {m['backend']}  target {json.dumps(m['target'])}",
        f"shape       batch {m['batch']} x seq {m['seq_len']}   dtype {m['dtype']} {json.dumps(m.get('precision', {}))}",
        f"inputs      {io(m['inputs'])}",
        f"outputs     {io(m['outputs'])}",
        f"size        {total / 1e6:.1f} MB in {len(m['files'])} files",
        f"validation  " + ", ".join(f"{k}={v[k]}" for k in v if k not in ("tolerance", "lengths")),
        f"build       {json.dumps(m.get('build', {}))}",
        f"tools       " + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()),
    ]
    return "\n".join(lines)


@main.command()
@click.option("--task", type=click.Choice(["embedding", "reranker"]), required=True)
@click.option("--artifact", type=click.Path(exists=True, file_okay=False),
              help="artifact or bucket-set directory (default: the quickstart's)")
@click.option("--checkpoint", help="torch reference checkpoint (default: the one the artifact was built from)")
def demo(task, artifact, checkpoint):
    """The reference demo through torch and the artifact side by side; exit 1 if parity is off tolerance."""
    from .demo import run_demo

    sys.exit(0 if run_demo(task, artifact, checkpoint, echo=click.echo) else 1)


@main.command("eval")
@click.option("--task", type=click.Choice(["embedding", "reranker"]), required=True)
@click.option("--dataset", required=True, help="sts12 | bq | msmarco | sts12-sample | bq-sample | msmarco-sample | PATH")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False), help="artifact or bucket-set directory")
@click.option("--checkpoint", help="torch reference checkpoint (default: the one the artifact was built from)")
@click.option("--engine", type=click.Choice(["both", "torch", "artifact"]), default="both", show_default=True)
@click.option("--limit", type=int, help="first N examples")
@click.option("--data-dir", type=click.Path(file_okay=False), help="where `toolkit data download` wrote the JSONL")
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="fail if the artifact trails torch by more than this on any metric")
@click.option("--instance", "instances", type=int, default=1, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def eval_cmd(task, dataset, artifact, checkpoint, engine, limit, data_dir, max_drop, instances, json_out):
    """Evaluate torch and the artifact on the same data: metrics, deltas, parity; exit 1 on a metric drop."""
    from .eval.run import eval_tables, evaluate
    from .report import write_json

    result = evaluate(task, dataset, artifact, checkpoint, engine, limit, data_dir, max_drop, instances)
    click.echo(eval_tables(result))
    write_json(json_out, result)
    sys.exit(0 if result.get("passed", True) else 1)


@main.group()
def data():
    """Evaluation datasets."""


@data.command("download")
@click.option("--out", "out_dir", default="data", show_default=True, type=click.Path(file_okay=False))
def data_download(out_dir):
    """Fetch STS12, C-MTEB/BQ and MS MARCO dev from the hub into JSONL files (needs the network)."""
    from .eval.datasets import download

    for path in download(out_dir):
        click.echo(path)


from .perf.cli import perf  # noqa: E402  (`toolkit perf ...` is the same group as the `perf` command)

main.add_command(perf, "perf")

if __name__ == "__main__":
    main()
