"""The `toolkit eval` command: a thin shell over `toolkit.eval.run.evaluate`."""
from __future__ import annotations

import sys

import click

from toolkit.cli_base import OutputFile
from toolkit.eval.datasets import DATASETS
from toolkit.eval.run import DEFAULT_MAX_DROP, RUNS, EvalOptions
from toolkit.tasks import TASKS


@click.command("eval")
@click.option("--task", type=click.Choice(sorted(TASKS)), required=True)
@click.option("--dataset", required=True,
              help="sts12 | bq | msmarco | sts12-sample | bq-sample | msmarco-sample | PATH")
@click.option("--format", "data_format", type=click.Choice(list(DATASETS)),
              help="the format of a --dataset PATH [default: msmarco's where its first row has a query, else bq's "
              "where the file name holds 'bq', else sts12's]")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False), help="artifact or bucket-set directory")
@click.option("--checkpoint", help="torch reference checkpoint (default: the one the artifact was built from)")
@click.option("--run", "run", type=click.Choice(RUNS), default="both", show_default=True,
              help="which engines to run: the torch reference, the artifact, or both (with deltas and parity)")
@click.option("--limit", type=int, help="first N examples (a positive number)")
@click.option("--data-dir", type=click.Path(file_okay=False), help="where `toolkit data download` wrote the JSONL")
@click.option("--max-drop", type=float, default=DEFAULT_MAX_DROP, show_default=True,
              help="fail if the artifact trails torch by more than this on any metric")
@click.option("--instances", "--instance", "instances", type=int, default=1, show_default=True,
              help="engine instances per artifact")
@click.option("--instruction", help="instead of the dataset's instruction; \"\" for none (no query prefix)")
@click.option("--json", "json_out", type=OutputFile(), help="also write the result here")
def eval_cmd(task, dataset, data_format, artifact, checkpoint, run, limit, data_dir, max_drop, instances, instruction,
             json_out):
    """Evaluate torch and the artifact on the same data: metrics, deltas, parity; exit 1 on a failed verdict (either
    engine's outputs not finite, the artifact's outputs outside the dtype's tolerance of torch's, a metric more than
    --max-drop below torch, or a metric that is not finite)."""
    from toolkit.eval.run import eval_tables, evaluate
    from toolkit.report import write_json

    options = EvalOptions(task=task, dataset=dataset, artifact=artifact, checkpoint=checkpoint, run=run, limit=limit,
                          data_dir=data_dir, max_drop=max_drop, instances=instances, instruction=instruction,
                          data_format=data_format)
    result = evaluate(options.check())
    click.echo(eval_tables(result))
    write_json(json_out, result)
    sys.exit(0 if result.get("passed", True) else 1)
