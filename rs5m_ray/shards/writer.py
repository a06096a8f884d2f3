"""Shard writer: the accounted sink of a run. RS5M-layout tars, a parquet sidecar and a
manifest per shard.

A sample's split and shard follow from a seeded hash of its sample_id alone, never from
the run's totals, so the same sample always lands in the same shard. Inside a shard,
samples are in (part, sample_id) order. The writer of a shard gets the shard's light rows
(ids, metadata, scores) and streams the image bytes from the staged parts, one row group
(at most `chunk_bytes`) at a time, into a tar built in a scratch file: memory stays bounded
whatever the shard's size. A shard over `max_shard_bytes` continues in an overflow shard
numbered after the regular ones (index + shards of its split).

A shard is committed in three atomic writes (tar, sidecar, then its manifest); only a
shard with a manifest is complete. A rerun skips a shard whose manifests name exactly the
same members, and rewrites the rest byte for byte. Accepted rows enter the persistent
dedup index only after their shard is committed.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray import metrics
from rs5m_ray.config import ShardConfig
from rs5m_ray.dedup_index import DedupIndex
from rs5m_ray.ledger import PartAccount, mark_dropped
from rs5m_ray.shards.layout import TarWriter, sample_members, shard_name
from rs5m_ray.storage import Storage, join

SHARD = "shard"
PART = "part"
ROW_GROUP = "row_group"
STAGE = "shard_writer"
SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("status", pa.string()), ("manifest", pa.string())])
# Image bytes, embeddings and staging coordinates stay out of the per-sample json and the sidecar.
NOT_METADATA = {"jpg", "image_embedding", SHARD, PART, ROW_GROUP}


def _unit(seed: int, salt: str, sample_id: str) -> int:
    return zlib.crc32(f"{seed}:{salt}:{sample_id}".encode())


def split_of(sample_id: str, cfg: ShardConfig) -> str:
    return "val" if _unit(cfg.seed, "split", sample_id) % 1_000_000 < cfg.val_fraction * 1_000_000 else "train"


def shards_of(split: str, cfg: ShardConfig) -> int:
    return cfg.val_shards if split == "val" else cfg.train_shards


def shard_of(sample_id: str, cfg: ShardConfig) -> str:
    split = split_of(sample_id, cfg)
    return shard_name(cfg.prefix, split, _unit(cfg.seed, "shard", sample_id) % shards_of(split, cfg))


def piece_name(shard: str, piece: int, cfg: ShardConfig) -> str:
    """Overflow piece `piece` of `shard` (piece 0 is the shard itself)."""
    split, index = shard.removesuffix(".tar").rsplit("-", 2)[1:]
    return shard_name(cfg.prefix, split, int(index) + piece * shards_of(split, cfg))


def manifest_path(out_dir: str, shard: str) -> str:
    return join(out_dir, shard.removesuffix(".tar") + ".manifest.json")


def layout_rows(rows: pa.Table, cfg: ShardConfig) -> pa.Table:
    """`rows` with their shard, sorted by (shard, sample_id), and a `row_group` column that cuts
    each shard's rows into groups of at most `cfg.chunk_bytes` of image bytes: the staged part's
    row groups, read one at a time by the shard writers."""
    rows = rows.append_column(SHARD, pa.array([shard_of(s, cfg) for s in rows["sample_id"].to_pylist()],
                                              pa.string()))
    rows = rows.sort_by([(SHARD, "ascending"), ("sample_id", "ascending")])
    shards = rows[SHARD].to_pylist()
    sizes = pc.binary_length(rows["jpg"]).to_pylist() if len(rows) else []
    groups, group, size = [], -1, 0
    for i, (shard, n) in enumerate(zip(shards, sizes)):
        if i == 0 or shard != shards[i - 1] or size + n > cfg.chunk_bytes:
            group, size = group + 1, 0
        groups.append(group)
        size += n
    return rows.append_column(ROW_GROUP, pa.array(groups, pa.int32()))


def row_group_slices(rows: pa.Table) -> list[tuple[int, int]]:
    """(offset, length) of each row group of a `layout_rows` table."""
    groups = rows[ROW_GROUP].to_numpy() if len(rows) else []
    starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
    return [(a, b - a) for a, b in zip(starts, starts[1:] + [len(groups)])]


class HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """map_groups function: one group = the light rows of one shard; bytes come from the staging."""

    __name__ = "write_shards"  # Ray names map_groups operators after their function

    def __init__(self, output: str, storage: Storage, cfg: ShardConfig, image_path, index: DedupIndex | None):
        self.output, self.storage, self.cfg = output, storage, cfg
        self.out_dir = join(output, "shards")
        self.image_path = image_path  # part -> its staged images file
        self.index = index

    def __call__(self, rows: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows = rows.sort_by([(PART, "ascending"), ("sample_id", "ascending")])
        shard = rows[SHARD][0].as_py()
        members = hashlib.sha256("\n".join(rows["sample_id"].to_pylist()).encode()).hexdigest()
        manifests = self._complete(shard, members)
        if manifests is None:
            manifests, missing = self._write(shard, rows, members)
            status = "written"
            metrics.observe("rs5m_shard_seconds", time.perf_counter() - start)
            for m in manifests:
                metrics.observe("rs5m_shard_bytes", m["tar_bytes"])
        else:  # its samples whose staged bytes were missing then are ledgered again
            missing, status = self._unwritten(rows, manifests), "skipped"
        rows = mark_dropped(rows, pc.is_in(rows["sample_id"], pa.array(missing, pa.string())),
                            "staged_image_missing")
        account = PartAccount(STAGE, self.output, self.storage)
        written = account.add(rows, rows, time.perf_counter() - start)
        account.commit(shard.removesuffix(".tar"))
        if self.index is not None:  # only now, with the shard committed
            self.index.commit(shard.removesuffix(".tar"), written)
        return pa.table([[m["shard"] for m in manifests], [status] * len(manifests),
                         [json.dumps(m, sort_keys=True) for m in manifests]], schema=SUMMARY_SCHEMA)

    def _complete(self, shard: str, members: str) -> list[dict] | None:
        first = manifest_path(self.out_dir, shard)
        if not self.storage.exists(first):
            return None
        manifest = json.loads(self.storage.read_bytes(first))
        if manifest.get("members_sha256") != members:
            return None
        rest = [manifest_path(self.out_dir, piece_name(shard, k, self.cfg)) for k in range(1, manifest["pieces"])]
        if not all(self.storage.exists(p) for p in rest):
            return None
        return [manifest] + [json.loads(self.storage.read_bytes(p)) for p in rest]

    def _unwritten(self, rows: pa.Table, manifests: list[dict]) -> list[str]:
        """The sample_ids of `rows` that no piece of their complete shard holds (per the sidecars)."""
        if sum(m["count"] for m in manifests) == len(rows):
            return []
        held = []
        for m in manifests:
            with self.storage.open(join(self.out_dir, m["shard"].removesuffix(".tar") + ".parquet")) as f:
                held.append(pq.read_table(f, columns=["sample_id"])["sample_id"])
        held = pa.chunked_array([c for h in held for c in h.chunks], pa.string())
        return pc.filter(rows["sample_id"], pc.invert(pc.is_in(rows["sample_id"], held))).to_pylist()

    def _write(self, shard: str, rows: pa.Table, members: str) -> tuple[list[dict], list[str]]:
        meta_cols = [c for c in rows.column_names if c not in NOT_METADATA]
        pieces: list[_Piece] = []
        missing: list[str] = []
        for part_rows in _groups(rows, [PART, ROW_GROUP]):
            ids = part_rows["sample_id"]
            jpgs = self._staged_bytes(part_rows[PART][0].as_py(), part_rows[ROW_GROUP][0].as_py(), ids)
            if jpgs.null_count:
                found = pc.is_valid(jpgs)
                missing += pc.filter(ids, pc.invert(found)).to_pylist()
                part_rows, jpgs = part_rows.filter(found), jpgs.filter(found)
            metadata = part_rows.select(meta_cols)
            json_rows = metadata.drop_columns(["caption"]).to_pylist()
            start = 0  # first row of `metadata` not yet in a piece's sidecar
            for i, (sid, caption) in enumerate(zip(part_rows["sample_id"].to_pylist(),
                                                   part_rows["caption"].to_pylist())):
                jpg = jpgs[i].as_py()  # one image's bytes at a time
                if not pieces or (pieces[-1].count and pieces[-1].tar.size + len(jpg) > self.cfg.max_shard_bytes):
                    if pieces:
                        pieces[-1].meta.append(metadata.slice(start, i - start))
                        start = i
                    pieces.append(_Piece(self.storage, join(self.out_dir, piece_name(shard, len(pieces), self.cfg))))
                pieces[-1].add(sample_members(sid, jpg, caption, json_rows[i]))
            if pieces:
                pieces[-1].meta.append(metadata.slice(start))
        if not pieces:
            return [], missing
        manifests = [p.commit(self.storage, self.out_dir, {"bucket": shard, "piece": k, "pieces": len(pieces),
                                                           "members_sha256": members})
                     for k, p in reversed(list(enumerate(pieces)))]  # piece 0's manifest last: it marks the whole
        return manifests[::-1], missing

    def _staged_bytes(self, part: str, row_group: int, ids: pa.ChunkedArray) -> pa.ChunkedArray:
        """The jpg bytes of `ids` from one staged row group (null where the staging lacks them)."""
        try:
            with self.storage.open(self.image_path(part)) as f:
                staged = pq.ParquetFile(f).read_row_group(row_group, columns=["sample_id", "jpg"])
        except Exception:  # a lost or damaged staged part: its rows go to the ledger
            return pa.chunked_array([pa.nulls(len(ids), pa.binary())])
        if staged["sample_id"].equals(ids):  # every staged row of the group is kept: no copy
            return staged["jpg"]
        return pc.take(staged["jpg"], pc.index_in(ids, staged["sample_id"]))


class _Piece:
    """One tar being written to a scratch file, with its sidecar rows."""

    def __init__(self, storage: Storage, path: str):
        self.path = path
        self.scratch = storage.scratch_path(path)
        self.file = open(self.scratch, "wb")
        self.tar = HashingFile(self.file)
        self.writer = TarWriter(self.tar)
        self.meta: list[pa.Table] = []
        self.count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.writer.add(name, data)
        self.count += 1

    def commit(self, storage: Storage, out_dir: str, extra: dict) -> dict:
        self.writer.close()
        self.file.close()
        storage.commit_file(self.scratch, self.path)
        metadata = pa.concat_tables(self.meta)
        sidecar = storage.scratch_path(self.path.removesuffix(".tar") + ".parquet")
        pq.write_table(metadata, sidecar, compression="zstd")
        storage.commit_file(sidecar, self.path.removesuffix(".tar") + ".parquet")
        name = self.path.rsplit("/", 1)[-1]
        manifest = {"shard": name, "split": name.rsplit("-", 2)[1], "count": self.count,
                    "tar_bytes": self.tar.size, "tar_sha256": self.tar.sha256.hexdigest(),
                    "sources": counts_of(metadata["source"]), **extra}
        storage.write_atomic(manifest_path(out_dir, name), json.dumps(manifest, sort_keys=True, indent=1).encode())
        return manifest


def counts_of(values: pa.ChunkedArray) -> dict[str, int]:
    return dict(sorted((v["values"], v["counts"]) for v in pc.value_counts(values).to_pylist()))


def _groups(rows: pa.Table, keys: list[str]):
    """Consecutive runs of equal `keys` in `rows` (sorted on them)."""
    cols = [rows[k].to_pylist() for k in keys]
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or any(c[i] != c[i - 1] for c in cols):
            yield rows.slice(start, i - start)
            start = i


def write_manifest(out_dir: str, storage: Storage, manifests: list[dict]) -> dict:
    """`manifest.json`: this run's complete shards."""
    manifest = {"shards": sorted(manifests, key=lambda s: s["shard"]),
                "samples": sum(s["count"] for s in manifests)}
    storage.write_atomic(join(out_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest
