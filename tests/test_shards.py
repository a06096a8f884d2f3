"""The shard writer: images staged per part (row groups from `layout_rows`), one `ShardWriter` call
per shard on its light rows, as the pipeline's `groupby(shard).map_groups` makes them (grouped
in-process here: no Ray needed)."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from rs5m_ray.config import ShardConfig
from rs5m_ray.dedup_index import DedupIndex
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.pipelines.harness import part_name
from rs5m_ray.pipelines.parts import write_part
from rs5m_ray.shards.layout import SHARD_RE, shard_name
from rs5m_ray.shards.writer import (PART, ROW_GROUP, SHARD, STAGE, ShardWriter, layout_rows, piece_name, shard_of,
                                    split_of, write_manifest)
from rs5m_ray.storage import Storage, join

REPO = Path(__file__).resolve().parents[1]
# ~650-byte images, so a 2000-byte chunk cuts each shard's rows of a part into several row groups.
CFG = ShardConfig(train_shards=3, val_shards=1, chunk_bytes=2000)


def jpg(i):
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (i % 255, 10, 20)).save(buf, "JPEG")
    return buf.getvalue()


def rows(n=40, ids=None):
    ids = ids if ids is not None else range(n)
    n = len(ids)
    return pa.table({"sample_id": [f"laion2b_p_{i}" for i in ids], "source": ["laion2b"] * n,
                     "url": [f"http://h/{i}.jpg" for i in ids], "caption": [f"aerial view {i}" for i in ids],
                     "jpg": [jpg(i) for i in ids], "clip_score": [0.1 * (i % 7) for i in ids],
                     "phash": pa.array([1000 + i for i in ids], pa.int64()),
                     "image_embedding": [[0.0, 1.0]] * n})


def staged_path(run: str):
    return lambda part: join(run, "staging", "images", f"{part}.parquet")


def stage(table: pa.Table, run: str, storage: Storage, cfg: ShardConfig = CFG, parts: int = 3):
    """Stage `table` as `parts` parts (row i in part i % parts) the way FetchPart does; returns
    (part -> staged file, the staged light rows: every column but the image bytes)."""
    path = staged_path(run)
    for k in range(parts):
        piece = table.filter(pa.array([i % parts == k for i in range(len(table))]))
        piece = piece.append_column(PART, pa.array([part_name(k)] * len(piece), pa.string()))
        write_part(storage, path(part_name(k)), layout_rows(piece, cfg))
    light = []
    for k in range(parts):
        with storage.open(path(part_name(k))) as f:
            staged = pq.read_table(f)
        light.append(staged.drop_columns(["jpg"]))
    return path, pa.concat_tables(light)


def write_shards(run: str, storage: Storage, light: pa.Table, image_path, cfg: ShardConfig = CFG,
                 index: DedupIndex | None = None) -> list[str]:
    """One writer call per shard, as `groupby(SHARD).map_groups` does (rows in no particular
    order: here reversed), then the run's manifest; returns the status of every shard piece."""
    writer = ShardWriter(run, storage, cfg, image_path, index)
    summaries = []
    for shard in sorted(set(light[SHARD].to_pylist())):
        group = light.filter(pc.equal(light[SHARD], shard))
        summaries.append(writer(group.take(pa.array(range(len(group) - 1, -1, -1)))))
    summary = pa.concat_tables(summaries)
    write_manifest(join(run, "shards"), storage, [json.loads(m) for m in summary["manifest"].to_pylist()])
    return summary["status"].to_pylist()


def write_all(table, run, storage, cfg=CFG, parts=3):
    image_path, light = stage(table, run, storage, cfg, parts)
    return write_shards(run, storage, light, image_path, cfg)


def tar_samples(tar_path) -> list[str]:
    """The sample ids in a tar, in order (from their img_name members)."""
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read().decode().removesuffix(".jpg")
                for m in tar.getmembers() if m.name.endswith(".img_name")]


