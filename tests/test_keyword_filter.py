import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from rs5m_ray.stages.keyword_filter import (GROUP1_RS_NOUNS, GROUP2_APPLICATIONS, RS5M_KEYWORDS, KeywordFilter,
                                            caption_hits, matched_keywords)


def hits(captions):
    return caption_hits(pa.array(captions, pa.string()), RS5M_KEYWORDS).to_pylist()


def test_the_44_keywords_of_the_paper():
    assert len(GROUP1_RS_NOUNS) == 27
    assert len(GROUP2_APPLICATIONS) == 17  # Appendix B2's 15 + "sentinel 1/2" spelled with a space (Fig. 3)
    assert len(set(RS5M_KEYWORDS)) == 44
    assert "freesound" in RS5M_KEYWORDS  # really in the paper's list


@pytest.mark.parametrize("caption", [
    "Aerial imagery of the Nile delta", "LANDSAT 8 scene over Lake Chad", "Sentinel-2 L2A tile 31TCJ",
    "sentinel 2 mosaic", "High-resolution SATELLITE IMAGES of Kyiv", "earth observation data cube",
    "Maxar WorldView-3 capture", "NAIP 2020 orthophoto", "Remote Sensing of Environment cover",
    "a space-borne view of hurricane", "Google Earth screenshot of my street",
])
def test_true_hits(caption):
    assert hits([caption]) == [True]


@pytest.mark.parametrize("caption", [
    "satellite dish on a red roof", "TV aerials on an old chimney", "aerial yoga class",
    "space station crew photo", "a satellite orbiting the moon", "Geographical information systems course",
])
def test_near_misses_that_no_stem_catches(caption):
    assert hits([caption]) == [False]


@pytest.mark.parametrize("caption", [
    "Aerial photographer at a wedding",  # `aerial photo`: the paper's stems are prefixes, no word boundary
    "space imaging expo booth",          # `space imag`
    "aerial views drone toy",            # `aerial view`
])
def test_near_misses_the_stems_still_catch_as_in_the_paper(caption):
    assert hits([caption]) == [True]


def test_case_insensitive_and_null_safe():
    assert hits(["AERIAL VIEW", None, ""]) == [True, False, False]


def reference(captions, keywords=RS5M_KEYWORDS):
    """The paper's semantics, row by row: `keyword in caption.lower()`."""
    return [None if c is None or not any(k in c.lower() for k in keywords)
            else "|".join(k for k in keywords if k in c.lower()) for c in captions]


ADVERSARIAL = [
    "AERİAL VIEW of a city",       # dotted capital I: str.lower() gives 'i' + combining dot, no hit
    "ſatellite image",             # long s: Unicode case folding would hit, str.lower() does not
    "SATELLITE İMAGE",             # no stem left after the dotted I
    "Ｌａｎｄｓａｔ fullwidth",       # fullwidth letters are other characters
    "Kelvin sign: \u212a",        # lower-cases to ASCII 'k', in no keyword
    "über Sentinel-2 Szene",       # non-ASCII before a hit
    "衛星画像 satellite IMAGERY 衛星", "航拍 Aerial Photo",
    "aerial satellite imagery",    # overlapping stems: both attributed
    "usgsusgs", "naip", "", "sentinel-", "sentinel 1", "SENTINEL-1", "google  earth",
    "ends with aerial", " view starts here",  # a stem across two captions is no hit
    "space", "-borne photo", "LANDSAT", "landsa", "t",
]


def random_captions(n, seed=0):
    rnd = random.Random(seed)
    alphabet = list("aeilmnoprstvw -İſéK衛\u212a") + [k[:rnd.randint(1, len(k))] for k in RS5M_KEYWORDS]
    captions = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) for _ in range(n)]
    return [c.upper() if rnd.random() < 0.3 else c for c in captions]


@pytest.mark.parametrize("captions", [ADVERSARIAL, random_captions(3000)], ids=["adversarial", "random"])
def test_fast_path_equals_the_papers_semantics(captions):
    captions = captions + [None] + captions[::-1]
    for array in (pa.array(captions, pa.string()), pa.array(captions, pa.large_string()),
                  pa.chunked_array([captions[:7], captions[7:]], pa.string())):
        assert matched_keywords(array, RS5M_KEYWORDS).to_pylist() == reference(captions)
        assert caption_hits(array, RS5M_KEYWORDS).to_pylist() == [r is not None for r in reference(captions)]
    sliced = pa.array(captions, pa.string()).slice(5, 20)
    assert matched_keywords(sliced, RS5M_KEYWORDS).to_pylist() == reference(captions[5:25])


