"""Typed configuration: one dataclass per stage, loaded from YAML.

Every threshold, model name, batch size, resource request and path lives here, so
moving from a laptop to a GPU cluster is a change of configuration only.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class StorageConfig:
    """Credentials and endpoint for s3:// paths (else taken from the environment)."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)  # credentials never reach a repr or a log
    secret: str | None = field(default=None, repr=False)
    region: str | None = None


@dataclass
class RayConfig:
    """How to reach Ray: address None starts a local cluster."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    # Ray Data shuffle for the groupby joins: None = Ray's default (hash shuffle, aggregator
    # actors: best on a cluster) when joining a cluster, "sort_shuffle_pull_based" on a local instance.
    shuffle_strategy: str | None = None


@dataclass
class SourceConfig:
    """One input dataset: a PUB11 source name and where its metadata files lie."""

    name: str
    paths: list[str]


@dataclass
class IngestConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_rows: int = 65_536
    max_caption_bytes: int = 16_384


@dataclass
class KeywordConfig:
    enabled: bool = True
    # None means RS5M's 44 keywords (rs5m_ray.stages.keyword_filter.RS5M_KEYWORDS).
    keywords: list[str] | None = None


@dataclass
class UrlDedupConfig:
    enabled: bool = True


@dataclass
class PartsConfig:
    """Input parts: the unit of download work and of resume.

    After the metadata stages, candidate rows are hash-partitioned on their URL into
    `num_parts` parts (all copies of a URL meet in one part, so URL dedup runs inside
    it). A fetch actor holds one part's images in memory: size parts to a few GB at most
    (candidates / num_parts images of ~100 KB each).
    """

    num_parts: int = 16


@dataclass
class DownloadConfig:
    concurrency_per_task: int = 64  # in-flight requests per worker
    timeout_s: float = 10.0  # whole request, per attempt
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 5.0  # longest silence between received chunks
    retries: int = 2  # extra attempts after a transient failure
    backoff_base_s: float = 0.5  # retry n waits base * 2**n plus jitter
    backoff_max_s: float = 20.0
    max_retry_after_s: float = 60.0  # a longer Retry-After gives up at once
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    # Politeness across the whole job (host = the URL's host:port).
    max_per_host: int = 16  # concurrent requests
    host_requests_per_s: float | None = None  # token bucket rate; None = no rate limit
    host_burst: int = 16  # token bucket size
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai
    opt_out_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    require_image_content_type: bool = True  # text/html etc. -> bad_content_type
    user_agent: str = "rs5m-ray/0.1 (research image-text dataset builder)"
    # Safety: only http(s) to public addresses unless switched on.
    allow_private_addresses: bool = False
    allow_storage_sources: bool = False  # s3:// and local paths read through Storage
    # Ray resources: an actor pool, one part at a time per actor (connections are reused
    # across parts); the actor also decodes what it downloads (decode.threads threads).
    num_cpus: float = 1.0
    min_actors: int = 1
    max_actors: int = 4


@dataclass
class DecodeConfig:
    max_pixels: int = 89_478_485  # larger images are refused (decompression bombs)
    resize_mode: str = "keep"  # keep | max_side | shortest_side (only ever shrinks)
    resize_size: int = 512
    reencode_quality: int = 95
    # always | if_needed: keep the original bytes of an RGB JPEG that decoded cleanly
    # and needs no rotation or resize (no second lossy generation, ~40% less CPU).
    reencode: str = "if_needed"
    phash: bool = True  # compute the perceptual hash in the same pass
    phash_method: str = "phash"
    threads: int = 2  # decode threads per fetch actor (decoders release the GIL)


@dataclass
class NearDupConfig:
    """pHash and embedding near-dup dedup (rs5m_ray.stages.near_dup / embedding_dedup)."""

    phash_enabled: bool = True
    hamming_radius: int = 4
    phash_bands: int = 6  # > hamming_radius; rows agree on >= bands - radius bands
    num_partitions: int = 16  # shuffle partitions of both joins (at least)
    partition_rows: int = 1_000_000  # pHash join: more partitions if exploded rows / partition exceed this
    embedding_enabled: bool = True
    cosine_threshold: float = 0.95
    k: int = 5
    embedding_buckets: int = 16  # k-means centroids that partition the embedding join
    embedding_assignments: int = 2  # nearest centroids each row joins (cuts boundary misses)
    kmeans_sample_rows: int = 20_000
    kmeans_iterations: int = 10
    keep_priority: list[str] = field(default_factory=lambda: ["laion2b", "laion400m", "coyo700m"])
    drop_first: list[str] = field(default_factory=lambda: ["laioncoco"])
    phash_quality_column: str | None = None  # e.g. a column known at pHash time; highest kept
    embedding_quality_column: str | None = None  # e.g. "clip_score"; highest kept
    seed: int = 2023
    index_path: str | None = None  # persistent dedup index (local or s3://); None = off
    run_id: str | None = None  # index parts of this run are ignored on reruns; None = from output path


@dataclass
class ScoringConfig:
    """The CLIP image pass (s_i, c_i, embedding) and the global quantile filter (notes §1.5)."""

    enabled: bool = True
    # Any open_clip architecture; the default is a tiny registered test config (random weights).
    clip_model: str = "rs5m-tiny-vit"
    # None = random init; an open_clip tag (e.g. "laion2b_s34b_b79k", needs internet or its hub cache),
    # a local path, s3://..., or "hf-hub:org/repo/file.pt" (hub cache). .pt/.bin (weights_only) or .safetensors.
    clip_pretrained: str | None = None
    weights_cache_dir: str | None = None  # where s3:// / hub weights are cached; None = ~/.cache/rs5m_ray
    strict_weights: bool = True  # a checkpoint missing any model key is an error (else a warning)
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = fp16 on GPU, fp32 on CPU; or fp32 | fp16 | bf16
    compile: bool = False  # torch.compile the image tower
    channels_last: bool = False  # memory format for conv towers (ConvNeXt) on GPU
    prompts: list[str] | None = None  # None = RS5M's 33 prompts (rs5m_ray.models.prompts)
    normalize_prompts: bool = True  # L2-normalise each prompt embedding before averaging
    detector_checkpoint: str | None = None  # versioned detector dir (rs5m train-detector --out)
    batch_size: int = 256  # rows per Ray batch
    forward_batch_size: int = 64  # images per forward; decode of the next chunk overlaps this one
    decode_threads: int = 2  # per actor
    # Let libjpeg decode large JPEGs at a reduced scale (fast path: only while keeping
    # shards.reader.DRAFT_MARGIN source pixels per output pixel); False = full decode.
    decode_draft: bool = True
    num_gpus: float = 0.0
    num_cpus: float = 1.0  # per actor
    min_actors: int = 1
    max_actors: int = 1
    clip_quantile_keep: float = 0.90
    detector_quantile_keep: float = 0.80


@dataclass
class ShardConfig:
    """A sample's split and shard follow from a seeded hash of its sample_id alone.

    Pick `train_shards` near expected samples / samples wanted per shard. A shard over
    `max_shard_bytes` continues in overflow shards numbered after the regular ones.
    """

    prefix: str = "pub11"
    train_shards: int = 64
    val_shards: int = 4
    val_fraction: float = 0.05
    seed: int = 2023
    max_shard_bytes: int = 4 * 1024**3  # RS5M's shards are ~4 GB
    chunk_bytes: int = 16 * 1024**2  # staged image row groups: what a shard writer reads at a time


@dataclass
class PipelineConfig:
    """The PUB11 job: every stage's section plus where inputs and outputs live."""

    output: str = "runs/demo"
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    keyword: KeywordConfig = field(default_factory=KeywordConfig)
    url_dedup: UrlDedupConfig = field(default_factory=UrlDedupConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)


