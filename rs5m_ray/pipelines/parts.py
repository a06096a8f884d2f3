"""Part-level workers: each call takes whole parts, reads one phase of the staging and
commits the next (kept rows, ledger, counts, then the done-marker). A part already
marked done is skipped, so a rerun redoes only the parts a failure interrupted.

    candidates --FetchPart--> images (jpg + metadata, sorted and row-grouped by shard)
    images     --ScorePart--> scores (light: metadata + s_i, c_i, embedding; no image bytes)

Both run as Ray Data actor pools over the part list, one after the other in one
streaming job: a part is scored as soon as it is downloaded, while others download.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from rs5m_ray.config import PipelineConfig
from rs5m_ray.ledger import PartAccount
from rs5m_ray.pipelines.harness import CANDIDATES, PART, Staging, timed
from rs5m_ray.shards.writer import layout_rows, row_group_slices
from rs5m_ray.stages.decode import DecodeStage
from rs5m_ray.stages.download import DownloadStage
from rs5m_ray.storage import Storage

IMAGES = "images"
SCORES = "scores"
SUMMARY = pa.schema([(PART, pa.string()), ("rows", pa.int64())])


def write_part(storage: Storage, path: str, table: pa.Table) -> None:
    """A staged part, one parquet row group per `row_group` of `table`, built in a scratch file."""
    scratch = storage.scratch_path(path)
    # JPEG bytes do not compress: zstd only on the other columns.
    compression = {name: "none" if name == "jpg" else "zstd" for name in table.column_names}
    with pq.ParquetWriter(scratch, table.schema, compression=compression) as writer:
        for offset, length in row_group_slices(table):
            writer.write_table(table.slice(offset, length), row_group_size=length)
    storage.commit_file(scratch, path)


def summary(parts: list[str], rows: list[int]) -> pa.Table:
    return pa.table([parts, rows], schema=SUMMARY)


class FetchPart:
    """Download and decode whole parts; stage the kept images sorted and row-grouped by shard.

    Downloads run on the process's event loop (at most `concurrency_per_task` in flight, a
    few slices queued so a slow request never idles the connections); each slice is decoded
    in `decode.threads` threads as soon as it arrives, while later slices download.
    """

    def __init__(self, cfg: PipelineConfig, storage: Storage, host_limits: str | None):
        self.cfg, self.storage = cfg, storage
        self.staging = Staging(cfg.output, storage)
        self.download = DownloadStage(cfg.download, storage, host_limits)
        self.decode = DecodeStage(cfg.decode)
        self.fetchers = ThreadPoolExecutor(3, thread_name_prefix="fetch")
        self.decoders = ThreadPoolExecutor(max(1, cfg.decode.threads), thread_name_prefix="decode")

    def __call__(self, items: pa.Table) -> pa.Table:
        parts = items[PART].to_pylist()
        return summary(parts, [self.fetch(p) for p in parts])

    def fetch(self, part: str) -> int:
        done = self.staging.marker(IMAGES, part)
        if done is not None:
            return done["rows"]
        started = time.time()
        with self.storage.open(self.staging.path(CANDIDATES, part)) as f:
            rows = pq.read_table(f)
        downloads = PartAccount("download", self.cfg.output, self.storage)
        decodes = PartAccount("decode", self.cfg.output, self.storage)
        step = max(1, self.cfg.download.concurrency_per_task)
        slices = [rows.slice(i, step) for i in range(0, len(rows), step)]
        fetched = [self.fetchers.submit(self._timed, self.download, s) for s in slices]
        kept = []
        for batch, future in zip(slices, fetched):
            result, seconds = future.result()
            got = downloads.add(batch, result, seconds)
            if len(got):
                kept.append(self._decode(got, decodes))
        staged = self._stage(part, kept)
        info = {"candidates": len(rows), "download": downloads.commit(part), "decode": decodes.commit(part)}
        self.staging.mark_done(IMAGES, part, timed({**info, "rows": staged}, started))
        return staged

    def _decode(self, batch: pa.Table, account: PartAccount) -> pa.Table:
        threads = max(1, self.cfg.decode.threads)
        size = -(-len(batch) // threads)
        pieces = [batch.slice(i, size) for i in range(0, len(batch), size)]
        results = list(self.decoders.map(lambda piece: self._timed(self.decode, piece), pieces))
        return pa.concat_tables([account.add(piece, result, seconds)
                                 for piece, (result, seconds) in zip(pieces, results)])

    def _stage(self, part: str, kept: list[pa.Table]) -> int:
        rows = pa.concat_tables(kept) if kept else None
        if rows is None or len(rows) == 0:
            return 0
        rows = rows.append_column(PART, pa.array([part] * len(rows), pa.string()))
        write_part(self.storage, self.staging.path(IMAGES, part), layout_rows(rows, self.cfg.shards))
        return len(rows)

    @staticmethod
    def _timed(stage, batch: pa.Table) -> tuple[pa.Table, float]:
        start = time.perf_counter()
        return stage(batch), time.perf_counter() - start


class ScorePart:
    """The CLIP image pass over whole staged parts, one row group at a time; stages the light rows."""

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        from rs5m_ray.stages.clip_score import ClipScore  # here, so torch stays out of the fetch actors

        self.cfg, self.storage = cfg, storage
        self.staging = Staging(cfg.output, storage)
        self.stage = ClipScore(cfg.scoring, storage)

    def __call__(self, items: pa.Table) -> pa.Table:
        parts, rows = items[PART].to_pylist(), items["rows"].to_pylist()
        return summary(parts, [self.score(p) if n else 0 for p, n in zip(parts, rows)])

    def score(self, part: str) -> int:
        done = self.staging.marker(SCORES, part)
        if done is not None:
            return done["rows"]
        started = time.time()
        account = PartAccount("clip_score", self.cfg.output, self.storage)
        light = []
        with self.storage.open(self.staging.path(IMAGES, part)) as f:
            staged = pq.ParquetFile(f)
            for group in range(staged.num_row_groups):
                batch = staged.read_row_group(group)
                start = time.perf_counter()
                result = self.stage(batch)
                light.append(account.add(batch, result, time.perf_counter() - start).drop_columns(["jpg"]))
        rows = pa.concat_tables(light)
        if len(rows):
            pq.write_table(rows, scratch := self.storage.scratch_path(self.staging.path(SCORES, part)),
                           compression="zstd")
            self.storage.commit_file(scratch, self.staging.path(SCORES, part))
        self.staging.mark_done(SCORES, part, timed({"clip_score": account.commit(part), "rows": len(rows)},
                                                   started))
        return len(rows)
