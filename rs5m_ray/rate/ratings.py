"""The ratings file: one CSV row per answer, appended and fsynced before the answer is
acknowledged, never rewritten. RS5M's columns come first (`image_path`, `description`,
`relevance_detail`, `hallucination`, `fluency`), so its tools read ours; then who rated
what and when. A rater's later answer on a sample replaces the earlier one (latest wins);
a skip is a row with `skipped` = 1 and no scores.

A crash can leave at most a torn last row (never acknowledged): opening the file cuts it off.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import threading
from datetime import datetime, timezone

log = logging.getLogger(__name__)

RATINGS = "ratings.csv"  # in a ratings directory
METRICS = ("relevance_detail", "hallucination", "fluency")
RS5M_COLUMNS = ("image_path", "description", *METRICS)
COLUMNS = (*RS5M_COLUMNS, "rater", "timestamp", "sample_id", "shard", "source", "skipped", "flag")
MAX_FLAG_CHARS = 2000


class RatingError(ValueError):
    """Input the tool refuses; the message is shown to the user as is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_scores(answer: dict) -> dict[str, int | None]:
    """The three 1-5 scores of an answer (all None for a skip), or a RatingError naming the bad one."""
    if answer.get("skip"):
        given = [m for m in METRICS if answer.get(m) is not None]
        if given:
            raise RatingError(f"a skip carries no scores, got {', '.join(given)}")
        return dict.fromkeys(METRICS)
    scores = {}
    for m in METRICS:
        v = answer.get(m)
        if v is None:
            raise RatingError(f"{m} is missing: rate all of {', '.join(METRICS)} (1-5), or skip")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            raise RatingError(f"{m} must be an integer from 1 to 5, got {v!r}")
        scores[m] = v
    return scores


def check_flag(answer: dict) -> str:
    flag = answer.get("flag") or ""
    if not isinstance(flag, str):
        raise RatingError(f"flag must be text, got {type(flag).__name__}")
    if len(flag) > MAX_FLAG_CHARS:
        raise RatingError(f"flag is {len(flag)} characters long, at most {MAX_FLAG_CHARS} are kept")
    return flag.strip()


def _records(text: str) -> tuple[list[list[str]], int]:
    """The complete CSV records of `text` and the character offset where they end: a record
    torn by a crash (no final newline, or cut inside a quoted field) is left out."""
    offset = 0

    def feed():
        nonlocal offset
        for line in io.StringIO(text, newline=""):  # split at line ends only, as csv writes them
            offset += len(line)
            yield line

    records, end = [], 0
    reader = csv.reader(feed(), strict=True)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:  # end of data inside a quoted field: a torn last record
            break
        if text[offset - 1] not in "\r\n":
            break
        records.append(record)
        end = offset
    return records, end


def read_rows(path: str) -> list[dict[str, str]]:
    """The complete rows of a ratings CSV (ours or RS5M's), as dicts by column name."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    records, end = _records(text)
    if end < len(text):
        log.warning("%s: its last record is incomplete (a crash while writing it?): left out", path)
    if not records:
        return []
    header, rows = records[0], records[1:]
    missing = [c for c in RS5M_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} is not a ratings file: no column {', '.join(missing)}")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: record {line} has {len(row)} fields, the header {len(header)}")
    return [dict(zip(header, row)) for row in rows]


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RatingsLog:
    """The append-only ratings file of one ratings directory."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        if os.path.exists(path):
            with open(path, "rb+") as f:
                text = f.read().decode("utf-8", "surrogateescape")  # a torn tail may end inside a character
                _, end = _records(text)
                if end < len(text):  # cut the torn tail a crash left, so appends start clean
                    f.truncate(len(text[:end].encode("utf-8", "surrogateescape")))
                    os.fsync(f.fileno())
            self.rows = read_rows(path)
        else:
            self.rows = []
        self._file = open(path, "a", encoding="utf-8", newline="")
        if self._file.tell() == 0:
            self._write(COLUMNS)
            _fsync_dir(path)

    def _write(self, record) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(record)
        self._file.write(buf.getvalue())  # one write per record
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict) -> dict[str, str]:
        """Write one answer durably; returns it as stored."""
        row = {c: "" if row.get(c) is None else str(row[c]) for c in COLUMNS}
        row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._write([row[c] for c in COLUMNS])
            self.rows.append(row)
        return row

    def close(self) -> None:
        self._file.close()
