"""Typed configuration: one dataclass per stage, loaded from YAML.

Every threshold, model name, batch size, resource request and path lives here, so
moving from a laptop to a GPU cluster is a change of configuration only.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Bounds:
    """What a config field accepts beyond its type, checked at load (`from_dict`).

    Numbers: `ge`/`gt`/`le`/`lt` (float fields also reject NaN and infinity always); strings:
    `choices` or `pattern` (full match); strings and lists: `min_len`; list items: `item_min_len`.
    None is always accepted for an optional field."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    min_len: int | None = None
    item_min_len: int | None = None

    def allowed(self) -> str:
        parts = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        if self.choices is not None:
            parts.append(f"one of {list(self.choices)}")
        if self.pattern is not None:
            parts.append(f"matching {self.pattern}")
        if self.min_len is not None:
            parts.append(f"at least {self.min_len} long")
        if self.item_min_len is not None:
            parts.append(f"items at least {self.item_min_len} long")
        return ", ".join(parts) or "any value"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, (int, float)):
            return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                    and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if self.choices is not None and value not in self.choices:
            return False
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            return False
        if self.min_len is not None and len(value) < self.min_len:
            return False
        return self.item_min_len is None or all(len(v) >= self.item_min_len for v in value)


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            repr: bool = True, **bounds: Any) -> Any:
    """A dataclass field with `Bounds` (e.g. `retries: int = bounded(2, ge=0)`)."""
    return field(default=default, default_factory=default_factory, repr=repr,
                 metadata={"bounds": Bounds(**bounds)})


FINITE = Bounds()  # what a float field without declared bounds gets: finite values only
SHUFFLE_STRATEGIES = ("sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle")
RESIZE_MODES = ("keep", "max_side", "shortest_side")
REENCODE_POLICIES = ("always", "if_needed")
PHASH_METHODS = ("phash", "dhash", "whash")


