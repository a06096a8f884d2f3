"""Generated RS3 sample input in the datasets' real layouts: FMoW, BigEarthNet-S2, MillionAID.

Places are real (so reverse geocoding and UTM statistics have something true to say); images are
the synthetic aerial scenes of `sample.generate`; BigEarthNet bands are 16-bit GeoTIFFs with real
GeoTIFF keys (projected CRS WGS 84 / UTM, pixel scale, tie point). A few files are broken on
purpose: a bad JSON, a missing image, a missing band, an unreadable TIFF, a non-image.
"""
from __future__ import annotations

import json
import os
import random
from datetime import datetime, timedelta

import numpy as np
import tifffile
import utm

from rs5m_ray.sample.generate import aerial_image, jpeg

# (place, latitude, longitude, ISO-3): FMoW covers the world.
FMOW_PLACES = [
    ("San Francisco", 37.7749, -122.4194, "USA"), ("Washington", 38.8895, -77.0353, "USA"),
    ("Chicago", 41.8781, -87.6298, "USA"), ("Houston", 29.7604, -95.3698, "USA"),
    ("Mexico City", 19.4326, -99.1332, "MEX"), ("Sao Paulo", -23.5505, -46.6333, "BRA"),
    ("Buenos Aires", -34.6037, -58.3816, "ARG"), ("London", 51.5074, -0.1278, "GBR"),
    ("Paris", 48.8566, 2.3522, "FRA"), ("Berlin", 52.52, 13.405, "DEU"), ("Madrid", 40.4168, -3.7038, "ESP"),
    ("Istanbul", 41.0082, 28.9784, "TUR"), ("Cairo", 30.0444, 31.2357, "EGY"), ("Nairobi", -1.2921, 36.8219, "KEN"),
    ("Lagos", 6.5244, 3.3792, "NGA"), ("Johannesburg", -26.2041, 28.0473, "ZAF"), ("Moscow", 55.7558, 37.6173, "RUS"),
    ("Mumbai", 19.076, 72.8777, "IND"), ("Delhi", 28.7041, 77.1025, "IND"), ("Beijing", 39.9042, 116.4074, "CHN"),
    ("Shanghai", 31.2304, 121.4737, "CHN"), ("Tokyo", 35.6762, 139.6503, "JPN"), ("Seoul", 37.5665, 126.978, "KOR"),
    ("Jakarta", -6.2088, 106.8456, "IDN"), ("Sydney", -33.8688, 151.2093, "AUS"), ("Perth", -31.9505, 115.8605, "AUS"),
    ("Riyadh", 24.7136, 46.6753, "SAU"), ("Tehran", 35.6892, 51.389, "IRN"), ("Bangkok", 13.7563, 100.5018, "THA"),
    ("Toronto", 43.6532, -79.3832, "CAN"), ("Anchorage", 61.2181, -149.9003, "USA"), ("Lima", -12.0464, -77.0428, "PER"),
]
FMOW_CATEGORIES = ["airport", "stadium", "place_of_worship", "storage_tank", "race_track", "crop_field",
                   "port", "solar_farm", "dam", "parking_lot_or_garage", "water_treatment_facility",
                   "shopping_mall", "wind_farm", "military_facility", "golf_course", "impoverished_settlement"]
# BigEarthNet's ten countries.
BEN_PLACES = [("Lisbon", 38.7223, -9.1393), ("Porto", 41.1579, -8.6291), ("Dublin", 53.3498, -6.2603),
              ("Cork", 51.8985, -8.4756), ("Helsinki", 60.1699, 24.9384), ("Oulu", 65.0121, 25.4651),
              ("Vienna", 48.2082, 16.3738), ("Brussels", 50.8503, 4.3517), ("Vilnius", 54.6872, 25.2797),
              ("Luxembourg", 49.6116, 6.1319), ("Belgrade", 44.7866, 20.4489), ("Pristina", 42.6629, 21.1655),
              ("Zurich", 47.3769, 8.5417), ("Graz", 47.0707, 15.4395)]
BEN_LABELS = ["Continuous urban fabric", "Discontinuous urban fabric", "Non-irrigated arable land",
              "Pastures", "Complex cultivation patterns", "Coniferous forest", "Broad-leaved forest",
              "Mixed forest", "Transitional woodland/shrub", "Water bodies", "Sea and ocean",
              "Land principally occupied by agriculture, with significant areas of natural vegetation",
              "Olive groves", "Peatbogs", "Industrial or commercial units"]


