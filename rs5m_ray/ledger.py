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
import time
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray.storage import Storage, join

DROP_REASON = "drop_reason"
DROP_DETAIL = "drop_detail"
LEDGER_COUNTS = "rs5m_ledger_counts"
LEDGER_COLUMNS = ["sample_id", "source", "url", "caption", "stage", DROP_REASON, DROP_DETAIL]
# What a part-level stage keeps of a dropped row besides its drop reason (not its image bytes).
LIGHT_LEDGER_COLUMNS = ["sample_id", "source", "url", "caption"]
STATS_SCHEMA = pa.schema(
    [("stage", pa.string()), ("source", pa.string()), ("rows_in", pa.int64()),
     ("rows_out", pa.int64()), ("seconds", pa.float64())]
)


def mark_dropped(table: pa.Table, mask: pa.Array, reason: str | pa.Array, detail: Any = None) -> pa.Table:
    """Set drop_reason (and detail) where `mask` is true and the row is not dropped yet."""
    table = ensure_drop_columns(table)
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
    return table.filter(pc.is_null(table[DROP_REASON]))


def dropped(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table[DROP_REASON]))


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
        start = time.perf_counter()
        result = self.stage(batch)
        return self.account(batch, result, time.perf_counter() - start)

    def account(self, batch: pa.Table, result: pa.Table, seconds: float) -> pa.Table:
        """Ledger the dropped rows of `result` (the stage's output for `batch`); return the kept ones."""
        result = ensure_drop_columns(result)
        if len(result) != len(batch):
            raise RuntimeError(f"stage {self.stage_name} returned {len(result)} rows for {len(batch)}: "
                               "stages must mark drops, not remove rows")
        key = batch_key(batch)
        out = kept(result)
        gone = dropped(result)
        if len(gone):
            write_ledger(self.storage, self.output, self.stage_name, key, gone)
        write_stats(self.storage, self.output, self.stage_name, key, batch, out, seconds)
        return out.drop_columns([DROP_REASON, DROP_DETAIL])


def write_ledger(storage: Storage, output: str, stage: str, key: str, rows: pa.Table) -> None:
    """Dropped rows, with their counts per source and reason in the file footer (the report
    reads only footers: a keyword stage's ledger holds nearly every input row)."""
    n = len(rows)
    cols = {c: rows[c] if c in rows.column_names else pa.nulls(n, pa.string()) for c in LEDGER_COLUMNS if c != "stage"}
    cols["stage"] = pa.repeat(stage, n)
    table = pa.table({c: pc.cast(cols[c], pa.string()) for c in LEDGER_COLUMNS})
    per_reason = pa.table({"source": table["source"], "reason": table[DROP_REASON]}).group_by(
        ["source", "reason"]).aggregate([([], "count_all")])
    # near_dup_of:<id> -> near_dup_of, on the groups rather than on every row
    reasons = pc.replace_substring_regex(per_reason["reason"], ":.*", "")
    counts = pa.table({"source": per_reason["source"], "reason": reasons, "n": per_reason["count_all"]}).group_by(
        ["source", "reason"]).aggregate([("n", "sum")]).rename_columns(["source", "reason", "count_all"]).to_pylist()
    table = table.replace_schema_metadata({LEDGER_COUNTS: json.dumps(counts)})
    write_parquet(storage, join(output, "ledger", stage, f"{key}.parquet"), table)


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
                out: pa.Table, seconds: float) -> None:
    rows_in = _count_by_source(batch)
    rows_out = _count_by_source(out)
    sources = sorted(rows_in)
    total = max(len(batch), 1)
    table = pa.table({
        "stage": [stage] * len(sources),
        "source": sources,
        "rows_in": [rows_in[s] for s in sources],
        "rows_out": [rows_out.get(s, 0) for s in sources],
        "seconds": [seconds * rows_in[s] / total for s in sources],
    }, schema=STATS_SCHEMA)
    write_parquet(storage, join(output, "stats", stage, f"{key}.parquet"), table)


def _count_by_source(table: pa.Table) -> dict[str, int]:
    if len(table) == 0:
        return {}
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

    def add(self, batch: pa.Table, result: pa.Table, seconds: float) -> pa.Table:
        """Account `result` (the stage's marks on `batch`); return its kept rows."""
        result = ensure_drop_columns(result)
        out, gone = kept(result), dropped(result)
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
        sources = sorted(self.rows_in)
        total = max(sum(self.rows_in.values()), 1)
        write_parquet(self.storage, join(self.output, "stats", self.stage, f"{part}.parquet"), pa.table({
            "stage": [self.stage] * len(sources), "source": sources,
            "rows_in": [self.rows_in[s] for s in sources], "rows_out": [self.rows_out[s] for s in sources],
            "seconds": [self.seconds * self.rows_in[s] / total for s in sources]}, schema=STATS_SCHEMA))
        return {"rows_in": sum(self.rows_in.values()), "rows_out": sum(self.rows_out.values())}
