"""64-bit perceptual hashes of decoded images, and Hamming distance on hash arrays.

`compute_phash` runs in the decode pass on the image that pass already holds (no
second decode); for a JPEG kept byte for byte, the decode pass validates it at reduced
DCT scale and hashes that (`jpeg_scale_for`, `phash_of_scaled`). Hashes travel as int64 (the 64 bits reinterpreted as signed) so
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
    fn = _method(method)
    img = img.convert("L")
    factor = prereduce_factor(img.size)
    if factor > 1:
        img = img.reduce(factor)
    return _packed(fn(img))


def prereduce_factor(size: tuple[int, int]) -> int:
    """The box factor `compute_phash` shrinks a (width, height) image by before hashing."""
    return max(1, min(size) // PREREDUCE_MIN_SIDE)


def jpeg_scale_for(size: tuple[int, int]) -> int:
    """The libjpeg DCT scale 1/s (s = 1, 2, 4 or 8) to decode a JPEG at for `phash_of_scaled`.

    s divides the pre-reduce factor, so decoding at 1/s (a block average for s = 8, a
    low-pass close to it for 2 and 4) and box-reducing by factor/s covers the same
    pixels as `compute_phash`'s reduce of the full image.
    """
    factor, s = prereduce_factor(size), 1
    while s < 8 and factor % (2 * s) == 0:
        s *= 2
    return s


def phash_of_scaled(grey: np.ndarray, size: tuple[int, int], scale: int, method: str = "phash") -> int:
    """`compute_phash` of a JPEG of (width, height) `size` from its luma decoded at 1/`scale`.

    The same hash as `compute_phash` on the fully decoded RGB image up to rounding (luma
    vs. Pillow's RGB->L, reduced IDCT vs. box): on real photos 0.04-0.3 bits apart on
    average, at most 2 (tests/test_decode.py); re-encoding a copy moves it more.
    """
    fn = _method(method)
    img = Image.fromarray(grey.reshape(grey.shape[0], grey.shape[1]))
    rest = prereduce_factor(size) // scale
    if rest > 1:
        img = img.reduce(rest)
    return _packed(fn(img))


def _method(method: str):
    try:
        return HASH_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown hash method {method!r}; known: {sorted(HASH_METHODS)}") from None


def _packed(h: imagehash.ImageHash) -> int:
    return int(np.packbits(h.hash.reshape(-1)).view(">i8")[0])


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
