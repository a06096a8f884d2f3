"""The PUB11 path: three phases over one staging area (`harness`), each resumable.

1. metadata (one Ray Data job over billions of rows, done once):
   ingest -> keyword filter -> hash-partition on URL into parts -> URL dedup inside each
   part -> staging/candidates/<part>.parquet.
2. parts (one streaming job, actor pools, part by part, done parts skipped on reruns):
   download + decode/validate (+pHash) -> staging/images; CLIP image pass -> staging/scores.
   A part is scored as soon as it is downloaded, while other parts download.
3. global (light columns only: ids, hashes, embeddings, scores; recomputed by every run):
   pHash near-dup -> embedding near-dup -> quantile thresholds -> accounted shard writer,
   which streams the image bytes from staging/images; then the report.

Scoring before the near-dup joins spends GPU time on rows that later turn out to be
near-duplicates (a few percent), and buys an image pass that never waits for the whole
download: the report's timeline shows how much the two overlapped.
"""
from __future__ import annotations

from functools import partial

import pyarrow as pa
import ray
import ray.data

from rs5m_ray.config import ConfigError, PipelineConfig
from rs5m_ray.dedup_index import index_for
from rs5m_ray.ledger import Accounted, write_parquet
from rs5m_ray.pipelines.harness import (CANDIDATES, PART, Staging, claim_output, part_name, timeline,
                                        write_shards)
from rs5m_ray.pipelines.harness import light_rows as staged_light_rows
from rs5m_ray.pipelines.parts import IMAGES, SCORES, FetchPart, ScorePart
from rs5m_ray.ray_runtime import init_ray
from rs5m_ray.report import build_report
from rs5m_ray.sources.adapters import ADAPTERS
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.stages.embedding_dedup import apply_embedding_dedup
from rs5m_ray.stages.host_limits import start_host_limits, stop_host_limits
from rs5m_ray.stages.keep_rule import KeepRule
from rs5m_ray.stages.keyword_filter import KeywordFilter
from rs5m_ray.stages.near_dup import apply_phash_dedup
from rs5m_ray.stages.quantile import apply_quantile_filter
from rs5m_ray.stages.url_dedup import BUCKET, add_url_bucket, dedup_urls
from rs5m_ray.storage import Storage, join

METADATA_STAGES = ["ingest", "keyword_filter", "url_dedup"]
PART_STAGES = ["download", "decode", "clip_score"]
GLOBAL_STAGES = ["phash_dedup", "embedding_dedup", "quantile_filter", "shard_writer"]
STAGES = METADATA_STAGES + PART_STAGES + GLOBAL_STAGES
# Outputs of the metadata phase: removed only while that phase is unfinished.
METADATA_OUTPUTS = [f"{d}/{s}" for d in ("ledger", "stats") for s in METADATA_STAGES] + ["keyword_hits", "errors"]
# Outputs every run recomputes from the staging.
GLOBAL_OUTPUTS = ([f"{d}/{s}" for d in ("ledger", "stats") for s in GLOBAL_STAGES]
                  + ["quantile_filter.json", "report.json", "report.png", "shards/manifest.json"])


class WriteCandidates:
    """map_groups function: one URL bucket = one part. URL dedup inside it, then the part's
    candidates are committed in sample_id order."""

    __name__ = "write_candidates"

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        self.staging, self.storage = Staging(cfg.output, storage), storage
        rule = KeepRule.from_config(cfg.near_dup)
        self.dedup = Accounted("url_dedup", cfg.output, storage, partial(dedup_urls, rule=rule)) \
            if cfg.url_dedup.enabled else None

    def __call__(self, rows: pa.Table) -> pa.Table:
        part = part_name(rows[BUCKET][0].as_py())
        rows = self.dedup(rows) if self.dedup else rows.drop_columns([BUCKET])
        write_parquet(self.storage, self.staging.path(CANDIDATES, part), rows.sort_by("sample_id"))
        return pa.table({PART: [part], "rows": [len(rows)]})


def metadata_phase(cfg: PipelineConfig, storage: Storage, staging: Staging) -> list[str]:
    """The candidate parts: from the staging when this phase is done, else computed now."""
    parts = staging.candidate_parts()
    if parts is not None:
        return parts
    for name in METADATA_OUTPUTS:
        storage.remove(join(cfg.output, name))
    staging.reset_candidates()
    return write_candidates(ingested(cfg, storage), cfg, storage, staging)


def ingested(cfg: PipelineConfig, storage: Storage) -> ray.data.Dataset:
    """Canonical rows of every input file (one file per task, streamed batch by batch)."""
    files = list_inputs(cfg.ingest, storage)
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    return ds.map_batches(IngestFiles(cfg.ingest, cfg.output, storage), batch_size=1, batch_format="pyarrow")