def shard_members(shards: Path) -> dict[str, str]:
    """sample_id -> the tar holding it; fails on a sample held twice."""
    where: dict[str, str] = {}
    for t in sorted(shards.glob("*.tar")):
        for s in tar_samples(t):
            assert s not in where, f"{s} in {where[s]} and {t.name}"
            where[s] = t.name
    return where


def test_split_is_deterministic_and_near_five_percent():
    cfg = ShardConfig()
    ids = [f"cc3m_x_{i}" for i in range(20000)]
    val = sum(split_of(s, cfg) == "val" for s in ids)
    assert 0.04 < val / len(ids) < 0.06
    assert [split_of(s, cfg) for s in ids[:100]] == [split_of(s, cfg) for s in ids[:100]]
    assert [split_of(s, ShardConfig(seed=1)) for s in ids[:200]] != [split_of(s, cfg) for s in ids[:200]]
    # shards spread over every index of their split, named after the split
    shards = Counter(shard_of(s, cfg) for s in ids)
    assert {n for n in shards if "-train-" in n} == {shard_name("pub11", "train", i) for i in range(cfg.train_shards)}
    assert {n for n in shards if "-val-" in n} == {shard_name("pub11", "val", i) for i in range(cfg.val_shards)}
    assert all(split_of(s, cfg) in shard_of(s, cfg) for s in ids[:500])


def test_names_follow_rs5m():
    assert shard_name("pub11", "train", 3) == "pub11-train-0003.tar"
    with pytest.raises(ValueError):
        shard_name("pub11", "test", 0)
    assert all(SHARD_RE.match(shard_of(f"sbu_{i}", CFG)) for i in range(50))
    # overflow pieces are numbered after the split's regular shards
    assert piece_name("pub11-train-0002.tar", 0, CFG) == "pub11-train-0002.tar"
    assert piece_name("pub11-train-0002.tar", 2, CFG) == "pub11-train-0008.tar"
    assert piece_name("pub11-val-0000.tar", 1, CFG) == "pub11-val-0001.tar"


def test_staged_row_groups_hold_one_shard_and_at_most_chunk_bytes(tmp_path, storage_local):
    image_path, light = stage(rows(), str(tmp_path), storage_local)
    for part in sorted(set(light[PART].to_pylist())):
        f = pq.ParquetFile(image_path(part))
        assert f.num_row_groups > len(set(light.filter(pc.equal(light[PART], part))[SHARD].to_pylist()))
        previous = None
        for g in range(f.num_row_groups):
            group = f.read_row_group(g)
            assert len(set(group[SHARD].to_pylist())) == 1 and set(group[ROW_GROUP].to_pylist()) == {g}
            assert len(group) == 1 or pc.sum(pc.binary_length(group["jpg"])).as_py() <= CFG.chunk_bytes
            key = [(s, i) for s, i in zip(group[SHARD].to_pylist(), group["sample_id"].to_pylist())]
            assert key == sorted(key) and (previous is None or previous < key[0])
            previous = key[-1]


def test_rs5m_loader_reads_every_sample(tmp_path, storage_local):
    write_all(rows(), str(tmp_path), storage_local)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("pub11-*.tar"))
    assert len(urls) > 1
    # RS5M's dataloader.py: WebDataset(urls).decode(custom_decoder) on img_content / img_name / caption.

    def custom_decoder(key, data):
        if key.endswith(".img_content"):
            return Image.open(io.BytesIO(data)).convert("RGB")
        if key.endswith((".img_name", ".caption")):
            return data.decode("utf-8")
        return None

    samples = list(wds.WebDataset(urls, shardshuffle=False).decode(custom_decoder))
    assert len(samples) == 40
    names = sorted(s["img_name"] for s in samples)
    assert names == sorted(f"laion2b_p_{i}.jpg" for i in range(40))
    s = next(x for x in samples if x["img_name"] == "laion2b_p_3.jpg")
    assert s["caption"] == "aerial view 3" and s["img_content"].size == (16, 12)
    meta = s["json"]  # webdataset decodes .json members itself
    assert meta["url"] == "http://h/3.jpg" and meta["phash"] == 1003
    assert not {"jpg", "image_embedding", "caption", SHARD, PART, ROW_GROUP} & set(meta)
    # every sample is in the shard its sample_id names
    for url in urls:
        assert {shard_of(s, CFG) for s in tar_samples(url)} == {Path(url).name}