@dataclass
class StorageConfig:
    """Credentials and endpoint for s3:// paths (else taken from the environment)."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)  # credentials never reach a repr or a log
    secret: str | None = field(default=None, repr=False)
    region: str | None = None
    # Attempts per S3 request: botocore's standard retries (exponential backoff with jitter) on 503
    # SlowDown, throttling and connection errors; s3fs retries SlowDown on top.
    max_attempts: int = bounded(10, ge=1, le=100)


@dataclass
class RayConfig:
    """How to reach Ray: address None starts a local cluster."""

    address: str | None = None
    num_cpus: int | None = bounded(None, ge=1)
    object_store_memory: int | None = bounded(None, ge=78_643_200)  # Ray's minimum, 75 MiB
    # Ray Data shuffle for the groupby joins: None = Ray's default (hash shuffle, aggregator
    # actors: best on a cluster) when joining a cluster, "sort_shuffle_pull_based" on a local instance.
    shuffle_strategy: str | None = bounded(None, choices=SHUFFLE_STRATEGIES)
    # The dashboard (job, actor, metrics pages) of a local instance this job starts: off unless set (it
    # costs CPU on a small box). A cluster's is its head's: on in cluster/*.yaml (`ray start --head`).
    dashboard: bool = False


@dataclass
class SourceConfig:
    """One input dataset: a PUB11 source name and where its metadata files lie."""

    name: str  # checked against the known sources before a job starts (pub11.check)
    paths: list[str] = bounded(min_len=1, item_min_len=1)


@dataclass
class IngestConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_rows: int = bounded(65_536, ge=1)
    max_caption_bytes: int = bounded(16_384, ge=1)
    # URLs with credentials (`http://user:pass@host/...`): the credentials are removed from the stored
    # URL either way and never sent; strip = fetch the URL without them, drop = drop the row
    # (`url_credentials`).
    url_credentials: str = bounded("strip", choices=("strip", "drop"))


@dataclass
class KeywordConfig:
    enabled: bool = True
    # None means RS5M's 44 keywords (rs5m_ray.stages.keyword_filter.RS5M_KEYWORDS).
    keywords: list[str] | None = bounded(None, min_len=1, item_min_len=1)


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

    num_parts: int = bounded(16, ge=1, le=100_000)


@dataclass
class DownloadConfig:
    concurrency_per_task: int = bounded(64, ge=1)  # in-flight requests per worker
    timeout_s: float = bounded(10.0, gt=0)  # whole request, per attempt
    connect_timeout_s: float = bounded(5.0, gt=0)
    read_timeout_s: float = bounded(5.0, gt=0)  # longest silence between received chunks
    retries: int = bounded(2, ge=0, le=100)  # extra attempts after a transient failure
    backoff_base_s: float = bounded(0.5, ge=0)  # retry n waits base * 2**n plus jitter
    backoff_max_s: float = bounded(20.0, ge=0)
    max_retry_after_s: float = bounded(60.0, ge=0)  # a longer Retry-After gives up at once
    max_bytes: int = bounded(20 * 1024 * 1024, ge=1)
    max_redirects: int = bounded(5, ge=0)
    # Politeness across the whole job (host = the URL's host:port).
    max_per_host: int = bounded(16, ge=1)  # concurrent requests
    host_requests_per_s: float | None = bounded(None, gt=0)  # token bucket rate; None = no rate limit
    host_burst: int = bounded(16, ge=1)  # token bucket size
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai
    opt_out_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    require_image_content_type: bool = True  # text/html etc. -> bad_content_type
    user_agent: str = bounded("rs5m-ray/0.1 (research image-text dataset builder)", min_len=1)
    # Safety: only http(s) to public addresses unless switched on (rs5m_ray.stages.download.AddressPolicy).
    # allow_hosts: addresses or networks also allowed, e.g. ["127.0.0.0/8"] for a loopback image server;
    # allow_private_addresses: every loopback and private (RFC 1918, ULA) address. Link-local and cloud
    # metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254, 100.100.100.200) stay blocked unless
    # an allow_hosts entry lies inside them.
    allow_hosts: list[str] = field(default_factory=list)
    allow_private_addresses: bool = False
    allow_storage_sources: bool = False  # s3:// and local paths read through Storage
    # Ray resources: an actor pool, one part at a time per actor (connections are reused
    # across parts); the actor also decodes what it downloads (decode.threads threads).
    num_cpus: float = bounded(1.0, ge=0)
    min_actors: int = bounded(1, ge=1)
    max_actors: int = bounded(4, ge=1)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.min_actors <= self.max_actors, "min_actors <= max_actors"),
                (self.backoff_base_s <= self.backoff_max_s, "backoff_base_s <= backoff_max_s"),
                (all(_is_network(h) for h in self.allow_hosts),
                 f"allow_hosts to be IP addresses or networks (e.g. 127.0.0.0/8), got {self.allow_hosts}")]


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


@dataclass
class DecodeConfig:
    max_pixels: int = bounded(89_478_485, ge=1)  # larger images are refused (decompression bombs)
    # img2dataset's guards, on the image as downloaded: the shorter side in pixels (image_too_small)
    # and longer / shorter side (aspect_ratio_too_large). img2dataset's defaults (0, no limit) keep
    # 1x1 tracking pixels and 10000x1 banners; these drop them. 0 / None switch a guard off.
    min_image_size: int = bounded(10, ge=0)
    max_aspect_ratio: float | None = bounded(10.0, ge=1)
    resize_mode: str = bounded("keep", choices=RESIZE_MODES)  # keep | max_side | shortest_side (only ever shrinks)
    resize_size: int = bounded(512, ge=1)
    reencode_quality: int = bounded(95, ge=1, le=100)
    # always | if_needed: keep the original bytes of an RGB JPEG that decoded cleanly
    # and needs no rotation or resize (no second lossy generation, ~40% less CPU).
    reencode: str = bounded("if_needed", choices=REENCODE_POLICIES)
    phash: bool = True  # compute the perceptual hash in the same pass
    phash_method: str = bounded("phash", choices=PHASH_METHODS)
    threads: int = bounded(2, ge=1)  # decode threads per fetch actor (decoders release the GIL)


@dataclass
class NearDupConfig:
    """pHash and embedding near-dup dedup (rs5m_ray.stages.near_dup / embedding_dedup)."""

    phash_enabled: bool = True
    hamming_radius: int = bounded(4, ge=0, le=63)
    phash_bands: int = bounded(6, ge=1, le=64)  # > hamming_radius; rows agree on >= bands - radius bands
    num_partitions: int = bounded(16, ge=1)  # shuffle partitions of both joins (at least)
    partition_rows: int = bounded(1_000_000, ge=1)  # pHash join: more partitions if exploded rows / partition exceed this
    embedding_enabled: bool = True
    cosine_threshold: float = bounded(0.95, ge=-1.0, le=1.0)
    k: int = bounded(5, ge=1)
    embedding_buckets: int = bounded(16, ge=1)  # k-means centroids that partition the embedding join
    embedding_assignments: int = bounded(2, ge=1)  # nearest centroids each row joins (cuts boundary misses)
    kmeans_sample_rows: int = bounded(20_000, ge=1)
    kmeans_iterations: int = bounded(10, ge=1)
    keep_priority: list[str] = field(default_factory=lambda: ["laion2b", "laion400m", "coyo700m"])
    drop_first: list[str] = field(default_factory=lambda: ["laioncoco"])
    phash_quality_column: str | None = None  # e.g. a column known at pHash time; highest kept
    embedding_quality_column: str | None = None  # e.g. "clip_score"; highest kept
    seed: int = bounded(2023, ge=0)
    index_path: str | None = None  # persistent dedup index (local or s3://); None = off
    run_id: str | None = None  # index parts of this run are ignored on reruns; None = from output path

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.phash_bands > self.hamming_radius, "phash_bands > hamming_radius"),
                (self.embedding_assignments <= self.embedding_buckets, "embedding_assignments <= embedding_buckets")]


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
    device: str = bounded("auto", pattern=r"auto|cpu|cuda(:[0-9]+)?")  # auto = cuda when available, else cpu
    precision: str = bounded("auto", choices=("auto", "fp32", "fp16", "bf16"))  # auto = fp16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the image tower
    channels_last: bool = False  # memory format for conv towers (ConvNeXt) on GPU
    prompts: list[str] | None = bounded(None, min_len=1, item_min_len=1)  # None = RS5M's 33 prompts (rs5m_ray.models.prompts)
    normalize_prompts: bool = True  # L2-normalise each prompt embedding before averaging
    detector_checkpoint: str | None = None  # versioned detector dir (rs5m train-detector --out)
    batch_size: int = bounded(256, ge=1)  # rows per stage call (read across a staged part's row groups)
    forward_batch_size: int = bounded(64, ge=1)  # images per forward; decode of the next chunk overlaps this one
    decode_threads: int = bounded(2, ge=1)  # per actor
    # Let libjpeg decode large JPEGs at a reduced scale (fast path: only while keeping
    # shards.reader.DRAFT_MARGIN source pixels per output pixel); False = full decode.
    decode_draft: bool = True
    num_gpus: float = bounded(0.0, ge=0)
    num_cpus: float = bounded(1.0, ge=0)  # per actor
    min_actors: int = bounded(1, ge=1)
    max_actors: int = bounded(1, ge=1)
    clip_quantile_keep: float = bounded(0.90, gt=0, le=1)
    detector_quantile_keep: float = bounded(0.80, gt=0, le=1)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.min_actors <= self.max_actors, "min_actors <= max_actors")]


@dataclass
class ShardConfig:
    """A sample's split and shard follow from a seeded hash of its sample_id alone.

    Pick `train_shards` near expected samples / samples wanted per shard. A shard over
    `max_shard_bytes` continues in overflow shards numbered after the regular ones.
    """

    prefix: str = bounded("pub11", pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]*")
    train_shards: int = bounded(64, ge=1)
    val_shards: int = bounded(4, ge=0)
    val_fraction: float = bounded(0.05, ge=0, le=1)
    seed: int = bounded(2023, ge=0)
    max_shard_bytes: int = bounded(4 * 1024**3, ge=1)  # RS5M's shards are ~4 GB
    chunk_bytes: int = bounded(16 * 1024**2, ge=1)  # staged image row groups: what a shard writer reads at a time

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.val_fraction == 0 or self.val_shards >= 1, "val_shards >= 1 when val_fraction > 0"),
                (self.val_fraction == 1 or self.train_shards >= 1, "train_shards >= 1 when val_fraction < 1")]


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


LABELED_SOURCE_NAMES = ("fmow", "ben", "millionaid")
BEN_STRETCHES = ("linear", "percentile")
GPE_BACKENDS = ("spacy", "nltk")


@dataclass
class LabeledSourceConfig:
    """One RS3 label source (rs5m_ray.sources.labeled): its dataset root, local or s3://."""

    name: str = bounded(choices=LABELED_SOURCE_NAMES)
    root: str = bounded(min_len=1)
    splits: list[str] = bounded(default_factory=lambda: ["train"], min_len=1, item_min_len=1)  # fmow
    variants: list[str] = bounded(default_factory=lambda: ["rgb", "msrgb"], min_len=1,
                                  item_min_len=1)  # fmow: RS5M used both
    include_list: str | None = None  # a file of names to keep, one a line (e.g. BigEarthNet's train.csv)


