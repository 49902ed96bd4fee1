"""Token-level helpers shared by validation, the runtime and the benchmarks."""
from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError


def left_pad(rows: list[list[int]], seq_len: int, pad_id: int, batch: int | None = None):
    """Left-pad token id lists to `[max(len(rows), batch), seq_len]` int64 arrays (ids, attention_mask).

    Rows beyond len(rows) (filling a batch of a fixed size, as a benchmark times it) repeat the first row, so they
    compute finite values that the caller drops (and start with any prompt prefix an artifact caches:
    `split_cached_prefix`)."""
    n = max(len(rows), batch or 0)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i in range(n):
        row = rows[i] if i < len(rows) else rows[0]
        if not row or len(row) > seq_len:
            raise ToolkitError(f"row {i} has {len(row)} tokens; it must have 1..{seq_len}")
        ids[i, seq_len - len(row):] = row
        mask[i, seq_len - len(row):] = 1
    return ids, mask


def holds_prefix(row, prefix: list[int]) -> bool:
    """Whether a row's tokens (a list or 1-D array, without padding) start with `prefix` and hold one after it: what a
    graph that caches `prefix`'s keys and values can run."""
    return len(row) > len(prefix) and list(row[:len(prefix)]) == list(prefix)


def split_cached_prefix(ids: np.ndarray, mask: np.ndarray, prefix: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded rows laid out for a graph that holds the keys and values of `prefix` (`Manifest.cached_prefix`):
    the prefix first, then the row's padding, then the rest of the row; unchanged without a prefix. Every row must
    start with the prefix and hold at least one token after it."""
    if not prefix:
        return ids, mask
    width = len(prefix)
    ids, mask = np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)
    for i, real in enumerate(mask.sum(axis=1)):
        start = ids.shape[1] - int(real)
        if not holds_prefix(ids[i, start:], prefix):
            raise ToolkitError(f"row {i} does not start with the {width}-token prompt prefix this artifact holds the "
                               "keys and values of, or has nothing after it: frame rows with the task's prompt "
                               "(Embedder and Reranker do)")
        padding = ids[i, :start].copy()
        ids[i, :width], ids[i, width:width + start] = prefix, padding
        mask[i, :width], mask[i, width:width + start] = 1, 0
    return ids, mask
