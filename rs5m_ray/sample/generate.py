"""Generated sample input for the demo: PUB11-style metadata and the images it points to.

Metadata files use each source's real format and column names; captions mix RS
keyword hits, near misses and plain web alt-text; some URLs repeat across
sources, some images are near-duplicate copies, some rows are broken. Images are
synthetic: "aerial" scenes (fields, roads, rivers, roofs seen from above) and
"photos" (horizon, sky gradient, centred objects), so that a detector can learn
the difference.
"""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance

RS_CAPTIONS = [
    "Aerial view of {n} buildings beside a river", "satellite image of farmland with {n} fields",
    "LANDSAT 8 scene of a coastal town", "aerial photo of a harbour with {n} boats",
    "Sentinel-2 true colour image of a river delta", "remote sensing image of a dense residential area",
    "Google Earth view of an airport with {n} planes", "aerial imagery of a highway interchange",
    "satellite view of a stadium surrounded by parking lots", "USGS orthophoto of a forest edge",
]
NEAR_MISS_CAPTIONS = [
    "Aerial photographer at work during a wedding", "space imaging expo 2019 booth",
    "aerial view drone toy for kids, {n} colours",
]
PLAIN_CAPTIONS = [
    "a cat sleeping on a sofa", "satellite dish on a red roof", "TV aerials on an old chimney",
    "portrait of a smiling woman in a park", "{n} apples on a wooden table", "vintage car at a show",
]
PALETTES = {"field": [(96, 128, 60), (140, 150, 80), (170, 160, 110), (70, 100, 50)],
            "urban": [(120, 120, 120), (150, 140, 130), (90, 90, 95), (180, 170, 160)]}


