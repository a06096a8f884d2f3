"""Decode and validate stage: every image is opened safely, fully decoded, normalised to RGB.

`DecodeStage(cfg)` maps a batch with `image_bytes` to the same rows with `jpg`,
`width`, `height` (of `jpg`), `orig_width`, `orig_height` (as displayed, after
EXIF orientation, before resizing), `orig_format`, `sha256` (of the downloaded
bytes) and `phash`; `image_bytes` is not carried further. Images that cannot be
used are dropped as `decode_error:<why>`: zero_bytes, not_an_image, too_many_pixels,
truncated, corrupt, unsupported_mode. This is RS5M's "cannot be opened or have a
zero file size" removal, made explicit.

With `reencode: if_needed`, an RGB JPEG that needs no rotation or resize keeps its
bytes; it is still decoded in full (libjpeg-turbo reads every coefficient, so damage
is found as in a full decode) but its inverse DCT runs at reduced scale, luma only,
which is also what its pHash is computed from (`_kept_jpeg`): ~1 ms per 500x400 photo
instead of ~2.5 (decode + pHash). Anything libjpeg warns about goes the full Pillow way.
"""
from __future__ import annotations

import hashlib
import io
import struct
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from rs5m_ray.config import DecodeConfig, check_bounds
from rs5m_ray.ledger import mark_dropped
from rs5m_ray.stages.download import IMAGE_BYTES
from rs5m_ray.stages.phash import compute_phash, jpeg_scale_for, phash_of_scaled

OUTPUT_SCHEMA = pa.schema([
    ("jpg", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("orig_width", pa.int32()), ("orig_height", pa.int32()), ("orig_format", pa.string()),
    ("sha256", pa.string()), ("phash", pa.int64()),
])
# Raster formats only: no EPS (Pillow would run Ghostscript on it) and no
# magic-less formats such as TGA that would claim arbitrary bytes.
Image.init()
SAFE_FORMATS = [f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "MPO", "ICO",
                            "PPM", "JPEG2000", "AVIF", "HEIF") if f in Image.OPEN]
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = (255, 255, 255)
# We enforce cfg.max_pixels ourselves; Pillow's own warning below its hard limit is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DecodeFailure(Exception):
    def __init__(self, why: str, detail: str = ""):
        super().__init__(why, detail)
        self.why, self.detail = why, detail

    @property
    def reason(self) -> str:
        return f"decode_error:{self.why}"


class ImageRejected(DecodeFailure):
    """A readable image that fails a quality guard: its reason is `why` itself."""

    @property
    def reason(self) -> str:
        return self.why


class DecodeStage:
    """Callable stage: `image_bytes` -> validated RGB JPEG and its metadata."""

    def __init__(self, cfg: DecodeConfig):
        check_bounds(cfg, "decode")
        self.cfg = cfg

    def __call__(self, table: pa.Table) -> pa.Table:
        if IMAGE_BYTES not in table.column_names:
            raise ValueError(f"decode needs the {IMAGE_BYTES!r} column (run the download stage first)")
        rows, reasons, details = [], [], []
        for data in table[IMAGE_BYTES].to_pylist():
            try:
                rows.append(decode_image(data, self.cfg))
                reasons.append(None)
                details.append(None)
            except Exception as e:  # includes Pillow failures nobody foresaw: they drop the row, not the batch
                f = e if isinstance(e, DecodeFailure) else DecodeFailure("corrupt", f"{type(e).__name__}: {e}"[:200])
                rows.append({})
                reasons.append(f.reason)
                details.append(f.detail or None)
        out = table.drop_columns([IMAGE_BYTES] + [c for c in OUTPUT_SCHEMA.names if c in table.column_names])
        for field in OUTPUT_SCHEMA:
            out = out.append_column(field, pa.array([r.get(field.name) for r in rows], field.type))
        reason_arr = pa.array(reasons, pa.string())
        return mark_dropped(out, pc.is_valid(reason_arr), reason_arr, pa.array(details, pa.string()))


