"""`toolkit demo`: the reference demo's sentences through the torch reference and an artifact, side by side."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .api import WEB_SEARCH_INSTRUCTION, Embedder, Reranker, find_artifacts
from .artifact import read_manifest, source_checkpoint
from .errors import ToolkitError
from .parity import TOLERANCES
from .report import format_table

QUERIES = ["What is the capital of China?", "Explain gravity", "中国的首都是哪里？", "什么是万有引力？"]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and is "
    "responsible for the movement of planets around the sun.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "万有引力是物体之间相互吸引的力，它使行星围绕太阳运动。",
]
QUICKSTART_ARTIFACTS = Path("quickstart/artifacts")  # where `make quickstart` puts them (see the Makefile)


def default_artifact(task: str) -> Path:
    path = QUICKSTART_ARTIFACTS / f"quickstart-{task}" / "onnx"
    if not path.exists():
        raise ToolkitError(f"no quickstart artifact at {path}: run `make quickstart` or pass --artifact DIR")
    return path


def run_demo(task: str, artifact: str | Path | None, checkpoint: str | None, echo=print) -> bool:
    """Print the side-by-side tables; return True when the artifact is within tolerance of torch."""
    source = artifact or default_artifact(task)
    dirs = find_artifacts(source)
    manifest = read_manifest(dirs[0])
    tol = TOLERANCES[manifest["dtype"]]
    cls = Embedder if task == "embedding" else Reranker
    with cls.from_artifacts(source, truncation="truncate") as compiled, \
            cls.from_checkpoint(checkpoint or source_checkpoint(dirs[0]), max_length=compiled.max_length,
                                truncation="truncate") as torch_ref:
        echo(f"{task} demo: torch (unpatched Hugging Face, fp32) vs {manifest['backend']} artifact "
             f"({manifest['dtype']}, SEQ {[read_manifest(d)['seq_len'] for d in dirs]})\n")
        if task == "embedding":
            return _embedding_tables(compiled, torch_ref, tol, echo)
        return _reranker_table(compiled, torch_ref, tol, echo)


def _embedding_tables(compiled: Embedder, torch_ref: Embedder, tol: dict, echo) -> bool:
    texts = [("query", q) for q in QUERIES] + [("document", d) for d in DOCUMENTS]
    outs = {}
    for name, model in (("torch", torch_ref), ("artifact", compiled)):
        outs[name] = (model.encode_queries(QUERIES), model.encode_documents(DOCUMENTS))
    cos = np.concatenate([np.sum(outs["torch"][k] * outs["artifact"][k], axis=-1) for k in (0, 1)])
    echo(format_table(["kind", "text", "cos(torch, artifact)"],
                      [[kind, text[:48], float(c)] for (kind, text), c in zip(texts, cos)],
                      title="per-item cosine similarity"))
    sims = {name: q @ d.T for name, (q, d) in outs.items()}
    rows = [[QUERIES[i][:30]] + [f"{sims['torch'][i, j]:.4f} / {sims['artifact'][i, j]:.4f}"
                                  for j in range(len(DOCUMENTS))] for i in range(len(QUERIES))]
    echo("\n" + format_table(["query \\ document"] + [f"doc{j}" for j in range(len(DOCUMENTS))], rows,
                             title="query-document similarity, torch / artifact"))
    ok = bool(cos.min() >= tol["embedding_min_cosine"])
    echo(f"\nmin cosine {cos.min():.6f} (tolerance >= {tol['embedding_min_cosine']}): {'OK' if ok else 'FAIL'}")
    return ok


def _reranker_table(compiled: Reranker, torch_ref: Reranker, tol: dict, echo) -> bool:
    pairs = [(q, d) for q in QUERIES for d in DOCUMENTS]
    a, b = torch_ref.score(pairs, WEB_SEARCH_INSTRUCTION), compiled.score(pairs, WEB_SEARCH_INSTRUCTION)
    diff = np.abs(a - b)
    echo(format_table(["query", "document", "torch P(yes)", "artifact P(yes)", "|diff|"],
                      [[q[:30], d[:36], float(x), float(y), float(z)] for (q, d), x, y, z in zip(pairs, a, b, diff)],
                      title="reranker scores"))
    ok = bool(diff.max() <= tol["reranker_max_prob_diff"])
    echo(f"\nmax |diff| {diff.max():.2e} (tolerance <= {tol['reranker_max_prob_diff']}): {'OK' if ok else 'FAIL'}")
    return ok
