"""Bucket sets chosen from data: the SEQs that waste the fewest padded tokens on a dataset's real token lengths.

Rows go to the smallest SEQ that holds them, so a bucket set's waste is the sum over rows of (SEQ - length). With the
lengths of real traffic sorted, the best `count` SEQs (multiples of `multiple`, the largest covering the longest row)
are found exactly by dynamic programming; short texts, being the most frequent, get the finest buckets.
"""
from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.tasks import Task
from toolkit.tokenizer import MAX_CONTEXT

# 10 SEQs in steps of 4: STS12 sentences pad 9.4% (6 in steps of 8: 18.5%; 8 in steps of 4: 11.0%), MS MARCO pairs
# 4.4%. More buckets cost compile time (one validation each; TVM: one compile each), not memory: a bucket set holds
# one copy of its weights (one ONNX Runtime session, one set of TVM weights)
DEFAULT_COUNT = 10
DEFAULT_STEP = 4
# --seq auto covers this share of the rows, and no SEQ above AUTO_MAX_SEQ: one very long text would otherwise make a
# bucket whose attention scores (batch x heads x SEQ^2 floats) need tens of GB, for a row in a thousand
AUTO_COVERAGE = 0.999
AUTO_MAX_SEQ = 8192


def token_lengths(task: Task, tokenizer, requests: list, instruction: str | None = None) -> np.ndarray:
    """Full input length of each request in the task's prompt layout (prefix + body + suffix), with `instruction` as
    `Task.body` reads it."""
    layout = task.prompt(tokenizer)
    bodies = tokenizer.encode([task.body(r, instruction) for r in requests])
    return np.array([layout.fixed + len(b) for b in bodies], dtype=np.int64)


def padded_tokens(lengths: np.ndarray, seq_lens) -> int:
    """Padding slots when each row goes to the smallest SEQ that holds it (rows above the largest are cut to it)."""
    seq_lens = np.sort(np.asarray(seq_lens))
    lengths = np.minimum(lengths, seq_lens[-1])
    return int((seq_lens[np.searchsorted(seq_lens, lengths)] - lengths).sum())


def padding_share(lengths: np.ndarray, seq_lens) -> float:
    """The share of the token slots that are padding when each row goes to the smallest SEQ that holds it (rows
    above the largest are cut to it)."""
    padded = padded_tokens(lengths, seq_lens)
    slots = padded + int(np.minimum(lengths, max(seq_lens)).sum())
    return padded / slots if slots else 0.0