def test_sidecar_and_manifest(tmp_path, storage_local):
    image_path, light = stage(rows(), str(tmp_path), storage_local)
    write_shards(str(tmp_path), storage_local, light, image_path)
    shards = tmp_path / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["samples"] == 40 and sum(s["count"] for s in manifest["shards"]) == 40
    assert [s["shard"] for s in manifest["shards"]] == sorted(p.name for p in shards.glob("*.tar"))
    for shard in manifest["shards"]:
        name = shard["shard"]
        side = pq.read_table(shards / name.replace(".tar", ".parquet"))
        assert len(side) == shard["count"]
        assert not {"jpg", "image_embedding", SHARD, PART, ROW_GROUP} & set(side.column_names)
        # inside a shard, samples are in (part, sample_id) order, in the sidecar as in the tar
        mine = light.filter(pc.equal(light[SHARD], name)).sort_by([(PART, "ascending"), ("sample_id", "ascending")])
        assert side["sample_id"].to_pylist() == mine["sample_id"].to_pylist() == tar_samples(shards / name)
        tar = (shards / name).read_bytes()
        assert (shard["tar_bytes"], shard["tar_sha256"]) == (len(tar), hashlib.sha256(tar).hexdigest())
        assert shard["sources"] == {"laion2b": shard["count"]}
        assert (shard["bucket"], shard["piece"], shard["pieces"]) == (name, 0, 1)
        assert shard["split"] == split_of(side["sample_id"][0].as_py(), CFG)
        assert json.loads((shards / name.replace(".tar", ".manifest.json")).read_text()) == shard


def test_rerun_skips_complete_shards_and_is_byte_identical(tmp_path, storage_local):
    a, b = tmp_path / "a", tmp_path / "b"
    path_a, light_a = stage(rows(), str(a), storage_local)
    assert set(write_shards(str(a), storage_local, light_a, path_a)) == {"written"}
    assert set(write_all(rows(), str(b), storage_local)) == {"written"}
    outputs = sorted(p.name for p in (a / "shards").iterdir())
    assert outputs == sorted(p.name for p in (b / "shards").iterdir())
    for name in outputs:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    # An interrupted run: one shard's manifest never landed, its tar was half written.
    victim = sorted((a / "shards").glob("*.tar"))[0]
    victim.with_name(victim.name.replace(".tar", ".manifest.json")).unlink()
    victim.write_bytes(b"partial")
    status = write_shards(str(a), storage_local, light_a, path_a)
    assert status.count("written") == 1 and status.count("skipped") == len(status) - 1
    for name in outputs:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    assert not [p for p in (a / "shards").iterdir() if ".tmp-" in p.name]


def test_shard_of_a_sample_does_not_depend_on_the_other_samples(tmp_path, storage_local):
    full, subset = tmp_path / "full", tmp_path / "subset"
    write_all(rows(), str(full), storage_local)
    some = [i for i in range(40) if i % 3 == 0 or i > 33]
    write_all(rows(ids=some), str(subset), storage_local, parts=2)  # other parts, other neighbours
    in_full, in_subset = shard_members(full / "shards"), shard_members(subset / "shards")
    assert set(in_subset) == {f"laion2b_p_{i}" for i in some} and len(in_full) == 40
    assert {s: in_full[s] for s in in_subset} == in_subset
    assert sorted(Counter(in_subset.values()).items()) != sorted(Counter(in_full.values()).items())