def decode_image(data: bytes | None, cfg: DecodeConfig) -> dict:
    """Validate and normalise one image; raises DecodeFailure with the reason."""
    if not data:
        raise DecodeFailure("zero_bytes")
    tried_kept = False
    if cfg.reencode == "if_needed" and data[:3] == b"\xff\xd8\xff":
        header = jpeg_header(data)  # Pillow's view of a plain JPEG's header, without Pillow's cost
        if header is not None:
            width, height, components, orientation = header
            check_geometry(width, height, cfg)
            if (components == 3 and orientation == 1 and 0 < width * height <= cfg.max_pixels
                    and width * height <= _PILLOW_BOMB_PIXELS and target_size(width, height, cfg) == (width, height)):
                kept, tried_kept = _kept_jpeg(data, width, height, cfg), True
                if kept is not None:
                    return kept
    try:
        img = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecodeFailure("too_many_pixels", str(e)[:200]) from None
    except UnidentifiedImageError:
        raise DecodeFailure("not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from None
    except Exception as e:  # plugins raise SyntaxError, struct.error, ... on mangled headers
        raise DecodeFailure("corrupt", f"{type(e).__name__}: {e}"[:200]) from None
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise DecodeFailure("zero_bytes", f"{width}x{height} pixels")
        check_geometry(width, height, cfg)
        if width * height > cfg.max_pixels:
            raise DecodeFailure("too_many_pixels", f"{width}x{height} > {cfg.max_pixels}")
        orientation = _orientation(img)
        target = target_size(width, height, cfg)
        if (not tried_kept and cfg.reencode == "if_needed" and img.format == "JPEG" and img.mode == "RGB"
                and orientation == 1 and target == (width, height)):
            kept = _kept_jpeg(data, width, height, cfg)
            if kept is not None:
                return kept
        if target != (width, height) and img.format == "JPEG":
            img.draft(img.mode, target)  # decode at 1/2, 1/4 or 1/8 scale when that is still big enough
        try:
            img.load()  # first frame of multi-frame files
        except Exception as e:
            why = "truncated" if "truncat" in str(e).lower() or lacks_end_marker(data, img.format) else "corrupt"
            raise DecodeFailure(why, f"{type(e).__name__}: {e}"[:200]) from None
        if orientation != 1:
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # an unreadable EXIF block leaves the image as stored
                orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
            target = target[::-1]
        rgb = to_rgb(img)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        unchanged = img.format == "JPEG" and img.mode == "RGB" and orientation == 1 and rgb.size == (width, height)
        if cfg.reencode == "if_needed" and unchanged:
            jpg = data
        else:
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=cfg.reencode_quality)
            jpg = buf.getvalue()
        return {
            "jpg": jpg, "width": rgb.width, "height": rgb.height,
            "orig_width": width, "orig_height": height, "orig_format": img.format,
            "sha256": hashlib.sha256(data).hexdigest(),
            "phash": compute_phash(rgb, cfg.phash_method) if cfg.phash else None,
        }


def check_geometry(width: int, height: int, cfg: DecodeConfig) -> None:
    """img2dataset's size guards: the shorter side at least `min_image_size`, longer / shorter at
    most `max_aspect_ratio`."""
    short, long = min(width, height), max(width, height)
    if short < cfg.min_image_size:
        raise ImageRejected("image_too_small", f"{width}x{height} < {cfg.min_image_size} px")
    if cfg.max_aspect_ratio is not None and short and long / short > cfg.max_aspect_ratio:
        raise ImageRejected("aspect_ratio_too_large", f"{width}x{height}: {long / short:.1f} > {cfg.max_aspect_ratio:g}")


