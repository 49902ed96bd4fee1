"""`perf buckets`, what sequence buckets buy: one dataset embedded with a single fixed-SEQ artifact vs a bucket set,
same backend, same process, side by side.

    result = run_bucket_benchmark(BucketOptions(fixed="ws/.../onnx/seq512", buckets="ws/.../onnx", data="sts12-sample"))
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from toolkit.api import Embedder, check_set
from toolkit.buckets import token_lengths
from toolkit.errors import ToolkitError, check_int
from toolkit.perf.common import dataset_requests
from toolkit.report import format_columns
from toolkit.tasks import EMBEDDING
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID


@dataclass(frozen=True)
class BucketOptions:
    """What `perf buckets` compares. `check()` validates every field before a model is loaded.

    - `fixed`: one embedding artifact at a large SEQ.
    - `buckets`: a bucket set (directory of embedding artifacts at several SEQs), same backend.
    - `data`: a dataset, as a JSONL path or a name the eval loaders know (e.g. `sts12-sample`).
    - `limit`: use the first N texts; `instances`: engine instances per artifact.
    """

    FLAGS: ClassVar[dict] = {"fixed": "--fixed", "buckets": "--buckets", "data": "--data", "limit": "--limit",
                             "instances": "--instances"}

    fixed: str | Path
    buckets: str | Path
    data: str | Path
    limit: int | None = None
    instances: int = 1

    def check(self) -> "BucketOptions":
        """Raise ToolkitError (naming the command-line option) for the first invalid field; return self."""
        if self.limit is not None:
            check_int(self.limit, self.FLAGS["limit"], 1)
        check_int(self.instances, self.FLAGS["instances"], 1)
        for name in ("fixed", "buckets", "data"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ToolkitError(f"{self.FLAGS[name]} is required, got {value!r}")
        return self


def check_artifacts(options: BucketOptions) -> None:
    """Before any model loads: `fixed` is one artifact and both sides hold embedding artifacts of one backend."""
    fixed, buckets = (check_set(path, EMBEDDING, lambda found: "perf buckets embeds texts, pass embedding artifacts")
                      for path in (options.fixed, options.buckets))
    if len(fixed) != 1:
        raise ToolkitError(f"--fixed must be one artifact directory (e.g. .../onnx/seq512), {options.fixed} holds "
                           f"{len(fixed)}; pass the set as --buckets")
    if fixed[0].backend != buckets[0].backend:
        raise ToolkitError(f"--fixed is a {fixed[0].backend} artifact but --buckets holds {buckets[0].backend} "
                           "artifacts; compare one backend at a time")
    largest = buckets[-1].seq_len
    if fixed[0].seq_len < largest:  # it would cut texts the set runs whole: less work, other outputs
        raise ToolkitError(f"--fixed is SEQ {fixed[0].seq_len}, below the bucket set's largest SEQ {largest}: the "
                           f"two would not embed the same tokens; pass --fixed {buckets[-1].path} or an artifact "
                           "of a larger SEQ")


def run_bucket_benchmark(options: BucketOptions, progress: bool = False) -> dict:
    """Embed the dataset's texts with the fixed artifact, then with the bucket set (texts longer than the largest SEQ
    are truncated on both sides; a fixed SEQ below the set's largest is refused). Returns per side the SEQs, texts
    per bucket, texts cut to its largest SEQ (`rows_truncated`), seconds and texts/s, plus `speedup` (fixed seconds /
    bucket seconds), `min_cosine_fixed_vs_buckets` and the texts' token lengths before truncation."""
    options.check()
    check_artifacts(options)
    texts = dataset_requests(EMBEDDING, options.data, options.limit)  # embedding artifacts (`check_artifacts`)
    result = {"data": str(options.data), "texts": len(texts)}
    outputs, lengths = {}, []
    for name, path in (("fixed", options.fixed), ("buckets", options.buckets)):
        with Embedder.from_artifacts(path, instances=options.instances, truncation="truncate") as model:
            for engine in model.runner.engines:  # warm-up: one batch through every bucket
                engine.run_sync(*left_pad([[ENDOFTEXT_ID]], engine.seq_len, ENDOFTEXT_ID, engine.batch))
            model.tokenize(texts[:1])  # the tokenizer loads at its first call: not part of the timed run
            started = time.perf_counter()
            outputs[name] = model.encode(texts, progress=progress)
            seconds = time.perf_counter() - started
            lengths = token_lengths(EMBEDDING, model.tokenizer, texts)  # before truncation: what the data holds
            used = {e.seq_len: 0 for e in model.runner.engines}
            for n in lengths.clip(max=model.max_length):
                used[model.runner.bucket_for(n).seq_len] += 1
            result[name] = {"artifact": str(path), "seq_lens": sorted(used), "rows_per_bucket": used,
                            "rows_truncated": int((lengths > model.max_length).sum()),
                            "seconds": seconds, "texts_per_s": len(texts) / seconds,
                            # ONNX Runtime runs a batch at its longest row, whatever the artifact's SEQ
                            "padded_to_seq": not any(e.dynamic_seq for e in model.runner.engines)}
    result["speedup"] = result["fixed"]["seconds"] / result["buckets"]["seconds"]
    result["min_cosine_fixed_vs_buckets"] = EMBEDDING.agreement(outputs["fixed"], outputs["buckets"])["min_cosine"]
    result["token_lengths"] = {"mean": float(np.mean(lengths)), "p50": float(np.median(lengths)),
                               "max": int(np.max(lengths))}  # the texts' own, before either side cuts them
    return result


def bucket_report(result: dict) -> str:
    """The `run_bucket_benchmark` result as a table and the speed-up line."""
    rows = [[name, str(result[name]["seq_lens"]), str(result[name]["rows_per_bucket"]), result[name]["seconds"],
             result[name]["texts_per_s"]] for name in ("fixed", "buckets")]
    lengths = result["token_lengths"]
    cut = result["buckets"].get("rows_truncated")
    title = (f"{result['texts']} texts from {result['data']} (tokens mean {lengths['mean']:.1f}, max {lengths['max']}"
             + (f"; {cut} longer than the largest SEQ {max(result['buckets']['seq_lens'])}, cut to it" if cut else "")
             + ")")
    table = format_columns(["run", "SEQs", "texts per bucket", "seconds", "texts/s"],
                           [None, None, None, ",.3f", ",.1f"], rows, title=title)
    unpadded = "" if result["fixed"]["padded_to_seq"] else (
        "\nthe fixed artifact runs each batch at its longest row, not padded to its SEQ (ONNX Runtime): buckets save "
        "only the batching; compare TVM sets to see what padding to one SEQ costs")
    return (f"{table}\nbucket speed-up: {result['speedup']:.2f}x   (min cosine fixed vs buckets "
            f"{result['min_cosine_fixed_vs_buckets']:.6f}){unpadded}")
