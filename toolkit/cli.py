"""The `toolkit` command line. Each command is a thin shell over one pipeline module."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from .errors import ToolkitError


class ToolkitGroup(click.Group):
    """Turns ToolkitError (a mistake the user can fix) into one clear line and exit code 2, not a traceback."""

    def invoke(self, ctx):
        warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


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
def compile(config, seq, checkpoint, backend, dtype, target, batch, workspace):
    """Compile CONFIG into one artifact directory per (backend, seq); prints their paths."""
    from .compile import compile_config
    from .config import load_build_config, parse_seq_lens

    cfg = load_build_config(config).with_overrides(
        seq_lens=parse_seq_lens(seq) if seq else None, checkpoint=checkpoint, dtype=dtype, target=target,
        batch=batch, workspace=Path(workspace) if workspace else None,
        backends={"all": ("onnx", "tvm")}.get(backend, (backend,)) if backend else None)
    for path in compile_config(cfg, log=lambda msg: click.echo(msg, err=True)):
        click.echo(path)


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


def _add_perf_group():
    from .perf.cli import perf

    main.add_command(perf, "perf")


_add_perf_group()

if __name__ == "__main__":
    main()
