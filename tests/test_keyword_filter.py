import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from rs5m_ray.stages.keyword_filter import (GROUP1_RS_NOUNS, GROUP2_APPLICATIONS, RS5M_KEYWORDS, KeywordFilter,
                                            caption_hits)


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
    assert "aerial view of a highway amid fields with cars on it" in found
    assert "packing a punch : satellite map shows the massive winter storm making its way up the coast" in found
    assert "aerial photograph of suburbs abutting the desert ." in found
    assert "satellite image of us state covered by the state flag" in found
    assert sum(mask) == 51
    misses = [c for c, m in zip(captions, mask) if not m and "satellite" in c]
    assert misses, "captions that mention a satellite without an RS stem exist and are not hits"
