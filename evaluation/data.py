"""Task data: rows of texts and labels from JSONL, JSON, CSV or parquet, by URI.

Local paths, ``file://``, ``s3://``, ``http(s)://`` (and ``hf://``) are read through
``merging.io.sources.Location(uri, io).local_path()`` (remote files are downloaded once into
the cache). Every ``DataError`` names the URI, the row (the 1-based line of the file for JSONL
and CSV, the 1-based row otherwise) and the field at fault.
"""
from __future__ import annotations

import csv
import gzip
import io as _io
import json
import os
from typing import Any, Sequence

from evaluation.errors import DataError
from merging.errors import MergeError
from merging.io.sources import IOConfig, Location
from merging.io.hashing import sha256_file

FORMATS = ("jsonl", "json", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class Row(dict):
    """A data row (a plain dict) that remembers where it came from: ``line`` (1-based line of
    the file, JSONL/CSV) or ``None`` (JSON, parquet: the row's 1-based position is used)."""

    __slots__ = ("line",)

    def __init__(self, data: dict, line: int | None = None):
        super().__init__(data)
        self.line = line


def where(uri: str, rows: Sequence[dict], i: int) -> str:
    """``<uri> line 7`` or ``<uri> row 3`` for ``rows[i]``."""
    line = getattr(rows[i], "line", None)
    return f"{uri} line {line}" if line is not None else f"{uri} row {i + 1}"


def detect_format(uri: str) -> tuple[str, bool]:
    """(format, gzipped) from the URI's extension."""
    name = uri.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    fmt = _SUFFIXES.get(ext)
    if fmt is None:
        raise DataError(f"{uri}: cannot tell the data format from the extension {ext or '(none)'!r} "
                        "(use .jsonl, .json, .csv or .parquet, optionally .gz, or give the format)")
    if gz and fmt == "parquet":
        raise DataError(f"{uri}: gzipped parquet is not supported (parquet compresses internally)")
    return fmt, gz


def _local(uri: str, io: IOConfig | None) -> str:
    try:
        loc = Location(uri, io or IOConfig())
        if not loc.remote and not os.path.exists(loc.path):
            raise DataError(f"{uri}: not found")
        if not loc.remote and os.path.isdir(loc.path):
            raise DataError(f"{uri}: is a directory, expected a data file")
        return loc.local_path()
    except DataError:
        raise
    except MergeError as e:
        raise DataError(f"task data {e}") from None


def _open_text(path: str, gz: bool, uri: str):
    try:
        raw = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise DataError(f"{uri}: cannot open ({e.strerror})") from None
    return _io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _gz_guard(uri: str):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if et is not None and issubclass(et, (OSError, EOFError, gzip.BadGzipFile)) and not issubclass(et, DataError):
                raise DataError(f"{uri}: cannot read ({et.__name__}: {ev})") from None
            if et is not None and issubclass(et, UnicodeDecodeError):
                raise DataError(f"{uri}: not UTF-8 text ({ev})") from None
            return False
    return _Guard()


def _jsonl(f, uri: str, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(f, start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{uri} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, lineno))
    return rows


def _json(f, uri: str, limit: int | None) -> list[Row]:
    try:
        data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{uri} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{uri}: expected a JSON list of objects, got {type(data).__name__}")
    if limit is not None:
        data = data[:limit]
    rows = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{uri} row {i + 1}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, None))
    return rows


def _csv(f, uri: str, limit: int | None) -> list[Row]:
    try:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{uri}: empty CSV file (expected a header row)")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataError(f"{uri} line 1: the CSV header needs unique, non-empty column names, got {header}")
        rows: list[Row] = []
        start = reader.line_num + 1
        for values in reader:
            if limit is not None and len(rows) >= limit:
                break
            lineno = start
            start = reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"{uri} line {lineno}: {len(values)} fields, the header has {len(header)}")
            rows.append(Row(dict(zip(header, values)), lineno))
        return rows
    except csv.Error as e:
        raise DataError(f"{uri} line {reader.line_num}: malformed CSV ({e})") from None


