"""The three reference evaluation sets, from local JSONL (the formats of their Hugging Face datasets) or the hub.

- STS12 (mteb/sts12-sts, test):      {"sentence1", "sentence2", "score": 0..5}
- C-MTEB BQ (C-MTEB/BQ, test):        {"sentence1", "sentence2", "score": 0|1}
- MS MARCO (zyznull/msmarco-passage-ranking, dev):
      {"query_id", "query", "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}

Instructions follow Qwen3-Embedding's own evaluation harness: STS12 and BQ use `SIMILARITY_INSTRUCTION` on both
sentences, MS MARCO the web-search instruction on queries (passages bare). Passages are `title + " " + text` with
surrounding whitespace stripped, as MTEB builds them.
"""
from __future__ import annotations

import codecs
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError, is_integer
from toolkit.tasks import SIMILARITY_INSTRUCTION, WEB_SEARCH_INSTRUCTION, Task

SAMPLES = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class DatasetSpec:
    """What a reference dataset is: its kind, where it lives, its gold range and the instruction its queries get."""

    kind: str  # "pairs" | "reranking"
    hub_id: str | None
    split: str | None
    score_range: tuple[float, float] | None  # gold range of pair datasets, normalised to 0..1 as MTEB does
    instruction: str
    file_name: str

    def holds_score(self, score: float) -> bool:
        """Whether a pair dataset's gold range holds `score`."""
        return self.score_range[0] <= score <= self.score_range[1]


DATASETS = {
    "sts12": DatasetSpec("pairs", "mteb/sts12-sts", "test", (0.0, 5.0), SIMILARITY_INSTRUCTION, "sts12_test.jsonl"),
    "bq": DatasetSpec("pairs", "C-MTEB/BQ", "test", (0.0, 1.0), SIMILARITY_INSTRUCTION, "bq_test.jsonl"),
    "msmarco": DatasetSpec("reranking", "zyznull/msmarco-passage-ranking", "dev", None, WEB_SEARCH_INSTRUCTION,
                           "msmarco_dev.jsonl"),
}
SAMPLE_FILES = {f"{name}-sample": (name, SAMPLES / f"{name}_sample.jsonl") for name in DATASETS}


@dataclass
class PairExample:
    """One STS / BQ row: two sentences and their gold similarity."""

    sentence1: str
    sentence2: str
    score: float


@dataclass
class RerankingExample:
    """One MS MARCO query with its candidate passages (positives first, as the files list them)."""

    query_id: str
    query: str
    passages: list[str]
    labels: list[int]  # 1 = positive


def formats_of_kind(kind: str) -> list[str]:
    """The formats (`--format`, the full datasets' names) whose rows are of `kind`."""
    return [n for n, s in DATASETS.items() if s.kind == kind]


def names_of_kind(kind: str) -> list[str]:
    """The dataset names (full and bundled samples) of one kind, e.g. for error messages."""
    return formats_of_kind(kind) + [sample for sample, (n, _) in SAMPLE_FILES.items() if DATASETS[n].kind == kind]


# the fields of each kind's rows, as `download` writes them
ROW_FIELDS = {"pairs": ("sentence1", "sentence2", "score"),
              "reranking": ("query_id", "query", "positive_passages", "negative_passages")}
# what each field check takes, in a user's words (messages never show Python's type names)
FIELD_TYPE_WORDS = {str: "a non-empty text", list: "a list", (int, float): "a number",
                    (str, int): "a text or an integer"}


