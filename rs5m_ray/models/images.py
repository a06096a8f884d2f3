"""Image bytes -> RGB PIL image, decoded once for every model that needs it."""
from __future__ import annotations

import io

from PIL import Image


def open_rgb(data: bytes, min_size: int, draft: bool = True) -> Image.Image:
    """Decode `data`. With `draft`, libjpeg downscales by 2^k while decoding, never below
    `min_size` on either side: much cheaper for large photos, and the models resize anyway."""
    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    return img.convert("RGB")
