"""The `toolkit` command line. Each command is a thin shell over one pipeline module."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolkit.cli_base import ToolkitGroup
from toolkit.errors import ToolkitError
from toolkit.tasks import TASKS


@click.group(cls=ToolkitGroup)
def main():
    """qwen3-deploy: compile, run and evaluate Qwen3-Embedding / Qwen3-Reranker artifacts."""


@main.command()
@click.option("--task", type=click.Choice(sorted(TASKS)), required=True)
@click.option("--shape", type=click.Choice(["tiny", "0.6b"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.argument("out_dir", type=click.Path(file_okay=False))
def synth(task, shape, seed, out_dir):
    """Write a synthetic (random-weight) Qwen3 checkpoint with the real Qwen3 tokenizer."""
    from toolkit.synth import write_synthetic_checkpoint

    click.echo(write_synthetic_checkpoint(out_dir, task, shape, seed))


@main.command()
@click.argument("config", type=click.Path())
@click.option("--seq", help="sequence length(s), e.g. 512 or 64,128,256,512, or `auto` with --lengths (overrides "
              "the config)")
@click.option("--lengths", "lengths_data", help="with --seq auto: a dataset (JSONL path or name) whose token lengths "
              "choose the bucket set")
@click.option("--buckets", "bucket_count", type=int, default=6, show_default=True,
              help="with --seq auto: how many SEQs")
@click.option("--bucket-step", type=int, default=8, show_default=True,
              help="with --seq auto: SEQs are multiples of this")
@click.option("--batch-tokens", type=int, help="token budget per batch: each SEQ's batch is this // SEQ "
              "(overrides --batch and the config)")
@click.option("--checkpoint", help="hub id or local checkpoint directory (overrides the config)")
@click.option("--backend", type=click.Choice(["onnx", "tvm", "all"]), help="overrides the config")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), help="overrides the config")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), help="overrides the config")
@click.option("--batch", type=int, help="static batch size (overrides the config)")
@click.option("--workspace", type=click.Path(file_okay=False), help="overrides the config")
@click.option("--name", help="artifact set name under the workspace (overrides the config)")
def compile(config, seq, lengths_data, bucket_count, bucket_step, batch_tokens, checkpoint, backend, dtype, target,
            batch, workspace, name):
    """Compile CONFIG into one artifact directory per (backend, seq); prints their paths."""
    from toolkit.compile import compile_config
    from toolkit.config import load_build_config, parse_seq_lens

    cfg = load_build_config(config).with_overrides(
        seq_lens=parse_seq_lens(seq) if seq and seq != "auto" else None, checkpoint=checkpoint, dtype=dtype,
        target=target, batch=batch, batch_tokens=batch_tokens, workspace=Path(workspace) if workspace else None,
        name=name, backends={"all": ("onnx", "tvm")}.get(backend, (backend,)) if backend else None)
    if (seq == "auto") != bool(lengths_data):
        raise ToolkitError("--seq auto and --lengths DATA go together: the dataset's token lengths choose the SEQs")
    if lengths_data:
        from toolkit.buckets import suggest_for_dataset

        cfg = cfg.with_overrides(seq_lens=suggest_for_dataset(cfg.task, cfg.checkpoint, lengths_data, bucket_count,
                                                                 bucket_step))
        click.echo(f"buckets chosen from {lengths_data}: --seq {','.join(map(str, cfg.seq_lens))}", err=True)
    for path in compile_config(cfg, log=lambda msg: click.echo(msg, err=True)):
        click.echo(path)


@main.command()
@click.argument("artifact_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
def validate(artifact_dir, checkpoint):
    """Re-run an artifact's validation against the fp32 Hugging Face model (e.g. a CUDA build on its GPU host)."""
    from toolkit.artifact import Manifest
    from toolkit.validation import revalidate

    stats = revalidate(artifact_dir, checkpoint)
    task = TASKS[Manifest.load(artifact_dir, verify=False).task]
    click.echo(f"{artifact_dir}: vs HF fp32: {task.format_agreement(stats)} ({stats['tolerance']}): "
               f"{'OK' if stats['passed'] else 'FAIL'}")
    sys.exit(0 if stats["passed"] else 1)


@main.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the raw manifest")
def inspect(artifact_dir, as_json):
    """Summarise an artifact's manifest, verify its file hashes and its validation (exit 1 if either fails)."""
    from toolkit.artifact import MANIFEST, Manifest

    m = Manifest.load(artifact_dir, verify=False)
    click.echo((Path(artifact_dir) / MANIFEST).read_text() if as_json else format_manifest(m))
    problems = m.verify_files()
    for p in problems:
        click.secho(f"MISMATCH {p}", fg="red")
    click.echo(f"files: {len(m.files)} checked, {len(problems)} mismatched")
    unusable = m.deployment_problem()
    if unusable:
        click.secho(f"NOT DEPLOYABLE: {unusable}", fg="red")
    sys.exit(1 if problems or unusable else 0)


def format_manifest(m) -> str:
    """The manifest as an aligned, readable summary."""
    io = lambda specs: ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in specs)  # noqa: E731
    v = m.validation or {}
    target = m.target.device + (f" ({json.dumps(m.target.tvm_target)})" if m.target.tvm_target else "")
    lines = [
        f"name        {m.name}",
        f"task        {m.task}",
        f"model       {m.model.checkpoint}" + (" (synthetic)" if m.model.synthetic else ""),
        f"backend     {m.backend}  target {target}",
        f"shape       batch {m.batch} x seq {m.seq_len}   dtype {m.dtype} {json.dumps(m.precision)}",
        f"inputs      {io(m.inputs)}",
        f"outputs     {io(m.outputs)}",
        f"size        {m.weight_bytes / 1e6:.1f} MB in {len(m.files)} files",
        "validation  " + (", ".join(f"{k}={v[k]}" for k in v if k != "lengths") or "none"),
        f"build       {json.dumps(m.build)}",
        "tools       " + ", ".join(f"{k} {ver}" for k, ver in m.tools.items()),
    ]
    return "\n".join(lines)


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


# `toolkit eval ...` and `toolkit perf ...` (also the `perf` command) live beside their modules
from toolkit.eval.cli import eval_cmd  # noqa: E402
from toolkit.perf.cli import perf  # noqa: E402

main.add_command(eval_cmd, "eval")
main.add_command(perf, "perf")

if __name__ == "__main__":
    main()