def test_byte_cap_continues_a_shard_in_overflow_pieces(tmp_path, storage_local):
    cap = 12_000  # a few samples (image ~650 bytes, ~3.5 KB of tar each)
    cfg = ShardConfig(train_shards=2, val_shards=1, chunk_bytes=2000, max_shard_bytes=cap)
    image_path, light = stage(rows(), str(tmp_path), storage_local, cfg)
    status = write_shards(str(tmp_path), storage_local, light, image_path, cfg)
    shards = tmp_path / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(status) == len(manifest["shards"]) == len(list(shards.glob("*.tar"))) and set(status) == {"written"}
    where = shard_members(shards)  # every sample exactly once
    assert sorted(where) == sorted(f"laion2b_p_{i}" for i in range(40)) and manifest["samples"] == 40
    by_bucket: dict[str, list[dict]] = {}
    for m in manifest["shards"]:
        by_bucket.setdefault(m["bucket"], []).append(m)
    assert max(len(p) for p in by_bucket.values()) >= 3
    for bucket, pieces in by_bucket.items():
        pieces.sort(key=lambda m: m["piece"])
        assert [m["shard"] for m in pieces] == [piece_name(bucket, k, cfg) for k in range(len(pieces))]
        assert all(m["pieces"] == len(pieces) for m in pieces)
        split, index = SHARD_RE.match(bucket)["split"], int(SHARD_RE.match(bucket)["index"])
        assert index < (cfg.train_shards if split == "train" else cfg.val_shards)
        # the pieces, in order, hold the shard's samples in (part, sample_id) order
        mine = light.filter(pc.equal(light[SHARD], bucket)).sort_by([(PART, "ascending"), ("sample_id", "ascending")])
        assert sum((tar_samples(shards / m["shard"]) for m in pieces), []) == mine["sample_id"].to_pylist()
    for m in manifest["shards"]:
        tar = shards / m["shard"]
        with tarfile.open(tar) as t:
            members = t.getmembers()
        spans = Counter()  # the tar bytes of each sample: headers and padded data of its members
        for member in members:
            spans[member.name.split(".", 1)[0]] += member.offset_data - member.offset + -(-member.size // 512) * 512
        one_sample = max(spans.values())
        # over the cap by at most one sample (and the tar's end-of-archive blocks and record padding)
        assert m["tar_bytes"] == tar.stat().st_size <= cap + one_sample + 2 * 512 + tarfile.RECORDSIZE
        assert m["count"] == len(spans)
    # the loader reads all of it; a rerun skips every piece
    assert len(list(wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False))) == 40
    assert write_shards(str(tmp_path), storage_local, light, image_path, cfg) == ["skipped"] * len(status)


def test_missing_staged_images_are_ledgered_not_lost(tmp_path, storage_local):
    run = str(tmp_path / "run")
    image_path, light = stage(rows(), run, storage_local)
    index = DedupIndex(str(tmp_path / "index"), storage_local, "r1")
    os.remove(image_path(part_name(1)))  # a lost staged part
    lost = set(light.filter(pc.equal(light[PART], part_name(1)))["sample_id"].to_pylist())
    assert lost

    def check():
        written = shard_members(tmp_path / "run" / "shards")
        ledger = read_parquet_dir(storage_local, join(run, "ledger", STAGE))
        assert set(ledger["sample_id"].to_pylist()) == lost and len(ledger) == len(lost)
        assert set(ledger["drop_reason"].to_pylist()) == {"staged_image_missing"}
        assert set(ledger["stage"].to_pylist()) == {STAGE}
        assert set(written) == set(light["sample_id"].to_pylist()) - lost  # every sample in a shard or the ledger
        stats = read_parquet_dir(storage_local, join(run, "stats", STAGE))
        assert (pc.sum(stats["rows_in"]).as_py(), pc.sum(stats["rows_out"]).as_py()) == (40, 40 - len(lost))
        manifest = json.loads((tmp_path / "run" / "shards" / "manifest.json").read_text())
        assert manifest["samples"] == len(written)
        # only samples in a committed shard enter the dedup index
        indexed = read_parquet_dir(storage_local, join(str(tmp_path / "index"), "phash"))
        assert sorted(indexed["sample_id"].to_pylist()) == sorted(written)

    assert set(write_shards(run, storage_local, light, image_path, index=index)) == {"written"}
    check()
    # A rerun (which removes the global stages' ledger and stats first) skips the complete shards
    # and ledgers the same samples again.
    for d in ("ledger", "stats"):
        storage_local.remove(join(run, d, STAGE))
    assert set(write_shards(run, storage_local, light, image_path, index=index)) == {"skipped"}
    check()


