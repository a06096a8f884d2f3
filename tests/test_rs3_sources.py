"""RS3 label-source readers on fixtures written here in the datasets' real layouts (real GeoTIFF keys)."""
from __future__ import annotations

import io
import json
import os
import random
from datetime import datetime

import numpy as np
import pytest
import tifffile
from PIL import Image

from rs5m_ray.config import BenRgbConfig, LabeledSourceConfig
from rs5m_ray.ledger import DROP_REASON
from rs5m_ray.sample.rs3 import (ben_metadata_json, utm_epsg, write_ben_patch, write_fmow, write_geotiff,
                                 write_millionaid)
from rs5m_ray.sources.labeled import ReadLabeled, candidates_table, list_labeled, to_uint8
from rs5m_ray.storage import Storage

STORAGE = Storage()


def read_all(cfg: LabeledSourceConfig, rgb: BenRgbConfig | None = None) -> dict[str, dict]:
    rows = list_labeled(cfg, STORAGE)
    table = ReadLabeled(STORAGE, rgb or BenRgbConfig(), threads=4)(candidates_table(rows))
    assert len(table) == len(rows)  # the stage marks drops, never loses a row
    return {r["sample_id"]: r for r in table.to_pylist()}


def test_fmow_rgb_layout_names_metadata_and_drop_reasons(tmp_path):
    rng = random.Random(1)
    jsons = write_fmow(str(tmp_path), 4, rng)
    # damage: bad JSON, metadata without its image, valid JSON without a needed field, image without JSON
    with open(jsons[0], "w") as f:
        f.write("{not json")
    os.remove(jsons[2].replace(".json", ".jpg"))
    doc = json.load(open(jsons[4]))
    del doc["timestamp"]
    json.dump(doc, open(jsons[4], "w"))
    os.remove(jsons[6])
    rows = read_all(LabeledSourceConfig(name="fmow", root=str(tmp_path)))
    assert len(rows) == 8
    reasons = {sid: r[DROP_REASON] for sid, r in rows.items() if r[DROP_REASON]}
    assert reasons == {"fmow_airport_0_0_rgb": "bad_json", "fmow_stadium_1_0_rgb": "missing_image",
                       "fmow_place_of_worship_2_0_rgb": "bad_metadata", "fmow_storage_tank_3_0_rgb": "missing_metadata"}
    ok = rows["fmow_stadium_1_0_msrgb"]
    source = json.load(open(jsons[3]))
    lon, lat = (float(v) for v in source["bounding_boxes"][0]["raw_location"].split("((")[1].split(",")[0].split())
    assert (ok["latitude"], ok["longitude"]) == (lat, lon)
    assert ok["country_code"] == source["country_code"] and ok["utm"] == source["utm"]
    assert ok["class_labels"] == ["stadium"] and ok["orig_name"] == "stadium_1_0_msrgb.jpg"
    geometa = json.loads(ok["geometa"])
    assert geometa["box"] == source["bounding_boxes"][1]["box"]  # the labelled object, not the image extent
    assert geometa["gsd"] == source["multi_resolution_dbl"]  # RS5M's GSD
    assert Image.open(io.BytesIO(ok["image_bytes"])).size == (source["img_width"], source["img_height"])


def test_fmow_full_tif_is_encoded_and_other_splits_are_named_apart(tmp_path):
    write_fmow(str(tmp_path), 1, random.Random(2), full=True)
    write_fmow(str(tmp_path), 1, random.Random(3), split="val")
    rows = read_all(LabeledSourceConfig(name="fmow", root=str(tmp_path), splits=["train", "val"], variants=["rgb"]))
    assert sorted(rows) == ["fmow_airport_0_0_rgb", "fmow_val_airport_0_0_rgb"]
    full = rows["fmow_airport_0_0_rgb"]
    assert full["url"].endswith(".tif") and full["image_bytes"][:3] == b"\xff\xd8\xff"
    tif = tifffile.imread(full["url"])
    decoded = np.asarray(Image.open(io.BytesIO(full["image_bytes"])))
    assert decoded.shape == tif.shape and np.abs(decoded.astype(int) - tif).mean() < 4  # 8-bit passes unchanged


def _patch(root, name, lat, lon, rng, **kw):
    doc = ben_metadata_json(["Sea and ocean", "Coniferous forest"], lat, lon, datetime(2017, 7, 18, 11, 21, 2))
    doc.update(kw.pop("doc", {}))
    return write_ben_patch(str(root), name, doc, utm_epsg(lat, lon), rng, **kw)


