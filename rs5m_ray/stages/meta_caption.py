"""Meta-captions: a sample's geo-metadata as a templated sentence, in front of its caption (notes §2.4).

`MetaCaption(cfg)` maps a batch to the same rows with `geometa_cap` (the sentence, null where a row
has no usable metadata), `country`, `month`, `utm_zone` and `caption` = `geometa_cap + " " + caption`
(RS5M's order in its RS3 text); a row left with no caption at all is dropped as `empty_caption`.

One template per sample: a seeded hash of (seed, group, sample_id) picks it, so reruns are stable
(RS5M shuffled the list per image). Templates: the project's own (`meta_caption_templates.json`, RS5M's
groups and placeholders, our wording) or RS5M's `geometa_template.json` by path.

Fields, as RS5M writes them:
- season from the month (Winter = Dec-Feb, Spring = Mar-May, Summer = Jun-Aug, Fall = Sep-Nov);
- timestamp "H o'clock, Month D, YYYY" (RedCaps: "Month D, YYYY", a post time has no hour worth saying);
- FMoW: country name from ISO-3 (pycountry), "City, Country" by offline reverse geocoding
  (reverse-geocode, nearest of its cities), the class with its 3x3-grid position (the two cells with
  the largest overlap with the box: "center and top-left blocks"), GSD and angles "%.2f", cloud cover
  in %, scan direction lower case, utm as given;
- BigEarthNet: labels joined with ", ", lower case, "_" -> "-", utm zone from the projection WKT;
- YFCC (PUB11, metadata joined by URL): "City, Country" from lat/lon and/or the date taken, the
  template group chosen by which exist; CC3M: image labels (prob >= 0.9, at most 3, else the argmax);
  RedCaps: created_utc (off by default: App. B9 excludes post times).

`utm_zone` is the zone with its latitude band computed from lat/lon (`utm`), for the statistics:
BigEarthNet's "29N" names a hemisphere, not band N.
"""
from __future__ import annotations

import json
import zlib
from datetime import datetime, timezone
from importlib import resources

import numpy as np
import pyarrow as pa

from rs5m_ray.config import MetaCaptionConfig
from rs5m_ray.ledger import mark_dropped

TEMPLATE_GROUPS = ("fmow_complex", "ben", "yfcc14m_country", "yfcc14m_timestamp", "yfcc14m_country_timestamp",
                   "cc3m", "redcaps")
SEASONS = {12: "Winter", 1: "Winter", 2: "Winter", 3: "Spring", 4: "Spring", 5: "Spring",
           6: "Summer", 7: "Summer", 8: "Summer", 9: "Fall", 10: "Fall", 11: "Fall"}
GRID = ("top-left", "top-center", "top-right", "center-left", "center", "center-right",
        "bottom-left", "bottom-center", "bottom-right")
OUTPUT_COLUMNS = {"geometa_cap": pa.string(), "country": pa.string(), "month": pa.string(), "utm_zone": pa.string()}
CC3M_LABEL_MIN_PROB = 0.9
CC3M_MAX_LABELS = 3


def load_templates(path: str | None = None) -> dict[str, list[str]]:
    """Template groups: ours (package data), or a JSON file of the same structure (RS5M's)."""
    if path is None:
        text = resources.files("rs5m_ray.stages").joinpath("meta_caption_templates.json").read_text()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    groups = json.loads(text)
    missing = [g for g in TEMPLATE_GROUPS if not groups.get(g)]
    if missing:
        raise ValueError(f"{path or 'meta_caption_templates.json'}: no templates for {missing}")
    return groups


def pick(templates: list[str], seed: int, group: str, sample_id: str) -> str:
    """The sample's template: a seeded hash of its sample_id, stable across runs and machines."""
    return templates[zlib.crc32(f"{seed}:{group}:{sample_id}".encode()) % len(templates)]


def fill(template: str, values: dict[str, str]) -> str:
    """Placeholders replaced by name (str.replace, as RS5M: literal braces elsewhere stay)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def parse_time(value: str) -> datetime:
    """FMoW "2014-06-01T16:14:24Z" (or with fractions), BigEarthNet "2017-10-02 11:21:12",
    YFCC "2013-11-24 23:08:45.0", or Unix seconds (RedCaps)."""
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def season_of(when: datetime) -> str:
    return SEASONS[when.month]


def clock_text(when: datetime, hour: bool = True) -> str:
    """RS5M's "15 o'clock, June 9, 2016" (no leading zeros); "June 9, 2016" without the hour."""
    date = f"{when:%B} {when.day}, {when.year}"
    return f"{when.hour} o'clock, {date}" if hour else date