def utm_wkt(zone: int, north: bool) -> str:
    """The projection WKT BigEarthNet ships (GDAL's WKT1 of WGS 84 / UTM)."""
    epsg = (32600 if north else 32700) + zone
    return (f'PROJCS["WGS 84 / UTM zone {zone}{"N" if north else "S"}",GEOGCS["WGS 84",DATUM["WGS_1984",'
            'SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],'
            'PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],'
            'AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
            f'PARAMETER["central_meridian",{zone * 6 - 183}],PARAMETER["scale_factor",0.9996],'
            f'PARAMETER["false_easting",500000],PARAMETER["false_northing",{0 if north else 10000000}],'
            f'UNIT["metre",1,AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],'
            f'AUTHORITY["EPSG","{epsg}"]]')


def write_geotiff(path: str, band: np.ndarray, epsg: int, ulx: float, uly: float, pixel: float = 10.0) -> None:
    """A single-band GeoTIFF with the keys GDAL writes for a projected CRS: GeoKeyDirectory
    (model type projected, raster type pixel-is-area, ProjectedCSType = `epsg`, metres),
    ModelPixelScale and ModelTiepoint (upper-left corner)."""
    geokeys = [1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg, 3076, 0, 1, 9001]
    extratags = [(33550, "d", 3, (pixel, pixel, 0.0), True),
                 (33922, "d", 6, (0.0, 0.0, 0.0, ulx, uly, 0.0), True),
                 (34735, "H", len(geokeys), geokeys, True)]
    tifffile.imwrite(path, band, extratags=extratags, photometric="minisblack")


def _timestamp(rng: random.Random) -> datetime:
    return datetime(2015, 1, 1) + timedelta(days=rng.randrange(4 * 365), hours=rng.randrange(8, 18),
                                            minutes=rng.randrange(60), seconds=rng.randrange(60))


