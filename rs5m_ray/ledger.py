"""The stage contract and the drop ledger.

A stage maps a pyarrow batch to a batch of the same rows with a `drop_reason`
column (null = kept) and optionally `drop_detail`. `Accounted` wraps any stage: it
keeps the kept rows in the stream, writes the dropped ones to the ledger and
writes per-source row counts, so every input row is accounted for at the end.

Side outputs are named after the batch's first sample_id (each row is in exactly
one batch of a stage), so a retried task overwrites its own files instead of
counting twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray import metrics
from rs5m_ray.arrays import constant_value, from_bool, repeat_where, to_bool, valid_mask
from rs5m_ray.storage import Storage, join

log = logging.getLogger(__name__)
DROP_REASON = "drop_reason"
DROP_DETAIL = "drop_detail"
LEDGER_COUNTS = "rs5m_ledger_counts"
LEDGER_COLUMNS = ["sample_id", "source", "url", "caption", "stage", DROP_REASON, DROP_DETAIL]
# What a part-level stage keeps of a dropped row besides its drop reason (not its image bytes).
LIGHT_LEDGER_COLUMNS = ["sample_id", "source", "url", "caption"]
STATS_SCHEMA = pa.schema(
    [("stage", pa.string()), ("source", pa.string()), ("rows_in", pa.int64()),
     ("rows_out", pa.int64()), ("seconds", pa.float64()),
     # Wall-clock span (epoch seconds) of the batch or part, and the Ray node it ran on: throughput and timeline.
     ("started", pa.float64()), ("finished", pa.float64()), ("node", pa.string())]
)


def mark_dropped(table: pa.Table, mask: pa.Array | np.ndarray, reason: str | pa.Array, detail: Any = None) -> pa.Table:
    """Set drop_reason (and detail) where `mask` (Arrow or numpy booleans) is true and the row is not
    dropped yet."""
    table = ensure_drop_columns(table)
    if isinstance(mask, np.ndarray):
        mask = from_bool(mask)
    if isinstance(reason, str) and table[DROP_REASON].null_count == len(table) and \
            (detail is None or (isinstance(detail, str) and table[DROP_DETAIL].null_count == len(table))):
        # Nothing dropped yet (a stage's usual case): the new columns are built, not merged.
        live = to_bool(mask)
        table = table.set_column(table.schema.get_field_index(DROP_REASON), DROP_REASON, repeat_where(reason, live))
        if detail is not None:
            table = table.set_column(table.schema.get_field_index(DROP_DETAIL), DROP_DETAIL,
                                     repeat_where(detail, live))
        return table
    live = pc.and_(pc.fill_null(mask, False), pc.is_null(table[DROP_REASON]))
    reason_arr = _as_string(reason)
    detail_arr = _as_string(detail)
    new_reason = pc.if_else(live, reason_arr, table[DROP_REASON])
    new_detail = pc.if_else(live, detail_arr, table[DROP_DETAIL])
    table = table.set_column(table.schema.get_field_index(DROP_REASON), DROP_REASON, new_reason)
    return table.set_column(table.schema.get_field_index(DROP_DETAIL), DROP_DETAIL, new_detail)


def _as_string(value: Any) -> pa.Array | pa.Scalar:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return pc.cast(value, pa.string())
    return pa.scalar(value, pa.string())


def ensure_drop_columns(table: pa.Table) -> pa.Table:
    for name in (DROP_REASON, DROP_DETAIL):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), pa.string()))
    return table


def kept(table: pa.Table) -> pa.Table:
    return take_rows(table, _null_mask(table[DROP_REASON]))


def dropped(table: pa.Table) -> pa.Table:
    return take_rows(table, ~_null_mask(table[DROP_REASON]))


def _null_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if column.null_count == len(column):
        return np.ones(len(column), bool)
    return ~valid_mask(column)


def take_rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows of `table` where `mask` holds, as one contiguous chunk (a chunked result costs more
    downstream than it saves: Ray Data sizes and serializes a table chunk by chunk, in Python).
    No copy when all or none are taken; most rows taken (a batch with a few drops): the runs
    between the drops concatenated (a memcpy, cheaper than a filter); a few rows taken (a keyword
    stage's hits): gathered by index; else one filter."""
    n = int(mask.sum())
    if n == len(table):
        return table
    if n == 0:
        return table.slice(0, 0)
    edges = np.flatnonzero(np.diff(np.r_[False, mask, False].astype(np.int8)))
    if len(edges) == 2:
        out = table.slice(edges[0], edges[1] - edges[0])
    elif 2 * n > len(table):
        out = pa.concat_tables([table.slice(a, b - a) for a, b in zip(edges[::2], edges[1::2])])
    elif 8 * n < len(table) and all(c.num_chunks == 1 for c in table.columns):  # take concatenates chunks first
        return table.take(pa.array(np.flatnonzero(mask)))
    else:
        out = table.filter(from_bool(mask))
    return out.combine_chunks() if any(c.num_chunks > 1 for c in out.columns) else out


