"""Results are printed as aligned tables and written as JSON."""
from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

from toolkit.errors import ToolkitError


def format_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """An aligned text table; numeric columns right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(display_width(str(h)), *(display_width(r[i]) for r in cells)) if cells else display_width(str(h))
              for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    line = lambda vals: "  ".join(aligned(str(v), w, right=num)  # noqa: E731
                                  for v, w, num in zip(vals, widths, numeric))
    out = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def format_columns(headers: list[str], formats: list[str | None], rows: list[list], title: str | None = None) -> str:
    """`format_table` with every number of column i in the format spec `formats[i]` (e.g. ",.1f": the same decimals
    down the column, thousands separated) and the column right-aligned, its text cells ("-", already formatted
    ratios) too; a None format leaves a column as `format_table` shows it (text: left-aligned)."""
    cells = [[c if spec is None or isinstance(c, str) else format(c, spec) for c, spec in zip(row, formats)]
             for row in rows]
    headers = list(headers)
    for i, spec in enumerate(formats):
        if spec is not None:
            width = max(display_width(headers[i]), *(display_width(row[i]) for row in cells)) if cells else \
                display_width(headers[i])
            headers[i] = aligned(headers[i], width, right=True)
            for row in cells:
                row[i] = aligned(row[i], width, right=True)
    return format_table(headers, cells, title=title)


def display_width(text: str) -> int:
    """The terminal cells `text` takes: a wide character (Chinese, full-width forms) takes two, a combining mark
    none; len() counts one each, and the demo's Chinese rows pushed their columns out of line."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def aligned(text: str, width: int, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal cells, on the left with `right`."""
    padding = " " * max(0, width - display_width(text))
    return padding + text if right else text + padding


def fmt(value) -> str:
    """A cell: floats with the digits that matter at their magnitude."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1e3:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        if value == 0 or abs(value) >= 1e-3:
            return f"{value:.4f}"
        return f"{value:.2e}"
    return str(value)


def finite_or_none(value):
    """`value` with every NaN or infinite float (nested in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write `payload` as indented UTF-8 JSON when a path is given; non-finite numbers as null (JSON has no NaN, and
    Python's bare `NaN` breaks strict readers such as `jq` and browsers)."""
    if path:
        text = json.dumps(finite_or_none(payload), indent=2, ensure_ascii=False, allow_nan=False)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        except OSError as e:  # after the command's checks: a full disk (`/dev/full`), a path changed meanwhile
            raise ToolkitError(f"cannot write the result to {path}: {e.strerror or e}; check the free disk space and "
                               "the path, or name another file") from e
