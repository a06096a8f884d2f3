"""The fast shard reader: same tensors as RS5M's CLIP preprocessing, deterministic
order, exact splitting over workers and ranks, corrupt data skipped, S3 streaming."""
from __future__ import annotations

import importlib.util
import io
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.shards.reader import ShardReader, expand_urls, make_loader, normalize, preprocess, preprocess_batch
from rs5m_ray.storage import Storage, join

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: its sibling `figures` imports
_spec = importlib.util.spec_from_file_location("shard_throughput", BENCHMARKS / "shard_throughput.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# The documented tolerance (reader docstring), in 8-bit levels of the input; a crop off
# by one pixel gives image means of several levels.
MAX_LEVELS, MEAN_LEVELS, IMAGE_MEAN_LEVELS, MIN_COSINE = 64.0, 0.1, 1.0, 0.9999


def tiny_jpeg(i: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: str, storage: Storage, n_shards: int, per_shard: int, prefix: str = "pub11",
                 image=tiny_jpeg) -> list[str]:
    urls = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            i = s * per_shard + j
            members += sample_members(f"laion2b_{s}_{j}", image(i), f"caption {i}", {"i": i})
        url = join(out, shard_name(prefix, "train", s))
        storage.write_atomic(url, tar_bytes(members))
        urls.append(url)
    return urls


def keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_same_tensors_as_reference_within_tolerance(tmp_path):
    rng = random.Random(7)
    sizes = [bench.pub11_size(rng) for _ in range(6)] + [(1800, 1300), (260, 1500), (120, 120), (100, 80),
                                                         (224, 224), (449, 300)]
    images = [bench.synthetic_jpeg(i, s) for i, s in enumerate(sizes)]
    gray, png = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(images[0])).convert("L").save(gray, "JPEG")
    Image.open(io.BytesIO(images[1])).save(png, "PNG")  # not a JPEG: PIL decodes it
    images += [gray.getvalue(), png.getvalue()]
    storage = Storage()
    url = join(str(tmp_path), shard_name("pub11", "train", 0))
    members = [m for i, b in enumerate(images) for m in sample_members(f"laion2b_0_{i}", b, "c", {})]
    storage.write_atomic(url, tar_bytes(members))

    batches = list(ShardReader(url, storage, batch_size=8, shuffle_buffer=0, shuffle_shards=False))
    ours = normalize(torch.cat([b["image"] for b in batches]))
    names = [n for b in batches for n in b["img_name"]]
    assert names == [f"laion2b_0_{i}.jpg" for i in range(len(images))]
    ref_t = open_clip.image_transform(224, is_train=False)
    ref = torch.stack([ref_t(Image.open(io.BytesIO(b))) for b in images])
    levels = (ours - ref).abs() * torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255
    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS
    assert levels.mean(dim=(1, 2, 3)).max() <= IMAGE_MEAN_LEVELS

    f = bench.fidelity(images)  # what the benchmark reports, embedding effect included
    assert f["max_levels"] == pytest.approx(levels.max().item(), abs=1e-3)
    assert f["min_cosine"] >= MIN_COSINE
    exact = bench.fidelity(images, draft_margin=None)  # full decode: only fixed-point rounding differs
    assert exact["max_levels"] <= 3.0 + 1e-3 and exact["mean_levels"] <= 0.05


def test_normalize_is_totensor_plus_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    std, mean = torch.tensor(open_clip.OPENAI_DATASET_STD), torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    ref = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(normalize(x), ref, atol=1e-5)


def test_order_is_deterministic_given_seed(tmp_path):
    urls = write_shards(str(tmp_path), Storage(), n_shards=4, per_shard=12)

    def order(seed):
        return keys(make_loader(ShardReader(urls, batch_size=5, seed=seed, shuffle_buffer=20), num_workers=2))

    first = order(1)
    assert sorted(first) == sorted(f"laion2b_{s}_{j}" for s in range(4) for j in range(12))
    assert order(1) == first
    assert order(2) != first