def suggest_seq_lens(lengths, count: int = DEFAULT_COUNT, multiple: int = DEFAULT_STEP, max_seq: int = MAX_CONTEXT,
                     minimum: int = 1) -> tuple[int, ...]:
    """The `count` SEQs (multiples of `multiple`, from `minimum` to `max_seq`) with the fewest padded tokens on
    `lengths`."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), minimum)
    if lengths.size == 0:
        raise ToolkitError("no token lengths to choose buckets from (the dataset is empty)")
    if count < 1 or multiple < 1:
        raise ToolkitError(f"bucket count and multiple must be >= 1, got {count} and {multiple}")
    lengths = np.minimum(lengths, max_seq)
    candidates = np.unique(np.minimum(-(-lengths // multiple) * multiple, max_seq))
    m = len(candidates)
    count = min(count, m)
    # cost[i][j]: padding of the rows with candidates[i-1] < length <= candidates[j], all sent to SEQ candidates[j]
    sorted_lengths = np.sort(lengths)
    prefix = np.concatenate([[0], np.cumsum(sorted_lengths)])
    upto = np.searchsorted(sorted_lengths, candidates, side="right")  # rows with length <= candidate

    def cost(i: int, j: int) -> int:  # rows in (candidates[i-1], candidates[j]] → SEQ candidates[j]; i = 0: from 0
        lo = upto[i - 1] if i > 0 else 0
        hi = upto[j]
        return int(candidates[j] * (hi - lo) - (prefix[hi] - prefix[lo]))

    inf = float("inf")
    best = [[inf] * m for _ in range(count + 1)]  # best[k][j]: k buckets, the largest candidates[j]
    choice = [[-1] * m for _ in range(count + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for k in range(2, count + 1):
        for j in range(m):
            for i in range(j):
                value = best[k - 1][i] + cost(i + 1, j)
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    k, j = min(range(1, count + 1), key=lambda k: (best[k][m - 1], k)), m - 1
    chosen = []
    while j >= 0 and k >= 1:
        chosen.append(int(candidates[j]))
        j, k = choice[k][j], k - 1
    return tuple(sorted(chosen))


def suggest_for_dataset(task_name: str, checkpoint: str, data: str, count: int = DEFAULT_COUNT,
                        multiple: int = DEFAULT_STEP, instruction: str | None = None, log=print) -> tuple[int, ...]:
    """The bucket set for a task's traffic in `data`, a JSONL file of its plain requests (`{"text"}` rows; the
    reranker's `{"query", "document"}`) or an evaluation dataset (with a build's `instruction`), tokenised with the
    checkpoint's tokenizer; its largest SEQ covers AUTO_COVERAGE of the rows, at most AUTO_MAX_SEQ and the
    checkpoint's context (the rows above it are logged). Logs the set with the share of padding it leaves on these
    rows, which are measured as they reach the model: with the instruction every input of the build carries
    (`Task.fixed_instruction`: the reranker's; an embedding set's queries only when one is named), else bare."""
    from toolkit.checkpoint import context_length, load_tokenizer, read_hf_config, resolve_checkpoint
    from toolkit.eval.datasets import PLAIN_ROW_FIELDS, load_dataset, read_plain_requests
    from toolkit.tasks import get_task

    task = get_task(task_name)
    resolved = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(resolved)
    requests = read_plain_requests(data, task)
    if requests is None:
        try:
            requests = task.traffic(load_dataset(data, task=task)[2])
        except ToolkitError as e:
            fields = ", ".join(f'"{f}"' for f in PLAIN_ROW_FIELDS[task.name])
            raise ToolkitError(f"{e} (--lengths reads JSONL rows of {{{fields}}} for the {task.name}, or an "
                               "evaluation set: its name, or a JSONL file in its format)") from None
    lengths = token_lengths(task, tokenizer, requests, instruction)
    covered = int(np.quantile(lengths, AUTO_COVERAGE, method="higher")) if lengths.size else 1
    context = context_length(read_hf_config(resolved))
    cap = min(-(-covered // multiple) * multiple if multiple >= 1 else covered, AUTO_MAX_SEQ, context)
    if (above := int((lengths > cap).sum())):
        log(f"{above} of {lengths.size} rows of {data} are longer than {cap} tokens, the largest SEQ --seq auto picks "
            f"(it covers {AUTO_COVERAGE:.1%} of the rows, at most {min(AUTO_MAX_SEQ, context)}): at run time they are "
            "truncated or refused, as the runtime's truncation policy says; for them, add a larger SEQ with --seq")
    carried = task.fixed_instruction(instruction)
    seq_lens = suggest_seq_lens(lengths, count, multiple, max_seq=cap, minimum=task.min_seq_len(tokenizer, carried))
    # what the users cannot check otherwise: the padding the set leaves on the very rows it was chosen for
    measured = (f"with the instruction {carried!r}" if carried is not None else "bare, as documents: queries with "
                "an instruction, as `toolkit eval` embeds STS and BQ, are longer; their set takes --instruction")
    log(f"buckets chosen from {data}: --seq {','.join(map(str, seq_lens))}, {padding_share(lengths, seq_lens):.1%} "
        f"of the token slots padding (each of its {lengths.size} rows in the smallest SEQ that holds it; measured "
        f"{measured})")
    return seq_lens