def test_atomic_resumable_shards_on_s3(s3_bucket):
    bucket, storage = s3_bucket
    run = f"{bucket}/pub11"
    out = f"{run}/shards"
    image_path, light = stage(rows(), run, storage)
    assert all(image_path(p).startswith("s3://") and storage.exists(image_path(p))
               for p in set(light[PART].to_pylist()))
    assert set(write_shards(run, storage, light, image_path)) == {"written"}
    tars = storage.glob(f"{out}/*.tar")
    first = {t: storage.read_bytes(t) for t in tars}
    assert set(write_shards(run, storage, light, image_path)) == {"skipped"}
    assert tars and all(t.startswith("s3://") for t in tars)
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest["samples"] == 40
    # an interrupted shard (tar landed, manifest did not) is rewritten byte for byte
    victim = tars[0]
    storage.remove(victim.removesuffix(".tar") + ".manifest.json")
    storage.write_atomic(victim, b"partial")
    status = write_shards(run, storage, light, image_path)
    assert status.count("written") == 1 and status.count("skipped") == len(status) - 1
    assert {t: storage.read_bytes(t) for t in storage.glob(f"{out}/*.tar")} == first
    fs = storage.fs(out)
    names = []
    for t in tars:
        with fs.open(t, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            names += [m.name for m in tar.getmembers() if m.name.endswith(".img_content")]
    assert len(names) == 40


MB = 1024**2


def test_shard_writer_memory_is_bounded_by_chunk_not_shard(tmp_path):
    """A 128 MiB shard (16x chunk_bytes) across two 64 MiB parts: the writer's peak RSS growth
    stays a few chunks, far below the shard (and below one whole part).

    The writer runs in a process of its own (tests/shard_memory_probe.py), which measures its
    peak RSS as VmHWM (ru_maxrss would start from this test runner's peak); the images are staged
    here, before it starts. Its allocators are told to hand freed large blocks back at once
    (glibc: mmap every allocation >= 128 KiB; Arrow: the system allocator), so RSS measures what
    the writer holds rather than what mimalloc/glibc keep cached for reuse."""
    from tests.shard_memory_probe import stage as stage_shard

    chunk = 8 * MB
    shard_bytes = stage_shard(str(tmp_path), 2, 64, MB, chunk)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-m", "tests.shard_memory_probe", str(tmp_path), str(chunk)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == ["written"] and result["count"] == result["rows"] == 128
    assert result["row_groups"] >= 16 and result["tar_bytes"] > shard_bytes >= 10 * chunk
    # peak RSS (VmHWM, reset to the RSS at the baseline where the kernel allows) over the baseline RSS
    growth = (result["peak_after_kib"] - result["rss_before_kib" if result["peak_reset"] else "peak_before_kib"]) * 1024
    print(f"shard writer peak RSS growth {growth / MB:.1f} MiB for a {shard_bytes / MB:.0f} MiB shard, "
          f"chunk_bytes {chunk / MB:.0f} MiB")
    assert growth < 4 * chunk + 60 * MB
    assert growth < shard_bytes / 2