def _parquet(path: str, uri: str, limit: int | None) -> list[Row]:
    try:  # lazy: pyarrow is heavy to import and only parquet task data needs it
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{uri}: reading parquet needs pyarrow, which is not installed") from None
    try:
        pf = pq.ParquetFile(path)
        rows: list[Row] = []
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                if limit is not None and len(rows) >= limit:
                    return rows
                rows.append(Row(obj, None))
        return rows
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types
        raise DataError(f"{uri}: not a readable parquet file ({type(e).__name__}: {e})") from None


def load_rows(uri: str, io: IOConfig | None = None, *, format: str = "auto", limit: int | None = None) -> list[dict]:
    """The rows of a data file as dicts (``Row``: they also carry their line number).

    ``format``: ``auto`` (by extension: .jsonl/.ndjson, .json, .csv, .parquet; ``.gz`` for the
    text formats), or one of jsonl/json/csv/parquet. ``limit``: the first ``limit`` rows only.
    """
    if limit is not None and limit < 0:
        raise DataError(f"{uri}: limit must be >= 0, got {limit}")
    if format == "auto":
        fmt, gz = detect_format(uri)
    elif format in FORMATS:
        fmt = format
        gz = uri.split("?", 1)[0].lower().endswith(".gz")
    else:
        raise DataError(f"{uri}: unknown data format {format!r} (use auto, {', '.join(FORMATS)})")
    path = _local(uri, io)
    if fmt == "parquet":
        return _parquet(path, uri, limit)
    with _gz_guard(uri):
        with _open_text(path, gz, uri) as f:
            if fmt == "jsonl":
                return _jsonl(f, uri, limit)
            if fmt == "json":
                return _json(f, uri, limit)
            return _csv(f, uri, limit)


def _check_rows(rows: Sequence[dict], uri: str) -> None:
    if not rows:
        raise DataError(f"{uri}: no data rows")


def read_texts(rows: Sequence[dict], text_field: str, *, uri: str) -> list[str]:
    """``row[text_field]`` of every row; a missing or non-string value names the row and field."""
    _check_rows(rows, uri)
    out = []
    for i, row in enumerate(rows):
        if text_field not in row:
            have = ", ".join(sorted(map(str, row))[:8])
            raise DataError(f"{where(uri, rows, i)}: no field {text_field!r} (the row has: {have or 'no fields'})")
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"{where(uri, rows, i)}: field {text_field!r} must be a string, got "
                            f"{type(value).__name__} {_show(value)}")
        out.append(value)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_index(value: Any) -> int | None:
    """An int class index from an int, an integral float or a digit string ("3", " 3 "); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
    return None


def read_labels(rows: Sequence[dict], label_field: str, labels: list[str] | None, *, uri: str) -> list[int]:
    """Class indices: a label is an index 0..C-1 (also ``"3"`` from CSV) or a name from ``labels``.

    With ``labels`` given, C = len(labels) and names take precedence over digit strings.
    Without, any non-negative integer is accepted.
    """
    _check_rows(rows, uri)
    names = {n: i for i, n in enumerate(labels)} if labels is not None else {}
    n_classes = len(labels) if labels is not None else None
    allowed = (f"; allowed names: {', '.join(map(repr, labels))} or an index 0..{len(labels) - 1}"
               if labels else "; labels must be class indices (0, 1, ...) when no label names are given")
    out = []
    for i, row in enumerate(rows):
        if label_field not in row:
            have = ", ".join(sorted(map(str, row))[:8])
            raise DataError(f"{where(uri, rows, i)}: no field {label_field!r} (the row has: {have or 'no fields'})")
        value = row[label_field]
        if isinstance(value, str) and value in names:
            out.append(names[value])
            continue
        idx = _as_index(value)
        if idx is None or idx < 0 or (n_classes is not None and idx >= n_classes):
            what = "unknown label" if idx is None else "label index out of range"
            raise DataError(f"{where(uri, rows, i)}: field {label_field!r}: {what} {_show(value)}{allowed}")
        out.append(idx)
    return out


def data_sha256(uri: str, io: IOConfig | None = None) -> str:
    """SHA-256 of the data file's bytes (as stored: a ``.gz`` file is hashed compressed)."""
    path = _local(uri, io)
    try:
        return sha256_file(path, io.cache_dir if io else None)  # remembered per file version: asked once per task and split
    except OSError as e:
        raise DataError(f"{uri}: cannot read ({e.strerror})") from None


__all__ = ["load_rows", "read_texts", "read_labels", "data_sha256", "detect_format", "Row", "FORMATS"]