@dataclass
class BenRgbConfig:
    """16-bit reflectance (BigEarthNet, fMoW-full) -> 8-bit RGB JPEG."""

    stretch: str = bounded("linear", choices=BEN_STRETCHES)  # linear: 0..max_value -> 0..255, same for all
    max_value: int = bounded(3000, ge=1, le=65535)  # Sentinel-2 L2A DN 3000 = reflectance 0.30
    low_percentile: float = bounded(2.0, ge=0, lt=100)  # percentile: per image
    high_percentile: float = bounded(98.0, gt=0, le=100)
    jpeg_quality: int = bounded(95, ge=1, le=100)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.low_percentile < self.high_percentile, "low_percentile < high_percentile")]


@dataclass
class LabeledReadConfig:
    """The reading actors of the rs3 part phase (read + validate, one part at a time)."""

    threads: int = bounded(8, ge=1, le=256)  # concurrent file reads per actor (object-store latency)
    num_cpus: float = bounded(1.0, gt=0)
    min_actors: int = bounded(1, ge=1)
    max_actors: int = bounded(4, ge=1)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.min_actors <= self.max_actors, "min_actors <= max_actors")]


@dataclass
class MetaCaptionConfig:
    """Meta-captions (rs5m_ray.stages.meta_caption): one seeded template per sample_id."""

    enabled: bool = True
    # None = the project's own templates (package data); or a path to RS5M's geometa_template.json.
    templates: str | None = None
    seed: int = bounded(2023, ge=0)
    redcaps: bool = False  # RedCaps post times (created_utc): off, App. B9 excludes them as not capture times