def test_documented_unicode_semantics():
    assert hits(["ſatellite image", "AERİAL VIEW", "aerial view"]) == [False, False, True]
    # A custom non-ASCII keyword: ASCII letters in either case, the others as lower-cased by str.lower().
    captions = pa.array(["TÉLÉDÉTECTION", "Télédétection spatiale"])
    assert caption_hits(captions, ["Télédétection"]).to_pylist() == [False, True]


def test_null_slot_bytes_are_not_scanned():
    data = pa.py_buffer(b"landsataerial view")
    offsets = pa.py_buffer(np.array([0, 7, 18], np.int32).tobytes())
    validity = pa.py_buffer(np.packbits([0, 1], bitorder="little").tobytes())
    array = pa.Array.from_buffers(pa.string(), 2, [validity, offsets, data])
    assert matched_keywords(array, RS5M_KEYWORDS).to_pylist() == [None, "aerial view"]


def test_non_string_captions_are_a_clear_error():
    with pytest.raises(TypeError, match="strings"):
        caption_hits(pa.array([1, 2]), RS5M_KEYWORDS)
    with pytest.raises(ValueError, match="non-empty"):
        caption_hits(pa.array(["x"]), ["aerial", ""])


def test_stage_survives_pickling_for_ray():
    batch = pa.table({"sample_id": ["a"], "source": ["cc3m"], "caption": ["Landsat 8"]})
    stage = pickle.loads(pickle.dumps(KeywordFilter()))
    assert stage(batch)["keywords"].to_pylist() == ["landsat"]


def test_stage_marks_misses_and_records_which_keywords():
    batch = pa.table({"sample_id": ["a", "b", "c"], "source": ["cc3m"] * 3,
                      "caption": ["aerial view of a satellite image", "a cat", "Landsat"]})
    out = KeywordFilter()(batch)
    assert out["drop_reason"].to_pylist() == [None, "keyword_miss", None]
    assert out["keywords"].to_pylist() == ["aerial view|satellite imag", None, "landsat"]


def test_custom_keyword_list():
    batch = pa.table({"sample_id": ["a", "b"], "source": ["x", "x"], "caption": ["drone shot", "aerial view"]})
    assert KeywordFilter(["Drone"])(batch)["drop_reason"].to_pylist() == [None, "keyword_miss"]


def test_real_laion_style_alt_text(shared_data):
    table = pq.read_table(shared_data / "web" / "laion_style_10000.parquet")
    found = set(table.filter(caption_hits(table["TEXT"], RS5M_KEYWORDS))["TEXT"].to_pylist())
    assert matched_keywords(table["TEXT"], RS5M_KEYWORDS).to_pylist() == reference(table["TEXT"].to_pylist())
    # Hand-verified rows of this file.
    assert "Aerial image of beach" in found
    assert "aerial picture of Dimond Hill Farm" in found
    assert any(c.startswith("Integrating Satellite Data and Geographical Information System") for c in found)
    assert any(c.startswith("New York City Circa-2015, high angle aerial view") for c in found)
    assert len(found) == 7
    assert all("satellite dish" not in c.lower() for c in found)


def test_real_cc3m_validation(shared_data):
    table = pacsv.read_csv(shared_data / "web" / "cc3m_validation.tsv",
                           read_options=pacsv.ReadOptions(column_names=["caption", "url"]),
                           parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))
    captions = table["caption"].to_pylist()
    mask = caption_hits(table["caption"], RS5M_KEYWORDS).to_pylist()
    found = {c for c, m in zip(captions, mask) if m}
    assert matched_keywords(table["caption"], RS5M_KEYWORDS).to_pylist() == reference(captions)
    assert "aerial view of a highway amid fields with cars on it" in found
    assert "packing a punch : satellite map shows the massive winter storm making its way up the coast" in found
    assert "aerial photograph of suburbs abutting the desert ." in found
    assert "satellite image of us state covered by the state flag" in found
    assert sum(mask) == 51
    misses = [c for c, m in zip(captions, mask) if not m and "satellite" in c]
    assert misses, "captions that mention a satellite without an RS stem exist and are not hits"
