"""RS detector: balanced 7:1:2 splits, ROC-AUC, versioned checkpoints, training (synthetic and real data)."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from rs5m_ray.config import ScoringConfig
from rs5m_ray.eval.detector import roc_auc
from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, latest_version, load_detector, save_detector
from rs5m_ray.storage import Storage, join
from rs5m_ray.train import detector as train


def test_balanced_splits_subsample_and_split_each_class_7_1_2():
    splits = train.balanced_splits([b"p%d" % i for i in range(300)], [b"n%d" % i for i in range(100)], seed=1)
    for name, size in (("train", 70), ("val", 10), ("test", 20)):
        labels = [e.label for e in splits[name]]
        assert labels.count(1) == labels.count(0) == size
    everything = [e.data for part in splits.values() for e in part]
    assert len(everything) == len(set(everything)) == 200
    with pytest.raises(ValueError, match="at least 10"):
        train.balanced_splits([b"x"] * 50, [b"y"] * 5, seed=1)


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0


def _head_meta() -> DetectorMeta:
    return DetectorMeta("clip_head", {"embed_dim": 8, "hidden": 4},
                        embedder={"clip_model": "rs5m-tiny-vit", "clip_pretrained": None}, metrics={"test": {}})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoints_are_versioned_and_newest_complete_one_loads(where, tmp_path, request):
    root, storage = (str(tmp_path / "det"), Storage()) if where == "local" else request.getfixturevalue("s3_bucket")
    root = join(root, "detector")
    first, second = build_module(_head_meta()), build_module(_head_meta())
    assert save_detector(first, _head_meta(), root, storage).endswith("v0001")
    assert save_detector(second, _head_meta(), root, storage).endswith("v0002")
    storage.write_atomic(join(root, "v0003", "detector.safetensors"), b"half-written")  # no metadata: incomplete
    assert latest_version(root, storage) == 2
    x = torch.randn(5, 8)
    loaded = load_detector(root, storage)
    assert loaded.meta.version == 2 and loaded.meta.created
    torch.testing.assert_close(loaded.probs(x), torch.sigmoid(second.eval()(x)).squeeze(-1).detach())
    assert load_detector(join(root, "v0001"), storage).meta.version == 1
    with pytest.raises(FileNotFoundError):
        load_detector(join(root, "nothing-here"), storage)


def test_head_refuses_other_embeddings():
    det = load_detector_from_meta(_head_meta())
    det.check_embedder("rs5m-tiny-vit", None, 8)
    with pytest.raises(ValueError, match="trained on"):
        det.check_embedder("ViT-B-32", "openai", 512)


def load_detector_from_meta(meta):
    from rs5m_ray.stages.rs_detector import RSDetector

    return RSDetector(build_module(meta), meta)


def synthetic(n: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    return ([jpeg(aerial_image(rng, (96, 96))) for _ in range(n)],
            [jpeg(photo_image(rng, (96, 96))) for _ in range(n)])


def test_clip_head_trains_and_reports_held_out_metrics():
    pos, neg = synthetic(30)
    module, meta = train.train_detector(pos, neg, "clip-head",
                                        ScoringConfig(), hidden=16, epochs=100)
    assert meta.kind == "clip_head" and meta.embedder["clip_model"] == "rs5m-tiny-vit"
    assert meta.training["sizes"] == {"train": 42, "val": 6, "test": 12}
    test = meta.metrics["test"]
    assert test["n"] == 12 and 0.0 <= test["accuracy"] <= 1.0 and 0.0 <= test["roc_auc"] <= 1.0


@pytest.fixture
def one_torch_thread():
    """On a shared, busy CPU, spinning intra-op threads slow training many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_real_data_backbone_from_scratch(shared_data, tmp_path, one_torch_thread):
    """`rs5m train-detector` on AID (RS) vs ImageNet (non-RS): a tiny ConvNeXt trained from scratch, CPU."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--positives", str(shared_data / "aid-dev"), "--negatives",
                              str(shared_data / "imagenet-dev"), "--out", str(tmp_path / "det"),
                              "--backbone", "test_convnext", "--epochs", "30"])
    summary = train.run(args)
    assert summary["training"]["positives_available"] == 300 and summary["training"]["negatives_available"] == 100
    assert summary["training"]["sizes"] == {"train": 140, "val": 20, "test": 40}
    # A classifier that learned nothing sits at 0.5 on this balanced test split.
    assert summary["metrics"]["test"]["roc_auc"] > 0.7
    det = load_detector(str(tmp_path / "det"))
    assert det.kind == "backbone" and det.meta.metrics == summary["metrics"]


def test_demo_detector_is_trained_once_unless_configured(tmp_path):
    storage = Storage()
    cfg = train.ensure_detector(ScoringConfig(), str(tmp_path), storage, per_class=20)
    root = str(tmp_path / "models" / "rs_detector")
    assert cfg.detector_checkpoint == root and latest_version(root, storage) == 1
    assert load_detector(root).meta.training["data"].startswith("generated")
    train.ensure_detector(ScoringConfig(), str(tmp_path), storage, per_class=20)
    assert latest_version(root, storage) == 1
    configured = ScoringConfig(detector_checkpoint="s3://models/det")
    assert train.ensure_detector(configured, str(tmp_path), storage) is configured
