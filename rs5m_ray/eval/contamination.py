"""Contamination check: are evaluation images in the training data?

Each eval image is hashed (64-bit pHash, the decode stage's `compute_phash`) and looked up in the
training shards (each shard image decoded once and hashed) and/or in a persistent dedup index (its
`phash` parts: every row any `rs5m pub11` run accepted, no decoding). Distance 0 is an exact copy,
1..`hamming_radius` a near copy (re-encoded, resized, brightness-shifted: README's near-dup figures).
With a model, eval and shard images are also compared by embedding (cosine >= threshold: crops and
other edits pHash misses); embeddings only compare within one model, so the shards are embedded
with the evaluated model (index embeddings come from the scoring model and are not used).

The report names every overlapping eval image with its closest training sample; `exclude` drops
them from the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from rs5m_ray.dedup_index import DedupIndex
from rs5m_ray.models.images import open_rgb
from rs5m_ray.shards.reader import ShardReader
from rs5m_ray.stages.phash import as_unsigned, compute_phash, hamming
from rs5m_ray.storage import Storage

HASH_SIDE = 256  # images are decoded at >= this size for hashing (pHash shrinks to 32 px)
CHECK_RUN_ID = "contamination-check"  # reads every run's index parts (none is this one's)


@dataclass
class Reference:
    """Training-side hashes (and embeddings) with the sample each came from."""

    ids: list[str] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)  # rows aligned with vector_ids
    vector_ids: list[str] = field(default_factory=list)

    def hash_array(self) -> np.ndarray:
        return np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)


def phash_of(data: bytes) -> int:
    return compute_phash(open_rgb(data, HASH_SIDE))


def shard_reference(urls: list[str], storage: Storage, clip=None, batch_size: int = 64) -> Reference:
    """pHash of every shard image (and its embedding by `clip`), decoded once per image."""
    ref = Reference()
    reader = ShardReader(urls, storage, shuffle_buffer=0, shuffle_shards=False)
    batch: list[bytes] = []
    batch_ids: list[str] = []

    def flush():
        if clip is not None and batch:
            pixels, errors = clip.decode_images(batch)
            ok = [i for i, e in enumerate(errors) if e is None]
            if ok:
                ref.vectors.append(clip.encode_images(pixels).numpy())
                ref.vector_ids.extend(batch_ids[i] for i in ok)
        batch.clear()
        batch_ids.clear()

    hashes = []
    for sample in reader.samples():
        data = sample.get("img_content")
        if not data:
            continue
        name = sample["img_name"].decode("utf-8") if "img_name" in sample else sample["__key__"]
        sample_id = f"{sample['__url__'].rsplit('/', 1)[-1]}:{name}"
        try:
            hashes.append(phash_of(data))
        except Exception:  # noqa: BLE001 - a corrupt training image cannot contaminate anything
            continue
        ref.ids.append(sample_id)
        batch.append(data)
        batch_ids.append(sample_id)
        if len(batch) == batch_size:
            flush()
    flush()
    ref.hashes.append(np.array(hashes, np.int64))
    return ref


def index_reference(index_path: str, storage: Storage) -> Reference:
    """The pHash parts of a persistent dedup index, every run's."""
    ref = Reference()
    for part in DedupIndex(index_path, storage, CHECK_RUN_ID).parts("phash"):
        with storage.open(part) as f:
            table = pq.read_table(f, columns=["sample_id", "phash"])
        ref.ids += table["sample_id"].to_pylist()
        ref.hashes.append(table["phash"].to_numpy())
    return ref