@dataclass
class GpeConfig:
    """Place names (GPE) in the written captions (rs5m_ray.stages.gpe), a Ray Data actor stage."""

    enabled: bool = True
    backend: str = bounded("spacy", choices=GPE_BACKENDS)
    spacy_model: str = bounded("en_core_web_sm", min_len=1)
    batch_size: int = bounded(256, ge=1)
    num_cpus: float = bounded(1.0, gt=0)
    min_actors: int = bounded(1, ge=1)
    max_actors: int = bounded(1, ge=1)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.min_actors <= self.max_actors, "min_actors <= max_actors")]


CAPTION_BACKENDS = ("hf", "vllm")


@dataclass
class CaptionConfig:
    """RS3 captioner (rs5m_ray.stages.caption, notes §2.2): candidates per image by nucleus sampling.

    Defaults: the eval script's published decoding (top_p 0.95, top_k 50, max_length 50, no prompt,
    seed 2023) with RS5M's 20 candidates; the model is a tiny random BLIP-2 (noise until trained).
    RS5M's: `model: hf-hub:Salesforce/blip2-opt-6.7b`, `precision: fp16`, `lora_adapter:` its
    RSITMD adapter folder. The actors also run the ranking (`caption_rank`) on the same decode.
    """

    enabled: bool = True
    backend: str = bounded("hf", choices=CAPTION_BACKENDS)  # hf: transformers in Ray Data actors; vllm: ray.data.llm
    # rs5m-tiny-blip2 | a model folder: local path, s3://..., hf-hub:org/repo[@revision]
    model: str = bounded("rs5m-tiny-blip2", min_len=1)
    model_class: str = bounded("Blip2ForConditionalGeneration", min_len=1)  # any transformers vision-to-text class
    lora_adapter: str | None = None  # peft adapter folder (local, s3://, hf-hub:), merged into the weights
    weights_cache_dir: str | None = None  # node-level cache for s3:// / hub folders; None = ~/.cache/rs5m_ray
    device: str = bounded("auto", pattern=r"auto|cpu|cuda(:[0-9]+)?")
    precision: str = bounded("auto", choices=("auto", "fp32", "fp16", "bf16"))  # auto = fp16 on GPU, fp32 on CPU
    num_candidates: int = bounded(20, ge=1, le=256)
    top_p: float = bounded(0.95, gt=0, le=1)
    top_k: int = bounded(50, ge=0)  # 0 = no top-k cut
    temperature: float = bounded(1.0, gt=0)
    # The eval script's max_length 50, which HF BLIP-2 counted after the query tokens: new tokens.
    max_new_tokens: int = bounded(50, ge=1, le=1024)
    prompt: str | None = None  # None = captioning from the image alone (RS5M)
    seed: int = bounded(2023, ge=0)  # a batch's sampling seed = hash(seed, its sample_ids)
    batch_size: int = bounded(16, ge=1)  # images per generate call (x num_candidates sequences)
    num_gpus: float = bounded(0.0, ge=0)  # per actor; fractional shares a GPU between actors
    num_cpus: float = bounded(1.0, ge=0)
    min_actors: int = bounded(1, ge=1)
    max_actors: int = bounded(1, ge=1)
    # vllm backend only: vLLM engine arguments (e.g. {max_model_len: 256, gpu_memory_utilization: 0.9})
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.min_actors <= self.max_actors, "min_actors <= max_actors")]


