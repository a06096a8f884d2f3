"""Streaming readers: one metadata file -> canonical pyarrow batches.

Files are read batch by batch (parquet row groups, CSV blocks, JSON-lines
chunks), so memory stays flat however large the input. Rows with unusable fields
are kept in the batch with a drop reason (the ingest stage's ledger); lines that
cannot be parsed (a ragged TSV line, invalid JSON) are reported with their line
number and become `malformed_row` drops; a file that cannot be read at all raises
`SourceFileError` naming it.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m_ray.arrays import (blank_mask, from_bool, is_valid_utf8, rows_with_bytes, sample_ids, scatter_strings,
                             string_buffers, to_bool, valid_mask)
from rs5m_ray.ledger import DROP_DETAIL, DROP_REASON
from rs5m_ray.sources.adapters import SourceAdapter
from rs5m_ray.storage import Storage, is_local, strip_protocol

CANONICAL = ("sample_id", "source", "url", "caption")


MALFORMED_ROW = "malformed_row"
UNREADABLE_FILE = "unreadable_file"
BadLine = tuple[str, str]  # where ("line 7", "record 3") and what is wrong with it


class SourceFileError(RuntimeError):
    """A metadata file that cannot be read (malformed, missing columns)."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def file_stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    name = re.sub(r"(\.(parquet|tsv|csv|jsonl?|txt))?(\.(gz|bz2|zst|xz))?$", "", name)
    return re.sub(r"[^A-Za-z0-9-]", "-", name)


def read_raw(path: str, adapter: SourceAdapter, storage: Storage,
             batch_rows: int) -> Iterator[tuple[pa.Table | None, list[BadLine]]]:
    """Yield the adapter's columns from one file, in order, as raw tables, each with the lines
    skipped as unparseable since the previous one."""
    try:
        if adapter.format == "parquet" and is_local(path):
            # Memory-mapped: parquet pages are decoded straight from the page cache, without a
            # Python-level read and copy per page.
            f = pa.memory_map(strip_protocol(path), "r")
        else:
            f = storage.fs(path).open(path, "rb", compression="infer")
    except (OSError, ValueError) as e:
        raise SourceFileError(path, f"cannot open: {e}") from e
    with f:
        try:
            yield from _READERS[adapter.format](f, path, adapter, batch_rows)
        except SourceFileError:
            raise
        except (pa.ArrowException, ValueError, OSError, EOFError) as e:
            raise SourceFileError(path, f"malformed {adapter.format}: {type(e).__name__}: {e}") from e


def rows_in_file(path: str, adapter: SourceAdapter, storage: Storage) -> int | None:
    """How many rows a file holds, as far as that can be told of a file that failed: the parquet
    footer's count, or the complete non-blank lines of a delimited or JSON-lines file that can be
    decompressed (a lower bound when the stream itself is cut); None when it cannot be counted."""
    try:
        with storage.fs(path).open(path, "rb", compression=None if adapter.format == "parquet" else "infer") as f:
            if adapter.format == "parquet":
                return pq.ParquetFile(f).metadata.num_rows
            if adapter.format == "json":
                return None
            lines = 0
            try:
                for line in f:
                    lines += line.endswith(b"\n") and bool(line.strip())
            except (OSError, EOFError, ValueError):
                pass
            return lines - (adapter.format in ("tsv", "csv") and adapter.header is None)
    except Exception:  # noqa: BLE001 - a footer that cannot be read: not countable
        return None


def bad_line_rows(adapter: SourceAdapter, stem: str, bad: list[BadLine]) -> pa.Table:
    """Canonical rows for unparseable lines: `malformed_row` drops whose sample_id and detail
    carry the line (or record) number, since the line has no row number of its own."""
    ids = pa.array([f"{adapter.name}_{stem}_{where.replace(' ', '')}" for where, _ in bad], pa.string())
    return _dropped(adapter, ids, pa.array([MALFORMED_ROW] * len(bad), pa.string()),
                    pa.array([f"{where}: {why}" for where, why in bad], pa.string()))


def lost_rows(adapter: SourceAdapter, stem: str, first_row: int, n: int, why: str) -> pa.Table:
    """Canonical rows for the `n` rows of an unreadable file from `first_row` on: `unreadable_file`
    drops under the sample_ids they would have had."""
    return _dropped(adapter, sample_ids(f"{adapter.name}_{stem}", first_row, n),
                    pa.repeat(pa.scalar(UNREADABLE_FILE, pa.string()), n), pa.repeat(pa.scalar(why[:200]), n))


