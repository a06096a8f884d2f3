"""Image bytes -> RGB PIL image, decoded once for every model that needs it; rotated views."""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image


def open_rgb(data: bytes, min_size: int, draft: bool = True) -> Image.Image:
    """Decode `data`. With `draft`, libjpeg downscales by 2^k while decoding, never below
    `min_size` on either side: much cheaper for large photos, and the models resize anyway."""
    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    return img.convert("RGB")


def rotation_crop_fraction(angles: Sequence[float]) -> float:
    """Side of the centre square that lies inside a square rotated by any of `angles`, as a
    fraction of the square's side: a square rotated by t holds an axis-aligned centre square of
    side 1 / (|cos t| + |sin t|), smallest at 45 degrees (1/sqrt 2); 30-degree steps: 0.732."""
    return min(1.0 / (abs(math.cos(math.radians(a))) + abs(math.sin(math.radians(a)))) for a in angles)


def rotated_views(img: Image.Image, angles: Sequence[float], size: int) -> list[Image.Image]:
    """`size`-pixel views of `img` rotated by each of `angles` (degrees, counter-clockwise).

    Corners: the image's centre square is rotated about its centre, then the centre square that
    every one of the angles keeps inside the rotated image is cropped (`rotation_crop_fraction`).
    So no fill colour enters any view, and every view shows the same disc of the scene at the same
    scale: views differ by rotation only, not by zoom (a per-angle largest square would zoom in at
    30 degrees and out at 90, mixing scale into the rotation-invariance score)."""
    fraction = rotation_crop_fraction(angles)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    # Resize once so the kept centre is `size` pixels wide; then each view is a rotate and a crop.
    full = size + 2 * math.ceil((size / fraction - size) / 2)  # even margins: the crop stays centred
    square = img.crop((left, top, left + side, top + side)).resize((full, full), Image.BICUBIC)
    offset = (full - size) // 2
    box = (offset, offset, offset + size, offset + size)
    return [square.rotate(a, resample=Image.BICUBIC).crop(box) for a in angles]
