"""Token-level helpers shared by validation, the runtime and the benchmarks."""
from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError


def left_pad(rows: list[list[int]], seq_len: int, pad_id: int, batch: int | None = None):
    """Left-pad token id lists to `[max(len(rows), batch), seq_len]` int64 arrays (ids, attention_mask).

    Rows beyond len(rows) (filling a static batch) hold a single pad token, attended, so they compute finite values
    that the caller drops."""
    n = max(len(rows), batch or 0)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i in range(n):
        row = rows[i] if i < len(rows) else [pad_id]
        if not row or len(row) > seq_len:
            raise ToolkitError(f"row {i} has {len(row)} tokens; it must have 1..{seq_len}")
        ids[i, seq_len - len(row):] = row
        mask[i, seq_len - len(row):] = 1
    return ids, mask