def aerial_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A top-down scene: patchwork of parcels, straight roads, a river, roofs."""
    w, h = size
    kind = rng.choice(list(PALETTES))
    img = Image.new("RGB", size, rng.choice(PALETTES[kind]))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(8, 20)):
        x, y = rng.randrange(w), rng.randrange(h)
        d.rectangle([x, y, x + rng.randint(w // 10, w // 3), y + rng.randint(h // 10, h // 3)],
                    fill=rng.choice(PALETTES[kind]))
    for _ in range(rng.randint(1, 3)):
        x = rng.randrange(w)
        d.line([(x, 0), (x + rng.randint(-w // 4, w // 4), h)], fill=(200, 200, 190), width=max(2, w // 60))
    if rng.random() < 0.6:
        pts = [(0, rng.randrange(h))] + [(w * i // 5, rng.randrange(h)) for i in range(1, 6)]
        d.line(pts, fill=(50, 80, 120), width=max(3, w // 25))
    for _ in range(rng.randint(0, 25)):
        x, y = rng.randrange(w), rng.randrange(h)
        s = rng.randint(3, max(4, w // 30))
        d.rectangle([x, y, x + s, y + s], fill=rng.choice([(160, 60, 50), (200, 200, 200), (80, 80, 80)]))
    return _add_noise(img, rng, 10)


def photo_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A ground-level photo: sky gradient above a horizon, objects in the middle."""
    w, h = size
    horizon = rng.randint(h // 3, 2 * h // 3)
    top, bottom = np.array([rng.randint(90, 160), rng.randint(140, 200), 255]), np.array([230, 230, 240])
    t = np.linspace(0, 1, horizon)[:, None]
    sky = (top * (1 - t) + bottom * t).astype(np.uint8)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:horizon] = sky[:, None, :]
    arr[horizon:] = np.array([rng.randint(60, 140), rng.randint(60, 120), rng.randint(30, 90)], np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        cx, cy, r = rng.randint(w // 4, 3 * w // 4), rng.randint(h // 3, 3 * h // 4), rng.randint(h // 10, h // 4)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return _add_noise(img, rng, 6)


def _add_noise(img: Image.Image, rng: random.Random, amount: int) -> Image.Image:
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-amount, amount + 1, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate(img: Image.Image, rng: random.Random) -> Image.Image:
    """A copy as the web makes them: resized, slightly cropped, brightness-shifted."""
    w, h = img.size
    c = max(1, min(w, h) // 40)
    out = img.crop((c, c, w - c, h - c)).resize((int(w * 0.8), int(h * 0.8)), Image.BICUBIC)
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.9, 1.1))


def generate(out_dir: str, base_url: str, rows_per_source: int = 60, seed: int = 2023) -> dict:
    """Write `images/` and `metadata/<source>/...`; image URLs are `base_url/<name>`.

    Returns the source config list (name, paths) for the pipeline.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images: dict[str, Image.Image] = {}

    def new_image(rs: bool) -> str:
        name = f"img{len(images):05d}.jpg"
        size = (rng.choice([256, 320, 400, 523, 640]), rng.choice([240, 300, 403, 480]))
        images[name] = aerial_image(rng, size) if rs else photo_image(rng, size)
        return name

    def row(source: str) -> tuple[str | None, str | None]:
        r = rng.random()
        if r < 0.55:
            caption, name = rng.choice(RS_CAPTIONS), new_image(True)
        elif r < 0.65:
            caption, name = rng.choice(NEAR_MISS_CAPTIONS), new_image(False)
        else:
            caption, name = rng.choice(PLAIN_CAPTIONS), new_image(rng.random() < 0.2)
        return f"{base_url}/{name}", caption.format(n=rng.randint(2, 40))

    tables = {s: [row(s) for _ in range(rows_per_source)] for s in ("laion2b", "laioncoco", "coyo700m", "cc3m",
                                                                      "redcaps", "wit")}
    # The same URL under several sources (LAION-COCO re-captions LAION2B; COYO overlaps LAION).
    for i in range(0, rows_per_source, 6):
        tables["laioncoco"][i] = tables["laion2b"][i]
        tables["coyo700m"][i + 1] = (tables["laion2b"][i + 1][0], tables["coyo700m"][i + 1][1])
    # Near-duplicate images behind different URLs.
    for i in range(2, rows_per_source, 9):
        src_url = tables["laion2b"][i][0]
        name = f"dup{i:05d}.jpg"
        images[name] = near_duplicate(images[src_url.rsplit("/", 1)[1]], rng)
        tables["cc3m"][i] = (f"{base_url}/{name}", tables["laion2b"][i][1])
    # Broken rows: missing URL, empty caption, a URL that 404s, a non-image.
    tables["laion2b"][-1] = (None, "aerial view of nothing")
    tables["coyo700m"][-1] = (f"{base_url}/img00000.jpg", "")
    tables["cc3m"][-1] = (f"{base_url}/missing.jpg", "satellite image of a missing file")
    with open(os.path.join(out_dir, "images", "not-an-image.jpg"), "wb") as f:
        f.write(b"<html>this is not an image</html>")
    tables["redcaps"][-1] = (f"{base_url}/not-an-image.jpg", "aerial view of a page that is not an image")

    for name, img in images.items():
        with open(os.path.join(out_dir, "images", name), "wb") as f:
            f.write(jpeg(img))
    return {"sources": _write_metadata(out_dir, tables), "images": len(images)}


def _write_metadata(out_dir: str, tables: dict[str, list]) -> list[dict]:
    meta = os.path.join(out_dir, "metadata")
    paths = {}
    for source in ("laion2b", "laioncoco"):
        os.makedirs(os.path.join(meta, source), exist_ok=True)
        rows = tables[source]
        half = len(rows) // 2
        paths[source] = []
        for part, chunk in enumerate((rows[:half], rows[half:])):
            p = os.path.join(meta, source, f"part-{part:05d}.parquet")
            pq.write_table(pa.table({"URL": [u for u, _ in chunk], "TEXT": [c for _, c in chunk],
                                     "WIDTH": [None] * len(chunk), "HEIGHT": [None] * len(chunk),
                                     "similarity": [0.3] * len(chunk)}), p)
            paths[source].append(p)
    os.makedirs(os.path.join(meta, "coyo700m"), exist_ok=True)
    p = os.path.join(meta, "coyo700m", "part-00000.parquet")
    rows = tables["coyo700m"]
    pq.write_table(pa.table({"id": list(range(len(rows))), "url": [u for u, _ in rows],
                             "text": [c for _, c in rows]}), p)
    paths["coyo700m"] = [p]
    p = os.path.join(meta, "cc3m", "Validation_GCC-1.1.0-Validation.tsv")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.writelines(f"{c}\t{u}\n" for u, c in tables["cc3m"])
    paths["cc3m"] = [p]
    p = os.path.join(meta, "redcaps", "earthporn_2020.json")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        json.dump({"info": {"subreddit": "earthporn"}, "annotations": [
            {"image_id": f"r{i}", "url": u, "raw_caption": c, "caption": c.lower(), "subreddit": "earthporn",
             "created_utc": 1577836800 + i} for i, (u, c) in enumerate(tables["redcaps"])]}, f)
    paths["redcaps"] = [p]
    p = os.path.join(meta, "wit", "wit_v1.train.all-00000-of-00010.tsv")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write("language\tpage_url\timage_url\tpage_title\tcaption_reference_description\n")
        for i, (u, c) in enumerate(tables["wit"]):
            lang = "de" if i % 10 == 3 else "en"
            f.write(f"{lang}\thttps://en.wikipedia.org/wiki/P{i}\t{u or ''}\tPage {i}\t{c}\n")
    paths["wit"] = [p]
    return [{"name": s, "paths": ps} for s, ps in paths.items()]
