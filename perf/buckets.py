"""What sequence buckets buy: one dataset embedded with a single fixed-SEQ artifact vs a bucket set, same backend,
same process, side by side."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..api import Embedder
from .run import dataset_texts


def run_bucket_benchmark(fixed: str | Path, buckets: str | Path, data: str | Path, limit: int | None = None,
                         instances: int = 1) -> dict:
    texts = dataset_texts(Path(data), limit)
    result = {"data": str(data), "texts": len(texts)}
    outputs = {}
    for name, path in (("fixed", fixed), ("buckets", buckets)):
        with Embedder.from_artifacts(path, instances=instances, truncation="truncate") as model:
            model.encode(texts[: 2 * (model.runner.engines[0].batch or 1)])  # warm-up
            started = time.perf_counter()
            outputs[name] = model.encode(texts, progress=True)
            seconds = time.perf_counter() - started
            lengths = [len(r) for r in model.tokenize(texts)]
            used = {e.seq_len: 0 for e in model.runner.engines}
            for n in lengths:
                used[model.runner.bucket_for(n).seq_len] += 1
            result[name] = {"artifact": str(path), "seq_lens": sorted(used), "rows_per_bucket": used,
                            "seconds": seconds, "texts_per_s": len(texts) / seconds}
    result["speedup"] = result["fixed"]["seconds"] / result["buckets"]["seconds"]
    result["min_cosine_fixed_vs_buckets"] = float(np.min(np.sum(outputs["fixed"] * outputs["buckets"], axis=-1)))
    result["token_lengths"] = {"mean": float(np.mean(lengths)), "p50": float(np.median(lengths)),
                               "max": int(np.max(lengths))}
    return result