def grid_position(box: list[float], width: float, height: float) -> str:
    """The two cells of the image's 3x3 grid that overlap the box (x, y, w, h) most, the larger
    first, ties in reading order: "center and top-left blocks"."""
    x, y, w, h = box
    cw, ch = width / 3, height / 3
    overlap = []
    for row in range(3):
        for col in range(3):
            dx = max(0.0, min(x + w, (col + 1) * cw) - max(x, col * cw))
            dy = max(0.0, min(y + h, (row + 1) * ch) - max(y, row * ch))
            overlap.append(dx * dy)
    order = sorted(range(9), key=lambda i: (-overlap[i], i))
    return f"{GRID[order[0]]} and {GRID[order[1]]} blocks"


def country_name(alpha3: str | None) -> str | None:
    import pycountry

    if not alpha3:
        return None
    found = pycountry.countries.get(alpha_3=alpha3.upper())
    return found.name if found is not None else alpha3


def reverse_geocode(latitudes: list[float | None], longitudes: list[float | None]) -> list[dict | None]:
    """Nearest city of each coordinate (offline: reverse-geocode's GeoNames cities), None where absent."""
    import reverse_geocode as rg

    index = [i for i, (a, b) in enumerate(zip(latitudes, longitudes)) if a is not None and b is not None]
    out: list[dict | None] = [None] * len(latitudes)
    if index:
        for i, found in zip(index, rg.search([(latitudes[i], longitudes[i]) for i in index])):
            out[i] = found
    return out


def utm_zone_of(lat: float | None, lon: float | None) -> str | None:
    """Zone number and latitude band ("18T"), None outside UTM's -80..84 degrees or without a location."""
    import utm

    if lat is None or lon is None or not (-80.0 <= lat <= 84.0):
        return None
    _, _, number, band = utm.from_latlon(lat, lon)
    return f"{number}{band}"


def _coordinate(value, limit: float) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if -limit <= v <= limit else None


def _number(value: float) -> str:
    return "%.2f" % value


