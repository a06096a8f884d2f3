"""Vectorised helpers on Arrow string arrays (numpy views of their buffers, Hyperscan scans).

The metadata path handles billions of rows, nearly all of which are dropped: these helpers
build and test whole batches without a per-row Python loop and without copying string data
that is about to be thrown away.
"""
from __future__ import annotations

import functools

import hyperscan
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, length len + 1, into `data`; data as uint8) of a string/binary array: zero-copy numpy
    views (offsets int32, or int64 for the large types)."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    dtype = np.int64 if large else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype, len(arr) + 1, arr.offset * np.dtype(dtype).itemsize)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(0, np.uint8)
    return offsets, data


def _bits(buf: pa.Buffer | None, offset: int, n: int, default: bool) -> np.ndarray:
    if buf is None:
        return np.full(n, default)
    return np.unpackbits(np.frombuffer(buf, np.uint8), count=offset + n, bitorder="little")[offset:].view(bool)


def valid_mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where `arr` is not null (numpy bool), unpacked from the validity bitmap."""
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([valid_mask(c) for c in arr.chunks])
    if arr.null_count == len(arr):
        return np.zeros(len(arr), bool)
    return _bits(arr.buffers()[0], arr.offset, len(arr), True)


def to_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy bool, null as False (`fill_null(arr, False)`), from its bitmaps."""
    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([to_bool(c) for c in arr.chunks] or [np.zeros(0, bool)])
    if not pa.types.is_boolean(arr.type):
        raise TypeError(f"expected booleans, got {arr.type}")
    values = _bits(arr.buffers()[1], arr.offset, len(arr), False)
    return values & valid_mask(arr) if arr.null_count else values.copy()


def from_bool(mask: np.ndarray) -> pa.BooleanArray:
    """numpy bool -> Arrow boolean array, by packing the bits."""
    mask = np.asarray(mask, bool)
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


_DIGITS4 = np.frombuffer(b"".join(f"{i:04d}".encode() for i in range(10_000)), np.uint8).reshape(-1, 4)


def sample_ids(prefix: str, first_row: int, n: int) -> pa.Array:
    """`<prefix>_<row>` for rows first_row .. first_row + n - 1, built in numpy without per-row
    formatting: rows are consecutive, so within a run of rows sharing everything but their last
    four digits those digits are a contiguous slice of a '0000'..'9999' table."""
    head = f"{prefix}_".encode()
    last = first_row + n
    # Runs end where the part above the last four digits changes (every 10,000 rows) and where
    # the digit count changes below 10,000.
    cuts = sorted({first_row, last, *range((first_row // 10_000 + 1) * 10_000, last, 10_000),
                   *(p for p in (10, 100, 1000) if first_row < p < last)})
    lengths = np.empty(n, np.int64)
    pieces = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        hi, lo = divmod(a, 10_000)
        if hi:
            run_prefix, digits = head + str(hi).encode(), _DIGITS4[lo:lo + b - a]
        else:
            width = len(str(a))
            run_prefix, digits = head, _DIGITS4[lo:lo + b - a, 4 - width:]
        block = np.empty((b - a, len(run_prefix) + digits.shape[1]), np.uint8)
        block[:, :len(run_prefix)] = np.frombuffer(run_prefix, np.uint8)
        block[:, len(run_prefix):] = digits
        pieces.append(block.reshape(-1))
        lengths[a - first_row:b - first_row] = block.shape[1]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("sample_id batch too large for a string array")
    data = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def is_valid_utf8(arr: pa.Array) -> bool:
    """Every value of a string/binary array is valid UTF-8. Checked on the whole data buffer at
    once (all-ASCII buffers by one max(); else one validation of the concatenation plus no value
    starting inside a character), not value by value."""
    offsets, data = string_buffers(arr)
    region = data[offsets[0]:offsets[-1]]
    if not len(region) or region.max() < 0x80:
        return True
    whole = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, len(region)], np.int32)),
                                                   pa.py_buffer(region)])
    try:
        whole.validate(full=True)
    except pa.ArrowInvalid:
        return False
    starts = offsets[:-1][offsets[:-1] < offsets[-1]] - offsets[0]
    return not ((region[starts] & 0xC0) == 0x80).any()


@functools.lru_cache(maxsize=8)
def _byte_class_database(chars: bytes) -> hyperscan.Database:
    # Per process (not picklable). Block-mode scratch is not thread-safe: one scan at a time per process.
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[("[" + "".join(f"\\x{c:02x}" for c in chars) + "]").encode()], ids=[0], flags=0)
    return database


def rows_with_bytes(arr: pa.Array | pa.ChunkedArray, chars: bytes, max_events: int = 4096) -> np.ndarray:
    """Bool mask: the (non-null) value contains any of the bytes `chars`. One Hyperscan pass over the
    data buffer; a buffer with more than `max_events` such bytes is scanned with numpy instead."""
    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([rows_with_bytes(c, chars, max_events) for c in arr.chunks] or [np.zeros(0, bool)])
    offsets, data = string_buffers(arr)
    region = data[offsets[0]:offsets[-1]]
    mask = np.zeros(len(arr), bool)
    if not len(region):
        return mask
    ends: list[int] = []

    def on_match(_id, _start, end, _flags, _ctx):
        ends.append(end)
        return len(ends) > max_events  # True stops the scan

    try:
        _byte_class_database(chars).scan(memoryview(region), match_event_handler=on_match)
    except hyperscan.ScanTerminated:
        pass
    if len(ends) > max_events:
        lut = np.zeros(256, bool)
        lut[list(chars)] = True
        positions = np.flatnonzero(lut[region])
    else:
        positions = np.asarray(ends, np.int64) - 1
    rows = np.searchsorted(offsets, positions + offsets[0], side="right") - 1
    mask[rows] = True
    return mask & valid_mask(arr)


