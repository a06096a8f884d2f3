"""The rating queue: a seeded sample of a shard set, spread evenly over sources, then over
the shards of each source, drawn once into the ratings directory (`queue.json` + `images/`)
so that serving and restarts never read the shards again.

A sample's rank is a seeded hash of its sample_id alone: the same shards, size and seed give
the same queue whatever the shard order or count of readers. Sources (the sample's json
`source`, else RS5M's name prefix: `fmow_…`, `ben_…`, `laion2b_0_0`) get equal quotas, capped
by what they hold, the rest going to the others; each source's quota is spread the same way
over its shards; inside a (source, shard) cell the lowest-ranked samples are taken. The queue
is in rank order, so sources and shards interleave.

Two passes over the shards, both through the shard reader (local or s3://): the first lists
sample ids and sources (from a shard's parquet sidecar where it has one, else from the tar),
the second copies only the drawn samples' images and captions out.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterable

import pyarrow.parquet as pq
from PIL import Image

from rs5m_ray.shards.layout import sample_key
from rs5m_ray.storage import Storage

log = logging.getLogger(__name__)

QUEUE = "queue.json"
IMAGES = "images"


@dataclass(frozen=True)
class Candidate:
    rank: int
    sample_id: str
    key: str  # the sample's key inside its tar
    source: str
    shard: str


def rank_of(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest(), "big")


def source_of_name(name: str) -> str:
    """RS5M's file names start with their source: `fmow_stadium_211_3_msrgb.jpg` -> fmow."""
    return os.path.basename(name).split("_", 1)[0] or "unknown"