def run_stage(stage: Callable[[pa.Table], pa.Table], batch: pa.Table, name: str) -> pa.Table:
    """The stage's marks on `batch`. A stage that raises drops the whole batch as `stage_error` (the
    exception in the detail, the traceback in the worker's log): one poisoned batch costs its own rows,
    counted in the ledger and the report, never the job, and no actor of a pool dies of it."""
    try:
        return stage(batch)
    except Exception as e:
        log.exception("stage %s failed on a batch of %d rows from %s: its rows go to the ledger as stage_error",
                      name, len(batch), batch["sample_id"][0] if "sample_id" in batch.column_names else "?")
        return mark_dropped(batch, np.ones(len(batch), bool), "stage_error", f"{type(e).__name__}: {e}"[:500])


def batch_key(table: pa.Table) -> str:
    return hashlib.sha1(f"{table['sample_id'][0].as_py()}|{len(table)}".encode()).hexdigest()[:20]


class Accounted:
    """Runs a stage on a batch; ledger for the dropped rows, counts for the report.

    `stage` is a batch function or a class (built once, in the worker: model stages
    load their model in `__init__`). Use as `ds.map_batches(Accounted, fn_constructor_kwargs=...)`
    for a class in an actor pool, or `ds.map_batches(Accounted(...))` for a function.
    """

    def __init__(self, stage_name: str, output: str, storage: Storage,
                 stage: Callable[[pa.Table], pa.Table] | type | None = None, stage_args: tuple = (),
                 stage_kwargs: dict | None = None):
        self.stage_name = stage_name
        self.__name__ = stage_name  # Ray names operators (and map_groups requires it) by __name__
        self.output = output
        self.storage = storage
        self.stage = stage(*stage_args, **(stage_kwargs or {})) if isinstance(stage, type) else stage

    def __call__(self, batch: pa.Table) -> pa.Table:
        if len(batch) == 0:
            return batch
        started, start = time.time(), time.perf_counter()
        result = run_stage(self.stage, batch, self.stage_name)
        return self.account(batch, result, time.perf_counter() - start, started)

    def account(self, batch: pa.Table, result: pa.Table, seconds: float, started: float | None = None) -> pa.Table:
        """Ledger the dropped rows of `result` (the stage's output for `batch`); return the kept ones."""
        result = ensure_drop_columns(result)
        if len(result) != len(batch):
            raise RuntimeError(f"stage {self.stage_name} returned {len(result)} rows for {len(batch)}: "
                               "stages must mark drops, not remove rows")
        key = batch_key(batch)
        keep = _null_mask(result[DROP_REASON])
        out = take_rows(result, keep)
        source = constant_value(batch["source"])  # one source per batch, nearly always: counted once
        if not keep.all():
            write_ledger(self.storage, self.output, self.stage_name, key, ledger_rows(result, ~keep, source))
        write_stats(self.storage, self.output, self.stage_name, key, batch, out, seconds, source, started)
        return out.drop_columns([DROP_REASON, DROP_DETAIL])


# Ledger files: the string columns that repeat one value per batch (source, stage, reason, detail)
# are dictionary pages of a few bytes; sample_ids, URLs and captions are plain pages (dictionaries
# only cost time on unique values). No column statistics: ledgers are read whole, never pruned.
LEDGER_DICTIONARY_COLUMNS = ["source", "stage", DROP_REASON, DROP_DETAIL]
LEDGER_COMPRESSION = "zstd"


