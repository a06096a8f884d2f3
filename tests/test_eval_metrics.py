"""Evaluation metrics against answers computed by hand: R@K (ties, several captions per image),
zero-shot accuracy, SeLo's Rsu / Ras / Rda / Rmi on synthetic maps and polygons, and the protocols."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rs5m_ray.eval import selo
from rs5m_ray.eval.protocols import (CLIP_RESISC45, RS5M_RETRIEVAL, RS5M_ZERO_SHOT, RetrievalProtocol,
                                     ZeroShotProtocol, get_protocol, register, rs5m_class_name,
                                     split_camel_class_name)
from rs5m_ray.eval.retrieval import best_positive_ranks, retrieval
from rs5m_ray.eval.zero_shot import classification_metrics
from rs5m_ray.models.prompts import RS5M_ZERO_SHOT_TEMPLATES


# ---------------------------------------------------------------- retrieval

def unit(*rows):
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_recall_with_several_captions_per_image_by_hand():
    # 3 images on the axes; 5 captions: image 0 owns captions 0, 1; image 1 owns 2, 3; image 2 owns 4.
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([0.1, 1, 0],   # caption 0 (image 0) looks like image 1
                 [1, 0.2, 0],   # caption 1 (image 0) is right
                 [1, 0.5, 0],   # caption 2 (image 1) looks like image 0
                 [1, 0.9, 0],   # caption 3 (image 1) looks like image 0, barely
                 [0, 1, 0.5])   # caption 4 (image 2) looks like image 1
    caption_image = np.array([0, 0, 1, 1, 2])
    out = retrieval(images, texts, caption_image, RS5M_RETRIEVAL)
    # image->text rankings (by cosine with each caption):
    #   image 0: captions 1 (.98), 2 (.89), 3 (.74), 0 (.10), 4 (0)  -> own caption 1 at rank 1
    #   image 1: captions 0 (.995), 4 (.89), 3 (.67), 2 (.45), 1 (.20) -> own caption 3 at rank 3
    #   image 2: caption 4 (.447) first                                -> rank 1
    assert out["image_to_text"] == {"R@1": pytest.approx(200 / 3), "R@5": 100.0, "R@10": 100.0}
    # text->image: caption 0 -> image 1 first, image 0 second (rank 2); 1 -> rank 1; 2 -> image 0 first
    # (rank 2); 3 -> image 0 (.74) before image 1 (.67) (rank 2); 4 -> image 1 (.89) before 2 (.45) (rank 2)
    assert out["text_to_image"] == {"R@1": 20.0, "R@5": 100.0, "R@10": 100.0}
    assert out["mR"] == pytest.approx((200 / 3 + 100 + 100 + 20 + 100 + 100) / 6)
    assert out["mR_image_to_text"] == pytest.approx((200 / 3 + 200) / 3)
    assert out["mR_text_to_image"] == pytest.approx(220 / 3)
    assert out["images"] == 3 and out["captions"] == 5


def test_ties_are_ranked_by_the_protocols_rule_and_counted():
    # one query, 4 gallery items; the positive (item 2) ties with two negatives at 0.5, one negative above
    scores = np.array([[0.9, 0.5, 0.5, 0.5]])
    positive = np.array([[False, False, True, False]])
    pessimistic, optimistic = best_positive_ranks(scores, positive)
    assert pessimistic.tolist() == [4] and optimistic.tolist() == [2]
    # two positives: the better one counts; ties among positives do not push it down
    scores = np.array([[0.3, 0.7, 0.7, 0.1]])
    positive = np.array([[False, True, True, False]])
    assert [r.tolist() for r in best_positive_ranks(scores, positive)] == [[1], [1]]
    # through the metric: identical captions of two images tie exactly
    images = unit([1, 0], [1, 0])  # a duplicated image
    texts = unit([1, 0], [1, 0])
    pess = retrieval(images, texts, np.array([0, 1]), RS5M_RETRIEVAL)
    opt = retrieval(images, texts, np.array([0, 1]), RetrievalProtocol("optimistic-ties", 1, ties="optimistic"))
    assert pess["image_to_text"]["R@1"] == 0.0 and opt["image_to_text"]["R@1"] == 100.0
    assert pess["queries_decided_by_ties"]["image_to_text"]["R@1"] == 2
    assert pess["image_to_text"]["R@5"] == 100.0


# ---------------------------------------------------------------- zero-shot

def test_classification_metrics_by_hand():
    logits = np.array([[3.0, 1, 0], [0, 2, 1], [1, 0, 2], [2, 1, 3], [0, 1, 0.5]])
    labels = np.array([0, 1, 2, 0, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"], top_k=(1, 2))
    # predictions 0, 1, 2, 2, 1: right for images 0, 1, 2
    assert m["top1"] == pytest.approx(60.0)
    # top-2: image 3 (label 0, 2nd best) found; image 4 (label 2, 2nd best) found
    assert m["top2"] == 100.0
    assert m["confusion"] == [[1, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert m["per_class_top1"] == {"a": 50.0, "b": 100.0, "c": 50.0}
    assert m["chance"] == pytest.approx(100 / 3)


def test_rs5m_templates_and_class_names():
    t = RS5M_ZERO_SHOT_TEMPLATES
    assert len(t) == len(set(t)) == 105
    assert t[0] == "a remote sensing image of many {}."
    assert t[5] == "a low resolution remote sensing image of the {}."
    assert t[34] == "a remote sensing image of a cool {}."
    assert t[35] == "an aerial image of many {}."
    assert t[104] == "a satellite image of a cool {}."
    assert RS5M_ZERO_SHOT.prompts("pond")[1] == "a remote sensing image of a pond."
    assert rs5m_class_name("BaseballField") == "baseballfield"
    assert rs5m_class_name("Sea_Lake") == "sea lake" and rs5m_class_name("a/b") == "a b"
    assert split_camel_class_name("BaseballField") == "baseball field"
    assert RS5M_ZERO_SHOT.class_name("SeaLake", {"SeaLake": "lake or sea"}) == "lake or sea"


def test_protocols_are_named_versioned_and_never_redefined():
    assert get_protocol(None, "zero_shot") is RS5M_ZERO_SHOT and RS5M_ZERO_SHOT.id == "rs5m-v1"
    assert get_protocol("clip-resisc45", "zero_shot") is CLIP_RESISC45
    assert CLIP_RESISC45.averaging == "normalized" and len(CLIP_RESISC45.templates) == 18
    with pytest.raises(ValueError, match="is for zero_shot"):
        get_protocol("rs5m-v1", "retrieval")
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope", "zero_shot")
    with pytest.raises(ValueError, match="new version"):
        register(ZeroShotProtocol("rs5m", 1, ("a {}.",)))
    with pytest.raises(ValueError, match=r"exactly one"):
        ZeroShotProtocol("bad", 1, ("no placeholder",))
    mine = register(ZeroShotProtocol("rs5m", 2, ("an aerial image of {}.",)))
    assert get_protocol("rs5m", "zero_shot") is mine  # the latest version by name


# ---------------------------------------------------------------- SeLo

SQUARE_A = [(50, 50), (150, 50), (150, 150), (50, 150)]  # centre (100, 100), r = int(1.5 * 70.71) = 106
SQUARE_B = [(350, 50), (450, 50), (450, 150), (350, 150)]  # centre (400, 100), r = 106


def test_windows_on_both_grids_clamped_and_counted_once():
    # 8x8 image, size 4: grid 0 -> rows (0,4), (4,8); grid 2 -> (2,6), (6,10) moved back to (4,8)
    wins = selo.windows(8, 8, (4,))
    assert len(wins) == 2 * 2 + 2 * 2 - 1  # (4,8)x(4,8) appears on both grids, once
    assert (2, 6, 2, 6) in wins and (0, 4, 4, 8) in wins
    assert (0, 4, 2, 6) not in wins  # both axes on the same grid, never one of each
    # a pixel's heat is the mean of its windows: window (0,4,0,4) scores 1, all others 0
    scores = np.array([1.0 if w == (0, 4, 0, 4) else 0.0 for w in wins])
    heat = selo.heat_map(8, 8, wins, scores)
    assert heat[0, 0] == 1.0  # covered by that window alone
    assert heat[3, 3] == pytest.approx(1 / 2)  # windows (0,4,0,4) and (2,6,2,6)
    assert heat[5, 5] == 0.0
    assert len(selo.windows(1000, 600, (256, 512, 768))) > 0


def test_probability_map_is_min_max_truncated_and_flat_maps_are_zero():
    heat = np.array([[0.2, 0.4], [0.6, 1.0]])
    assert selo.probability_map(heat, 1).tolist() == [[0, 63], [127, 255]]  # 255 * 0.25 = 63.75 -> 63
    assert selo.probability_map(np.full((4, 4), 0.3), 3).sum() == 0


def test_rsu_by_hand():
    prob = np.full((10, 10), 0.1)
    prob[0:2, 0:2] = 0.5
    mask = selo.region_mask(prob.shape, [[(0, 0), (1, 0), (1, 1), (0, 1)]])  # fills 2 x 2 pixels
    assert mask.sum() == 4
    # inside = 4 * 0.5 = 2; outside = 96 * 0.1 = 9.6; left = 2 / 9.6; right = 96 / 4 = 24
    assert selo.rsu(prob, mask) == pytest.approx(1 - math.exp(-0.707 * (2 / 9.6) * 24))


def test_ras_and_rda_with_several_regions_by_hand():
    assert selo.centre_and_radius(SQUARE_A) == (100, 100, 106)
    # one centre 10 px from A's centre, none near B: x = (10/106 + 1) / 2
    x = (10 / 106 + 1) / 2
    assert selo.ras([SQUARE_A, SQUARE_B], [(110, 100)]) == pytest.approx((math.exp(3 * x) - 1) / (math.exp(3) - 1))
    # two centres in A (mean distance to their centroid 10 px), one in B
    centres = [(90, 100), (110, 100), (400, 120)]
    rda_a = 0.5 * (1 - 10 / 106) + math.exp(-0.5 * (2 + 2))
    assert selo.rda([SQUARE_A, SQUARE_B], centres) == pytest.approx((rda_a + 1.0) / 2)
    # A's offset: mean distance of its two centres = 10; B's: 20
    x = (10 / 106 + 20 / 106) / 2
    assert selo.ras([SQUARE_A, SQUARE_B], centres) == pytest.approx((math.exp(3 * x) - 1) / (math.exp(3) - 1))


def test_a_peak_outside_every_region_scores_the_worst_ras_and_rda():
    centres = [(300, 300)]
    assert selo.ras([SQUARE_A, SQUARE_B], centres) == pytest.approx(1.0)
    assert selo.rda([SQUARE_A, SQUARE_B], centres) == 0.0
    assert selo.rmi(0.6, 1.0, 0.0) == pytest.approx(0.4 * 0.6)


def test_no_attention_peak_scores_zero():
    prob = np.zeros((300, 500))
    m = selo.slm_metrics(prob, [SQUARE_A, SQUARE_B])
    assert m == {"Rsu": 0.0, "Ras": 1.0, "Rda": 0.0, "Rmi": 0.0, "attention_centres": 0}


def test_attention_centres_find_a_peak_and_end_to_end_metrics():
    # a bright disc on A's centre: one attention centre near (100, 100) (the 50-px box filter's even
    # kernel shifts it by half a pixel per pass), Rda = 1, Ras small, Rsu high
    yy, xx = np.mgrid[0:300, 0:500]
    prob = np.where((xx - 100) ** 2 + (yy - 100) ** 2 <= 40 ** 2, 1.0, 0.05)
    centres = selo.attention_centres(prob)
    assert len(centres) == 1
    assert abs(centres[0][0] - 100) <= 3 and abs(centres[0][1] - 100) <= 3
    m = selo.slm_metrics(prob, [SQUARE_A])
    assert m["Rda"] == 1.0 and m["Ras"] < 0.01 and m["Rsu"] > 0.99
    assert m["Rmi"] == pytest.approx(0.4 * m["Rsu"] + 0.35 * (1 - m["Ras"]) + 0.25)
