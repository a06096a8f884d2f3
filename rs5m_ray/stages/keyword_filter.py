"""RS5M's keyword filter: 44 remote-sensing keywords, case-insensitive substrings.

Semantics follow the paper (notes §1.2): stems such as `aerial imag` match as
plain substrings with no word boundary, so "aerial images", "aerial imagery" and
"LANDSAT 8 scene" hit, and so do near misses the stems still catch, e.g.
"aerial photographer" (`aerial photo`) or "space imaging expo" (`space imag`).
"satellite dish" and a roof "aerials" do not match any stem. This is the
paper's recall-oriented first pass; later stages (CLIP score, RS detector)
remove what the stems let through.

Case: ASCII letters match either case; keywords are lower-cased with
`str.lower()` and their non-ASCII characters must match byte for byte. For the
44 ASCII keywords this equals the paper's `keyword in caption.lower()`: the only
non-ASCII characters that `str.lower()` maps to ASCII are the Kelvin sign (-> k,
in no keyword) and 'İ' (-> 'i' plus a combining dot, which no stem contains).
No Unicode case folding: 'ſatellite' (long s) and 'AERİAL' do not hit.

Speed: Hyperscan (SIMD multi-literal matching) scans a batch's whole caption
data buffer in one call, zero-copy; each occurrence is mapped back to its row
through the offsets buffer, so hit detection and per-keyword attribution are one
pass. An occurrence straddling two captions is discarded.
"""
from __future__ import annotations

import functools

import hyperscan
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rs5m_ray.arrays import from_bool, null_except, scatter_strings, string_buffers, valid_mask
from rs5m_ray.ledger import batch_key, mark_dropped, write_parquet
from rs5m_ray.storage import Storage, join

GROUP1_RS_NOUNS = (
    "remote sensing", "earth observ", "aerial imag", "aerial photo", "aerial map", "aerial pic",
    "aerial view", "aerial scan", "aerial satellite", "satellite imag", "satellite photo", "satellite map",
    "satellite pic", "satellite view", "satellite scan", "satellite data", "satellite surveillance",
    "space photo", "spaceborne photo", "space-borne photo", "space imag", "spaceborne imag",
    "space-borne imag", "space view", "spaceborne view", "space-borne view", "space surveillance",
)
GROUP2_APPLICATIONS = (
    "google earth", "freesound", "sentinel-1", "sentinel-2", "sentinel 1", "sentinel 2", "gaofen", "usgs",
    "naip", "modis", "eosdis", "worldview", "planet dove", "arcgis", "maxar", "landsat",
    "geographic information system",
)
RS5M_KEYWORDS = GROUP1_RS_NOUNS + GROUP2_APPLICATIONS


@functools.lru_cache(maxsize=16)
def _database(keywords: tuple[str, ...]) -> hyperscan.Database:
    # Built per process (not picklable, so never shipped with the stage). Block mode scratch is not
    # thread-safe: one scan at a time per process, as Ray's map_batches runs them.
    if not keywords or not all(keywords):
        raise ValueError(f"keywords must be non-empty strings, got {keywords!r}")
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[k.encode() for k in keywords], ids=list(range(len(keywords))),
                     flags=hyperscan.HS_FLAG_CASELESS, literal=True)
    return database


@functools.lru_cache(maxsize=16)
def _lowered(keywords: tuple[str, ...]) -> bool:
    return all(k == k.lower() for k in keywords)


@functools.lru_cache(maxsize=16)
def _byte_lengths(keywords: tuple[str, ...]) -> np.ndarray:
    return np.array([len(k.encode()) for k in keywords], np.int64)


