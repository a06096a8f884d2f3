"""The CLIP image pass: columns, scores that match their definition, decode drops, the actor-pool stage."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from rs5m_ray.config import ScoringConfig, load_config
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.models.clip import ClipModel
from rs5m_ray.models.prompts import RS_PROMPTS
from rs5m_ray.pipelines import pub11
from rs5m_ray.pipelines.harness import Staging
from rs5m_ray.pipelines.parts import stage_fetched
from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.stages.clip_score import ClipScore, prompt_embedding
from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, save_detector
from rs5m_ray.storage import Storage
from tests.conftest import untrained_detector


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory) -> str:
    """An untrained head (the stage's maths does not need a good one)."""
    return untrained_detector(str(tmp_path_factory.mktemp("det")))


@pytest.fixture(scope="module")
def stage(head_checkpoint) -> ClipScore:
    return ClipScore(ScoringConfig(detector_checkpoint=head_checkpoint, forward_batch_size=3))


def images(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [jpeg((aerial_image if i % 2 else photo_image)(rng, (rng.choice([80, 300]), 120))) for i in range(n)]


def batch(data: list) -> pa.Table:
    n = len(data)
    return pa.table({"sample_id": [f"laion2b_p_{i}" for i in range(n)], "source": ["laion2b"] * n,
                     "caption": ["aerial view"] * n, "jpg": pa.array(data, pa.binary())})


def test_adds_embedding_and_scores_that_match_their_definition(stage):
    out = stage(batch(images(7)))
    assert len(out) == 7 and out["drop_reason"].null_count == 7
    emb = np.array(out["image_embedding"].to_pylist(), np.float32)
    assert emb.shape == (7, 64) and out.schema.field("image_embedding").type == pa.list_(pa.float32())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["clip_score"].to_numpy(), emb @ stage.prompt.numpy(), atol=1e-5)
    probs = stage.detector.probs(torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(out["rs_prob"].to_numpy(), probs, atol=1e-5)


def test_chunked_forward_gives_the_same_scores_as_one_forward(head_checkpoint):
    data = batch(images(8, seed=3))
    scores = []
    for step in (3, 64):
        torch.manual_seed(1)  # the same random CLIP weights for both
        scores.append(ClipScore(ScoringConfig(detector_checkpoint=head_checkpoint, forward_batch_size=step))(data))
    np.testing.assert_allclose(scores[0]["clip_score"].to_numpy(), scores[1]["clip_score"].to_numpy(), atol=1e-5)


def test_fast_preprocessing_matches_the_open_clip_pil_transform(head_checkpoint, monkeypatch):
    """Sensitivity check of the fast path (reduced-scale decode, torch resize) against open_clip's
    own PIL transform on fully decoded images, through the same random tiny model: embeddings
    keep cosine >= 0.999. Large images make the reduced-scale decode kick in."""
    rng = random.Random(5)
    data = [jpeg((aerial_image if i % 2 else photo_image)(rng, size), quality=90)
            for i, size in enumerate([(80, 120), (300, 120), (640, 480), (480, 800), (1024, 768), (333, 517)])]
    embeddings = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(ClipModel, "eval_transform", property(lambda self: None))
            torch.manual_seed(1)  # the same random CLIP weights for both
            stage = ClipScore(ScoringConfig(detector_checkpoint=head_checkpoint, decode_draft=fast))
            assert (stage.clip.eval_transform is not None) == fast
            out = stage(batch(data))
        assert out["drop_reason"].null_count == len(data)
        embeddings.append(np.array(out["image_embedding"].to_pylist(), np.float32))
    cosine = (embeddings[0] * embeddings[1]).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_only_the_standard_eval_transform_takes_the_fast_path(stage):
    assert stage.clip.eval_transform == (64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    visual = stage.clip.model.visual
    standard = dict(visual.preprocess_cfg)
    try:
        for change in ({"resize_mode": "squash"}, {"interpolation": "bilinear"}, {"size": (64, 48)}):
            visual.preprocess_cfg = {**standard, **change}
            assert stage.clip.eval_transform is None, change
    finally:
        visual.preprocess_cfg = standard


def test_undecodable_images_get_a_drop_reason_not_a_crash(stage):
    good = images(2)
    out = stage(batch([good[0], b"\xff\xd8\xff not really a jpeg", None, good[0][: len(good[0]) // 3], good[1]]))
    reasons = out["drop_reason"].to_pylist()
    assert reasons[0] is None and reasons[4] is None
    assert reasons[1] == reasons[2] == "decode_error"
    assert out["drop_detail"][2].as_py() == "no image bytes"
    assert out["clip_score"][1].as_py() is None and out["image_embedding"][1].as_py() is None
    # A truncated JPEG either decodes (PIL pads it) or is dropped; either way it is accounted for.
    assert reasons[3] in (None, "decode_error")


def test_prompt_normalisation_switch(stage):
    raw = stage.clip.encode_texts(list(RS_PROMPTS), normalize=False)
    unit = raw / raw.norm(dim=1, keepdim=True)
    for normalize_each, feats in ((True, unit), (False, raw)):
        expected = feats.mean(0) / feats.mean(0).norm()
        torch.testing.assert_close(prompt_embedding(stage.clip, RS_PROMPTS, normalize_each), expected)
    assert not torch.allclose(prompt_embedding(stage.clip, RS_PROMPTS, True),
                              prompt_embedding(stage.clip, RS_PROMPTS, False))


def test_backbone_detector_reads_pixels(tmp_path):
    meta = DetectorMeta("backbone", {"name": "test_convnext", "image_size": 48})
    path = save_detector(build_module(meta), meta, str(tmp_path / "det"), Storage())
    out = ClipScore(ScoringConfig(detector_checkpoint=path))(batch(images(3)))
    probs = out["rs_prob"].to_numpy()
    assert np.all((probs > 0) & (probs < 1)) and out["drop_reason"].null_count == 3


def test_configuration_errors_are_clear(head_checkpoint):
    with pytest.raises(ValueError, match="detector_checkpoint"):
        ClipScore(ScoringConfig())
    with pytest.raises(ValueError, match="trained on"):
        ClipScore(ScoringConfig(clip_model="rs5m-tiny-convnext", detector_checkpoint=head_checkpoint))


def test_clip_pass_over_staged_parts_accounts_for_every_row(sort_shuffle, head_checkpoint, tmp_path):
    """The pipeline's CLIP pass (`pub11.parts_phase`: ScorePart actors over staged image parts)."""
    data = images(10) + [b"broken", b"\xff\xd8 truncated"]
    table = batch(data)
    parts = {"part-00000": table.slice(0, 5), "part-00001": table.slice(5, 4), "part-00002": table.slice(9)}
    out_dir, storage = str(tmp_path / "run"), Storage()
    cfg = load_config(overrides={"output": out_dir, "scoring": {"detector_checkpoint": head_checkpoint}})
    stage_fetched(out_dir, storage, cfg.shards, parts)
    pub11.parts_phase(cfg, storage, sorted(parts))

    scored = read_parquet_dir(storage, f"{out_dir}/staging/scores")
    assert len(scored) == 10 and {"image_embedding", "clip_score", "rs_prob"} <= set(scored.column_names)
    assert not {"jpg", "drop_reason"} & set(scored.column_names)
    ledger = read_parquet_dir(storage, f"{out_dir}/ledger/clip_score")
    assert sorted(ledger["sample_id"].to_pylist()) == ["laion2b_p_10", "laion2b_p_11"]
    assert ledger["drop_reason"].to_pylist() == ["decode_error", "decode_error"]
    stats = read_parquet_dir(storage, f"{out_dir}/stats/clip_score")
    assert sum(stats["rows_in"].to_pylist()) == 12 and sum(stats["rows_out"].to_pylist()) == 10
    markers = sorted(Staging(out_dir, storage).markers("scores"), key=lambda m: m["part"])
    assert [m["rows"] for m in markers] == [5, 4, 1]