@dataclass
class TrainConfig:
    """GeoRSCLIP: fine-tune an open_clip model on RS5M shards with Ray Train (notes §4.2).

    Defaults are the paper's main run (AdamW, lr 1e-6, weight decay 0.5, cosine schedule,
    AMP, global batch 700, 20 epochs) except the model: a tiny random test config here;
    the paper's is `ViT-B-32` from `openai`.
    """

    output: str = "runs/georsclip"  # Ray Train storage (local or s3://): checkpoints in <output>/<name>/
    name: str = "georsclip"  # rerunning the same output + name resumes from its latest checkpoint
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    clip_model: str = "rs5m-tiny-vit"
    clip_pretrained: str | None = None  # as scoring.clip_pretrained: a tag, path, s3://, hf-hub:
    weights_cache_dir: str | None = None
    strict_weights: bool = True
    train_shards: list[str] = field(default_factory=list)  # brace patterns, globs or dirs (local or s3://)
    val_shards: list[str] = field(default_factory=list)
    # Samples one epoch covers; None = the sum of the train shards' manifests (rs5m pub11 writes them).
    samples_per_epoch: int | None = None
    epochs: int = 20
    batch_size: int = 700  # global: split evenly over the workers; the contrastive loss sees all of it
    lr: float = 1e-6
    weight_decay: float = 0.5  # not applied to gains, biases, embeddings' scales or logit_scale
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    precision: str = "auto"  # autocast dtype: auto = bf16 on GPU, fp32 on CPU; or fp32 | bf16
    augment: bool = False  # random flips and 90-degree rotations (RS imagery has no "up")
    peft: str = "none"  # none = full fine-tuning of both towers | lora = frozen CLIP + LoRA
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None  # weight-name suffixes; None = attention projections
    num_workers: int = 1  # Ray Train workers (one per GPU)
    use_gpu: bool = False
    cpus_per_worker: int = 2  # decode + preprocessing run in this many loader processes
    shuffle_buffer: int = 10_000
    max_failures: int = 3  # worker failures survived by restarting from the latest checkpoint
    keep_checkpoints: int = 2
    seed: int = 0


class ConfigError(ValueError):
    pass


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys by name."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                cls: type = PipelineConfig) -> Any:
    """Load a `cls` (the PUB11 job's PipelineConfig by default) from YAML, then apply nested `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(cls, _merge(data, overrides or {}))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


SECRET_FIELDS = ("key", "secret")


def without_secrets(cfg: Any) -> dict[str, Any]:
    """`cfg` as a dict with every credential removed: what may be written or logged."""

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: None if k in SECRET_FIELDS else scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub(to_dict(cfg))