def test_ben_geotiffs_rgb_order_stretch_names_and_crs(tmp_path):
    rng = random.Random(4)
    lisbon = _patch(tmp_path, "S2A_MSIL2A_20170718T112102_1_1", 38.72, -9.14, rng)
    _patch(tmp_path, "S2A_MSIL2A_20170718T112102_0_9", 60.17, 24.94, rng)
    # B04 (red) = 3000, B03 (green) = 1500, B02 (blue) = 0: reflectance order must reach the JPEG as RGB
    name = os.path.basename(lisbon)
    with tifffile.TiffFile(os.path.join(lisbon, f"{name}_B03.tif")) as tif:
        keys = tif.geotiff_metadata
        tie = keys["ModelTiepoint"]
    assert int(keys["ProjectedCSTypeGeoKey"]) == 32629 and keys["ModelPixelScale"][:2] == [10.0, 10.0]
    doc = json.load(open(os.path.join(lisbon, f"{name}_labels_metadata.json")))
    assert tie[3:5] == [doc["coordinates"]["ulx"], doc["coordinates"]["uly"]]
    for band, value in (("B04", 3000), ("B03", 1500), ("B02", 0)):
        write_geotiff(os.path.join(lisbon, f"{name}_{band}.tif"), np.full((120, 120), value, np.uint16), 32629,
                      tie[3], tie[4])
    rows = read_all(LabeledSourceConfig(name="ben", root=str(tmp_path)))
    # sequential names over the sorted patch names, the patch name kept
    assert rows["ben_0"]["orig_name"] == "S2A_MSIL2A_20170718T112102_0_9"
    assert rows["ben_1"]["orig_name"] == name
    r = rows["ben_1"]
    assert r[DROP_REASON] is None and r["utm"] == "29N" and r["timestamp"] == "2017-07-18 11:21:02"
    assert abs(r["latitude"] - 38.72) < 0.02 and abs(r["longitude"] + 9.14) < 0.02
    assert r["class_labels"] == ["Sea and ocean", "Coniferous forest"]
    pixel = np.asarray(Image.open(io.BytesIO(r["image_bytes"])))[60, 60].astype(int)
    assert np.abs(pixel - [255, 128, 0]).max() <= 3  # linear stretch: 3000 -> 255


def test_ben_bad_files_are_drop_reasons_and_crs_comes_from_the_tiff(tmp_path):
    rng = random.Random(5)
    folders = {k: _patch(tmp_path, f"S2B_MSIL2A_20180101T100000_{i}_0", 53.35, -6.26, rng)
               for i, k in enumerate(["missing_band", "unreadable", "small", "no_json", "bad_json", "no_wkt", "ok"])}

    def path(kind, suffix):
        return os.path.join(folders[kind], f"{os.path.basename(folders[kind])}_{suffix}")

    os.remove(path("missing_band", "B04.tif"))
    open(path("unreadable", "B03.tif"), "wb").write(b"II*\x00garbage")
    write_geotiff(path("small", "B02.tif"), np.zeros((60, 60), np.uint16), 32629, 0, 0)  # a 20 m band's size
    os.remove(path("no_json", "labels_metadata.json"))
    open(path("bad_json", "labels_metadata.json"), "w").write('{"labels": [')
    doc = json.load(open(path("no_wkt", "labels_metadata.json")))
    doc["projection"] = ""
    json.dump(doc, open(path("no_wkt", "labels_metadata.json"), "w"))
    rows = {r["orig_name"]: r for r in read_all(LabeledSourceConfig(name="ben", root=str(tmp_path))).values()}
    reasons = {k: rows[os.path.basename(f)][DROP_REASON] for k, f in folders.items()}
    assert reasons == {"missing_band": "missing_band", "unreadable": "unreadable_tiff", "small": "bad_band",
                       "no_json": "missing_metadata", "bad_json": "bad_json", "no_wkt": None, "ok": None}
    assert rows[os.path.basename(folders["no_wkt"])]["utm"] == "29N"  # from the bands' GeoKeys (EPSG 32629)


def test_percentile_stretch_and_include_list(tmp_path):
    values = np.arange(100 * 100 * 3, dtype=np.uint16).reshape(100, 100, 3)
    out = to_uint8(values, BenRgbConfig(stretch="percentile", low_percentile=2, high_percentile=98))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255 and 0.015 < (out == 0).mean() < 0.03  # the lowest 2% (and rounding)
    rng = random.Random(6)
    for i in range(3):
        _patch(tmp_path / "ben", f"P_{i}", 50.85, 4.35, rng)
    (tmp_path / "train.csv").write_text("P_0\nP_2\n")
    rows = list_labeled(LabeledSourceConfig(name="ben", root=str(tmp_path / "ben"),
                                            include_list=str(tmp_path / "train.csv")), STORAGE)
    assert [(r["sample_id"], r["orig_name"]) for r in rows] == [("ben_0", "P_0"), ("ben_1", "P_2")]


def test_millionaid_names_and_clashing_names(tmp_path):
    paths = write_millionaid(str(tmp_path), 3, random.Random(7))
    rows = read_all(LabeledSourceConfig(name="millionaid", root=str(tmp_path)))
    stems = sorted(f"millionaid_{os.path.basename(p)[:-4]}" for p in paths)
    assert sorted(rows) == stems and all(r[DROP_REASON] is None and r["class_labels"] == [] for r in rows.values())
    os.makedirs(tmp_path / "other")
    open(tmp_path / "other" / os.path.basename(paths[0]), "wb").write(open(paths[0], "rb").read())
    with pytest.raises(ValueError, match="both name sample"):
        list_labeled(LabeledSourceConfig(name="millionaid", root=str(tmp_path)), STORAGE)
