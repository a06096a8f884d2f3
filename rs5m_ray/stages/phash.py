"""64-bit perceptual hashes of decoded images, and Hamming distance on hash arrays.

`compute_phash` runs in the decode pass on the image that pass already holds (no
second decode). Hashes travel as int64 (the 64 bits reinterpreted as signed) so
they fit an arrow int64 column; `as_unsigned` views them back as uint64 bits.
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

HASH_METHODS = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash}
# All three methods hash a grey image shrunk to <= 32 px. Converting to grey first and
# box-reducing to >= 64 px makes their Lanczos resample 2-4x cheaper on 256-1024 px
# images and moves the hash by ~0.2 bits on average (measured in benchmarks/dedup.py).
PREREDUCE_MIN_SIDE = 64


def compute_phash(img: Image.Image, method: str = "phash") -> int:
    """The image's 64-bit `method` hash (phash | dhash | whash) as a signed int64."""
    try:
        fn = HASH_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown hash method {method!r}; known: {sorted(HASH_METHODS)}") from None
    img = img.convert("L")
    factor = min(img.size) // PREREDUCE_MIN_SIDE
    if factor > 1:
        img = img.reduce(factor)
    bits = fn(img).hash.reshape(-1)
    return int(np.packbits(bits).view(">i8")[0])


def as_unsigned(hashes) -> np.ndarray:
    """int64 (signed view) or uint64 hashes as a uint64 array, without copying bits."""
    arr = np.asarray(hashes)
    if arr.dtype == np.uint64:
        return arr
    return arr.astype(np.int64, copy=False).view(np.uint64)


def hamming(a, b) -> np.ndarray:
    """Element-wise Hamming distance between two broadcastable hash arrays."""
    return np.bitwise_count(np.bitwise_xor(as_unsigned(a), as_unsigned(b))).astype(np.int8)


def hamming_matrix(a, b) -> np.ndarray:
    """All distances between hashes `a` (rows) and `b` (columns)."""
    return hamming(as_unsigned(a)[:, None], as_unsigned(b)[None, :])