def fmow_json(name: str, category: str, lat: float, lon: float, country: str, size: tuple[int, int],
              rng: random.Random) -> dict:
    """An fMoW image JSON: the first box spans the image (its raw_location is the footprint), the
    second is the labelled object."""
    w, h = size
    d = 0.01
    footprint = f"POLYGON (({lon:.10f} {lat:.10f}, {lon + d:.10f} {lat:.10f}, {lon + d:.10f} {lat - d:.10f}, " \
                f"{lon:.10f} {lat - d:.10f}, {lon:.10f} {lat:.10f}))"
    bw, bh = rng.randint(w // 5, w // 2), rng.randint(h // 5, h // 2)
    bx, by = rng.randrange(0, w - bw), rng.randrange(0, h - bh)
    _, _, zone, band = utm.from_latlon(lat, lon)
    return {
        "bounding_boxes": [{"ID": 0, "box": [0, 0, w, h], "category": category, "raw_location": footprint},
                           {"ID": 1, "box": [bx, by, bw, bh], "category": category, "raw_location": footprint}],
        "cloud_cover": rng.choice([0, 0, 0, 2, 7]), "country_code": country,
        "gsd": round(rng.uniform(0.3, 0.6), 4), "img_filename": name, "img_width": w, "img_height": h,
        "multi_resolution_dbl": round(rng.uniform(1.2, 3.0), 6), "off_nadir_angle_dbl": round(rng.uniform(0, 35), 6),
        "pan_resolution_dbl": round(rng.uniform(0.3, 0.6), 6), "scan_direction": rng.choice(["Forward", "Reverse"]),
        "sensor_platform_name": rng.choice(["WORLDVIEW02", "WORLDVIEW03", "GEOEYE01", "QUICKBIRD02"]),
        "target_azimuth_dbl": round(rng.uniform(0, 360), 6),
        "timestamp": _timestamp(rng).strftime("%Y-%m-%dT%H:%M:%SZ"), "utm": f"{zone}{band}",
    }


def write_fmow(root: str, n_images: int, rng: random.Random, full: bool = False, split: str = "train") -> list[str]:
    """fMoW-rgb (jpg) or fMoW-full (tif) layout, both variants per image; returns the JSON paths."""
    written = []
    for i in range(n_images):
        place, lat, lon, country = FMOW_PLACES[i % len(FMOW_PLACES)]
        lat, lon = lat + rng.uniform(-0.05, 0.05), lon + rng.uniform(-0.05, 0.05)
        category = FMOW_CATEGORIES[i % len(FMOW_CATEGORIES)]
        folder = os.path.join(root, split, category, f"{category}_{i}")
        os.makedirs(folder, exist_ok=True)
        for variant, size in (("rgb", (rng.randint(180, 320), rng.randint(180, 320))), ("msrgb", (96, 96))):
            stem = f"{category}_{i}_0_{variant}"
            image = aerial_image(rng, size)
            if full:
                tifffile.imwrite(os.path.join(folder, f"{stem}.tif"), np.asarray(image), photometric="rgb")
            else:
                with open(os.path.join(folder, f"{stem}.jpg"), "wb") as f:
                    f.write(jpeg(image))
            path = os.path.join(folder, f"{stem}.json")
            with open(path, "w") as f:
                json.dump(fmow_json(f"{stem}.{'tif' if full else 'jpg'}", category, lat, lon, country, size, rng), f)
            written.append(path)
    return written


def ben_metadata_json(labels: list[str], lat: float, lon: float, when: datetime) -> dict:
    easting, northing, zone, _ = utm.from_latlon(lat, lon)
    ulx, uly = int(easting // 10 * 10) - 600, int(northing // 10 * 10) + 600
    return {"labels": labels, "coordinates": {"ulx": ulx, "uly": uly, "lrx": ulx + 1200, "lry": uly - 1200},
            "projection": utm_wkt(zone, lat >= 0),
            "tile_source": f"S2A_MSIL1C_{when:%Y%m%dT%H%M%S}_N0205_R022_T{zone}XXX_{when:%Y%m%dT%H%M%S}.SAFE",
            "acquisition_date": when.strftime("%Y-%m-%d %H:%M:%S")}


def utm_epsg(lat: float, lon: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding (lat, lon)."""
    return (32600 if lat >= 0 else 32700) + utm.from_latlon(lat, lon)[2]


def write_ben_patch(root: str, name: str, doc: dict, epsg: int, rng: random.Random,
                    bands=("B02", "B03", "B04", "B08")) -> str:
    """One BigEarthNet-S2 patch folder: 10 m bands as 120x120 uint16 GeoTIFFs and the metadata JSON."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    scene = np.asarray(aerial_image(rng, (120, 120))).astype(np.uint16) * 11  # DN ~ reflectance x 10,000
    c = doc["coordinates"]
    for band in bands:
        channel = {"B04": 0, "B03": 1, "B02": 2}.get(band, 1)
        write_geotiff(os.path.join(folder, f"{name}_{band}.tif"), scene[..., channel], epsg, c["ulx"], c["uly"])
    with open(os.path.join(folder, f"{name}_labels_metadata.json"), "w") as f:
        json.dump(doc, f)
    return folder


def write_ben(root: str, n_patches: int, rng: random.Random) -> list[str]:
    folders = []
    for i in range(n_patches):
        place, lat, lon = BEN_PLACES[i % len(BEN_PLACES)]
        lat, lon = lat + rng.uniform(-0.2, 0.2), lon + rng.uniform(-0.2, 0.2)
        when = datetime(2017, 6, 1) + timedelta(days=rng.randrange(365), hours=rng.randrange(9, 12),
                                                minutes=rng.randrange(60))
        name = f"S2A_MSIL2A_{when:%Y%m%dT%H%M%S}_{rng.randrange(90)}_{rng.randrange(90)}"
        labels = sorted(rng.sample(BEN_LABELS, rng.randint(1, 4)), key=BEN_LABELS.index)
        folders.append(write_ben_patch(root, name, ben_metadata_json(labels, lat, lon, when), utm_epsg(lat, lon), rng))
    return folders


def write_millionaid(root: str, n_images: int, rng: random.Random) -> list[str]:
    folder = os.path.join(root, "test")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n_images):
        path = os.path.join(folder, f"P{rng.randrange(10**7):07d}.jpg")
        with open(path, "wb") as f:
            f.write(jpeg(aerial_image(rng, (rng.randint(200, 400), rng.randint(200, 400)))))
        paths.append(path)
    return paths


def generate_rs3(out_dir: str, fmow_images: int = 24, ben_patches: int = 20, millionaid_images: int = 10,
                 seed: int = 2023) -> list[dict]:
    """All three sources under `out_dir`, with one broken file of each kind; returns the source configs."""
    rng = random.Random(seed)
    fmow, ben, maid = (os.path.join(out_dir, d) for d in ("fmow", "bigearthnet", "millionaid"))
    jsons = write_fmow(fmow, fmow_images, rng)
    with open(jsons[0], "w") as f:
        f.write('{"bounding_boxes": [')  # bad JSON
    os.remove(jsons[3].replace(".json", ".jpg"))  # metadata without its image
    folders = write_ben(ben, ben_patches, rng)
    os.remove(os.path.join(folders[1], f"{os.path.basename(folders[1])}_B03.tif"))  # missing band
    with open(os.path.join(folders[2], f"{os.path.basename(folders[2])}_B04.tif"), "wb") as f:
        f.write(b"II*\x00 this is not a tiff")  # unreadable TIFF
    paths = write_millionaid(maid, millionaid_images, rng)
    with open(paths[0], "wb") as f:
        f.write(b"<html>not an image</html>")  # fails validation (decode)
    return [{"name": "fmow", "root": fmow}, {"name": "ben", "root": ben}, {"name": "millionaid", "root": maid}]