@dataclass
class CaptionRankConfig:
    """Candidate ranking and the rotation-invariance pick (rs5m_ray.stages.caption_rank, notes §2.3).

    Model A keeps `keep_a` of the candidates, model B `keep_b` of those; the rotation model scores
    the survivors over `rotation_angles` rotations. Models: any open_clip architecture with weights
    as `scoring.clip_pretrained`; RS5M's: `ViT-H-14` (likely laion2b_s32b_b79k) and `RN50x64`
    (likely openai). Defaults: the tiny random test configs (scores mean nothing).
    """

    enabled: bool = True
    model_a: str = bounded("rs5m-tiny-vit", min_len=1)
    pretrained_a: str | None = None
    keep_a: int = bounded(10, ge=1)
    model_b: str = bounded("rs5m-tiny-convnext", min_len=1)
    pretrained_b: str | None = None
    keep_b: int = bounded(5, ge=1)
    rotation_model: str = bounded("b", choices=("a", "b"))
    rotation_angles: int = bounded(12, ge=2, le=360)  # evenly spaced from 0 degrees: 12 = 30-degree steps
    text_chunk: int = bounded(256, ge=1)  # candidate texts per text-tower forward
    seed: int = bounded(2023, ge=0)  # the final pick (top vs rotation-invariant) = hash(seed, sample_id)
    weights_cache_dir: str | None = None
    strict_weights: bool = True
    precision: str = bounded("auto", choices=("auto", "fp32", "fp16", "bf16"))  # device: caption.device

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.keep_b <= self.keep_a, "keep_b <= keep_a")]


