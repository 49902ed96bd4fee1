"""The three reference evaluation sets, from local JSONL (the formats of their Hugging Face datasets) or the hub.

- STS12 (mteb/sts12-sts, test):      {"sentence1", "sentence2", "score": 0..5}
- C-MTEB BQ (C-MTEB/BQ, test):        {"sentence1", "sentence2", "score": 0|1}
- MS MARCO (zyznull/msmarco-passage-ranking, dev):
      {"query_id", "query", "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolkitError

SAMPLES = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # "pairs" | "reranking"
    hub_id: str | None
    split: str | None
    score_range: tuple[float, float] | None  # gold range of pair datasets, normalised to 0..1 as MTEB does
    instruction: str
    file_name: str


STS_INSTRUCTION = "Retrieve semantically similar text."
WEB_SEARCH_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DATASETS = {
    "sts12": DatasetSpec("pairs", "mteb/sts12-sts", "test", (0.0, 5.0), STS_INSTRUCTION, "sts12_test.jsonl"),
    "bq": DatasetSpec("pairs", "C-MTEB/BQ", "test", (0.0, 1.0), STS_INSTRUCTION, "bq_test.jsonl"),
    "msmarco": DatasetSpec("reranking", "zyznull/msmarco-passage-ranking", "dev", None, WEB_SEARCH_INSTRUCTION,
                           "msmarco_dev.jsonl"),
}
SAMPLE_FILES = {f"{name}-sample": (name, SAMPLES / f"{name}_sample.jsonl") for name in DATASETS}


@dataclass
class PairExample:
    sentence1: str
    sentence2: str
    score: float


@dataclass
class RerankingExample:
    query_id: str
    query: str
    passages: list[str]
    labels: list[int]  # 1 = positive


def _require(row: dict, key: str, kind, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()) or isinstance(value, bool):
        raise ToolkitError(f"{where}: field {key!r} must be a non-empty {getattr(kind, '__name__', kind)}, "
                           f"got {value!r}")
    return value


def parse_row(row, kind: str, where: str, score_range=None):
    """Validate one row; errors name the file and line."""
    if not isinstance(row, dict):
        raise ToolkitError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "pairs":
        score = float(_require(row, "score", (int, float), where))
        if score_range and not score_range[0] <= score <= score_range[1]:
            raise ToolkitError(f"{where}: score {score} is outside {score_range}")
        return PairExample(_require(row, "sentence1", str, where), _require(row, "sentence2", str, where), score)
    passages, labels = [], []
    for key, label in (("positive_passages", 1), ("negative_passages", 0)):
        for j, p in enumerate(_require(row, key, list, where) if key in row else []):
            text = _require(p, "text", str, f"{where} {key}[{j}]") if isinstance(p, dict) else None
            if text is None:
                raise ToolkitError(f"{where}: {key}[{j}] must be an object with a 'text' field")
            title = p.get("title") or ""
            passages.append(f"{title} {text}".strip() if title else text)
            labels.append(label)
    if not passages:
        raise ToolkitError(f"{where}: no positive_passages or negative_passages")
    return RerankingExample(str(_require(row, "query_id", (str, int), where)), _require(row, "query", str, where),
                            passages, labels)


def detect(first_row: dict, path: Path) -> tuple[str, DatasetSpec]:
    """Which reference format a local file is in (by its fields; BQ vs STS by the file name)."""
    if "query" in first_row:
        return "msmarco", DATASETS["msmarco"]
    name = "bq" if "bq" in path.name.lower() else "sts12"
    return name, DATASETS[name]


def read_jsonl(path: Path, limit: int | None = None, spec: DatasetSpec | None = None):
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ToolkitError(f"{where}: not valid JSON ({e.msg})") from None
            if spec is None:
                _, spec = detect(row if isinstance(row, dict) else {}, path)
            examples.append(parse_row(row, spec.kind, where, spec.score_range))
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise ToolkitError(f"{path} has no rows")
    return examples


def load_dataset(name_or_path: str, limit: int | None = None, data_dir: str | Path | None = None):
    """Returns (name, spec, examples). Looks for, in order: a JSONL path; a bundled sample (`sts12-sample`, ...);
    `DATA_DIR/<file>` (as written by `toolkit data download`); the hub."""
    path = Path(name_or_path)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        try:
            name, spec = detect(json.loads(first), path)
        except (json.JSONDecodeError, AttributeError, TypeError):
            raise ToolkitError(f"{path}:1: not a JSON object") from None
        return name, spec, read_jsonl(path, limit, spec)
    if name_or_path in SAMPLE_FILES:
        name, sample = SAMPLE_FILES[name_or_path]
        return name, DATASETS[name], read_jsonl(sample, limit, DATASETS[name])
    if name_or_path not in DATASETS:
        raise ToolkitError(f"unknown dataset {name_or_path!r}: use {sorted(DATASETS)}, "
                           f"{sorted(SAMPLE_FILES)} or a JSONL path")
    spec = DATASETS[name_or_path]
    if data_dir and (Path(data_dir) / spec.file_name).is_file():
        return name_or_path, spec, read_jsonl(Path(data_dir) / spec.file_name, limit, spec)
    rows = hub_rows(name_or_path)
    examples = [parse_row(r, spec.kind, f"{spec.hub_id} row {i}", spec.score_range) for i, r in enumerate(rows, 1)
                if not limit or i <= limit]
    return name_or_path, spec, examples


def hub_rows(name: str) -> list[dict]:
    spec = DATASETS[name]
    try:
        import datasets

        return list(datasets.load_dataset(spec.hub_id, split=spec.split))
    except Exception as e:
        raise ToolkitError(
            f"cannot load {spec.hub_id} from the hub ({type(e).__name__}). Pass a local JSONL file instead "
            f"(--dataset path/to/{spec.file_name}; copies live in the shared data folder), use the bundled "
            f"'{name}-sample', or run `toolkit data download --out DIR` where the hub is reachable") from None


def download(out_dir: str | Path) -> list[Path]:
    """Write the three datasets as JSONL in the formats above (needs the hub)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in DATASETS.items():
        keep = ("sentence1", "sentence2", "score") if spec.kind == "pairs" else (
            "query_id", "query", "positive_passages", "negative_passages")
        path = out_dir / spec.file_name
        with open(path, "w", encoding="utf-8") as f:
            for row in hub_rows(name):
                f.write(json.dumps({k: row[k] for k in keep}, ensure_ascii=False) + "\n")
        written.append(path)
    return written