def _percent(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{float(value):g}"


class MetaCaption:
    """Callable stage: rows with source metadata -> + geometa_cap, country, month, utm_zone; caption
    = meta-caption + caption."""

    def __init__(self, cfg: MetaCaptionConfig):
        self.cfg = cfg
        self.templates = load_templates(cfg.templates)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        for r in rows:  # PUB11 metadata (YFCC) carries coordinates as text
            r["latitude"], r["longitude"] = _coordinate(r.get("latitude"), 90), _coordinate(r.get("longitude"), 180)
        lat = [r["latitude"] for r in rows]
        lon = [r["longitude"] for r in rows]
        places = reverse_geocode(lat, lon)
        out = {name: [] for name in OUTPUT_COLUMNS}
        captions, bad = [], []
        for row, place in zip(rows, places):
            try:
                meta = self.meta_caption(row, place) if self.cfg.enabled else {}
            except (KeyError, IndexError, TypeError, ValueError) as e:  # metadata no reader checked: a drop
                meta = {}
                bad.append((len(captions), f"{type(e).__name__}: {e}"[:200]))
            for name in OUTPUT_COLUMNS:
                out[name].append(meta.get(name))
            out["utm_zone"][-1] = utm_zone_of(row.get("latitude"), row.get("longitude")) or row.get("utm_zone")
            parts = [p for p in (meta.get("geometa_cap"), (row.get("caption") or "").strip()) if p]
            captions.append(" ".join(parts) if parts else None)
        result = table
        for name, typ in OUTPUT_COLUMNS.items():
            values = pa.array(out[name], typ)
            result = result.set_column(result.schema.get_field_index(name), name, values) \
                if name in result.column_names else result.append_column(name, values)
        caption_values = pa.array(captions, pa.string())
        result = result.set_column(result.schema.get_field_index("caption"), "caption", caption_values) \
            if "caption" in result.column_names else result.append_column("caption", caption_values)
        if bad:
            rows_bad = np.zeros(len(captions), bool)
            rows_bad[[i for i, _ in bad]] = True
            details = [None] * len(captions)
            for i, why in bad:
                details[i] = why
            result = mark_dropped(result, rows_bad, "bad_metadata", pa.array(details, pa.string()))
        return mark_dropped(result, np.array([c is None for c in captions], bool), "empty_caption")

    def meta_caption(self, row: dict, place: dict | None) -> dict:
        source = row.get("source")
        if source == "fmow":
            return self._fmow(row, place)
        if source == "ben":
            return self._ben(row, place)
        if source in ("yfcc15m", "yfcc14m"):
            return self._yfcc(row, place)
        if source == "cc3m" and row.get("image_labels"):
            return self._cc3m(row)
        if source == "redcaps" and self.cfg.redcaps and row.get("created_utc"):
            return self._redcaps(row)
        return {"country": place and place.get("country")}

    def _sentence(self, group: str, sample_id: str, values: dict[str, str]) -> str:
        return fill(pick(self.templates[group], self.cfg.seed, group, sample_id), values)

    def _fmow(self, row: dict, place: dict | None) -> dict:
        geometa = json.loads(row["geometa"])
        when = parse_time(row["timestamp"])
        country = country_name(row.get("country_code"))
        city = place.get("city") if place else None
        values = {
            "country": f"{city}, {country}" if city else country,
            "season": season_of(when),
            "class_label": row["class_labels"][0].lower(),
            "relative_location": grid_position(geometa["box"], geometa["img_width"], geometa["img_height"]),
            "ground_sample_distance": _number(geometa["gsd"]),
            "utm_zone": row["utm"],
            "timestamp": clock_text(when),
            "cloud_cover_rate": _percent(geometa["cloud_cover"]),
            "scan_direction": geometa["scan_direction"].lower(),
            "target_azimuth": _number(geometa["target_azimuth"]),
            "off_nadir": _number(geometa["off_nadir"]),
        }
        return {"geometa_cap": self._sentence("fmow_complex", row["sample_id"], values), "country": country,
                "month": f"{when:%B}"}

    def _ben(self, row: dict, place: dict | None) -> dict:
        when = parse_time(row["timestamp"])
        values = {"season": season_of(when), "utm_zone": row["utm"], "timestamp": clock_text(when),
                  "class_labels": ", ".join(row["class_labels"]).lower().replace("_", "-")}
        return {"geometa_cap": self._sentence("ben", row["sample_id"], values),
                "country": place and place.get("country"), "month": f"{when:%B}"}

    def _yfcc(self, row: dict, place: dict | None) -> dict:
        values, month = {}, None
        if place:
            values["country"] = f"{place['city']}, {place['country']}" if place.get("city") else place["country"]
        taken = row.get("datetaken")
        if taken:
            try:
                when = parse_time(taken)
                values.update(season=season_of(when), timestamp=clock_text(when))
                month = f"{when:%B}"
            except ValueError:
                pass
        if not values:
            return {}
        group = "yfcc14m_country_timestamp" if len(values) == 3 else \
            "yfcc14m_country" if "country" in values else "yfcc14m_timestamp"
        return {"geometa_cap": self._sentence(group, row["sample_id"], values),
                "country": place and place.get("country"), "month": month}

    def _cc3m(self, row: dict) -> dict:
        label = ", ".join(cc3m_labels(row["image_labels"], row.get("image_label_probs")))
        return {"geometa_cap": self._sentence("cc3m", row["sample_id"], {"class_label": label})} if label else {}

    def _redcaps(self, row: dict) -> dict:
        when = parse_time(str(row["created_utc"]))
        values = {"season": season_of(when), "timestamp": clock_text(when, hour=False)}
        return {"geometa_cap": self._sentence("redcaps", row["sample_id"], values), "month": f"{when:%B}"}


def cc3m_labels(labels: str, probs: str | None) -> list[str]:
    """CC3M Image Labels ("a,b,c" with "0.97,0.9,0.6"): those with prob >= 0.9, at most 3, else the argmax."""
    names = [x.strip() for x in labels.split(",") if x.strip()]
    if not probs:
        return names[:1]
    p = [float(x) for x in probs.split(",")]
    sure = [n for n, q in zip(names, p) if q >= CC3M_LABEL_MIN_PROB][:CC3M_MAX_LABELS]
    return (sure or [names[int(np.argmax(p))]]) if names else []