@pytest.mark.parametrize("n_shards", [5, 3])  # shard split (5 >= 2 ranks x 2 workers) and sample split
def test_ranks_and_workers_see_every_sample_once(tmp_path, n_shards):
    urls = write_shards(str(tmp_path), Storage(), n_shards=n_shards, per_shard=7)
    seen = []
    for rank in range(2):
        reader = ShardReader(urls, batch_size=4, seed=3, rank=rank, world_size=2, shuffle_buffer=10)
        seen += keys(make_loader(reader, num_workers=2))
    assert Counter(seen) == Counter(f"laion2b_{s}_{j}" for s in range(n_shards) for j in range(7))


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, caplog):
    storage = Storage()
    good = tiny_jpeg(0)
    members = sample_members("ok_1", good, "fine", {})
    members += sample_members("truncated", good[: len(good) // 2], "cut jpeg", {})
    members += sample_members("garbage", b"not an image", "junk", {})
    members += [(m, d) for m, d in sample_members("no_image", good, "x", {}) if not m.endswith("img_content")]
    members += sample_members("ok_2", good, "fine", {})
    bad_samples = join(str(tmp_path), shard_name("pub11", "train", 0))
    storage.write_atomic(bad_samples, tar_bytes(members))
    whole = tar_bytes(sample_members("ok_3", good, "fine", {}) + sample_members("lost", good, "fine", {}))
    cut_shard = join(str(tmp_path), shard_name("pub11", "train", 1))
    storage.write_atomic(cut_shard, whole[: len(whole) - 1500])
    missing = join(str(tmp_path), shard_name("pub11", "train", 2))

    reader = ShardReader([bad_samples, cut_shard, missing], batch_size=2, shuffle_buffer=0, shuffle_shards=False)
    batches = list(reader)
    assert [k for b in batches for k in b["key"]] == ["ok_1", "ok_2", "ok_3"]
    expected = {"corrupt_sample": 2, "incomplete_sample": 1, "bad_shard": 2}
    assert reader.stats.skipped == expected
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == expected  # what workers report
    assert "truncated" in caplog.text and "garbage" in caplog.text


def test_preprocess_batch_reports_errors_per_image():
    good = tiny_jpeg(1)
    images, errors = preprocess_batch([good, b"junk", good[:50]], size=32)
    assert images.shape == (3, 3, 32, 32) and torch.equal(images[0], preprocess(good, 32))
    assert errors[0] is None and errors[1].startswith("UnidentifiedImageError") and errors[2]
    assert not images[1].any()


def test_reads_s3_shards_through_workers(s3_bucket):
    bucket, storage = s3_bucket
    out = join(bucket, "shards")
    urls = write_shards(out, storage, n_shards=3, per_shard=6)
    storage.write_atomic(join(out, "pub11-train-0000.parquet"), b"sidecar, not a shard")
    assert expand_urls(out + "/", storage) == urls
    reader = ShardReader(out + "/pub11-train-{0000..0002}.tar", storage, batch_size=4, read_ahead_bytes=1)
    batches = list(make_loader(reader, num_workers=2))
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"laion2b_{s}_{j}" for s in range(3)
                                                                   for j in range(6))
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 224, 224) for b in batches)


def test_rs5m_names_and_members(tmp_path):
    """RS5M's release: {pub11,rs3}-train-NNNN.tar, members img_name/img_content/caption only."""
    storage = Storage()
    for prefix in ("pub11", "rs3"):
        members = [(f"k{i}.{m.split('.', 1)[1]}", d) for i in range(3)
                   for m, d in sample_members(f"{prefix}_{i}", tiny_jpeg(i), f"{prefix} caption {i}", {})
                   if not m.endswith(".json")]
        storage.write_atomic(join(str(tmp_path), shard_name(prefix, "train", 0)), tar_bytes(members))
    reader = ShardReader(str(tmp_path / "{pub11,rs3}-train-{0000..0000}.tar"), batch_size=10,
                         shuffle_buffer=0, shuffle_shards=False, image_size=64)
    (batch,) = list(reader)
    assert batch["img_name"] == [f"{p}_{i}.jpg" for p in ("pub11", "rs3") for i in range(3)]
    assert batch["caption"][3] == "rs3 caption 0" and batch["json"] == [""] * 6
    assert batch["image"].shape == (6, 3, 64, 64)
    with pytest.raises(ValueError, match="no shards"):
        ShardReader(str(tmp_path / "none-*.tar"))