def blank_mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Bool mask: null, or empty once Unicode whitespace is trimmed (`utf8_trim_whitespace(x) == ""`).

    Only values whose first byte is not printable ASCII go through the trim (a value starting
    with one of '!'..'~' is never blank): in web metadata that is a handful of rows per batch."""
    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([blank_mask(c) for c in arr.chunks] or [np.zeros(0, bool)])
    offsets, data = string_buffers(arr)
    if not len(data):
        return np.ones(len(arr), bool)
    first = np.take(data, offsets[:-1], mode="clip")  # an empty value's "first byte" is its neighbour's:
    valid = valid_mask(arr)                           # empty values are caught by their length instead
    blank = ~valid
    maybe = np.flatnonzero(valid & ((first < 0x21) | (first > 0x7E) | (offsets[1:] == offsets[:-1])))
    if len(maybe):
        trimmed = pc.utf8_trim_whitespace(arr.take(pa.array(maybe)))
        blank[maybe] = to_bool(pc.equal(trimmed, ""))
    return blank


def repeat_where(value: str, mask: np.ndarray) -> pa.Array:
    """A string array holding `value` where `mask` holds and null (zero length) elsewhere: equals
    `if_else(mask, value, null)`, built from numpy without a per-row kernel."""
    raw = value.encode()
    lengths = np.where(mask, len(raw), 0)
    offsets = np.zeros(len(mask) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("string array too large")
    count = int(mask.sum())
    data = np.tile(np.frombuffer(raw, np.uint8), count) if raw else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(pa.string(), len(mask), [pa.py_buffer(np.packbits(mask, bitorder="little")),
                                                          pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)],
                                 null_count=len(mask) - count)


def scatter_strings(n: int, rows: np.ndarray, values: list[str]) -> pa.Array:
    """A string array of length `n`: values[i] at rows[i] (increasing), null elsewhere."""
    encoded = [v.encode() for v in values]
    lengths = np.zeros(n, np.int64)
    lengths[rows] = [len(e) for e in encoded]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("string array too large")
    valid = np.zeros(n, bool)
    valid[rows] = True
    buffers = [pa.py_buffer(np.packbits(valid, bitorder="little")), pa.py_buffer(offsets.astype(np.int32)),
               pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), n, buffers, null_count=n - len(encoded))


def _lengths(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    return np.concatenate([np.diff(string_buffers(c)[0]) for c in chunks] or [np.zeros(0, np.int64)])


def null_except(arr: pa.Array | pa.ChunkedArray, keep: np.ndarray) -> pa.Array:
    """`arr` with every row outside `keep` set to null (and zero length), as one array: the data of
    dropped rows is not copied, only that of the kept ones. Equals `if_else(keep, arr, null)`."""
    keep = keep & valid_mask(arr)
    lengths = np.where(keep, _lengths(arr), 0)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offsets = np.zeros(len(arr) + 1, np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    # A few rows are gathered by index, not by scanning a mask (but Arrow's take concatenates chunks first).
    few = 8 * keep.sum() < len(keep) and not isinstance(arr, pa.ChunkedArray)
    kept = arr.take(pa.array(np.flatnonzero(keep))) if few else arr.filter(from_bool(keep))
    if isinstance(kept, pa.ChunkedArray):
        kept = kept.combine_chunks()
    k_offsets, k_data = string_buffers(kept)
    body = k_data[k_offsets[0]:k_offsets[-1]] if len(kept) else np.zeros(0, np.uint8)
    validity = pa.py_buffer(np.packbits(keep, bitorder="little"))
    return pa.Array.from_buffers(arr.type, len(arr), [validity, pa.py_buffer(offsets), pa.py_buffer(body)],
                                 null_count=int(len(arr) - keep.sum()))


def constant_value(arr: pa.Array | pa.ChunkedArray, skip_nulls: bool = False):
    """The single value of a string array holding it in every row (with `skip_nulls`, in every
    non-null row, there being one), else None. Checked on the buffers (lengths, then bytes), no hashing."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        if len(arr.dictionary) == 1 and arr.null_count == 0 and len(arr):
            return arr.dictionary[0].as_py()
        return None
    if len(arr) == 0 or arr.null_count == len(arr) or (arr.null_count and not skip_nulls) \
            or not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    offsets, data = string_buffers(arr)
    lengths = np.diff(offsets)
    if arr.null_count:
        valid = valid_mask(arr)
        width = int(lengths[np.argmax(valid)])
        if not (lengths == np.where(valid, width, 0)).all():  # null slots must hold no bytes
            return None
    else:
        width = int(lengths[0])
        if not (lengths == width).all():
            return None
    body = data[offsets[0]:offsets[-1]]
    # The concatenated values repeat with period `width` iff the body equals itself shifted by it.
    if width and not np.array_equal(body[width:], body[:-width]):
        return None
    return body[:width].tobytes().decode()