def _json_words(value) -> str:
    """A JSON value as a message names it: null, true, false, or its kind with short ones quoted."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r:.40}" if value.strip() else "an empty text"
    return "a list" if isinstance(value, list) else "an object"


def _require(row: dict, key: str, kind, where: str):
    if key not in row:
        raise ToolkitError(f"{where}: field {key!r} is missing")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()) or isinstance(value, bool):
        raise ToolkitError(f"{where}: field {key!r} must be {FIELD_TYPE_WORDS[kind]}, got {_json_words(value)}")
    return value


def _object_row(row, where: str) -> dict:
    """`row` where it is a JSON object, else an error naming what it is."""
    if not isinstance(row, dict):
        raise ToolkitError(f"{where}: expected a JSON object (one row of the dataset), got {_json_words(row)}")
    return row


def _check_fields(row: dict, name: str, where: str) -> None:
    """Refuse a row that holds the other kind's fields and none of `name`'s: the file is in another format than the
    one it is read as (stated, or told by the file's name)."""
    kind = DATASETS[name].kind
    other = next(k for k in ROW_FIELDS if k != kind)
    found = [f for f in ROW_FIELDS[other] if f in row]
    if found and not any(f in row for f in ROW_FIELDS[kind]):
        raise ToolkitError(f"{where}: the row has {' / '.join(formats_of_kind(other))} fields ({', '.join(found)}), "
                           f"none of {name}'s ({', '.join(ROW_FIELDS[kind])}), and the file is read as {name}: pass "
                           f"--format {' or '.join(formats_of_kind(other))} if it is in that format")


def passage_text(title: str | None, text: str) -> str:
    """A passage as MTEB builds it: `(title + " " + text).strip()`."""
    return f"{title or ''} {text}".strip()


def parse_row(row, name: str, where: str):
    """Validate one row of dataset `name`'s format into a PairExample or RerankingExample; errors name the file and
    line."""
    row = _object_row(row, where)
    _check_fields(row, name, where)
    spec = DATASETS[name]
    if spec.kind == "pairs":
        score = float(_require(row, "score", (int, float), where))
        if not spec.holds_score(score):
            holds = [n for n in formats_of_kind("pairs") if DATASETS[n].holds_score(score)]
            fix = f"; pass --format {' or '.join(holds)} for a file of such scores" if holds else ""
            raise ToolkitError(f"{where}: score {score:g} is outside {name}'s gold range "
                               f"{spec.score_range[0]:g}..{spec.score_range[1]:g}{fix}")
        return PairExample(_require(row, "sentence1", str, where), _require(row, "sentence2", str, where), score)
    passages, labels = [], []
    for key, label in (("positive_passages", 1), ("negative_passages", 0)):
        for j, p in enumerate(_require(row, key, list, where) if key in row else []):
            if not isinstance(p, dict):
                raise ToolkitError(f"{where}: {key}[{j}] must be an object with a 'text' field, got {_json_words(p)}")
            text = _require(p, "text", str, f"{where} {key}[{j}]")
            title = p.get("title")
            if title is not None and not isinstance(title, str):
                raise ToolkitError(f"{where} {key}[{j}]: field 'title' must be a text, got {_json_words(title)}")
            passages.append(passage_text(title, text))
            labels.append(label)
    if not passages:
        raise ToolkitError(f"{where}: no positive_passages or negative_passages")
    return RerankingExample(str(_require(row, "query_id", (str, int), where)), _require(row, "query", str, where),
                            passages, labels)


def detect(first_row: dict, path: Path) -> str:
    """Which reference format a local file is in, unless stated (`--format`): by its fields, BQ vs STS by the file
    name."""
    if "query" in first_row:
        return "msmarco"
    return "bq" if "bq" in path.name.lower() else "sts12"


GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip file (RFC 1952)


def _lines(path: Path):
    """(line number, text) of each non-blank line; a line that is not UTF-8 is an error naming the file and line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if line_no == 1 and raw.startswith(GZIP_MAGIC):
                raise ToolkitError(f"{path} is gzip-compressed: gunzip it first (`gunzip -k {path}`) and pass the "
                                   "JSONL file")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ToolkitError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                   f"{e.start + 1}); re-save the file as UTF-8") from None
            if line.strip():
                yield line_no, line


def _json_row(path: Path, line_no: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ToolkitError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None


def check_limit(limit) -> int | None:
    """`limit` as given when it is None or a positive integer; anything else is an error."""
    if limit is not None and (not is_integer(limit) or limit < 1):
        raise ToolkitError(f"limit must be a positive number of examples, got {limit!r}; leave it out to use all")
    return limit


def check_format(data_format) -> None:
    """Refuse a stated file format other than None (told by the file) or a full dataset's name."""
    if data_format is not None and data_format not in DATASETS:
        raise ToolkitError(f"format must be one of {', '.join(DATASETS)}, got {data_format!r}")


def read_jsonl(path: Path, limit: int | None = None, name: str | None = None) -> list:
    """The first `limit` examples (all when None) of a local JSONL file, in dataset `name`'s format (detected from the
    first row when None)."""
    check_limit(limit)
    path = Path(path)
    examples, query_lines = [], {}
    for line_no, line in _lines(path):
        row = _json_row(path, line_no, line)
        name = name or detect(row if isinstance(row, dict) else {}, path)
        example = parse_row(row, name, f"{path}:{line_no}")
        if isinstance(example, RerankingExample):  # a query counted twice would weigh twice in every mean
            first = query_lines.setdefault(example.query_id, line_no)
            if first != line_no:
                raise ToolkitError(f"{path}:{line_no}: query_id {example.query_id!r} repeats line {first}; give each "
                                   "query one row, all its passages in it")
        examples.append(example)
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise ToolkitError(f"{path} has no rows")
    return examples


# rows of plain requests, a task's own (what `--lengths` reads besides the evaluation sets): an embedding's texts, a
# reranker's (query, document) pairs as calibration files hold them
PLAIN_ROW_FIELDS = {"embedding": ("text",), "reranker": ("query", "document")}


def read_plain_requests(path, task: Task) -> list | None:
    """The requests of a JSONL file of `task`'s plain rows (PLAIN_ROW_FIELDS): texts, or (query, document) pairs;
    None when `path` is no file or its first row is not such a row (an evaluation set's, say)."""
    path, fields, requests = Path(path), PLAIN_ROW_FIELDS[task.name], []
    if not path.is_file():
        return None
    for line_no, line in _lines(path):
        row = _object_row(_json_row(path, line_no, line), f"{path}:{line_no}")
        if not requests and not all(f in row for f in fields):
            return None
        values = tuple(_require(row, f, str, f"{path}:{line_no}") for f in fields)
        requests.append(values if len(values) > 1 else values[0])
    return requests or None


def resolve_dataset(name_or_path: str, data_dir: str | Path | None = None,
                    data_format: str | None = None) -> tuple[str, DatasetSpec, Path | None]:
    """`(name, spec, local file or None for the hub)` without reading the examples. Looks for, in order: a JSONL
    path (in `data_format`, a full dataset's name, where given; else told by its first row and its name); a bundled
    sample (`sts12-sample`, ...); with `data_dir`, `DATA_DIR/<file>` (as written by `toolkit data download`; an error
    when it is missing); the hub."""
    check_format(data_format)
    path = Path(name_or_path)
    if path.is_file():
        if data_format is not None:
            return data_format, DATASETS[data_format], path
        for line_no, line in _lines(path):
            name = detect(_object_row(_json_row(path, line_no, line), f"{path}:{line_no}"), path)
            return name, DATASETS[name], path
        raise ToolkitError(f"{path} has no rows")
    named = SAMPLE_FILES[name_or_path][0] if name_or_path in SAMPLE_FILES else name_or_path
    if data_format is not None and named in DATASETS and data_format != named:
        raise ToolkitError(f"{name_or_path} is {named} data, not {data_format}: --format states the format of a JSONL "
                           "file; leave it out for a dataset name")
    if name_or_path in SAMPLE_FILES:
        name, sample = SAMPLE_FILES[name_or_path]
        return name, DATASETS[name], sample
    if name_or_path not in DATASETS:
        names = f"{sorted(DATASETS)} or {sorted(SAMPLE_FILES)}"
        if os.path.lexists(path) or _looks_like_a_path(name_or_path):
            if not path.exists():
                target = f" (a symlink to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
                raise ToolkitError(f"no such file: {name_or_path}{target}; give the path of a JSONL file, or a "
                                   f"dataset name: {names}")
            raise ToolkitError(f"not a regular file: {name_or_path}; give the path of a JSONL file, or a dataset "
                               f"name: {names}")
        raise ToolkitError(f"unknown dataset {name_or_path!r}: use {sorted(DATASETS)}, "
                           f"{sorted(SAMPLE_FILES)} or a JSONL path")
    spec = DATASETS[name_or_path]
    if not data_dir:
        return name_or_path, spec, None
    return name_or_path, spec, _data_dir_file(Path(data_dir), name_or_path, spec)


def _looks_like_a_path(name: str) -> bool:
    """A path separator or a `.jsonl` suffix: meant as a file, never as a dataset name."""
    return any(sep and sep in name for sep in (os.sep, os.altsep, "/")) or name.lower().endswith(".jsonl")


def _data_dir_file(data_dir: Path, name: str, spec: DatasetSpec) -> Path:
    """`DATA_DIR/<spec's file>`. A missing one is an error saying what DATA_DIR holds: a user who names a directory
    means its data, so it never falls back to the hub."""
    path = data_dir / spec.file_name
    if path.is_file():
        return path
    try:
        names = sorted(p.name + "/" * p.is_dir() for p in data_dir.iterdir())
    except OSError as e:
        holds = "it does not exist" if not data_dir.exists() else f"it cannot be listed: {e.strerror or e}"
    else:
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        holds = f"it holds {', '.join(names[:10])}{more}" if names else "it is empty"
    raise ToolkitError(f"the data directory {data_dir} has no {spec.file_name}, the file {name} is read from "
                       f"({holds}); run `toolkit data download --out {data_dir}`, give the file's path instead of "
                       f"{name!r}, or leave out the data directory to load from the hub")


def read_examples(name: str, spec: DatasetSpec, source: Path | None, limit: int | None = None) -> list:
    """The examples of a dataset resolved by `resolve_dataset` (from its file, or the hub when `source` is None)."""
    check_limit(limit)
    if source is not None:
        return read_jsonl(source, limit, name)
    rows = hub_rows(name)
    return [parse_row(r, name, f"{spec.hub_id} row {i}") for i, r in enumerate(rows, 1)
            if not limit or i <= limit]


def load_dataset(name_or_path: str, limit: int | None = None, data_dir: str | Path | None = None,
                 task: Task | None = None, data_format: str | None = None):
    """Returns (name, spec, examples); see `resolve_dataset` for where it looks and what `data_format` states. With
    `task`, a dataset of a kind it cannot use is refused before it is read."""
    check_limit(limit)
    name, spec, source = resolve_dataset(name_or_path, data_dir, data_format)
    if task is not None:
        check_kind(task, name, spec)
    return name, spec, read_examples(name, spec, source, limit)


def check_kind(task: Task, name: str, spec: DatasetSpec) -> None:
    """Raise ToolkitError, naming the datasets it can use, unless `task` runs on data of `spec`'s kind."""
    if spec.kind not in task.dataset_kinds:
        usable = [n for kind in task.dataset_kinds for n in names_of_kind(kind)]
        raise ToolkitError(f"the {task.name} task cannot use {name} (a {spec.kind} dataset); use "
                           f"{', '.join(usable)} or a JSONL file in one of those formats")


def check_scorable(name: str, spec: DatasetSpec, examples: list) -> None:
    """Raise ToolkitError, naming the data's problem and the fix, when `examples` cannot define `spec`'s metrics:
    correlations need 2 pairs, gold scores that vary and pairs of two different texts, ranking metrics a query with a
    positive passage. Checked before any model runs, so an undefined (NaN) metric is never blamed on a model. Queries
    without a negative passage (ranked trivially) are warned about."""
    more = "use a larger --limit (or all rows) or a file with more rows"
    if spec.kind == "pairs":
        if len(examples) < 2:
            raise ToolkitError(f"{name}: Spearman and Pearson need at least 2 pairs, got {len(examples)}; {more}")
        scores = {e.score for e in examples}
        if len(scores) == 1:
            raise ToolkitError(f"{name}: all {len(examples)} pairs have the gold score {scores.pop():g}, so Spearman "
                               f"and Pearson are undefined; {more} (with varied scores)")
        if all(e.sentence1 == e.sentence2 for e in examples):  # any model gives each pair the same cosine, 1
            raise ToolkitError(f"{name}: in all {len(examples)} pairs sentence2 is sentence1, so every similarity is 1 "
                               "and Spearman and Pearson are undefined; put each pair's second text in sentence2")
    elif not any(any(e.labels) for e in examples):
        raise ToolkitError(f"{name}: none of the {len(examples)} queries has a positive passage, so MAP, MRR, NDCG and "
                           f"recall are undefined; {more} (with positive_passages)")
    elif unranked := sum(all(e.labels) for e in examples):
        warnings.warn(f"{name}: {unranked} of the {len(examples)} queries have no negative passage: every ranking "
                      "metric is 1 on them whatever the model scores (add negative_passages to rank)")


HUB_PROBE_TIMEOUT_S = 5  # long enough for a slow link; datasets' own retries take ~24 s to give up


def hub_rows(name: str, fix: str | None = None) -> list[dict]:
    """All rows of a reference dataset's split from the Hugging Face hub, or from datasets' cache where the hub is not
    reachable (HF_HUB_OFFLINE, or no answer to one short request): datasets' own retries took ~24 s to get there. An
    error says why and then `fix`, what the user does instead (default: the loader's local options)."""
    spec = DATASETS[name]
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE  # HF_HUB_OFFLINE, or datasets' own HF_DATASETS_OFFLINE
    unreachable = None if offline else _hub_unreachable(datasets.config.HF_ENDPOINT)
    try:
        with _offline_mode(unreachable is not None):
            return list(datasets.load_dataset(spec.hub_id, split=spec.split))
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        cache = datasets.config.HF_DATASETS_CACHE  # the one place a name is looked for besides the hub
        cause = (f"{unreachable}, and datasets' cache {cache} holds no copy of it" if unreachable else
                 f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and datasets' cache {cache} holds no copy that loads "
                 f"({error})" if offline else error)
    raise ToolkitError(f"cannot load {spec.hub_id} from the hub ({cause}). " + (fix or (
        f"The name {name!r} is read from the hub (or, with `toolkit eval --data-dir DIR`, from DIR/{spec.file_name}): "
        f"pass the path of a local copy instead of the name (path/to/{spec.file_name}, which `toolkit data download "
        f"--out DIR` writes where the hub is reachable; docs/data-sources.md says how the copies we measured on were "
        f"built from public files), or use the bundled '{name}-sample'")))


@contextmanager
def _offline_mode(on: bool):
    """datasets and huggingface_hub in offline mode within the block (`on`): datasets then reads its cache at once."""
    import datasets
    import huggingface_hub.constants

    if not on:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` gives no HTTP answer within HUB_PROBE_TIMEOUT_S (None: it answers, whatever the status). Sent
    with huggingface_hub's client, so its proxy and certificate settings apply."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # the client's transport errors differ between huggingface_hub versions
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{endpoint} is unreachable: {reason}"
    return None


def download(out_dir: str | Path) -> list[Path]:
    """Write the three datasets as JSONL in the formats above (needs the hub). Each file appears only once all its
    rows are fetched and written, so a failure never leaves a partial file that `resolve_dataset` would pick up."""
    out_dir = Path(out_dir)
    written = []
    for name, spec in DATASETS.items():
        # this command is the hub's way in: without it, the file comes from elsewhere
        fix = (f"This command needs the hub: run it where the hub is reachable (HF_HUB_OFFLINE unset) and copy "
               f"{spec.file_name} from its --out folder to {out_dir}, or pass `toolkit eval --dataset` the path of a "
               f"JSONL copy (docs/data-sources.md: how to build one from public files) or the bundled "
               f"'{name}-sample'")
        lines = [json.dumps(_hub_fields(row, ROW_FIELDS[spec.kind], spec, i), ensure_ascii=False) + "\n"
                 for i, row in enumerate(hub_rows(name, fix), 1)]
        path = out_dir / spec.file_name
        _write_atomically(path, lines)
        written.append(path)
    return written


def _hub_fields(row: dict, keep: tuple[str, ...], spec: DatasetSpec, row_no: int) -> dict:
    """`row`'s `keep` fields; a missing one means the hub's schema changed, an error naming the dataset and row."""
    missing = [k for k in keep if k not in row]
    if missing:
        raise ToolkitError(f"{spec.hub_id} row {row_no} has no field {missing[0]!r} (fields: {sorted(row)}); the "
                           f"hub's format changed: give a local JSONL path or a bundled sample instead")
    return {k: row[k] for k in keep}


def _write_atomically(path: Path, lines: list[str]) -> None:
    """Write `lines` to a `.part` file beside `path`, then rename it into place."""
    part = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(part, path)
    except OSError as e:
        raise ToolkitError(f"cannot write {path}: {e.strerror or e}; pass a writable --out DIR") from None
    finally:
        part.unlink(missing_ok=True)  # gone already after the rename
