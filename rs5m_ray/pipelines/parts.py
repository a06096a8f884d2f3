"""Part-level workers: each call takes whole parts, reads one phase of the staging and
commits the next (kept rows, ledger, counts, then the done-marker). A part already
marked done is skipped, so a rerun redoes only the parts a failure interrupted.

    candidates --FetchPart--> images (jpg + metadata, sorted and row-grouped by shard)
    images     --ScorePart--> scores (light: metadata + s_i, c_i, embedding; no image bytes)
    images   --CaptionPart--> captions (RS3, light: metadata + candidates, scores, final caption)

Both run as Ray Data actor pools over the part list, one after the other in one
streaming job: a part is scored as soon as it is downloaded, while others download.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from rs5m_ray.config import PipelineConfig, Rs3Config, ShardConfig
from rs5m_ray.ledger import PartAccount, run_stage
from rs5m_ray.pipelines.harness import CANDIDATES, PART, Staging, timed
from rs5m_ray.shards.writer import layout_rows, row_group_slices
from rs5m_ray.sources.labeled import ReadLabeled
from rs5m_ray.stages.decode import DecodeStage
from rs5m_ray.stages.download import DownloadStage
from rs5m_ray.storage import Storage

IMAGES = "images"
SCORES = "scores"
CAPTIONS = "captions"
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


def stage_images(storage: Storage, staging: Staging, shards: ShardConfig, part: str, kept: list[pa.Table]) -> int:
    """Commit a part's kept image rows to staging/images, sorted and row-grouped by shard; their count."""
    rows = pa.concat_tables(kept) if kept else None
    if rows is None or len(rows) == 0:
        return 0
    rows = rows.append_column(PART, pa.array([part] * len(rows), pa.string()))
    write_part(storage, staging.path(IMAGES, part), layout_rows(rows, shards))
    return len(rows)


def stage_fetched(output: str, storage: Storage, shards: ShardConfig, parts: dict[str, pa.Table]) -> None:
    """Stage image rows fetched elsewhere (sample_id, source, jpg, ...) as done parts of the images
    phase, as FetchPart stages them: what the part phases after it read (a benchmark's inputs, tests)."""
    staging = Staging(output, storage)
    for part, rows in parts.items():
        started = time.time()
        staged = stage_images(storage, staging, shards, part, [rows])
        staging.mark_done(IMAGES, part, timed({"candidates": len(rows), "rows": staged}, started))


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
        staged = stage_images(self.storage, self.staging, self.cfg.shards, part, kept)
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

    @staticmethod
    def _timed(stage, batch: pa.Table) -> tuple[pa.Table, float]:
        start = time.perf_counter()
        return stage(batch), time.perf_counter() - start


class ScorePart:
    """The CLIP image pass over whole staged parts, `scoring.batch_size` rows at a time; stages the light rows."""

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        from rs5m_ray.stages.clip_score import ClipScore  # here, so torch stays out of the fetch actors

        self.cfg, self.storage = cfg, storage
        self.stage = ClipScore(cfg.scoring, storage)

    def __call__(self, items: pa.Table) -> pa.Table:
        parts, rows = items[PART].to_pylist(), items["rows"].to_pylist()
        return summary(parts, [self.score(p) if n else 0 for p, n in zip(parts, rows)])

    def score(self, part: str) -> int:
        return stage_light_part(self.stage, "clip_score", self.cfg.output, self.storage, IMAGES, SCORES, part,
                                self.cfg.scoring.batch_size)


def stage_light_part(stage, stage_name: str, output: str, storage: Storage, source: str, phase: str,
                     part: str, batch_rows: int) -> int:
    """Run `stage` over staging/<source>/<part> in batches of `batch_rows` rows (read across the part's row
    groups, which follow its shards: a part spread over many shards has row groups of a few rows, too few
    for a forward pass); commit the kept rows without their image bytes to staging/<phase>/<part>, the
    ledger and counts, then the done-marker."""
    staging = Staging(output, storage)
    done = staging.marker(phase, part)
    if done is not None:
        return done["rows"]
    started = time.time()
    account = PartAccount(stage_name, output, storage)
    light = []
    with storage.open(staging.path(source, part)) as f:
        for records in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            batch = pa.Table.from_batches([records])
            start = time.perf_counter()
            result = run_stage(stage, batch, stage_name)
            light.append(account.add(batch, result, time.perf_counter() - start).drop_columns(["jpg"]))
    rows = pa.concat_tables(light)
    if len(rows):
        pq.write_table(rows, scratch := storage.scratch_path(staging.path(phase, part)), compression="zstd")
        storage.commit_file(scratch, staging.path(phase, part))
    staging.mark_done(phase, part, timed({stage_name: account.commit(part), "rows": len(rows)}, started))
    return len(rows)


class CaptionPart:
    """RS3: candidates, ranking and the final caption (`stages.caption`) over whole staged parts of
    `previous` (with `jpg`), `caption.batch_size` rows at a time; stages the light rows in `CAPTIONS`."""

    def __init__(self, cfg: Rs3Config, storage: Storage, previous: str):
        from rs5m_ray.stages.caption import CaptionStage  # here, so torch stays out of the reading actors

        self.cfg, self.storage, self.previous = cfg, storage, previous
        self.stage = CaptionStage(cfg.caption, cfg.caption_rank, storage)

    def __call__(self, items: pa.Table) -> pa.Table:
        parts, rows = items[PART].to_pylist(), items["rows"].to_pylist()
        return summary(parts, [stage_light_part(self.stage, "caption", self.cfg.output, self.storage, self.previous,
                                                CAPTIONS, p, self.cfg.caption.batch_size) if n else 0
                               for p, n in zip(parts, rows)])


class ReadLabeledPart:
    """RS3: read whole parts of label-source samples (image + metadata, `sources.labeled`) and validate
    them (`DecodeStage`); stage the kept images sorted and row-grouped by shard. Ledger stages
    `ingest` (unreadable files) and `decode`."""

    def __init__(self, cfg: Rs3Config, storage: Storage):
        self.cfg, self.storage = cfg, storage
        self.staging = Staging(cfg.output, storage)
        self.read = ReadLabeled(storage, cfg.rgb, cfg.read.threads)
        self.decode = DecodeStage(cfg.decode)

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
        reads = PartAccount("ingest", self.cfg.output, self.storage)
        decodes = PartAccount("decode", self.cfg.output, self.storage)
        step = 4 * self.cfg.read.threads
        kept = []
        for batch in (rows.slice(i, step) for i in range(0, len(rows), step)):
            start = time.perf_counter()
            got = reads.add(batch, self.read(batch), time.perf_counter() - start)
            if len(got):
                start = time.perf_counter()
                kept.append(decodes.add(got, self.decode(got), time.perf_counter() - start))
        staged = stage_images(self.storage, self.staging, self.cfg.shards, part, kept)
        info = {"candidates": len(rows), "ingest": reads.commit(part), "decode": decodes.commit(part)}
        self.staging.mark_done(IMAGES, part, timed({**info, "rows": staged}, started))
        return staged
