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

_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64, length len + 1, into `data`; data as uint8) of a string/binary array, zero-copy
    except for the offsets' widening."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    dtype = np.int64 if large else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype, len(arr) + 1, arr.offset * np.dtype(dtype).itemsize).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(0, np.uint8)
    return offsets, data


def valid_mask(arr: pa.Array) -> np.ndarray:
    """True where `arr` is not null (numpy bool)."""
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return pc.is_valid(arr).to_numpy(zero_copy_only=False)


def sample_ids(prefix: str, first_row: int, n: int) -> pa.Array:
    """`<prefix>_<row>` for rows first_row .. first_row + n - 1, built in numpy (no per-row formatting)."""
    head = np.frombuffer(f"{prefix}_".encode(), np.uint8)
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    digits = 1 + np.searchsorted(_POW10, rows, side="right")
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(len(head) + digits, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("sample_id batch too large for a string array")
    data = np.empty(offsets[-1], np.uint8)
    # Rows increase, so each digit count is one contiguous run: fill it as a 2-D block.
    bounds = np.flatnonzero(np.diff(digits)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, n]):
        if lo == hi:
            continue
        d = int(digits[lo])
        block = np.empty((hi - lo, len(head) + d), np.uint8)
        block[:, :len(head)] = head
        r = rows[lo:hi]
        for k in range(d):
            block[:, len(head) + d - 1 - k] = (r // 10**k) % 10 + 48
        data[offsets[lo]:offsets[hi]] = block.ravel()
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


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
    starts = offsets[:-1]
    first = np.zeros(len(arr), np.uint8)
    nonempty = offsets[1:] > starts
    first[nonempty] = data[starts[nonempty]]
    valid = valid_mask(arr)
    blank = ~valid
    maybe = np.flatnonzero(valid & ((first < 0x21) | (first > 0x7E)))
    if len(maybe):
        trimmed = pc.utf8_trim_whitespace(arr.take(pa.array(maybe)))
        blank[maybe] = pc.equal(trimmed, "").to_numpy(zero_copy_only=False)
    return blank


def null_except(arr: pa.Array | pa.ChunkedArray, keep: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """`arr` with every row outside `keep` set to null (and zero length): the data of dropped rows is
    not copied, only that of the kept ones. Equals `if_else(keep, arr, null)`."""
    if isinstance(arr, pa.ChunkedArray):
        chunks, start = [], 0
        for c in arr.chunks:
            chunks.append(null_except(c, keep[start:start + len(c)]))
            start += len(c)
        return pa.chunked_array(chunks, arr.type)
    keep = keep & valid_mask(arr)
    offsets, data = string_buffers(arr)
    lengths = np.where(keep, np.diff(offsets), 0)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    new_offsets = np.zeros(len(arr) + 1, np.int64 if large else np.int32)
    np.cumsum(lengths, out=new_offsets[1:])
    kept = arr.filter(pa.array(keep))
    k_offsets, k_data = string_buffers(kept)
    body = k_data[k_offsets[0]:k_offsets[-1]] if len(kept) else np.zeros(0, np.uint8)
    validity = pa.py_buffer(np.packbits(keep, bitorder="little"))
    return pa.Array.from_buffers(arr.type, len(arr), [validity, pa.py_buffer(new_offsets), pa.py_buffer(body)],
                                 null_count=int(len(arr) - keep.sum()))


def constant_value(arr: pa.Array | pa.ChunkedArray):
    """The single value of a string array holding one non-null value in every row, else None.
    Checked on the buffers (lengths, then bytes), no hashing."""
    if isinstance(arr, pa.ChunkedArray):
        values = {constant_value(c) for c in arr.chunks if len(c)}
        return values.pop() if len(values) == 1 and None not in values else None
    if len(arr) == 0 or arr.null_count or not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    offsets, data = string_buffers(arr)
    width = int(offsets[1] - offsets[0])
    if not (np.diff(offsets) == width).all():
        return None
    body = data[offsets[0]:offsets[-1]]
    if width and not (body.reshape(-1, width) == body[:width]).all():
        return None
    return body[:width].tobytes().decode()
