"""evaluation.data: rows from JSONL/JSON/CSV/parquet (+gz), by path, file:// and http; errors
name the URI, the line and the field."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os

import pytest

from evaluation.data import data_sha256, load_rows, read_labels, read_texts
from evaluation.errors import DataError
from merging.io.sources import IOConfig

ROWS = [{"text": "the cat", "label": 0}, {"text": "red blue", "label": 1}, {"text": "a dog", "label": "animal"},
        {"text": "gold", "label": "colour"}]
NAMES = ["animal", "colour"]


def _write(path, fmt: str, rows=ROWS, gz=False) -> str:
    path = str(path)
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", newline="")) if gz else (lambda p: open(p, "w", newline=""))
    with opener(path) as f:
        if fmt == "jsonl":
            for r in rows:
                f.write(json.dumps(r) + "\n")
        elif fmt == "json":
            json.dump(rows, f, indent=1)
        elif fmt == "csv":
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("name,fmt,gz", [("d.jsonl", "jsonl", False), ("d.json", "json", False), ("d.csv", "csv", False),
                                         ("d.jsonl.gz", "jsonl", True), ("d.csv.gz", "csv", True), ("d.json.gz", "json", True)])
def test_formats(tmp_path, name, fmt, gz):
    uri = _write(tmp_path / name, fmt, gz=gz)
    rows = load_rows(uri)
    assert [r["text"] for r in rows] == [r["text"] for r in ROWS]
    assert read_texts(rows, "text", uri=uri) == ["the cat", "red blue", "a dog", "gold"]
    assert read_labels(rows, "label", NAMES, uri=uri) == [0, 1, 0, 1]  # indices ("0" in CSV) and names
    assert len(load_rows(uri, limit=2)) == 2
    assert load_rows("file://" + uri) == rows


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    uri = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["x y", "z"], "label": [1, 0]}), uri)
    rows = load_rows(uri)
    assert rows == [{"text": "x y", "label": 1}, {"text": "z", "label": 0}]
    assert read_labels(rows, "label", None, uri=uri) == [1, 0]
    assert load_rows(uri, limit=1) == rows[:1]
    rows[1]["text"] = None
    with pytest.raises(DataError, match=r"d\.parquet row 2: field 'text' must be a string, got NoneType"):
        read_texts(rows, "text", uri=uri)


def test_over_http_and_sha256(tmp_path, serve_http):
    os.makedirs(tmp_path / "srv")
    uri = _write(tmp_path / "srv" / "d.jsonl", "jsonl")
    srv = serve_http(tmp_path / "srv")
    cfg = IOConfig(cache_dir=str(tmp_path / "cache"))
    url = srv.url_for("d.jsonl")
    assert load_rows(url, cfg) == load_rows(uri)
    digest = hashlib.sha256(open(uri, "rb").read()).hexdigest()
    assert data_sha256(uri) == digest == data_sha256(url, cfg)
    with pytest.raises(DataError, match="missing.jsonl"):
        load_rows(srv.url_for("missing.jsonl"), cfg)


def test_bad_rows_name_uri_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok", "label": 0}\n\n{"text": "broken", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON"):
        load_rows(str(p))
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: expected a JSON object, got list"):
        load_rows(str(p))

    p.write_text('{"text": "ok", "label": 0}\n\n{"body": "no text", "label": 1}\n{"text": 5, "label": 1}\n')
    rows = load_rows(str(p))
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: no field 'text' \(the row has: body, label\)"):
        read_texts(rows, "text", uri=str(p))
    with pytest.raises(DataError, match=r"bad\.jsonl line 4: field 'text' must be a string, got int 5"):
        read_texts(rows[:1] + rows[2:], "text", uri=str(p))

    c = tmp_path / "bad.csv"
    c.write_text("text,label\nhello,0\nworld\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: 1 fields, the header has 2"):
        load_rows(str(c))
    c.write_text('text,label\n"multi\nline",0\nnext,7\n')
    rows = load_rows(str(c))
    assert rows[0]["text"] == "multi\nline"
    with pytest.raises(DataError, match=r"bad\.csv line 4: field 'label': label index out of range '7'; allowed names: 'animal', 'colour'"):
        read_labels(rows, "label", NAMES, uri=str(c))

    j = tmp_path / "bad.json"
    j.write_text('[{"text": "a", "label": "animal"}, {"text": "b", "label": "plant"}]')
    with pytest.raises(DataError, match=r"bad\.json row 2: field 'label': unknown label 'plant'; allowed names: 'animal', 'colour' or an index 0\.\.1"):
        read_labels(load_rows(str(j)), "label", NAMES, uri=str(j))
    j.write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"bad\.json: expected a JSON list of objects, got dict"):
        load_rows(str(j))
    j.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"bad\.json line 2: not valid JSON"):
        load_rows(str(j))


def test_labels(tmp_path):
    uri = "mem://x"
    rows = [{"y": 0}, {"y": "1"}, {"y": 2.0}, {"y": " 3 "}]
    assert read_labels(rows, "y", None, uri=uri) == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"row 4: field 'y': label index out of range ' 3 '"):
        read_labels(rows, "y", ["a", "b", "c"], uri=uri)
    with pytest.raises(DataError, match=r"row 1: field 'y': unknown label True; labels must be class indices"):
        read_labels([{"y": True}], "y", None, uri=uri)
    with pytest.raises(DataError, match=r"row 1: field 'y': label index out of range -1"):
        read_labels([{"y": -1}], "y", None, uri=uri)
    with pytest.raises(DataError, match=r"row 2: no field 'y'"):
        read_labels([{"y": 0}, {"z": 1}], "y", None, uri=uri)
    # a name wins over a digit string that is also a name
    assert read_labels([{"y": "1"}], "y", ["x", "z", "1"], uri=uri) == [2]
    with pytest.raises(DataError, match="no data rows"):
        read_texts([], "text", uri=uri)


def test_format_and_path_errors(tmp_path):
    with pytest.raises(DataError, match=r"d\.txt: cannot tell the data format from the extension '\.txt'"):
        load_rows(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match=r"nope\.jsonl: not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "d.txt"
    p.write_text('{"text": "a"}\n')
    assert load_rows(str(p), format="jsonl") == [{"text": "a"}]
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        load_rows(str(p), format="xml")
    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: cannot read"):
        load_rows(str(g))
    b = tmp_path / "latin.csv"
    b.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text"):
        load_rows(str(b))