def ledger_rows(result: pa.Table, gone: np.ndarray, source: str | None = None) -> pa.Table:
    """The ledger's columns of the rows where `gone` holds. Only the per-row columns are gathered:
    a column that is null there, or holds one value there (a batch's source and drop reason,
    nearly always), becomes a null column or a one-entry dictionary. `source`: the batch's one
    source, when known."""
    n = int(gone.sum())
    cols = {}
    for c in LEDGER_COLUMNS:
        if c not in result.column_names:
            continue
        col = result[c]
        if col.null_count == len(col) or (col.null_count and not (valid_mask(col) & gone).any()):
            cols[c] = pa.nulls(n, pa.string())  # e.g. the URLs and captions of keyword misses
            continue
        # Drop reasons are non-null exactly on the dropped rows; a source constant on the batch is so on them.
        value = constant_value(col, skip_nulls=True) if c == DROP_REASON else \
            source if c == "source" and source is not None else \
            constant_value(col) if c in LEDGER_DICTIONARY_COLUMNS else None
        cols[c] = _repeat_dictionary(value, n) if value is not None else col.filter(from_bool(gone))
    return pa.table(cols)


def _repeat_dictionary(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def write_ledger(storage: Storage, output: str, stage: str, key: str, rows: pa.Table) -> None:
    """Dropped rows, with their counts per source and reason in the file footer (the report
    reads only footers: a keyword stage's ledger holds nearly every input row)."""
    n = len(rows)
    cols = {}
    for c in LEDGER_COLUMNS:
        col = _repeat_dictionary(stage, n) if c == "stage" else \
            rows[c] if c in rows.column_names else pa.nulls(n, pa.string())
        if col.type != pa.string() and col.type != pa.dictionary(pa.int32(), pa.string()):
            col = pc.cast(col, pa.string())
        cols[c] = col
    # A constant column goes to the writer as a one-entry dictionary.
    constants = {c: constant_value(cols[c]) for c in LEDGER_DICTIONARY_COLUMNS}
    for c, value in constants.items():
        if value is not None and not pa.types.is_dictionary(cols[c].type):
            cols[c] = _repeat_dictionary(value, n)
    source, reason = constants["source"], constants[DROP_REASON]
    if source is not None and reason is not None:  # the usual batch: one source, one reason
        counts = [{"source": source, "reason": reason.split(":", 1)[0], "count_all": n}]
    else:
        per_reason = pa.table({"source": pc.cast(cols["source"], pa.string()),
                               "reason": pc.cast(cols[DROP_REASON], pa.string())}).group_by(
            ["source", "reason"]).aggregate([([], "count_all")])
        # near_dup_of:<id> -> near_dup_of, on the groups rather than on every row
        reasons = pc.replace_substring_regex(per_reason["reason"], ":.*", "")
        counts = pa.table({"source": per_reason["source"], "reason": reasons, "n": per_reason["count_all"]}).group_by(
            ["source", "reason"]).aggregate([("n", "sum")]).rename_columns(["source", "reason", "count_all"]).to_pylist()
    # Columns without nulls are declared so: the writer then skips their definition levels.
    table = pa.Table.from_arrays(list(cols.values()), schema=pa.schema(
        [pa.field(c, v.type, nullable=bool(v.null_count)) for c, v in cols.items()]))
    buf = io.BytesIO()
    # store_schema=False: dictionary columns read back as plain strings, like every other ledger file's.
    # One-value and all-null columns are a few bytes of RLE: compressing them only costs time.
    compression = {c: "none" if pa.types.is_dictionary(cols[c].type) or cols[c].null_count == n
                   else LEDGER_COMPRESSION for c in LEDGER_COLUMNS}
    with pq.ParquetWriter(buf, table.schema, compression=compression, use_dictionary=LEDGER_DICTIONARY_COLUMNS,
                          write_statistics=False, store_schema=False) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({LEDGER_COUNTS: json.dumps(counts)})
    storage.write_atomic(join(output, "ledger", stage, f"{key}.parquet"), buf.getvalue())
    for c in counts:
        metrics.count("rs5m_rows_dropped", c["count_all"], stage=stage, source=c["source"] or "", reason=c["reason"])


def ledger_counts(storage: Storage, output: str) -> list[dict]:
    """(stage, source, reason, count) of every ledger file, from the footers alone."""
    counts = []
    for path in storage.glob(join(output, "ledger", "**", "*.parquet")):
        with storage.open(path) as f:
            meta = pq.read_schema(f).metadata or {}
        stage = path.rstrip("/").split("/")[-2]
        counts += [{"stage": stage, **c} for c in json.loads(meta[LEDGER_COUNTS.encode()])]
    return counts


def write_stats(storage: Storage, output: str, stage: str, key: str, batch: pa.Table,
                out: pa.Table, seconds: float, source: str | None = None, started: float | None = None) -> None:
    """Rows in and out per source; `source`: the batch's one source, when known."""
    if source is not None:
        rows_in, rows_out = {source: len(batch)}, {source: len(out)}
    else:
        rows_in, rows_out = _count_by_source(batch), _count_by_source(out)
    write_counts(storage, output, stage, key, rows_in, rows_out, seconds, started)


def write_counts(storage: Storage, output: str, stage: str, key: str, rows_in: dict[str, int],
                 rows_out: dict[str, int], seconds: float, started: float | None = None) -> None:
    """`stats/<stage>/<key>.parquet`: rows in and out per source, the stage's seconds shared by rows, the
    wall-clock span (`started`, default: `seconds` before now) and the node."""
    sources = sorted(rows_in)
    total = max(sum(rows_in.values()), 1)
    finished = time.time()
    started = finished - seconds if started is None else started
    table = pa.table({
        "stage": [stage] * len(sources),
        "source": sources,
        "rows_in": [rows_in[s] for s in sources],
        "rows_out": [rows_out.get(s, 0) for s in sources],
        "seconds": [seconds * rows_in[s] / total for s in sources],
        "started": [started] * len(sources),
        "finished": [finished] * len(sources),
        "node": [_node()] * len(sources),
    }, schema=STATS_SCHEMA)
    write_parquet(storage, join(output, "stats", stage, f"{key}.parquet"), table)
    for s in sources:
        metrics.count("rs5m_rows_in", rows_in[s], stage=stage, source=s)
        metrics.count("rs5m_rows_out", rows_out.get(s, 0), stage=stage, source=s)
    metrics.observe("rs5m_stage_seconds", seconds, stage=stage)


def _node() -> str:
    """The Ray node this runs on (its id), or the host name outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


def _count_by_source(table: pa.Table) -> dict[str, int]:
    if len(table) == 0:
        return {}
    source = constant_value(table["source"])
    if source is not None:
        return {source: len(table)}
    counts = pc.value_counts(table["source"])
    return {v["values"].as_py(): v["counts"].as_py() for v in counts}


def write_parquet(storage: Storage, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_atomic(path, buf.getvalue())


def read_parquet_dir(storage: Storage, path: str) -> pa.Table | None:
    """All parquet files below `path` as one table, or None if there are none."""
    files = storage.glob(join(path, "**", "*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in files],
                            promote_options="permissive")


class PartAccount:
    """Ledger and counts of one stage over one part, written once under the part's name, so a
    redone part overwrites its own files instead of adding to them."""

    def __init__(self, stage: str, output: str, storage: Storage):
        self.stage, self.output, self.storage = stage, output, storage
        self.gone: list[pa.Table] = []
        self.rows_in: Counter = Counter()
        self.rows_out: Counter = Counter()
        self.seconds = 0.0
        self.started: float | None = None

    def add(self, batch: pa.Table, result: pa.Table, seconds: float) -> pa.Table:
        """Account `result` (the stage's marks on `batch`); return its kept rows."""
        result = ensure_drop_columns(result)
        out, gone = kept(result), dropped(result)
        if self.started is None:
            self.started = time.time() - seconds
        self.rows_in.update(_count_by_source(batch))
        self.rows_out.update(_count_by_source(out))
        self.seconds += seconds
        if len(gone):
            self.gone.append(gone.select([c for c in LIGHT_LEDGER_COLUMNS + [DROP_REASON, DROP_DETAIL]
                                          if c in gone.column_names]))
        return out.drop_columns([DROP_REASON, DROP_DETAIL])

    def commit(self, part: str) -> dict:
        if self.gone:
            write_ledger(self.storage, self.output, self.stage, part,
                         pa.concat_tables(self.gone, promote_options="permissive"))
        write_counts(self.storage, self.output, self.stage, part, self.rows_in, self.rows_out, self.seconds,
                     self.started)
        return {"rows_in": sum(self.rows_in.values()), "rows_out": sum(self.rows_out.values())}