def write_candidates(ds: ray.data.Dataset, cfg: PipelineConfig, storage: Storage, staging: Staging) -> list[str]:
    """Keyword filter, then rows hash-partitioned on URL into parts, URL dedup inside each part."""
    if cfg.keyword.enabled:
        ds = ds.map_batches(Accounted("keyword_filter", cfg.output, storage,
                                      KeywordFilter(cfg.keyword.keywords, cfg.output, storage)),
                            batch_format="pyarrow")
    n = cfg.parts.num_parts
    written = (ds.map_batches(add_url_bucket, fn_kwargs={"num_partitions": n}, batch_format="pyarrow")
               .groupby(BUCKET, num_partitions=n)
               .map_groups(WriteCandidates(cfg, storage), batch_format="pyarrow")
               .take_all())
    parts = sorted(r[PART] for r in written)
    staging.finish_candidates(parts)
    return parts


def parts_phase(cfg: PipelineConfig, storage: Storage, parts: list[str]) -> None:
    """Download + decode, then the CLIP pass, part by part, streaming; done parts are skipped."""
    if not parts:
        return
    dl, sc = cfg.download, cfg.scoring
    host_limits = start_host_limits(dl)
    try:
        ds = ray.data.from_items([{PART: p} for p in parts], override_num_blocks=len(parts))
        ds = ds.map_batches(FetchPart, fn_constructor_args=(cfg, storage, host_limits), batch_size=1,
                            batch_format="pyarrow", num_cpus=dl.num_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=dl.min_actors, max_size=dl.max_actors))
        if sc.enabled:
            ds = ds.map_batches(ScorePart, fn_constructor_args=(cfg, storage), batch_size=1,
                                batch_format="pyarrow", num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None,
                                compute=ray.data.ActorPoolStrategy(min_size=sc.min_actors, max_size=sc.max_actors))
        ds.take_all()
    finally:
        stop_host_limits(host_limits)


def light_rows(cfg: PipelineConfig, storage: Storage, staging: Staging) -> ray.data.Dataset | None:
    """Every staged row without its image bytes (the scores when scoring ran), or None if none."""
    return staged_light_rows(storage, staging, SCORES if cfg.scoring.enabled else IMAGES)


def global_phase(cfg: PipelineConfig, storage: Storage, staging: Staging, ds: ray.data.Dataset | None) -> dict:
    extra: dict = {}
    index = index_for(cfg.near_dup, cfg.output, storage)
    if ds is not None:
        if cfg.near_dup.phash_enabled:
            ds = apply_phash_dedup(ds, cfg.near_dup, cfg.output, storage, index)
        if cfg.scoring.enabled:
            if cfg.near_dup.embedding_enabled:
                ds = apply_embedding_dedup(ds, cfg.near_dup, cfg.output, storage, index)
            ds, extra["quantile_filter"] = apply_quantile_filter(ds, cfg.scoring, cfg.output, storage)
        if index is None and "image_embedding" in ds.columns():
            ds = ds.drop_columns(["image_embedding"])  # the shuffle carries only what the writer uses
        ds = ds.materialize()
    extra["shard_run"] = write_shards(ds, cfg.output, storage, cfg.shards, staging, IMAGES, index)
    return extra


def check(cfg: PipelineConfig) -> None:
    """What load-time validation cannot know: cross-section needs and the known sources."""
    if cfg.scoring.enabled and not cfg.scoring.detector_checkpoint:
        raise ConfigError("scoring.detector_checkpoint is required (train one with `rs5m train-detector`)")
    if cfg.near_dup.phash_enabled and not cfg.decode.phash:
        raise ConfigError("near_dup.phash_enabled needs decode.phash (the hash is computed in the decode pass)")
    if cfg.near_dup.embedding_enabled and not cfg.scoring.enabled:
        raise ConfigError("near_dup.embedding_enabled needs scoring.enabled (embeddings come from the CLIP pass)")
    if not cfg.ingest.sources:
        raise ConfigError("ingest.sources: no sources given")
    for i, source in enumerate(cfg.ingest.sources):
        if source.name not in ADAPTERS:
            raise ConfigError(f"ingest.sources[{i}].name: unknown source {source.name!r}; known: {sorted(ADAPTERS)}")


def run(cfg: PipelineConfig) -> dict:
    check(cfg)
    storage = Storage(cfg.storage)
    staging = Staging(cfg.output, storage)
    if staging.candidate_parts() is None:
        list_inputs(cfg.ingest, storage)  # inputs exist before the output is claimed or Ray starts
    claim_output(cfg, storage, GLOBAL_OUTPUTS)
    init_ray(cfg.ray)
    parts = metadata_phase(cfg, storage, staging)
    parts_phase(cfg, storage, parts)
    extra = global_phase(cfg, storage, staging, light_rows(cfg, storage, staging))
    extra["timeline"] = timeline(staging, [IMAGES, SCORES] if cfg.scoring.enabled else [IMAGES])
    return build_report(cfg.output, storage, STAGES, join(cfg.output, "shards"), extra=extra)
