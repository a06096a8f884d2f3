"""One adapter per PUB11 source: its real file format and column names.

Each adapter maps a source's metadata onto the canonical schema
(`sample_id`, `source`, `url`, `caption`) and keeps the extra columns later
stages use (sizes, geo fields, dates). Captions come from the first non-empty
column of `caption_columns`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceAdapter:
    name: str
    format: str  # parquet | tsv | csv | jsonl | json
    url_column: str
    caption_columns: tuple[str, ...]
    extra_columns: tuple[str, ...] = ()
    # Column names for header-less delimited files (as the datasets ship them).
    header: tuple[str, ...] | None = None
    # Records nested under this key in a JSON document (RedCaps' annotations files).
    json_records_key: str | None = None
    # (column, required value): rows with another value are dropped as `filtered_<column>`.
    require: tuple[tuple[str, str], ...] = ()
    notes: str = field(default="", compare=False)

    @property
    def columns(self) -> tuple[str, ...]:
        cols = (self.url_column, *self.caption_columns, *self.extra_columns, *(c for c, _ in self.require))
        return tuple(dict.fromkeys(cols))


_LAION = dict(format="parquet", url_column="URL", caption_columns=("TEXT",),
              extra_columns=("WIDTH", "HEIGHT", "similarity"))

ADAPTERS: dict[str, SourceAdapter] = {a.name: a for a in [
    SourceAdapter("laion2b", **_LAION, notes="LAION2B-en parquet: SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity"),
    SourceAdapter("laion400m", **_LAION, notes="LAION-400M parquet, same columns as LAION2B-en"),
    SourceAdapter("laioncoco", format="parquet", url_column="URL", caption_columns=("TEXT", "top_caption"),
                  extra_columns=("WIDTH", "HEIGHT", "similarity"),
                  notes="LAION-COCO parquet: URL, TEXT, top_caption, all_captions, all_similarities, WIDTH, HEIGHT"),
    SourceAdapter("coyo700m", format="parquet", url_column="url", caption_columns=("text",),
                  extra_columns=("width", "height", "clip_similarity_vitb32"),
                  notes="COYO-700M parquet: id, url, text, width, height, image_phash, clip_similarity_vitb32, ..."),
    SourceAdapter("wit", format="tsv", url_column="image_url",
                  caption_columns=("caption_reference_description", "caption_attribution_description",
                                   "caption_alt_text_description"),
                  extra_columns=("page_title", "original_width", "original_height"),
                  require=(("language", "en"),),
                  notes="WIT tsv(.gz) with header; RS5M used the English rows only"),
    SourceAdapter("yfcc15m", format="tsv", url_column="downloadurl", caption_columns=("title", "description"),
                  extra_columns=("photoid", "datetaken", "latitude", "longitude"),
                  notes="YFCC15M (OpenAI's English subset of YFCC100M) metadata tsv with header"),
    SourceAdapter("cc12m", format="tsv", url_column="url", caption_columns=("caption",), header=("url", "caption"),
                  notes="cc12m.tsv: url<TAB>caption, no header"),
    SourceAdapter("redcaps", format="json", url_column="url", caption_columns=("caption", "raw_caption"),
                  extra_columns=("subreddit", "created_utc", "image_id"), json_records_key="annotations",
                  notes="RedCaps annotations/<subreddit>_<year>.json: {info, annotations: [...]}"),
    SourceAdapter("cc3m", format="tsv", url_column="url", caption_columns=("caption",), header=("caption", "url"),
                  notes="Conceptual Captions Train/Validation GCC tsv: caption<TAB>url, no header"),
    SourceAdapter("sbu", format="jsonl", url_column="image_url", caption_columns=("caption",),
                  extra_columns=("user_id",), notes="SBU captions as json lines: image_url, user_id, caption"),
    SourceAdapter("vg", format="jsonl", url_column="url", caption_columns=("caption",),
                  extra_columns=("image_id", "width", "height"),
                  notes="Visual Genome image_data records with their region phrases joined into `caption`"),
]}


def get_adapter(name: str) -> SourceAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; known: {sorted(ADAPTERS)}") from None