@dataclass
class Rs3ShardConfig(ShardConfig):
    prefix: str = bounded("rs3", pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Rs3Config:
    """The RS3 job (rs5m_ray.pipelines.rs3): label sources -> validate -> caption (20 candidates, rank
    20 -> 10 -> 5, rotation pick) -> meta-caption in front -> shards."""

    output: str = "runs/rs3"
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sources: list[LabeledSourceConfig] = bounded(default_factory=list, min_len=1)
    parts: PartsConfig = field(default_factory=PartsConfig)
    read: LabeledReadConfig = field(default_factory=LabeledReadConfig)
    rgb: BenRgbConfig = field(default_factory=BenRgbConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    caption_rank: CaptionRankConfig = field(default_factory=CaptionRankConfig)
    meta_caption: MetaCaptionConfig = field(default_factory=MetaCaptionConfig)
    gpe: GpeConfig = field(default_factory=GpeConfig)
    shards: Rs3ShardConfig = field(default_factory=Rs3ShardConfig)


@dataclass
class TrainConfig:
    """GeoRSCLIP: fine-tune an open_clip model on RS5M shards with Ray Train (notes §4.2).

    Defaults are the paper's main run (AdamW, lr 1e-6, weight decay 0.5, cosine schedule,
    AMP, global batch 700, 20 epochs) except the model: a tiny random test config here;
    the paper's is `ViT-B-32` from `openai`.
    """

    output: str = "runs/georsclip"  # Ray Train storage (local or s3://): checkpoints in <output>/<name>/
    name: str = bounded("georsclip", min_len=1)  # rerunning the same output + name resumes from its latest checkpoint
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    clip_model: str = "rs5m-tiny-vit"
    clip_pretrained: str | None = None  # as scoring.clip_pretrained: a tag, path, s3://, hf-hub:
    weights_cache_dir: str | None = None
    strict_weights: bool = True
    train_shards: list[str] = field(default_factory=list)  # brace patterns, globs or dirs (local or s3://)
    val_shards: list[str] = field(default_factory=list)
    # Samples one epoch covers; None = the sum of the train shards' manifests (rs5m pub11 writes them).
    samples_per_epoch: int | None = bounded(None, ge=1)
    epochs: int = bounded(20, ge=1)
    batch_size: int = bounded(700, ge=1)  # global: split evenly over the workers; the contrastive loss sees all of it
    lr: float = bounded(1e-6, gt=0)
    weight_decay: float = bounded(0.5, ge=0)  # not applied to gains, biases, embeddings' scales or logit_scale
    warmup_steps: int = bounded(0, ge=0)
    max_grad_norm: float | None = bounded(None, gt=0)
    # autocast dtype: auto = bf16 on GPU, fp32 on CPU; fp16 runs with a GradScaler
    precision: str = bounded("auto", choices=("auto", "fp32", "bf16", "fp16"))
    grad_accumulation: int = bounded(1, ge=1)  # batches of batch_size per optimizer step (gradients averaged)
    freeze_image_tower: bool = False  # Table VI's ablations
    freeze_text_tower: bool = False
    # Pixel normalisation (notes §4.4): model = the model's own preprocessing config
    normalization: str = bounded("model", choices=("model", "clip", "imagenet", "rs5m", "pub11", "rs3", "geometa"))
    augment: bool = False  # random flips and 90-degree rotations (RS imagery has no "up")
    # none = full fine-tuning; else frozen CLIP + rs5m_ray.models.peft method (AdapterHub defaults)
    peft: str = bounded("none", choices=("none", "lora", "pfeiffer", "prefix", "unipelt"))
    lora_rank: int | None = bounded(None, ge=1)  # lora / unipelt r; None = AdapterHub's 8
    lora_alpha: float | None = bounded(None, gt=0)  # None = AdapterHub's 8
    lora_matrices: list[str] | None = bounded(None, min_len=1, item_min_len=1)  # of q, k, v; None = q, v
    reduction_factor: float | None = bounded(None, gt=0)  # pfeiffer / unipelt bottleneck; None = 16
    prefix_length: int | None = bounded(None, ge=1)  # prefix / unipelt; None = 30 / 10
    num_workers: int = bounded(1, ge=1)  # Ray Train workers (one per GPU)
    use_gpu: bool = False
    cpus_per_worker: int = bounded(2, ge=1)  # the worker's CPU reservation: its torch threads and loaders
    loader_workers: int | None = bounded(None, ge=1)  # loader processes per worker; None = cpus_per_worker - 1 (>= 1)
    shuffle_buffer: int = bounded(10_000, ge=0)
    checkpoint_every_steps: int | None = bounded(None, ge=1)  # plus one at every epoch end; resumes mid-epoch exactly
    log_every_steps: int = bounded(1, ge=1)  # metrics to Ray Train and <output>/<name>/metrics.csv
    eval_image_folders: list[str] = field(default_factory=list)  # zero-shot (rs5m_ray.eval) on rank 0
    eval_every_epochs: int = bounded(1, ge=1)
    audit_log: bool = False  # per step and rank: sample keys and a weight fingerprint (<output>/<name>/audit/)
    max_failures: int = bounded(3, ge=-1)  # worker failures survived by restarting from the latest checkpoint; -1 = any
    keep_checkpoints: int = bounded(2, ge=1)
    seed: int = bounded(0, ge=0)

    def relations(self) -> list[tuple[bool, str]]:
        return [(self.batch_size % self.num_workers == 0, "batch_size to split evenly over num_workers")]


EVAL_TASKS = ("zero_shot", "retrieval", "selo")
RETRIEVAL_FORMATS = ("csv", "precomp", "class_matched")


@dataclass
class EvalSetConfig:
    """One evaluation set (rs5m_ray.eval.datasets). zero_shot: `path` = ImageFolder root. retrieval:
    `format` csv (RS5M's filename,title CSV at `path`, images in `images`), precomp (`<split>_caps.txt` and
    `<split>_filename.txt` in `path`, images in `images`) or class_matched (ImageFolder `images` + the
    precomp captions in `path` of each image's class). selo: `path` = AIR-SLT root."""

    name: str = bounded(min_len=1)
    task: str = bounded(choices=EVAL_TASKS)
    path: str = bounded(min_len=1)
    images: str | None = None
    format: str = bounded("csv", choices=RETRIEVAL_FORMATS)
    split: str = "test"
    encoding: str | None = None  # csv: None = gb18030 for RSICD files (as RS5M), else utf-8
    protocol: str | None = None  # a protocol id (rs5m_ray.eval.protocols); None = RS5M's for the task
    class_names: dict[str, str] | None = None  # zero_shot: folder -> class name overrides


@dataclass
class ContaminationConfig:
    """Eval images looked up in the training data before evaluating (rs5m_ray.eval.contamination)."""

    train_shards: list[str] = field(default_factory=list)  # patterns / dirs of RS5M shards (local or s3://)
    index_path: str | None = None  # a persistent dedup index (near_dup.index_path of pub11 runs)
    hamming_radius: int = bounded(4, ge=0, le=15)
    embeddings: bool = True  # also compare embeddings of the evaluated model with the shard images'
    cosine_threshold: float = bounded(0.95, ge=-1, le=1)
    exclude: bool = False  # leave overlapping eval images out of the metrics


@dataclass
class EvalConfig:
    """`rs5m eval`: a model (the one loader's config: name, weights, device, precision, and the Ray
    resources of its embedding actors), evaluation sets, the contamination check, outputs."""

    output: str = "runs/eval"
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ScoringConfig = field(default_factory=ScoringConfig)
    label: str | None = None  # the row name in the tables; None = model name + weights
    sets: list[EvalSetConfig] = field(default_factory=list)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    distributed: bool = False  # image embedding passes as Ray Data actor stages (model.num_gpus etc.)
    plots: bool = True


@dataclass
class NodeTypeConfig:
    """A node type of cluster/aws.yaml and cluster/kuberay.yaml, with its price."""

    name: str = bounded(min_len=1)
    vcpus: int = bounded(1, ge=1)
    gpus: int = bounded(0, ge=0)
    gpu_bf16_tflops: float = bounded(0.0, ge=0)  # dense peak per GPU
    network_gbps: float = bounded(10.0, gt=0)
    price_per_hour: float = bounded(0.0, ge=0)


@dataclass
class PlanConfig:
    """`rs5m plan`: RS5M at full scale on two node types, from the benchmarks' figures. Work sizes are the
    paper's; per-item GFLOPs (forward; 2 x parameters x tokens) turn GPU peaks into estimated rates."""

    figures: str = "benchmarks/figures.json"
    cpu_node: NodeTypeConfig = field(default_factory=lambda: NodeTypeConfig("c7i.8xlarge", 32, 0, 0.0, 12.5, 1.428))
    gpu_node: NodeTypeConfig = field(default_factory=lambda: NodeTypeConfig("g6e.12xlarge", 48, 4, 362.0, 100.0,
                                                                            10.493))
    metadata_bytes_per_row: float = bounded(100.0, gt=0)  # compressed parquet, URL + caption + a few columns
    image_bytes: float = bounded(150_000.0, gt=0)  # a web image as downloaded
    metadata_rows: int = bounded(4_200_000_000, ge=1)
    downloads: int = bounded(6_100_000, ge=1)
    scorings: int = bounded(5_200_000, ge=1)
    caption_images: int = bounded(2_060_000, ge=1)
    caption_candidates: int = bounded(20, ge=1)
    train_samples: int = bounded(5_000_000, ge=1)
    train_epochs: int = bounded(20, ge=1)
    gpu_utilisation: float = bounded(0.35, gt=0, le=1)  # of the dense peak, for encoders and training
    caption_gpu_utilisation: float = bounded(0.10, gt=0, le=1)  # token-by-token generation is memory-bound
    scoring_gflops: float = bounded(396.0, gt=0)  # ConvNeXt-XXL image tower at 256 px
    caption_gflops_per_candidate: float = bounded(335.0, gt=0)  # BLIP-2 OPT-2.7B: 62 tokens x 2 x 2.7e9
    caption_image_gflops: float = bounded(514.0, gt=0)  # BLIP-2's ViT-g/14 once per image (1.0e9 x 257 x 2)
    train_gflops_vit_b_32: float = bounded(55.5, gt=0)  # 3 x (image 8.8 + text 9.7): forward + backward
    train_gflops_vit_h_14: float = bounded(1139.0, gt=0)  # 3 x (image 325 + text 54.5)
    # Wall-clock hours each phase should take: node counts follow.
    metadata_hours: float = bounded(4.0, gt=0)
    download_hours: float = bounded(12.0, gt=0)
    scoring_hours: float = bounded(4.0, gt=0)
    caption_hours: float = bounded(24.0, gt=0)
    train_hours: float = bounded(48.0, gt=0)


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
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check_bounds(obj, where)
    return obj


def check_bounds(obj: Any, where: str = "") -> None:
    """Raise ConfigError naming the key path and what it allows, for the first field of config
    `obj` or its sections outside its `Bounds`, or the first of its `relations()` that does not hold."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, prefix + f.name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_bounds(item, f"{prefix}{f.name}[{i}]")
        bounds = f.metadata.get("bounds", FINITE)
        if not bounds.accepts(value):
            allowed = bounds.allowed() if bounds is not FINITE else ""
            if isinstance(value, float):
                allowed = f"{allowed}, finite" if allowed else "finite numbers"
            raise ConfigError(f"{prefix}{f.name}: {value!r} is not allowed; allowed: {allowed}")
    for ok, rule in getattr(obj, "relations", lambda: [])():
        if not ok:
            raise ConfigError(f"{where or type(obj).__name__}: needs {rule}")


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
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                cls: type = PipelineConfig) -> Any:
    """Load a `cls` (the PUB11 job's PipelineConfig by default) from YAML, then apply nested `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return from_dict(cls, _merge(data, overrides or {}))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


SECRET_FIELDS = ("key", "secret")
# Keys that change how a run uses the machines or where it is, never what it outputs: a run
# directory may be resumed with other values (a dotted key covers everything below it).
RESOURCE_KEYS = frozenset({
    "output", "storage", "ray", "ingest.batch_rows",
    "download.concurrency_per_task", "download.num_cpus", "download.min_actors", "download.max_actors",
    "decode.threads", "near_dup.num_partitions", "near_dup.partition_rows", "shards.chunk_bytes",
    "scoring.batch_size", "scoring.forward_batch_size", "scoring.decode_threads", "scoring.num_gpus",
    "scoring.num_cpus", "scoring.min_actors", "scoring.max_actors", "scoring.compile", "scoring.channels_last",
    "scoring.weights_cache_dir",
})


def flat_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value} (lists are values)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flat_keys(v, f"{prefix}.{k}" if prefix else k))
    return out


def output_keys(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flat keys of a config dict that affect a run's output (`RESOURCE_KEYS` left out)."""
    def resource(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in RESOURCE_KEYS for i in range(1, len(parts) + 1))

    return {k: v for k, v in flat_keys(cfg_dict).items() if not resource(k)}


def without_secrets(cfg: Any) -> dict[str, Any]:
    """`cfg` as a dict with every credential removed: what may be written or logged."""

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: None if k in SECRET_FIELDS else scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub(to_dict(cfg))