def _bands(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of radius + 1 bit bands covering 64 bits: pairs within `radius` bits share one exactly."""
    n = radius + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def nearest_hashes(queries: np.ndarray, reference: np.ndarray, radius: int,
                   chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the smallest Hamming distance to a reference hash if within `radius` (else radius + 1)
    and that reference's row (else -1). Candidate pairs share a whole band (pigeonhole), found by a
    sorted join per band: the reference is streamed in chunks, never compared all-pairs."""
    best = np.full(len(queries), radius + 1, np.int64)
    where = np.full(len(queries), -1, np.int64)
    if not len(queries) or not len(reference):
        return best, where
    q, r_all = as_unsigned(queries), as_unsigned(reference)
    for start in range(0, len(r_all), chunk):
        r = r_all[start:start + chunk]
        for shift, width in _bands(radius):
            mask = np.uint64((1 << width) - 1)
            qb, rb = (q >> np.uint64(shift)) & mask, (r >> np.uint64(shift)) & mask
            order = np.argsort(qb, kind="stable")
            lo, hi = np.searchsorted(qb[order], rb, "left"), np.searchsorted(qb[order], rb, "right")
            lens = hi - lo
            refs = np.flatnonzero(lens)
            if not len(refs):
                continue
            n = lens[refs]
            ref_rows = np.repeat(refs, n)
            q_rows = order[np.repeat(lo[refs] - np.cumsum(n) + n, n) + np.arange(n.sum())]
            d = hamming(q[q_rows], r[ref_rows]).astype(np.int64)
            closer = d < best[q_rows]
            for qi, ri, di in zip(q_rows[closer], ref_rows[closer], d[closer]):
                if di < best[qi]:
                    best[qi], where[qi] = di, start + ri
    return best, where


def hash_images(paths: list[str], storage: Storage) -> tuple[np.ndarray, list[str | None]]:
    """pHash of each eval image (0 where it cannot be read; its error says so)."""
    hashes, errors = np.zeros(len(paths), np.int64), []
    for i, p in enumerate(paths):
        try:
            hashes[i] = phash_of(storage.read_bytes(p))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - reported with the image
            errors.append(f"{type(e).__name__}: {e}"[:300])
    return hashes, errors


def typical_cosine(vectors: np.ndarray, sample: int = 1024) -> float:
    """Median over eval images (a seeded sample) of the cosine to their nearest OTHER eval image: how close
    the model puts distinct images of one set. A copy must score above that to be told apart."""
    rows = vectors[np.random.default_rng(0).permutation(len(vectors))[:sample]]
    if len(rows) < 2:
        return -1.0
    sims = rows @ rows.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.median(sims.max(axis=1)))


def check(eval_paths: list[str], eval_hashes: np.ndarray, ref: Reference, radius: int,
          eval_vectors: np.ndarray | None = None, cosine_threshold: float = 0.95) -> dict:
    """Overlaps of one eval set with the reference: counts and every overlapping image."""
    dist, row = nearest_hashes(eval_hashes, ref.hash_array(), radius)
    exact, near = dist == 0, (dist > 0) & (dist <= radius)
    by_embedding = np.zeros(len(eval_paths), bool)
    cosine = np.full(len(eval_paths), np.nan)
    nearest_vec = np.full(len(eval_paths), -1)
    embedding_check = "off"
    if eval_vectors is not None and ref.vectors:
        spread = typical_cosine(eval_vectors)
        if spread >= cosine_threshold:
            # distinct eval images are this similar already: the model cannot tell a copy by embedding
            embedding_check = (f"uninformative: median cosine of eval images to their nearest other eval image "
                               f"{spread:.4f} >= threshold {cosine_threshold}")
        else:
            embedding_check = f"on (median cosine of eval images to their nearest other eval image {spread:.4f})"
            ref_vectors = np.concatenate(ref.vectors)
            sims = eval_vectors @ ref_vectors.T
            nearest_vec = sims.argmax(axis=1)
            cosine = sims[np.arange(len(eval_paths)), nearest_vec]
            by_embedding = cosine >= cosine_threshold
    flagged = exact | near | by_embedding
    matches = []
    for i in np.flatnonzero(flagged):
        m = {"image": eval_paths[i], "kind": "exact" if exact[i] else "near" if near[i] else "embedding"}
        if row[i] >= 0:
            m |= {"training_sample": ref.ids[row[i]], "hamming": int(dist[i])}
        if by_embedding[i]:
            m |= {"embedding_match": ref.vector_ids[nearest_vec[i]], "cosine": round(float(cosine[i]), 5)}
        matches.append(m)
    return {"images": len(eval_paths), "exact": int(exact.sum()), "near": int(near.sum()),
            "embedding_only": int((by_embedding & ~exact & ~near).sum()), "contaminated": int(flagged.sum()),
            "hamming_radius": radius, "cosine_threshold": cosine_threshold if eval_vectors is not None else None,
            "embedding_check": embedding_check,
            "reference_images": int(len(ref.hash_array())), "matches": matches, "flagged": flagged}
