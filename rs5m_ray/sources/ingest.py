"""Ingest stage: metadata files of all sources -> canonical rows, streamed on Ray.

The unit of work is one file; each file is read batch by batch, so a task's
memory stays flat. A file that cannot be read is recorded under `errors/` with
its path and reason, and the job goes on.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator

import pyarrow as pa

from rs5m_ray.config import IngestConfig
from rs5m_ray.ledger import Accounted
from rs5m_ray.sources.adapters import get_adapter
from rs5m_ray.sources.readers import (SourceFileError, bad_line_rows, canonicalize, file_stem, lost_rows,
                                      read_raw, rows_in_file)
from rs5m_ray.storage import Storage, join


def list_inputs(cfg: IngestConfig, storage: Storage) -> list[dict]:
    """One work item per metadata file; file stems name sample_ids, so they must be unique per source."""
    items = []
    for source in cfg.sources:
        get_adapter(source.name)
        files = sorted({f for pattern in source.paths for f in storage.glob(pattern)})
        if not files:
            raise FileNotFoundError(f"source {source.name}: no files match {source.paths}")
        stems: dict[str, str] = {}
        for f in files:
            stem = file_stem(f)
            if stem in stems:
                raise ValueError(f"source {source.name}: {f} and {stems[stem]} share the name {stem!r}, "
                                 "which would give clashing sample_ids")
            stems[stem] = f
            items.append({"source": source.name, "path": f})
    return items


class IngestFiles:
    """map_batches generator: a batch of file items -> canonical row batches."""

    def __init__(self, cfg: IngestConfig, output: str, storage: Storage):
        self.cfg, self.output, self.storage = cfg, output, storage
        self.accounted = Accounted("ingest", output, storage)

    def __call__(self, files: pa.Table) -> Iterator[pa.Table]:
        for source, path in zip(files["source"].to_pylist(), files["path"].to_pylist()):
            yield from self._read_file(source, path)

    def _read_file(self, source: str, path: str) -> Iterator[pa.Table]:
        adapter, stem, row, skipped = get_adapter(source), file_stem(path), 0, 0
        try:
            for raw, bad in read_raw(path, adapter, self.storage, self.cfg.batch_rows):
                if bad:
                    skipped += len(bad)
                    yield self._account(bad_line_rows(adapter, stem, bad), 0.0)
                if raw is None or not len(raw):
                    continue
                start = time.perf_counter()
                table = canonicalize(raw, adapter, stem, row, self.cfg.max_caption_bytes, self.cfg.url_credentials)
                row += len(raw)
                yield self._account(table, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - whatever fails in one file is that file's error
            yield from self._unreadable(adapter, path, stem, row, skipped, e)

    def _account(self, table: pa.Table, seconds: float) -> pa.Table:
        return self.accounted.account(table, table, seconds)

    def _unreadable(self, adapter, path: str, stem: str, row: int, skipped: int, error: Exception):
        """Record the file's error; the rows it holds beyond those read, where they can be
        counted, become `unreadable_file` drops (so the accounting sees them)."""
        why = error.why if isinstance(error, SourceFileError) else f"{type(error).__name__}: {error}"
        total = rows_in_file(path, adapter, self.storage)
        lost = None if total is None else max(0, total - row - skipped)
        record = {"source": adapter.name, "path": path, "error": why, "rows_read_before_error": row,
                  "rows_lost": lost}
        key = hashlib.sha1(path.encode()).hexdigest()[:20]
        self.storage.write_atomic(join(self.output, "errors", "ingest", f"{key}.json"), json.dumps(record).encode())
        for first in range(row, row + (lost or 0), self.cfg.batch_rows):
            n = min(self.cfg.batch_rows, row + lost - first)
            yield self._account(lost_rows(adapter, stem, first, n, why), 0.0)
