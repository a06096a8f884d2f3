"""Decode and validate: broken files become drop reasons, odd modes become clean RGB JPEGs."""
from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from rs5m_ray.config import DecodeConfig
from rs5m_ray.stages.decode import (OUTPUT_SCHEMA, DecodeFailure, DecodeStage, _orientation, decode_image,
                                    jpeg_header, target_size)
from rs5m_ray.stages.phash import compute_phash, hamming
from tests.test_phash import scene


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded_rgb(result: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result["jpg"])).convert("RGB"), dtype=np.int32)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in a few bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def reason(data, cfg=None) -> str:
    cfg = cfg or DecodeConfig()
    with pytest.raises(DecodeFailure) as info:
        decode_image(data, cfg)
    return info.value.why


@pytest.mark.parametrize("policy", ["always", "if_needed"])  # if_needed validates kept JPEGs at reduced scale
def test_broken_inputs_get_reasons(policy):
    cfg = DecodeConfig(reencode=policy)
    good = encode(Image.new("RGB", (120, 80), (10, 120, 200)), "JPEG")
    assert reason(b"", cfg) == reason(None, cfg) == "zero_bytes"
    assert reason(b"<html><body>not found</body></html>", cfg) == "not_an_image"
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", cfg) == "not_an_image"  # no Ghostscript
    assert reason(good[: len(good) // 2], cfg) == "truncated"
    assert reason(good[:-10], cfg) == "truncated"
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    png = encode(noise, "PNG")
    assert reason(png[: len(png) // 2], cfg) == "truncated"
    damaged = bytearray(good)
    damaged[len(good) // 2: len(good) // 2 + 200] = bytes(200)
    assert decode_image(bytes(damaged), cfg)["width"] == 120  # damaged data still decodes: kept
    assert reason(png_header_only(200_000, 200_000), cfg) == "too_many_pixels"
    assert reason(good, DecodeConfig(reencode=policy, max_pixels=120 * 80 - 1)) == "too_many_pixels"
    assert decode_image(good, DecodeConfig(reencode=policy, max_pixels=120 * 80))["width"] == 120


@pytest.mark.parametrize("img, fmt, expected", [
    (Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    (Image.new("RGBA", (16, 12), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
    (Image.new("LA", (16, 12), (0, 255)), "PNG", (0, 0, 0)),
    (Image.new("1", (16, 12), 1), "PNG", (255, 255, 255)),
    (Image.fromarray(np.full((12, 16), 65535, np.uint16)), "PNG", (255, 255, 255)),  # 16-bit grey
    (Image.fromarray(np.full((12, 16), 32768, np.uint16)), "TIFF", (128, 128, 128)),
    (Image.new("RGB", (16, 12), (0, 0, 255)), "WEBP", (0, 0, 255)),
])
def test_modes_become_rgb(img, fmt, expected):
    result = decode_image(encode(img, fmt), DecodeConfig())
    assert (result["width"], result["height"], result["orig_format"]) == (16, 12, fmt)
    assert np.abs(decoded_rgb(result).mean(axis=(0, 1)) - expected).max() <= 6


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (16, 12), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 8, 12))  # left half red, right half index 0 = transparent
    pixels = decoded_rgb(decode_image(encode(img, "PNG", transparency=0), DecodeConfig()))
    assert np.abs(pixels[:, :6].mean(axis=(0, 1)) - (255, 0, 0)).max() <= 8
    assert np.abs(pixels[:, 10:].mean(axis=(0, 1)) - (255, 255, 255)).max() <= 8


def test_multi_frame_keeps_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels = decoded_rgb(decode_image(data, DecodeConfig()))
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    result = decode_image(encode(img, "JPEG", exif=exif.tobytes()), DecodeConfig())
    assert (result["width"], result["height"], result["orig_width"], result["orig_height"]) == (20, 40, 20, 40)
    pixels = decoded_rgb(result)
    assert pixels[:15, :, 0].mean() > 200 and pixels[25:, :, 2].mean() > 200  # red on top now


@pytest.mark.parametrize("mode, size, expected", [
    ("keep", 64, (300, 200)), ("max_side", 150, (150, 100)), ("shortest_side", 100, (150, 100)),
    ("max_side", 500, (300, 200)),  # never enlarged
])
def test_resize_policies(mode, size, expected):
    cfg = DecodeConfig(resize_mode=mode, resize_size=size)
    assert target_size(300, 200, cfg) == expected
    result = decode_image(encode(Image.new("RGB", (300, 200), (90, 90, 90)), "JPEG"), cfg)
    assert (result["width"], result["height"]) == expected
    assert (result["orig_width"], result["orig_height"]) == (300, 200)
    assert Image.open(io.BytesIO(result["jpg"])).size == expected


def test_rotated_jpeg_resized_with_draft_keeps_orientation():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (1600, 400), (30, 60, 90)), "JPEG", exif=exif.tobytes())
    result = decode_image(data, DecodeConfig(resize_mode="max_side", resize_size=200))
    assert (result["width"], result["height"], result["orig_width"], result["orig_height"]) == (50, 200, 400, 1600)


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError):
        DecodeStage(DecodeConfig(resize_mode="stretch"))


def test_stage_columns_and_drops():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good = encode(photo, "PNG")
    table = pa.table({"sample_id": ["a", "b", "c"], "source": ["cc3m"] * 3, "url": ["u1", "u2", "u3"],
                      "image_bytes": pa.array([good, b"", b"GIF89a garbage"], pa.binary())})
    out = DecodeStage(DecodeConfig())(table)
    assert "image_bytes" not in out.column_names
    for field in OUTPUT_SCHEMA:
        assert out.schema.field(field.name).type == field.type
    assert out["drop_reason"].to_pylist() == [None, "decode_error:zero_bytes", "decode_error:not_an_image"]
    row = out.slice(0, 1).to_pylist()[0]
    assert row["sha256"] == hashlib.sha256(good).hexdigest()
    assert (row["width"], row["height"], row["orig_format"]) == (64, 48, "PNG")
    assert row["phash"] == compute_phash(photo)  # lossless input: hashed the same pixels
    assert out["jpg"][1].as_py() is None and out["phash"][1].as_py() is None

    no_hash = DecodeStage(DecodeConfig(phash=False))(table)
    assert no_hash["phash"].to_pylist() == [None, None, None]


@pytest.mark.parametrize("folder, pattern", [("aid-dev", "*/*.jpg"), ("imagenet-dev", "*.JPEG")])
def test_real_images_all_kept_with_true_sizes(shared_data, folder, pattern):
    files = sorted((shared_data / folder).glob(pattern))
    if not files:
        pytest.skip(f"{folder} not present")
    table = pa.table({"sample_id": [f.name for f in files], "source": ["cc3m"] * len(files),
                      "url": [str(f) for f in files],
                      "image_bytes": pa.array([f.read_bytes() for f in files], pa.binary())})
    out = DecodeStage(DecodeConfig())(table)
    assert out["drop_reason"].null_count == len(files)
    for f, w, h, ow, oh in zip(files, *(out[c].to_pylist() for c in ("width", "height", "orig_width", "orig_height"))):
        with Image.open(f) as img:
            size = ImageOps.exif_transpose(img).size
        assert (w, h) == (ow, oh) == size, f.name
    if folder == "aid-dev":
        assert set(zip(out["width"].to_pylist(), out["height"].to_pylist())) == {(150, 150)}


def test_reencode_if_needed_keeps_clean_rgb_jpegs():
    cfg = DecodeConfig(reencode="if_needed")
    photo = Image.new("RGB", (40, 30), (120, 30, 60))
    jpg = encode(photo, "JPEG", quality=80)
    assert decode_image(jpg, cfg)["jpg"] == jpg
    assert decode_image(jpg, DecodeConfig(reencode="always"))["jpg"] != jpg
    png = encode(photo, "PNG")
    grey = encode(photo.convert("L"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated = encode(photo, "JPEG", exif=exif.tobytes())
    for data in (png, grey, rotated):
        out = decode_image(data, cfg)["jpg"]
        assert out != data and Image.open(io.BytesIO(out)).mode == "RGB"
    assert decode_image(jpg, DecodeConfig(reencode="if_needed", resize_mode="max_side", resize_size=20))["jpg"] != jpg
    with pytest.raises(ValueError):
        DecodeStage(DecodeConfig(reencode="never"))


def photo_jpeg(seed: int, size: tuple[int, int], **kw) -> bytes:
    """A smooth random scene (tests/test_phash.py's) with sensor noise, as a JPEG."""
    img, rng = scene(seed, *size)
    img = img * 200 + 20 + rng.normal(0, 4, img.shape)
    return encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "JPEG", quality=90, **kw)


def full_decode_phash(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return compute_phash(img.convert("RGB"))


def test_kept_jpeg_is_damage_checked_like_a_full_decode():
    """The reduced-scale validation of kept JPEGs refuses and keeps exactly what a full decode does."""
    rng = random.Random(0)
    inputs = [photo_jpeg(1, (300, 200)), photo_jpeg(2, (640, 480), progressive=True)]
    for good in list(inputs):
        inputs += [good[:k] for k in sorted(rng.sample(range(2, len(good)), 12))] + [good[:-1], good[:-2]]
        header_end = good.find(b"\xff\xda") + 20
        for n in (1, 3, 20):
            for end in (len(good), header_end, header_end):  # anywhere, and twice in the header
                damaged = bytearray(good)
                for _ in range(n):
                    damaged[rng.randrange(2, end)] = rng.randrange(256)
                inputs.append(bytes(damaged))
    verdicts = []
    for data in inputs:
        for policy in ("always", "if_needed"):
            try:
                verdicts.append((policy, decode_image(data, DecodeConfig(reencode=policy))["width"]))
            except DecodeFailure as e:
                verdicts.append((policy, e.why))
    full, reduced = verdicts[::2], verdicts[1::2]
    assert [v for _, v in full] == [v for _, v in reduced]
    assert {"truncated"} <= {v for _, v in full} and sum(isinstance(v, int) for _, v in full) >= 2


@pytest.mark.parametrize("size", [(500, 400), (1024, 768), (640, 480), (100, 80), (257, 1030)])
def test_kept_jpeg_bytes_kept_and_hash_matches_full_decode(size):
    for seed in range(4):
        data = photo_jpeg(seed, size)
        row = decode_image(data, DecodeConfig(reencode="if_needed"))
        assert row["jpg"] == data and (row["width"], row["height"]) == size
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        # Luma at reduced DCT scale vs. Pillow's full RGB decode: rounding apart, not a copy apart.
        assert hamming(row["phash"], full_decode_phash(data)) <= 2, (size, seed)


def test_kept_real_jpegs_hash_as_full_decode(shared_data):
    files = sorted((shared_data / "aid-dev").glob("*/*.jpg"))[::3] + sorted((shared_data / "imagenet-dev").glob("*.JPEG"))
    if not files:
        pytest.skip("no real images")
    dist = []
    for f in files:
        data = f.read_bytes()
        row = decode_image(data, DecodeConfig(reencode="if_needed"))
        dist.append(int(hamming(row["phash"], full_decode_phash(data))))
    assert max(dist) <= 2 and np.mean(dist) <= 0.5, np.bincount(dist)


def test_jpeg_header_reads_what_pillow_reads():
    base = Image.open(io.BytesIO(photo_jpeg(3, (64, 48)))).convert("RGB")
    cases = []
    for orientation in range(0, 10):  # 0: no tag; 9: out of range
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        for mode in ("RGB", "L", "CMYK"):
            cases.append(encode(base.convert(mode), "JPEG", exif=exif.tobytes(), progressive=orientation % 2 == 1))
    xmp = encode(base, "JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    mpo = encode(base, "MPO", save_all=True, append_images=[base])
    assert jpeg_header(xmp) is None and jpeg_header(mpo) is None  # Pillow may read these differently
    rng = random.Random(5)
    for data in list(cases):
        for _ in range(20):
            damaged = bytearray(data)
            damaged[rng.randrange(2, data.find(b"\xff\xda") + 10)] = rng.randrange(256)
            cases.append(bytes(damaged))
    read = 0
    for data in cases:
        header = jpeg_header(data)
        if header is None:
            continue
        read += 1
        try:
            img = Image.open(io.BytesIO(data))
        except Exception:
            continue  # a damaged header Pillow refuses: libjpeg refuses it too (kept-JPEG test above)
        assert img.format == "JPEG"
        assert header == (*img.size, len(img.getbands()), _orientation(img))
    assert read >= 30
