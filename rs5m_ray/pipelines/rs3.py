"""The RS3 path: label-only RS datasets (FMoW, BigEarthNet-S2, MillionAID) -> captioned shards.
Composition only, on the harness's staging (parts are the unit of work and of resume, as in pub11).

1. listing (driver, done once): `sources.labeled` lists every source and names the samples as RS5M
   does; the rows are hash-partitioned on sample_id into parts -> staging/candidates/<part>.parquet.
2. parts (one streaming job, actor pools, done parts skipped on reruns):
   `images`: read image + metadata, validate and re-encode -> staging/images (ledger: ingest, decode);
   then each of `CAPTION_PHASES` in order (the captioning hook: see below).
3. global (light rows, recomputed by every run): meta-caption in front of the caption -> accounted shard
   writer (`rs3-{train,val}-NNNN.tar`, pub11's layout) -> GPE place names over the written captions ->
   report with the geo statistics.

Captioning hook: a `PartPhase` in `CAPTION_PHASES` is a part worker like `parts.ScorePart`: built as
`worker(cfg, storage, previous_phase)`, called on a table of {part, rows}, it reads
staging/<previous_phase>/<part> (images: row group by row group, with `jpg`), commits
staging/<name>/<part>.parquet with the light rows (no `jpg`; `part`, `shard`, `row_group` kept) and
its final caption in `caption`, then its done-marker; it returns `parts.summary`. The one phase is
`parts.CaptionPart` (`caption.enabled`): 20 BLIP-2 candidates, CLIP ranking 20 -> 10 -> 5, rotation
pick, seeded final caption; all candidates with their scores go into the sidecar. With captioning off,
rs3 shards carry the meta-caption alone (and MillionAID, which has no metadata, is dropped as
`empty_caption`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import ray
import ray.data

from rs5m_ray.config import ConfigError, Rs3Config
from rs5m_ray.ledger import Accounted, write_parquet
from rs5m_ray.pipelines.harness import (CANDIDATES, PART, Staging, claim_output, light_rows, part_name, timeline,
                                        write_shards)
from rs5m_ray.pipelines.parts import CAPTIONS, IMAGES, CaptionPart, ReadLabeledPart
from rs5m_ray.ray_runtime import init_ray
from rs5m_ray.report import build_report
from rs5m_ray.sources.labeled import candidates_table, list_labeled
from rs5m_ray.stages.gpe import GpeUnavailable, check_available, extract_gpe
from rs5m_ray.stages.meta_caption import MetaCaption
from rs5m_ray.storage import Storage, join


@dataclass(frozen=True)
class PartPhase:
    """A part phase after `images` (the captioning hook). `resources(cfg)` returns the section with the
    actor pool's `num_cpus`, `num_gpus`, `min_actors`, `max_actors`; `enabled(cfg)` whether it runs."""

    name: str  # its staging folder
    stages: tuple[str, ...]  # the ledger stages it accounts (report funnel order)
    worker: type
    resources: Callable[[Rs3Config], Any]
    enabled: Callable[[Rs3Config], bool]


CAPTION_PHASES: list[PartPhase] = [
    PartPhase(CAPTIONS, ("caption",), CaptionPart, lambda cfg: cfg.caption, lambda cfg: cfg.caption.enabled)]
LISTING_STAGES = ["ingest", "decode"]
GLOBAL_STAGES = ["meta_caption", "shard_writer"]
GLOBAL_OUTPUTS = ([f"{d}/{s}" for d in ("ledger", "stats") for s in GLOBAL_STAGES]
                  + ["gpe", "report.json", "report.png", "geo.png", "shards/manifest.json"])


def phases(cfg: Rs3Config) -> list[PartPhase]:
    return [p for p in CAPTION_PHASES if p.enabled(cfg)]


def stages(cfg: Rs3Config) -> list[str]:
    return LISTING_STAGES + [s for p in phases(cfg) for s in p.stages] + GLOBAL_STAGES


def part_of(sample_id: str, num_parts: int) -> int:
    return zlib.crc32(sample_id.encode()) % num_parts


def listing_phase(cfg: Rs3Config, storage: Storage, staging: Staging) -> list[str]:
    """The candidate parts: from the staging when the listing is done, else listed now."""
    parts = staging.candidate_parts()
    if parts is not None:
        return parts
    staging.reset_candidates()
    rows = [r for source in cfg.sources for r in list_labeled(source, storage)]
    by_part: dict[int, list[dict]] = {}
    for r in rows:
        by_part.setdefault(part_of(r["sample_id"], cfg.parts.num_parts), []).append(r)
    names = []
    for index, part_rows in sorted(by_part.items()):
        names.append(part_name(index))
        write_parquet(storage, staging.path(CANDIDATES, names[-1]), candidates_table(part_rows))
    staging.finish_candidates(names)
    return sorted(names)


def parts_phase(cfg: Rs3Config, storage: Storage, parts: list[str]) -> str:
    """Read + validate, then the caption phases, part by part, streaming; returns the last phase's name."""
    if not parts:
        return IMAGES
    r = cfg.read
    ds = ray.data.from_items([{PART: p} for p in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(ReadLabeledPart, fn_constructor_args=(cfg, storage), batch_size=1, batch_format="pyarrow",
                        num_cpus=r.num_cpus, compute=ray.data.ActorPoolStrategy(min_size=r.min_actors,
                                                                                max_size=r.max_actors))
    last = IMAGES
    for phase in phases(cfg):
        res = phase.resources(cfg)
        ds = ds.map_batches(phase.worker, fn_constructor_args=(cfg, storage, last), batch_size=1,
                            batch_format="pyarrow", num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors))
        last = phase.name
    ds.take_all()
    return last


def global_phase(cfg: Rs3Config, storage: Storage, staging: Staging, last_phase: str) -> dict:
    ds = light_rows(storage, staging, last_phase)
    if ds is not None:
        ds = ds.map_batches(Accounted("meta_caption", cfg.output, storage, MetaCaption(cfg.meta_caption)),
                            batch_format="pyarrow").materialize()
    extra: dict = {"shard_run": write_shards(ds, cfg.output, storage, cfg.shards, staging, IMAGES)}
    if cfg.gpe.enabled:
        extra["gpe"] = extract_gpe(join(cfg.output, "shards"), join(cfg.output, "gpe"), storage, cfg.gpe)
    return extra


def check(cfg: Rs3Config) -> None:
    if cfg.gpe.enabled:
        try:
            check_available(cfg.gpe)
        except GpeUnavailable as e:
            raise ConfigError(f"gpe.backend {cfg.gpe.backend}: {e}") from None
    if not cfg.sources:
        raise ConfigError("sources: no label sources given")
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"sources: each source once (their sample names would clash), got {names}")
    if cfg.caption.enabled and cfg.caption.backend != "hf":
        raise ConfigError("caption.backend: rs3 captions part by part with the hf backend; the vllm backend "
                          "runs on Ray Data datasets (stages.caption.caption_images)")


def run(cfg: Rs3Config) -> dict:
    check(cfg)
    storage = Storage(cfg.storage)
    init_ray(cfg.ray)
    claim_output(cfg, storage, GLOBAL_OUTPUTS)
    staging = Staging(cfg.output, storage)
    parts = listing_phase(cfg, storage, staging)
    last = parts_phase(cfg, storage, parts)
    extra = global_phase(cfg, storage, staging, last)
    extra["timeline"] = timeline(staging, [IMAGES] + [p.name for p in phases(cfg)])
    return build_report(cfg.output, storage, stages(cfg), join(cfg.output, "shards"), extra=extra)