def keyword_occurrences(captions: pa.Array | pa.ChunkedArray, keywords) -> tuple[np.ndarray, np.ndarray]:
    """(row, keyword index) of every occurrence of a keyword inside one non-null caption."""
    keywords = keywords if isinstance(keywords, tuple) and _lowered(keywords) else tuple(k.lower() for k in keywords)
    if isinstance(captions, pa.ChunkedArray):  # each chunk scanned in place, no concatenation
        if captions.num_chunks == 1:
            return keyword_occurrences(captions.chunk(0), keywords)
        found = [(r + start, k) for (r, k), start in
                 zip((keyword_occurrences(c, keywords) for c in captions.chunks),
                     np.cumsum([0] + [len(c) for c in captions.chunks[:-1]]))]
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([r for r, _ in found]), np.concatenate([k for _, k in found])
    if not pa.types.is_string(captions.type) and not pa.types.is_large_string(captions.type):
        raise TypeError(f"captions must be strings, got {captions.type}")
    offsets, data = string_buffers(captions)
    found: list[tuple[int, int]] = []
    if offsets[-1] > offsets[0]:
        _database(keywords).scan(memoryview(data[offsets[0]:offsets[-1]]),
                                 match_event_handler=lambda kid, _start, end, _flags, _ctx: found.append((kid, end)))
    kids, ends = np.array(found, np.int64).reshape(-1, 2).T
    ends = ends + offsets[0]
    starts = ends - _byte_lengths(keywords)[kids]
    rows = np.searchsorted(offsets, starts, side="right") - 1
    inside = ends <= offsets[rows + 1]
    if captions.null_count:
        inside &= valid_mask(captions)[rows]
    return rows[inside], kids[inside]


def caption_hits(captions: pa.Array | pa.ChunkedArray, keywords) -> pa.Array:
    """Boolean mask: caption contains any keyword (ASCII case-insensitive); null -> False."""
    rows, _ = keyword_occurrences(captions, keywords)
    mask = np.zeros(len(captions), bool)
    mask[rows] = True
    return from_bool(mask)


def matched_keywords(captions: pa.Array | pa.ChunkedArray, keywords) -> pa.Array:
    """Per caption, the '|'-joined keywords it contains in list order; null when none."""
    keywords = tuple(k.lower() for k in keywords)
    rows, kids = keyword_occurrences(captions, keywords)
    pairs = np.unique(rows * len(keywords) + kids)  # sorted by row, then keyword order
    joined: list[str] = []
    last = -1
    for row, k in zip((pairs // len(keywords)).tolist(), (pairs % len(keywords)).tolist()):  # the hits only
        if row == last:
            joined[-1] += "|" + keywords[k]
        else:
            joined.append(keywords[k])
            last = row
    return scatter_strings(len(captions), np.unique(pairs // len(keywords)), joined)


class KeywordFilter:
    """Stage: keep captions with an RS keyword; records hits per keyword and source."""

    def __init__(self, keywords=None, output: str | None = None, storage: Storage | None = None):
        self.keywords = tuple(k.lower() for k in (keywords or RS5M_KEYWORDS))
        self.output, self.storage = output, storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch["caption"]  # a batch may arrive as slices: each scanned in place
        keywords = matched_keywords(captions, self.keywords)
        hit = pc.is_valid(keywords)
        keep = valid_mask(keywords)
        batch = mark_dropped(batch, ~keep, "keyword_miss")
        # Misses are nearly every input row: their ledger rows keep neither URL nor caption (the
        # sample_id locates them in the input). Nulled without copying the misses' bytes.
        for name, column in (("url", batch["url"] if "url" in batch.column_names else None), ("caption", captions)):
            if column is not None:
                batch = batch.set_column(batch.schema.get_field_index(name), name, null_except(column, keep))
        if self.output is not None and keep.any():
            self._write_counts(batch, batch["source"].filter(hit), keywords.filter(hit))
        return batch.append_column("keywords", keywords)

    def _write_counts(self, batch: pa.Table, sources: pa.Array, keywords: pa.Array) -> None:
        rows = [(s, k) for s, ks in zip(sources.to_pylist(), keywords.to_pylist()) for k in ks.split("|")]
        table = pa.table({"source": [s for s, _ in rows], "keyword": [k for _, k in rows]})
        counts = table.group_by(["source", "keyword"]).aggregate([([], "count_all")])
        write_parquet(self.storage, join(self.output, "keyword_hits", f"{batch_key(batch)}.parquet"),
                      counts.rename_columns(["source", "keyword", "count"]))
