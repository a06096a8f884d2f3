"""The vectorised Arrow helpers equal the plain per-row (or pyarrow.compute) definitions."""
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rs5m_ray.arrays import (blank_mask, constant_value, from_bool, is_valid_utf8, null_except, repeat_where,
                             rows_with_bytes, sample_ids, scatter_strings, to_bool, valid_mask)


@pytest.mark.parametrize("first, n", [(0, 0), (0, 1), (0, 1000), (95, 20), (9_990, 30), (99_990, 20_000),
                                      (123_456_789, 65_536), (10**12 - 3, 7)])
def test_sample_ids_equal_per_row_formatting(first, n):
    ids = sample_ids("laion2b_part-00000", first, n)
    ids.validate(full=True)
    assert ids.to_pylist() == [f"laion2b_part-00000_{r}" for r in range(first, first + n)]


def test_bytes_found_in_each_row_and_in_slices():
    urls = pa.array(["http://a/b.jpg", None, "http://a/b c.jpg", "", "x\x00y", "\tq", "ok\x0b", "é\u00a0"])
    assert rows_with_bytes(urls, b"\t\n\x0c\r ").tolist() == [False, False, True, False, False, True, False, False]
    assert rows_with_bytes(urls, b"\x00").tolist() == [False, False, False, False, True, False, False, False]
    assert rows_with_bytes(urls.slice(2, 3), b" ").tolist() == [True, False, False]
    many = pa.array(["a b c d e f"] * 100 + ["x"])  # more matches than events allowed: numpy fallback
    assert rows_with_bytes(many, b" ", max_events=10).tolist() == [True] * 100 + [False]


def test_null_slot_bytes_are_not_reported():
    data = pa.py_buffer(b"a ba b")
    offsets = pa.py_buffer(np.array([0, 3, 6], np.int32).tobytes())
    validity = pa.py_buffer(np.packbits([0, 1], bitorder="little").tobytes())
    array = pa.Array.from_buffers(pa.string(), 2, [validity, offsets, data])
    assert rows_with_bytes(array, b" ").tolist() == [False, True]


def test_blank_mask_equals_unicode_trim():
    values = ["x", None, "", "  ", "\xa0\u2003", " a", "\u200b", "é", "\t\n", "\x0b", "a ", "\x1c"]
    expected = [v is None or pc.utf8_trim_whitespace(pa.scalar(v)).as_py() == "" for v in values]
    assert blank_mask(pa.array(values)).tolist() == expected


def test_utf8_validity_is_checked_per_value():
    def strings(*values):
        return pa.array(list(values), pa.binary()).view(pa.string())

    assert is_valid_utf8(strings(b"abc", b"\xc3\xa9", b""))
    assert not is_valid_utf8(strings(b"a\xff"))
    assert not is_valid_utf8(strings(b"\xc3", b"\xa9"))  # valid only as a concatenation
    assert not is_valid_utf8(strings(b"x\xc3", b"\xa9y").slice(1))


def test_null_except_equals_if_else_without_copying_dropped_bytes():
    rnd = random.Random(0)
    values = [None if rnd.random() < 0.1 else "v" * rnd.randint(0, 9) + str(i) for i in range(500)]
    keep = np.array([rnd.random() < 0.2 for _ in values])
    arrays = [pa.array(values), pa.array(values).slice(7, 300),
              pa.chunked_array([values[:100], values[100:]], pa.string())]
    for arr in arrays:
        k = keep[:len(arr)]
        out = null_except(arr, k)
        out.validate(full=True)
        assert out.to_pylist() == pc.if_else(pa.array(k), arr, pa.scalar(None, pa.string())).to_pylist()
        assert out.buffers()[2].size == sum(len(v) for v, kk in zip(arr.to_pylist(), k) if kk and v)


def test_constant_value_and_repeat_where():
    assert constant_value(pa.array(["kw"] * 5)) == "kw"
    assert constant_value(pa.chunked_array([["kw"] * 2, ["kw"]])) == "kw"
    assert constant_value(pa.array(["kw", "kx"])) is None
    assert constant_value(pa.array(["ab", "a", "b"])) is None  # same bytes, other boundaries
    assert constant_value(pa.array(["kw", None])) is None
    assert constant_value(pa.array(["kw", None]), skip_nulls=True) == "kw"
    assert constant_value(pa.array([""] * 3)) == ""
    mask = np.array([True, False, True, True])
    reasons = repeat_where("keyword_miss", mask)
    reasons.validate(full=True)
    assert reasons.to_pylist() == ["keyword_miss", None, "keyword_miss", "keyword_miss"]
    assert constant_value(reasons, skip_nulls=True) == "keyword_miss"
    scattered = scatter_strings(5, np.array([1, 3]), ["a|b", "c"])
    scattered.validate(full=True)
    assert scattered.to_pylist() == [None, "a|b", None, "c", None]


def test_bool_conversions():
    values = [True, None, False, True, None, True, False, True, True, False, True]
    arr = pa.array(values)
    assert to_bool(arr).tolist() == [bool(v) for v in values]
    assert to_bool(arr.slice(3)).tolist() == [bool(v) for v in values[3:]]
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(5)])
    assert to_bool(chunked).tolist() == [bool(v) for v in values[:3] + values[5:]]
    assert valid_mask(arr.slice(1)).tolist() == [v is not None for v in values[1:]]
    assert from_bool(np.array(values, bool)).to_pylist() == [bool(v) for v in values]
