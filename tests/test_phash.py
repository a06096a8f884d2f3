"""Perceptual hashes: bit layout, methods, Hamming helpers, robustness on generated and real images."""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from rs5m_ray.stages.phash import as_unsigned, compute_phash, hamming, hamming_matrix

RADIUS = 4


def scene(seed: int, width: int, height: int) -> tuple[np.ndarray, np.random.Generator]:
    """A smooth random RGB scene in [0, 1] (sum of random low-frequency waves plus blobs), and the
    generator that drew it (for more of the same seed's randomness)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.zeros((height, width, 3))
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(0.2, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    for _ in range(5):
        cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.2)]
        img += rng.uniform(-1.5, 1.5, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)[..., None]
    return (img - img.min()) / (img.max() - img.min()), rng


def generated_image(seed: int, size: int = 256) -> Image.Image:
    img, _ = scene(seed, size, size)
    return Image.fromarray((img * 255).astype(np.uint8))


def reencoded(img: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def cropped(img: Image.Image, fraction: float = 0.01) -> Image.Image:
    w, h = img.size
    dx, dy = max(1, int(w * fraction)), max(1, int(h * fraction))
    return img.crop((dx, dy, w - dx, h - dy))


def watermarked(img: Image.Image) -> Image.Image:
    """Semi-transparent text in a corner, the usual stock-photo mark."""
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    w, h = img.size
    ImageDraw.Draw(layer).text((w * 0.6, h * 0.9), "(c) stock", fill=(255, 255, 255, 96))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


COPIES = {
    "reencoded": reencoded,
    "resized_down": lambda im: im.resize((im.width * 2 // 3, im.height * 2 // 3)),
    "resized_up": lambda im: im.resize((im.width * 2, im.height * 2)),
    "cropped_1pct": cropped,
    "brighter_10pct": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "watermarked": watermarked,
}


def test_small_images_hash_exactly_as_imagehash():
    img = generated_image(1, size=100)
    expected = int(str(imagehash.phash(img)), 16)
    got = compute_phash(img)
    assert -(2**63) <= got < 2**63
    assert int(np.int64(got).view(np.uint64)) == expected


def test_methods_are_selectable_and_unknown_ones_rejected():
    img = generated_image(2)
    hashes = {m: compute_phash(img, m) for m in ("phash", "dhash", "whash")}
    assert len(set(hashes.values())) == 3
    with pytest.raises(ValueError, match="unknown hash method"):
        compute_phash(img, "ahash2")


def test_hamming_helpers_match_bit_counting():
    rng = np.random.default_rng(0)
    a = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64)
    b = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64)
    expected = [bin((int(x) ^ int(y)) & (2**64 - 1)).count("1") for x, y in zip(a, b)]
    assert hamming(a, b).tolist() == expected
    assert hamming(as_unsigned(a), b).tolist() == expected
    m = hamming_matrix(a[:5], b[:7])
    assert m.shape == (5, 7) and m[3, 4] == bin((int(a[3]) ^ int(b[4])) & (2**64 - 1)).count("1")


def test_generated_copies_are_near_and_distinct_images_far():
    images = [generated_image(s) for s in range(20)]
    hashes = np.array([compute_phash(im) for im in images], dtype=np.int64)
    for name, copy in COPIES.items():
        d = hamming(hashes, np.array([compute_phash(copy(im)) for im in images], dtype=np.int64))
        assert np.mean(d <= RADIUS) >= 0.9, (name, d.tolist())  # pHash shifts on crops: see README
    apart = hamming_matrix(hashes, hashes)[np.triu_indices(len(hashes), 1)]
    assert (apart > RADIUS).all()


def test_real_aid_copies_found_and_false_positive_rate(shared_data):
    files = sorted((shared_data / "aid-dev").glob("*/*.jpg"))
    assert len(files) == 300
    images = [Image.open(f).convert("RGB") for f in files]
    hashes = np.array([compute_phash(im) for im in images], dtype=np.int64)
    recall = {name: float(np.mean(hamming(hashes, np.array([compute_phash(copy(im)) for im in images])) <= RADIUS))
              for name, copy in COPIES.items()}
    pairs = np.triu_indices(len(files), 1)
    dist = hamming_matrix(hashes, hashes)[pairs]
    classes = np.array([f.parent.name for f in files])
    same_class = classes[pairs[0]] == classes[pairs[1]]
    fp_all, fp_same = int((dist <= RADIUS).sum()), int((dist[same_class] <= RADIUS).sum())
    print(f"\nAID-dev pHash radius {RADIUS}: copy recall {recall}; false positives {fp_all}/{len(dist)} pairs, "
          f"{fp_same}/{int(same_class.sum())} same-class pairs")
    assert min(recall.values()) >= 0.9, recall
    assert fp_same / same_class.sum() <= 0.001 and fp_all / len(dist) <= 0.001