def _dropped(adapter: SourceAdapter, ids: pa.Array, reasons: pa.Array, details: pa.Array) -> pa.Table:
    n = len(ids)
    cols = {"sample_id": ids, "source": pa.repeat(pa.scalar(adapter.name, pa.string()), n),
            "url": pa.nulls(n, pa.string()), "caption": pa.nulls(n, pa.string())}
    cols.update({c: pa.nulls(n, pa.string()) for c in adapter.extra_columns})
    return pa.table({**cols, DROP_REASON: reasons, DROP_DETAIL: details})


def _read_parquet(f, path, adapter, batch_rows):
    pf = pq.ParquetFile(f)
    columns = _present(path, adapter, pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        yield pa.Table.from_batches([batch]), []


def _read_delimited(f, path, adapter, batch_rows):
    delimiter = "\t" if adapter.format == "tsv" else ","
    # One thread: a task is one CPU, and only then does Arrow know each skipped line's number
    # (its count of lines, in which blank lines do not count).
    read = pacsv.ReadOptions(column_names=list(adapter.header) if adapter.header else None, block_size=8 << 20,
                             use_threads=False)
    bad: list[BadLine] = []

    def skip(row) -> str:
        bad.append((f"line {row.number}", f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        return "skip"

    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"',
                               newlines_in_values=False, invalid_row_handler=skip)
    if adapter.header:
        names = list(adapter.header)
        if not f.read(1):
            return  # an empty header-less file holds no rows (Arrow calls it malformed)
        f.seek(0)
    else:
        names = _peek_header(f, delimiter)
    columns = _present(path, adapter, names)
    # Binary, so that a caption with invalid UTF-8 becomes a drop reason, not a failed file.
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns},
                                   strings_can_be_null=False)
    reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in reader:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= batch_rows:
            yield pa.Table.from_batches(pending), bad
            pending, rows, bad = [], 0, []
    if pending or bad:
        yield (pa.Table.from_batches(pending) if pending else None), bad


def _peek_header(f, delimiter: str) -> list[str]:
    line = f.readline()
    f.seek(0)
    return line.decode("utf-8", errors="replace").rstrip("\r\n").split(delimiter)


def _read_jsonl(f, path, adapter, batch_rows):
    # Invalid UTF-8 bytes survive as surrogates, and go back to bytes in `_records_table`: an
    # invalid_utf8 drop of their row, not a failed file.
    records: list[dict] = []
    bad: list[BadLine] = []
    try:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((f"line {lineno}", f"invalid JSON ({e.msg})"))
                continue
            why = _record_problem(record, adapter)
            if why:
                bad.append((f"line {lineno}", why))
                continue
            records.append(record)
            if len(records) >= batch_rows:
                yield _records_table(path, adapter, records), bad
                records, bad = [], []
    except (OSError, EOFError):  # a stream cut short (truncated .gz): first the lines read before the cut
        if records or bad:
            yield (_records_table(path, adapter, records) if records else None), bad
        raise
    if records or bad:
        yield (_records_table(path, adapter, records) if records else None), bad


