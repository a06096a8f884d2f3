"""RS5M's keyword filter: 44 remote-sensing keywords, case-insensitive substrings.

Semantics follow the paper (notes §1.2): stems such as `aerial imag` match as
plain substrings with no word boundary, so "aerial images", "aerial imagery" and
"LANDSAT 8 scene" hit, and so do near misses the stems still catch, e.g.
"aerial photographer" (`aerial photo`) or "space imaging expo" (`space imag`).
"satellite dish" and a roof "aerials" do not match any stem. This is the
paper's recall-oriented first pass; later stages (CLIP score, RS detector)
remove what the stems let through.

One RE2 pass (an alternation of all keywords, compiled to a DFA by Arrow) finds
the rows that hit; only those few rows are then tested keyword by keyword to
record which keywords hit.
"""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

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


def keyword_pattern(keywords) -> str:
    return "|".join(re.escape(k.lower()) for k in keywords)


def caption_hits(captions: pa.Array, keywords) -> pa.Array:
    """Boolean mask: caption contains any keyword (case-insensitive)."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    return pc.fill_null(pc.match_substring_regex(captions, keyword_pattern(keywords), ignore_case=True), False)


def which_keywords(captions: pa.Array, keywords) -> pa.Array:
    """For each caption, the '|'-joined keywords it contains. Runs on the hits only (rare)."""
    lowered = pc.utf8_lower(pc.fill_null(captions, "")).to_pylist()
    return pa.array(["|".join([k for k in keywords if k in c]) for c in lowered], pa.string())


class KeywordFilter:
    """Stage: keep captions with an RS keyword; records hits per keyword and source."""

    def __init__(self, keywords=None, output: str | None = None, storage: Storage | None = None):
        self.keywords = tuple(k.lower() for k in (keywords or RS5M_KEYWORDS))
        self.output, self.storage = output, storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        hit = caption_hits(batch["caption"], self.keywords)
        batch = mark_dropped(batch, pc.invert(hit), "keyword_miss")
        hits = batch.filter(hit)
        keywords = which_keywords(hits["caption"], self.keywords)
        if self.output is not None and len(hits):
            self._write_counts(batch, hits["source"], keywords)
        column = pc.replace_with_mask(pa.nulls(len(batch), pa.string()), hit, keywords)
        return batch.append_column("keywords", column)

    def _write_counts(self, batch: pa.Table, sources: pa.Array, keywords: pa.Array) -> None:
        rows = [(s, k) for s, ks in zip(sources.to_pylist(), keywords.to_pylist()) for k in ks.split("|")]
        table = pa.table({"source": [s for s, _ in rows], "keyword": [k for _, k in rows]})
        counts = table.group_by(["source", "keyword"]).aggregate([([], "count_all")])
        write_parquet(self.storage, join(self.output, "keyword_hits", f"{batch_key(batch)}.parquet"),
                      counts.rename_columns(["source", "keyword", "count"]))