def _text(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data else ""


def _meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _identity(sample: dict) -> tuple[str, str, dict]:
    """(sample_id, source, metadata) of a raw shard sample."""
    meta = _meta(sample)
    name = _text(sample.get("img_name")) or sample["__key__"]
    return str(meta.get("sample_id") or sample["__key__"]), str(meta.get("source") or source_of_name(name)), meta


def _raw_samples(urls: list[str], storage: Storage):
    """The shards' samples in file order, through the shard reader, and its skip counts."""
    from rs5m_ray.shards.reader import ShardReader  # imports torch: only when drawing

    reader = ShardReader(urls, storage, shuffle_buffer=0, shuffle_shards=False)
    return reader.samples(), reader.stats.skipped


def list_candidates(urls: list[str], storage: Storage, seed: int) -> tuple[list[Candidate], Counter]:
    """Every sample of the shards (first copy of a sample_id only), and what was skipped, by reason."""
    found: list[Candidate] = []
    skipped: Counter = Counter()
    no_sidecar = []
    for url in urls:
        sidecar = url.removesuffix(".tar") + ".parquet"
        try:
            with storage.open(sidecar) as f:
                table = pq.read_table(f, columns=["sample_id", "source"])
        except Exception as e:  # noqa: BLE001 - no usable sidecar: the tar itself is listed
            if storage.exists(sidecar):
                log.warning("reading the tar instead of its unreadable sidecar %s: %s", sidecar, e)
            no_sidecar.append(url)
            continue
        found += [Candidate(rank_of(seed, sid), sid, sample_key(sid), src, url)
                  for sid, src in zip(table["sample_id"].to_pylist(), table["source"].to_pylist())]
    if no_sidecar:
        samples, reader_skips = _raw_samples(no_sidecar, storage)
        for sample in samples:
            if "img_content" not in sample or "caption" not in sample:
                skipped["incomplete_sample"] += 1
                continue
            sid, src, _ = _identity(sample)
            found.append(Candidate(rank_of(seed, sid), sid, sample["__key__"], src, sample["__url__"]))
        skipped.update(reader_skips)
    unique: dict[str, Candidate] = {}
    for c in found:
        if c.sample_id in unique:
            skipped["duplicate_sample_id"] += 1
        else:
            unique[c.sample_id] = c
    return list(unique.values()), skipped


def allocate(sizes: dict[Hashable, int], n: int, seed: int) -> dict[Hashable, int]:
    """`n` spread over groups as evenly as their sizes allow; a remainder goes to groups in seeded order."""
    quota = dict.fromkeys(sizes, 0)
    left = min(n, sum(sizes.values()))
    open_groups = sorted((k for k in sizes if sizes[k]), key=lambda k: rank_of(seed, str(k)))
    while left:
        share, extra = divmod(left, len(open_groups))
        for i, k in enumerate(open_groups):
            take = min(sizes[k] - quota[k], share + (i < extra))
            quota[k] += take
            left -= take
        open_groups = [k for k in open_groups if quota[k] < sizes[k]]
    return quota


def _grouped(items: Iterable[Candidate], attr: str) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in items:
        groups[getattr(c, attr)].append(c)
    return groups


def draw(candidates: list[Candidate], n: int, seed: int) -> list[Candidate]:
    """`n` candidates spread over sources, then shards; returned in rank order."""
    picked: list[Candidate] = []
    by_source = _grouped(candidates, "source")
    source_quota = allocate({s: len(c) for s, c in by_source.items()}, n, seed)
    for source, members in by_source.items():
        by_shard = _grouped(members, "shard")
        shard_quota = allocate({s: len(c) for s, c in by_shard.items()}, source_quota[source], seed)
        for shard, cell in by_shard.items():
            picked += sorted(cell, key=lambda c: c.rank)[: shard_quota[shard]]
    return sorted(picked, key=lambda c: c.rank)


def _image_type(data: bytes) -> tuple[str, str] | None:
    """(file extension, MIME type) of an encoded image PIL can open, else None."""
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - not an image: the sample is skipped and counted
        return None
    return (fmt.lower(), Image.MIME.get(fmt, "application/octet-stream")) if fmt else None


def build_queue(urls: list[str], out_dir: str, n: int, seed: int, storage: Storage | None = None) -> dict:
    """Draw the queue from the shards `urls` into `out_dir` (local): images, then `queue.json` last."""
    storage = storage or Storage()
    candidates, skipped = list_candidates(urls, storage, seed)
    picked = draw(candidates, n, seed)
    wanted = {(c.shard, c.key): c for c in picked}
    copied: dict[str, dict] = {}
    os.makedirs(os.path.join(out_dir, IMAGES), exist_ok=True)
    lost: Counter = Counter()  # drawn samples that cannot be shown, by reason
    samples, _ = _raw_samples(sorted({c.shard for c in picked}, key=urls.index), storage)
    for sample in samples:
        c = wanted.get((sample["__url__"], sample["__key__"]))
        if c is None or c.sample_id in copied:
            continue
        kind = _image_type(sample.get("img_content") or b"")
        if kind is None or "caption" not in sample:
            lost["corrupt_image" if kind is None else "incomplete_sample"] += 1
            continue
        _, _, meta = _identity(sample)
        image = f"{IMAGES}/{sample_key(c.sample_id)}.{kind[0]}"
        storage.write_atomic(os.path.join(out_dir, image), sample["img_content"])
        copied[c.sample_id] = {"sample_id": c.sample_id, "source": c.source, "shard": c.shard,
                               "img_name": _text(sample.get("img_name")) or c.key, "caption": _text(sample["caption"]),
                               "image": image, "mimetype": kind[1], "meta": meta}
    lost["unreadable_on_second_read"] = len(picked) - len(copied) - sum(lost.values())
    skipped.update(lost)
    queue = {"shards": urls, "sample": n, "seed": seed, "available": len(candidates),
             "skipped": {k: v for k, v in sorted(skipped.items()) if v},
             "samples": [copied[c.sample_id] for c in picked if c.sample_id in copied]}
    storage.write_atomic(os.path.join(out_dir, QUEUE), json.dumps(queue, ensure_ascii=False, indent=1).encode())
    return queue


def load_queue(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, QUEUE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read())


def open_queue(out_dir: str, shards: list[str] | None, n: int, seed: int, storage: Storage | None = None) -> dict:
    """The queue of `out_dir`: drawn now from `shards` if it has none, else the one drawn before,
    which must come from the same shards, size and seed when `shards` are given."""
    storage = storage or Storage()
    queue = load_queue(out_dir)
    if queue is None:
        if shards is None:
            raise ValueError(f"{out_dir} holds no rating queue yet: give --shards to draw one")
        from rs5m_ray.shards.reader import expand_urls

        urls = expand_urls(shards, storage)
        if not urls:
            raise ValueError(f"no shards match {shards}")
        return build_queue(urls, out_dir, n, seed, storage)
    if shards is not None:
        from rs5m_ray.shards.reader import expand_urls

        asked = {"shards": expand_urls(shards, storage), "sample": n, "seed": seed}
        held = {k: queue[k] for k in asked}
        if asked != held:
            diff = ", ".join(k for k in asked if asked[k] != held[k])
            raise ValueError(f"{out_dir} holds a queue drawn with other {diff} ({held['sample']} samples, "
                             f"seed {held['seed']}, {len(held['shards'])} shards); use another --out, "
                             "or leave out --shards to go on rating it")
    return queue
