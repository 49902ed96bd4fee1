"""What several perf commands share (run, compare, profile, buckets, traffic, serve): the `--instances` check, the
median of repeated figures, and inputs of an artifact's shape (random rows, or a dataset's requests)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from toolkit.api import token_rows
from toolkit.artifact import Manifest
from toolkit.checkpoint import load_tokenizer
from toolkit.errors import ToolkitError, check_int
from toolkit.eval.datasets import load_dataset
from toolkit.runtime import AUTO_INSTANCES
from toolkit.tasks import PromptLayout, Task, get_task
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID


# ---- options and figures ---------------------------------------------------------------------------------------------
def check_instances(value) -> None:
    """Raise ToolkitError naming `--instances` unless `value` is a count >= 1 or "auto"."""
    if value != AUTO_INSTANCES:
        check_int(value, "--instances", 1)


def median(values) -> float:
    """The median of an iterable of numbers."""
    return float(np.median(list(values)))


def judge_agreement(task: Task, agreement: dict, manifest: Manifest, checkpoint: str, named: bool) -> dict:
    """A set's agreement with torch fp32 with its dtype's tolerance and whether it meets it added and, where it does
    not, the likely cause as `toolkit eval` names it (`hint`: e.g. torch ran another checkpoint than the set was built
    from; `named`: the user chose it)."""
    if not task.judge(agreement, manifest.dtype)["passed"]:
        agreement["hint"] = manifest.parity_failure_hint(checkpoint, named)
    return agreement


# ---- inputs ----------------------------------------------------------------------------------------------------------
def dataset_requests(task: Task, name_or_path: str | Path, limit: int | None = None) -> list:
    """The first `limit` requests `task` serves from an evaluation dataset (a JSONL path, or a name the eval loaders
    know such as `sts12-sample`): `Task.traffic`, texts to embed or (query, passage) pairs. Read with the evaluation
    loaders, so malformed rows get the same line-numbered errors and data of a kind the task cannot use is refused
    as the eval refuses it."""
    _, _, examples = load_dataset(str(name_or_path), limit, task=task)  # each example holds at least one request
    return task.traffic(examples)[:limit]


def artifact_layout(manifest: Manifest, tokenizer) -> PromptLayout:
    """The prompt layout of the artifact's inputs, what every input starts with as its prefix (a reranker's chat
    prefix, then the instruction the set was compiled for, if any: what its graph caches)."""
    task = get_task(manifest.task)
    return PromptLayout(task.prompt_start(tokenizer, manifest.instruction), task.prompt(tokenizer).suffix)


def random_rows(manifest: Manifest, count: int, rng: np.random.Generator) -> list[list[int]]:
    """`count` rows of the artifact's full SEQ in its inputs' layout (`artifact_layout`): the prefix, random ordinary
    tokens, the suffix."""
    layout = artifact_layout(manifest, load_tokenizer(manifest.path / "tokenizer"))
    body = manifest.seq_len - layout.fixed
    # ids below <|endoftext|> are ordinary vocabulary tokens (the special ones start there)
    return [layout.prefix + rng.integers(0, ENDOFTEXT_ID, body).tolist() + layout.suffix for _ in range(count)]


def make_inputs(manifest: Manifest, source: str, count: int, batch: int | None = None,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` left-padded `(input_ids, attention_mask)` batches of `batch` rows (None: the artifact's most) at its
    SEQ: random full-length ids, or the requests a dataset holds for the artifact's task, framed as the API frames
    them (`Task.body` with the artifact's instruction in the task's prompt, cut to fit)."""
    batch, seq = batch or manifest.batch, manifest.seq_len
    if source == "random":
        rows = random_rows(manifest, batch * count, np.random.default_rng(seed))
    elif source.lower() == "random" and not Path(source).exists():
        raise ToolkitError(f"--input {source!r} is no dataset; for random ids, write it in lower case: --input random")
    else:
        task = get_task(manifest.task)
        requests = dataset_requests(task, source, limit=batch * count)
        tokenizer = load_tokenizer(manifest.path / "tokenizer")
        # with the artifact's instruction, a body starts with its head (`Task.body`): every row then starts with
        # the prefix the artifact caches (`artifact_layout`)
        bodies = [task.body(r, manifest.instruction) for r in requests]
        with warnings.catch_warnings():  # cutting long inputs to the artifact's SEQ is the point here
            warnings.simplefilter("ignore")
            rows = token_rows(task.prompt(tokenizer), tokenizer, bodies, seq, "truncate")
        rows = [rows[i % len(rows)] for i in range(batch * count)]
    return [left_pad(rows[i:i + batch], seq, ENDOFTEXT_ID, batch) for i in range(0, len(rows), batch)]