def _read_json(f, path, adapter, batch_rows):
    try:
        doc = json.loads(f.read().decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise SourceFileError(path, f"invalid JSON ({e.msg} at line {e.lineno})") from e
    records = doc.get(adapter.json_records_key) if adapter.json_records_key and isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise SourceFileError(path, f"expected a list of records under {adapter.json_records_key!r}")
    for start in range(0, len(records), batch_rows):
        chunk = records[start:start + batch_rows]
        problems = [_record_problem(r, adapter) for r in chunk]
        bad = [(f"record {start + i + 1}", why) for i, why in enumerate(problems) if why]
        good = [r for r, why in zip(chunk, problems) if not why]
        yield (_records_table(path, adapter, good) if good else None), bad


def _record_problem(record, adapter: SourceAdapter) -> str | None:
    """Why a JSON record cannot be a row: not an object, or a URL or caption that is not text."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for c in (adapter.url_column, *adapter.caption_columns):
        if record.get(c) is not None and not isinstance(record[c], str):
            return f"{c!r} is a JSON {type(record[c]).__name__}, not a string"
    return None


def _records_table(path: str, adapter: SourceAdapter, records: list[dict]) -> pa.Table:
    """The adapter's columns of JSON records, as binary: text that is not valid UTF-8 (lone
    surrogates from `\\ud800` escapes or from undecodable bytes) becomes an invalid_utf8 drop."""
    names = set().union(*(r.keys() for r in records))
    columns = _present(path, adapter, names)
    return pa.table({c: pa.array([_json_bytes(r.get(c)) for r in records], pa.binary()) for c in columns})


def _json_bytes(value) -> bytes | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        return text.encode("utf-8", errors="surrogateescape")  # undecodable input bytes, as they were
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")  # escaped lone surrogates: invalid UTF-8


_READERS = {"parquet": _read_parquet, "tsv": _read_delimited, "csv": _read_delimited,
            "jsonl": _read_jsonl, "json": _read_json}


def _present(path: str, adapter: SourceAdapter, names) -> list[str]:
    names = set(names)
    if adapter.url_column not in names:
        raise SourceFileError(path, f"missing URL column {adapter.url_column!r} ({adapter.name}); has {sorted(names)}")
    if not any(c in names for c in adapter.caption_columns):
        raise SourceFileError(path, f"missing caption column(s) {list(adapter.caption_columns)} ({adapter.name})")
    missing_required = [c for c, _ in adapter.require if c not in names]
    if missing_required:
        raise SourceFileError(path, f"missing column(s) {missing_required} ({adapter.name})")
    return [c for c in adapter.columns if c in names]


def canonicalize(raw: pa.Table, adapter: SourceAdapter, stem: str, first_row: int,
                 max_caption_bytes: int, url_credentials: str = "strip") -> pa.Table:
    """Map a raw batch to the canonical schema; unusable rows get a drop reason.

    Vectorised over the batch: each check is a numpy mask over the column buffers (NUL bytes
    and whitespace found by one Hyperscan pass each), and only checks that fire touch the table."""
    n = len(raw)
    sample_id = sample_ids(f"{adapter.name}_{stem}", first_row, n)
    url, url_ok = _as_text(raw, adapter.url_column)
    url, credentials = _without_userinfo(url)  # never stored, never sent
    captions = [_as_text(raw, c) for c in adapter.caption_columns if c in raw.column_names]
    # Per caption column, whitespace-only -> null; then the first non-null one.
    cleaned = []
    for c, _ in captions:
        blank = blank_mask(c)
        cleaned.append(pc.if_else(from_bool(blank), pa.scalar(None, pa.string()), c)
                       if blank.sum() > c.null_count else c)
    caption = cleaned[0] if len(cleaned) == 1 else pc.coalesce(*cleaned)
    caption_ok = _all(ok for _, ok in captions)
    cols = {"sample_id": sample_id, "source": pa.repeat(pa.scalar(adapter.name, pa.string()), n), "url": url,
            "caption": caption}
    for c in adapter.extra_columns:
        cols[c] = _as_text(raw, c)[0] if c in raw.column_names else pa.nulls(n, pa.string())
    table = pa.table(cols)

    url_offsets, _ = string_buffers(url)
    # One scan for every byte a URL may not hold; which one, only on the (rare) rows found.
    url_bad = rows_with_bytes(url, b"\x00\t\n\x0c\r ")
    url_nul = np.zeros(n, bool)
    if url_bad.any():
        bad_rows = np.flatnonzero(url_bad)
        url_nul[bad_rows] = rows_with_bytes(url.take(pa.array(bad_rows)), b"\x00")
    caption_bytes = np.where(valid_mask(caption), np.diff(string_buffers(caption)[0]), 0)
    too_long = caption_bytes > max_caption_bytes
    checks = [  # in order: a row gets the first reason that applies
        (None if url_ok is None else ~url_ok, "invalid_utf8", "url"),
        (None if caption_ok is None else ~caption_ok, "invalid_utf8", "caption"),
        (blank_mask(url), "null_url", None),
        (url_nul, "invalid_url", "NUL byte"),
        # not `^\S+$` (RE2's \s is [\t\n\f\r ]): an empty or null URL, or one with such a byte
        (url_bad | (np.diff(url_offsets) == 0) | ~valid_mask(url), "invalid_url", "whitespace"),
        (~valid_mask(caption), "empty_caption", None),
        (rows_with_bytes(caption, b"\x00"), "caption_nul_byte", None),
        (too_long, "caption_too_long", f"> {max_caption_bytes} bytes"),
        (credentials if url_credentials == "drop" else None, "url_credentials", "user:password@ removed"),
    ]
    for column, value in adapter.require:
        v, _ = _as_text(raw, column)
        checks.append((~to_bool(pc.equal(v, value)),
                       f"filtered_{column}", f"!= {value}"))
    # A row's reason is that of the first check it fails: one code per row, then the reason and
    # detail columns built from the codes (scattered when, as usual, only a few rows fail).
    code = np.full(n, -1, np.int16)
    for i, (mask, _, _) in enumerate(checks):
        if mask is not None and mask.any():
            code[(code < 0) & mask] = i
    rows = np.flatnonzero(code >= 0)
    if 8 * len(rows) < n:  # the usual batch: a handful of bad rows
        reasons = scatter_strings(n, rows, [checks[c][1] for c in code[rows].tolist()])
        details = [checks[c][2] for c in code[rows].tolist()]
        keep = [d is not None for d in details]
        details = scatter_strings(n, rows[keep], [d for d in details if d is not None])
    else:
        index = pa.array(code, mask=code < 0)
        reasons = pa.array([r for _, r, _ in checks], pa.string()).take(index)
        details = pa.array([d for _, _, d in checks], pa.string()).take(index)
    table = table.append_column(DROP_REASON, reasons).append_column(DROP_DETAIL, details)
    if too_long.any():
        # A rejected giant caption is cut in the ledger; kept captions are never altered.
        clipped = pc.utf8_slice_codeunits(pc.fill_null(caption, ""), 0, max_caption_bytes)
        table = table.set_column(3, "caption", pc.if_else(from_bool(too_long), clipped, caption))
    return table


class ColumnTypeError(ValueError):
    """A column whose type cannot be read as text (a list, a struct): the file is unreadable."""


USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _without_userinfo(url: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """`url` with any `user:password@` removed, and the rows that had one (None: no row)."""
    candidates = np.flatnonzero(rows_with_bytes(url, b"@"))
    if not len(candidates):
        return url, None
    values = url.take(pa.array(candidates)).to_pylist()
    stripped = [USERINFO.sub(r"\1", v) if v is not None else None for v in values]
    changed = [i for i, (a, b) in zip(candidates.tolist(), zip(values, stripped)) if a != b]
    if not changed:
        return url, None
    mask = np.zeros(len(url), bool)
    mask[changed] = True
    fixed = url.to_pylist()  # rare rows: a Python pass over this batch's URLs is fine
    for i, v in zip(candidates.tolist(), stripped):
        fixed[i] = v
    return pa.array(fixed, pa.string()), mask


def _as_text(raw: pa.Table, name: str) -> tuple[pa.Array, np.ndarray | None]:
    try:
        return _text(raw[name])
    except pa.ArrowNotImplementedError:
        raise ColumnTypeError(f"column {name!r} has type {raw.schema.field(name).type}, "
                              "which cannot be read as text") from None


def _text(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """The column as UTF-8 strings and a mask of rows that were valid UTF-8 (None: all of them).

    String columns (parquet does not validate them) are checked too: a value with invalid UTF-8
    is a drop reason, never a failed task."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if not is_valid_utf8(col):
            return _decode_per_row(col.view(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()))
        return (col if pa.types.is_string(col.type) else pc.cast(col, pa.string())), None
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        return pc.cast(col, pa.string()), None
    try:
        return pc.cast(col, pa.string()), None
    except pa.ArrowInvalid:
        return _decode_per_row(col)


def _decode_per_row(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    # Rare path: find the invalid rows in Python, keep them (replaced) for the ledger.
    values, ok = [], []
    for b in col.to_pylist():
        try:
            values.append(None if b is None else b.decode("utf-8"))
            ok.append(True)
        except UnicodeDecodeError:
            values.append(b.decode("utf-8", errors="replace"))
            ok.append(False)
    return pa.array(values, pa.string()), np.array(ok, bool)


def _all(masks) -> np.ndarray | None:
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out
