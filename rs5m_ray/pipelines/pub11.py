"""The PUB11 path as one streaming Ray Data job.

ingest -> keyword filter -> URL dedup -> download -> decode/validate (+pHash)
-> pHash near-dup -> CLIP image pass (s_i, c_i, embedding) -> embedding near-dup
-> global quantile thresholds -> pub11-*.tar shards, ledger, report.
"""
from __future__ import annotations

import json

import ray
import ray.data

from rs5m_ray.config import ConfigError, PipelineConfig, to_dict
from rs5m_ray.ledger import Accounted
from rs5m_ray.dedup_index import index_for
from rs5m_ray.ray_runtime import init_ray
from rs5m_ray.report import build_report
from rs5m_ray.shards.writer import SHARD, ShardWriter, assign_shards, shard_counts, write_manifest
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.stages.clip_score import score_images
from rs5m_ray.stages.decode import DecodeStage
from rs5m_ray.stages.download import DownloadStage
from rs5m_ray.stages.host_limits import start_host_limits, stop_host_limits
from rs5m_ray.stages.keyword_filter import KeywordFilter
from rs5m_ray.stages.embedding_dedup import apply_embedding_dedup
from rs5m_ray.stages.near_dup import apply_phash_dedup
from rs5m_ray.stages.quantile import apply_quantile_filter
from rs5m_ray.stages.url_dedup import BUCKET, add_url_bucket, dedup_urls
from rs5m_ray.storage import Storage, join

# Everything a run writes besides its shards: recomputed whole by every (re)run.
SIDE_OUTPUTS = ("ledger", "stats", "keyword_hits", "errors", "quantile_filter.json", "report.json", "report.png")


def claim_output(cfg: PipelineConfig, storage: Storage) -> None:
    """A run directory belongs to one configuration: a rerun recomputes every stage (complete
    shards are kept and skipped) and rewrites the side outputs; another config would mix them."""
    path = join(cfg.output, "run_config.json")
    mine = json.dumps(to_dict(cfg), sort_keys=True, indent=1)
    if storage.exists(path):
        theirs = storage.read_bytes(path).decode()
        if theirs != mine:
            raise ValueError(f"{cfg.output} holds a run with a different configuration; "
                             "resume with the same config or choose another output")
        for name in SIDE_OUTPUTS:
            storage.remove(join(cfg.output, name))
        return
    storage.write_atomic(path, mine.encode())


def metadata_stages(ds: ray.data.Dataset, cfg: PipelineConfig, storage: Storage) -> ray.data.Dataset:
    """Keyword filter and global URL dedup: cheap, vectorised, on billions of rows."""
    out = cfg.output
    if cfg.keyword.enabled:
        ds = ds.map_batches(Accounted("keyword_filter", out, storage,
                                      KeywordFilter(cfg.keyword.keywords, out, storage)),
                            batch_format="pyarrow")
    if cfg.url_dedup.enabled:
        parts = cfg.url_dedup.num_partitions
        ds = (ds.map_batches(add_url_bucket, fn_kwargs={"num_partitions": parts}, batch_format="pyarrow")
              .groupby(BUCKET, num_partitions=parts)
              .map_groups(Accounted("url_dedup", out, storage, dedup_urls), batch_format="pyarrow"))
    return ds


def image_stages(ds: ray.data.Dataset, cfg: PipelineConfig, storage: Storage, host_limits: str | None
                 ) -> ray.data.Dataset:
    """Download (actor pool, cluster-wide host limits), then decode/validate (+pHash) as tasks."""
    out, dl = cfg.output, cfg.download
    ds = ds.map_batches(Accounted, batch_format="pyarrow", batch_size=dl.batch_size, num_cpus=dl.num_cpus,
                        compute=ray.data.ActorPoolStrategy(min_size=dl.min_actors, max_size=dl.max_actors),
                        fn_constructor_kwargs=dict(stage_name="download", output=out, storage=storage,
                                                   stage=DownloadStage, stage_args=(dl, storage, host_limits)))
    return ds.map_batches(Accounted("decode", out, storage, DecodeStage(cfg.decode)), batch_format="pyarrow",
                          batch_size=cfg.decode.batch_size)


def write_shards(ds: ray.data.Dataset, cfg: PipelineConfig, storage: Storage) -> dict:
    shards_dir = join(cfg.output, "shards")
    storage.makedirs(shards_dir)
    ds = ds.materialize()
    counts = shard_counts(ds.count(), cfg.shards)
    summary = (ds.map_batches(assign_shards, fn_kwargs={"cfg": cfg.shards, "counts": counts},
                              batch_format="pyarrow")
               .groupby(SHARD)
               .map_groups(ShardWriter(shards_dir, storage), batch_format="pyarrow")
               .to_pandas())
    manifest = write_manifest(shards_dir, storage)
    return {"written": int((summary["status"] == "written").sum()),
            "skipped": int((summary["status"] == "skipped").sum()), "samples": manifest["samples"]}


STAGES = ["ingest", "keyword_filter", "url_dedup", "download", "decode", "phash_dedup", "clip_score",
          "embedding_dedup", "quantile_filter"]


def check(cfg: PipelineConfig) -> None:
    if cfg.scoring.enabled and not cfg.scoring.detector_checkpoint:
        raise ConfigError("scoring.detector_checkpoint is required (train one with `rs5m train-detector`)")
    if cfg.near_dup.phash_enabled and not cfg.decode.phash:
        raise ConfigError("near_dup.phash_enabled needs decode.phash (the hash is computed in the decode pass)")
    if cfg.near_dup.embedding_enabled and not cfg.scoring.enabled:
        raise ConfigError("near_dup.embedding_enabled needs scoring.enabled (embeddings come from the CLIP pass)")


def run(cfg: PipelineConfig) -> dict:
    check(cfg)
    storage = Storage(cfg.storage)
    init_ray(cfg.ray)
    claim_output(cfg, storage)
    files = list_inputs(cfg.ingest, storage)
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    ds = ds.map_batches(IngestFiles(cfg.ingest, cfg.output, storage), batch_size=1, batch_format="pyarrow")
    ds = metadata_stages(ds, cfg, storage)
    host_limits = start_host_limits(cfg.download)
    extra: dict = {}
    try:
        ds = image_stages(ds, cfg, storage, host_limits)
        index = index_for(cfg.near_dup, cfg.output, storage)
        if cfg.near_dup.phash_enabled:
            ds = apply_phash_dedup(ds, cfg.near_dup, cfg.output, storage, index)
        if cfg.scoring.enabled:
            ds = score_images(ds, cfg.scoring, cfg.output, storage)
            if cfg.near_dup.embedding_enabled:
                ds = apply_embedding_dedup(ds, cfg.near_dup, cfg.output, storage, index)
            ds, extra["quantile_filter"] = apply_quantile_filter(ds, cfg.scoring, cfg.output, storage)
        extra["shard_run"] = write_shards(ds, cfg, storage)
    finally:
        stop_host_limits(host_limits)
    return build_report(cfg.output, storage, STAGES, join(cfg.output, "shards"), extra=extra)