def _kept_jpeg(data: bytes, width: int, height: int, cfg: DecodeConfig) -> dict | None:
    """A clean RGB JPEG that is kept byte for byte: validated without building its full-size pixels.

    libjpeg decodes the whole entropy-coded stream (every coefficient of every component:
    truncation and corruption surface exactly as in a full decode) but runs the inverse
    DCT at 1/8 scale (1/s where the pHash needs more) and for the luma only. Any libjpeg
    warning, recoverable or not, returns None: the caller then decodes fully with Pillow,
    whose verdict (kept, `truncated`, `corrupt`) stands as before. Whatever libjpeg accepts
    strictly, Pillow accepts too (fuzzed over truncations and byte damage).
    """
    scale = jpeg_scale_for((width, height)) if cfg.phash else 8
    try:
        grey = simplejpeg.decode_jpeg(data, "GRAY", min_height=-(-height // scale), min_width=-(-width // scale),
                                      strict=True)
    except Exception:  # ValueError for libjpeg errors and warnings
        return None
    if grey.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None  # libjpeg chose another scale or saw another size: let Pillow decide
    return {
        "jpg": data, "width": width, "height": height, "orig_width": width, "orig_height": height,
        "orig_format": "JPEG", "sha256": hashlib.sha256(data).hexdigest(),
        "phash": phash_of_scaled(grey, (width, height), scale, cfg.phash_method) if cfg.phash else None,
    }


# Pillow refuses to open larger images outright (DecompressionBombError).
_PILLOW_BOMB_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else float("inf")
_JPEG_TABLES = {0xC4, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))  # DHT, DQT, DRI, COM, APPn
_EXIF, _XMP, _MPF = b"Exif\0\0", b"http://ns.adobe.com/xap/1.0/\0", b"MPF\0"


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, EXIF orientation) of a plain 8-bit Huffman JPEG, or None.

    Reads the segments before the first scan as Pillow does, and gives up (None: the
    caller asks Pillow) on anything Pillow might read differently: other frame types,
    fill bytes, a second EXIF block, XMP (Pillow takes an orientation from it), MPF
    (multi-picture files), an EXIF block it cannot walk, a frame with no height.
    """
    pos, n, found, orientation, exif_seen = 2, len(data), None, 1, False
    try:
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            length = (data[pos + 2] << 8) | data[pos + 3]
            body = data[pos + 4: pos + 2 + length]
            if length < 2 or len(body) != length - 2:
                return None
            if marker == 0xDA:  # start of scan: the header is complete
                return None if found is None else (*found, orientation)
            if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive (Huffman)
                if found is not None or len(body) < 6 or body[0] != 8:
                    return None
                height, width, components = (body[1] << 8) | body[2], (body[3] << 8) | body[4], body[5]
                if not height or not width or len(body) != 6 + 3 * components:
                    return None
                found = (width, height, components)
            elif marker == 0xE1 and body.startswith(_EXIF):
                if exif_seen:
                    return None
                exif_seen, orientation = True, _exif_orientation(body[6:])
                if orientation is None:
                    return None
            elif (marker == 0xE1 and body.startswith(_XMP)) or (marker == 0xE2 and body.startswith(_MPF)):
                return None
            elif marker not in _JPEG_TABLES:
                return None
            pos += 2 + length
    except (IndexError, struct.error):
        return None
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """IFD0's Orientation (1 when absent), None when the block cannot be walked or the value is odd."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or struct.unpack_from(order + "H", tiff, 2)[0] != 42:
        return None
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for i in range(count):
        tag, kind, values = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
        if tag == 0x0112:
            if kind != 3 or values != 1:
                return None
            (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)
            return value if 1 <= value <= 8 else None
    return 1


END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


def lacks_end_marker(data: bytes, fmt: str | None) -> bool:
    """True when a format with a closing marker is cut short (Pillow's messages vary)."""
    marker = END_MARKERS.get(fmt or "")
    return marker is not None and not data.rstrip(b"\0\r\n ").endswith(marker)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def target_size(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """Output size under the resize policy; images are only ever shrunk."""
    if cfg.resize_mode == "keep":
        return width, height
    side = max(width, height) if cfg.resize_mode == "max_side" else min(width, height)
    if side <= cfg.resize_size:
        return width, height
    scale = cfg.resize_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha composited on white, 16-bit and float scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if img.mode == "F" and peak <= 1.0 else (255.0 / 65535 if peak > 255 else 1.0)
        if peak > 65535:
            scale = 255.0 / peak
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise DecodeFailure("unsupported_mode", f"{img.mode}: {e}") from None
