"""`rs5m eval` end to end on tiny random models and generated or real images: agreement with
CLIP_benchmark, the dataset formats, the Ray embedding pass, the contamination check, SeLo, the
detector, and the CLI's outputs. (Numbers of a random model mean nothing; these check the machinery.)"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rs5m_ray import cli
from rs5m_ray.config import ScoringConfig
from rs5m_ray.eval import contamination, datasets
from rs5m_ray.eval.api import clip_of, evaluate
from rs5m_ray.eval.embed import LocalEmbedder, RayEmbedder
from rs5m_ray.eval.protocols import CLIP_RESISC45
from rs5m_ray.models.clip import load_clip
from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.storage import Storage

CLASSES = ("BareLand", "DenseResidential", "Sea_Lake", "river")


@pytest.fixture(scope="module")
def clip():
    return load_clip(ScoringConfig(clip_model="rs5m-tiny-vit"))


def image_folder(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{c}_{i}.jpg").write_bytes(jpeg(aerial_image(rng, (96 + 8 * i, 80))))
    return root


# ---------------------------------------------------------------- agreement with CLIP_benchmark

def clip_benchmark_results(clip, paths, labels, class_names, templates, captions, caption_image):
    """CLIP_benchmark's own metric code on the same model and the same model inputs."""
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    size, mean, std = clip.eval_transform
    pixels, errors = clip.decode_images([Path(p).read_bytes() for p in paths])
    assert not any(errors)
    from rs5m_ray.shards.reader import normalize

    images = normalize(pixels, "cpu", mean, std)
    batches = [(images[i:i + 7], torch.as_tensor(labels[i:i + 7])) for i in range(0, len(images), 7)]
    # Its `evaluate` cannot run under numpy 2 (`accuracy` converts a 1-element array with float()):
    # its classifier and logits, then top-K read off them here.
    classifier = zsc.zero_shot_classifier(clip.model, clip.tokenizer, class_names,
                                          [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
    logits, target = zsc.run_classification(clip.model, classifier, batches, "cpu", amp=False)
    order = np.argsort(-logits.numpy(), axis=1, kind="stable")
    zero_shot = {f"acc{k}": float((order[:, :k] == target.numpy()[:, None]).any(axis=1).mean()) for k in (1, 5)}
    owned = [[c for c, i in zip(captions, caption_image) if i == k] for k in range(len(paths))]
    batches = [(images[i:i + 7], owned[i:i + 7]) for i in range(0, len(images), 7)]
    recalls = zsr.evaluate(clip.model, batches, clip.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    return zero_shot, recalls


def assert_agreement(clip, folder: datasets.ClassificationSet, captions_set: datasets.RetrievalSet):
    zs = evaluate(clip, folder, CLIP_RESISC45)["metrics"]
    rt = evaluate(clip, captions_set)["metrics"]
    names = [CLIP_RESISC45.class_name(f) for f in folder.folders]
    ref_zs, ref_rt = clip_benchmark_results(clip, folder.paths, folder.labels, names, CLIP_RESISC45.templates,
                                            captions_set.captions, captions_set.caption_image)
    assert round(zs["top1"], 2) == round(100 * ref_zs["acc1"], 2)
    if len(names) >= 5:
        assert round(zs["top5"], 2) == round(100 * ref_zs["acc5"], 2)
    for k in (1, 5, 10):
        assert round(rt["image_to_text"][f"R@{k}"], 2) == round(100 * ref_rt[f"text_retrieval_recall@{k}"], 2)
        assert round(rt["text_to_image"][f"R@{k}"], 2) == round(100 * ref_rt[f"image_retrieval_recall@{k}"], 2)
    return zs, rt


def test_zero_shot_and_retrieval_equal_clip_benchmark(clip, tmp_path):
    folder = datasets.read_image_folder(str(image_folder(tmp_path / "set", per_class=6)))
    assert folder.folders == sorted(CLASSES) and len(folder.paths) == 24
    captions = [f"caption {j} of {Path(p).stem}" for p in folder.paths for j in range(3)]
    ret = datasets.grouped("gen", [p for p in folder.paths for _ in range(3)], captions, "")
    zs, rt = assert_agreement(clip, folder, ret)
    assert np.array(zs["confusion"]).sum() == 24 and rt["captions"] == 72


def test_real_aid_agrees_with_clip_benchmark(clip, shared_data):
    aid = datasets.read_image_folder(str(shared_data / "aid-dev"))
    assert len(aid.folders) == 30 and len(aid.paths) == 300
    aid = aid.subset(np.arange(300) % 10 < 3)  # 3 per class: the CPU budget of the suite
    ret = datasets.class_matched_retrieval_set(aid, str(shared_data / "captions" / "rsicd"), "train", seed=1)
    assert len(ret.paths) == 90 and len(ret.captions) == 450
    assert_agreement(clip, aid, ret)


# ---------------------------------------------------------------- formats

def test_retrieval_csv_gb18030_and_precomp_group_captions(tmp_path):
    rows = "filename,title\na.jpg,一架飞机 a plane\nb.jpg,two ships\na.jpg,a runway\n"
    (tmp_path / "rsicd_test.csv").write_bytes(rows.encode("gb18030"))
    s = datasets.read_retrieval_csv(str(tmp_path / "rsicd_test.csv"), str(tmp_path / "imgs"))
    assert [Path(p).name for p in s.paths] == ["a.jpg", "b.jpg"]
    assert s.captions[0] == "一架飞机 a plane" and s.caption_image.tolist() == [0, 1, 0]
    (tmp_path / "plain.csv").write_text("filename,caption\na.jpg,x\n")
    with pytest.raises(ValueError, match="title"):
        datasets.read_retrieval_csv(str(tmp_path / "plain.csv"), "")
    (tmp_path / "test_filename.txt").write_text("1.tif\n2.tif\n")
    (tmp_path / "test_caps.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    p = datasets.read_precomp(str(tmp_path), str(tmp_path / "imgs"))
    assert p.caption_image.tolist() == [0] * 5 + [1] * 5 and p.captions[5] == "c5"
    sub = p.subset(np.array([False, True]))
    assert sub.captions == [f"c{i}" for i in range(5, 10)] and sub.caption_image.tolist() == [0] * 5
    (tmp_path / "test_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="divide evenly"):
        datasets.read_precomp(str(tmp_path), "")


# ---------------------------------------------------------------- the Ray embedding pass

def test_ray_embedding_pass_equals_the_local_one_and_reports_bad_images(ray_cluster, clip, tmp_path):
    root = image_folder(tmp_path / "set", per_class=3)
    (root / "river" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = datasets.read_image_folder(str(root)).paths + [str(root / "missing.jpg")]
    local = LocalEmbedder(clip).embed_images(paths)
    cfg = ScoringConfig(clip_model="rs5m-tiny-vit", batch_size=4, forward_batch_size=3)
    remote = RayEmbedder(cfg, clip=clip).embed_images(paths)
    assert remote.ok.tolist() == local.ok.tolist() and local.ok.sum() == 12, remote.errors[:2]
    assert "missing.jpg" in paths[-1] and remote.errors[-1].startswith("read:")
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=1e-5)
    assert np.allclose(np.linalg.norm(local.vectors[local.ok], axis=1), 1, atol=1e-4)


def test_training_loop_model_evaluates_in_memory(clip, tmp_path):
    folder = datasets.read_image_folder(str(image_folder(tmp_path / "set", per_class=2)))
    clip.model.train()
    wrapped = clip_of(clip.model, clip.tokenizer, name="epoch-1")
    r = evaluate(wrapped, folder)
    assert clip.model.training  # the loop's mode is restored
    assert r["protocol"]["id"] == "rs5m-v1" and r["model"] == "epoch-1" and r["metrics"]["images"] == 8


# ---------------------------------------------------------------- contamination

def plant_shards(out: Path, copies: list[bytes], others: list[bytes]) -> str:
    members = []
    for i, data in enumerate(copies + others):
        members += sample_members(f"train_{i}", data, "a caption", {})
    name = shard_name("pub11", "train", 0)
    (out / name).write_bytes(tar_bytes(members))
    return str(out / name)


def reencoded_and_resized(data: bytes, i: int) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if i % 2:
        img = img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.BICUBIC)
    return jpeg(img, quality=70)


def test_contamination_finds_planted_copies_and_nothing_in_clean_sets(tmp_path, shared_data):
    files = sorted((shared_data / "aid-dev").glob("*/*.jpg"))
    planted, clean = files[:30:3], files[1:60:3]  # 10 eval images copied into training, 20 never
    copies = [reencoded_and_resized(p.read_bytes(), i) for i, p in enumerate(planted)]
    others = [p.read_bytes() for p in sorted((shared_data / "aid-train").glob("*/*.jpg"))[:60:2]]
    shard = plant_shards(tmp_path, copies, others)
    storage = Storage()
    ref = contamination.shard_reference([shard], storage)
    assert len(ref.ids) == 40
    for paths, expected in (([str(p) for p in planted], 10), ([str(p) for p in clean], 0)):
        hashes, errors = contamination.hash_images(paths, storage)
        found = contamination.check(paths, hashes, ref, radius=4)
        assert found["contaminated"] == expected and not any(errors)
        assert all(m["training_sample"].endswith(f"train_{planted.index(Path(m['image']))}.jpg")
                   for m in found["matches"])


def test_embedding_matches_are_reported_beside_phash_ones():
    ref = contamination.Reference(ids=["s0", "s1"], hashes=[np.array([0, -1], np.int64)],
                                  vectors=[np.eye(3)[:2]], vector_ids=["s0", "s1"])
    eval_vectors = np.array([[0.0, 0.999, 0.0447], [0, 0, 1.0]])
    found = contamination.check(["a", "b"], np.array([0x0F0F, 0x00FF], np.int64), ref, 4, eval_vectors, 0.95)
    assert found["contaminated"] == 1 and found["embedding_only"] == 1
    assert found["matches"][0]["embedding_match"] == "s1" and found["embedding_check"].startswith("on")
    # a model that puts distinct images this close cannot tell copies: its embedding matches do not count
    alike = np.array([[1.0, 0.01, 0], [1.0, 0, 0.01]])
    found = contamination.check(["a", "b"], np.array([0x0F0F, 0x00FF], np.int64), ref, 4,
                                alike / np.linalg.norm(alike, axis=1, keepdims=True), 0.95)
    assert found["contaminated"] == 0 and found["embedding_check"].startswith("uninformative")


# ---------------------------------------------------------------- SeLo, detector, the CLI

def air_slt(root: Path) -> Path:
    rng = random.Random(3)
    (root / "imgs").mkdir(parents=True)
    (root / "annotations").mkdir()
    img = aerial_image(rng, (640, 520))
    img.save(root / "imgs" / "scene.jpg", quality=90)
    anno = [{"jpg_name": "scene.jpg", "caption": "a dense residential area", "points": [[[50, 60], [250, 60],
                                                                                         [250, 240], [50, 240]]]},
            {"jpg_name": "scene.jpg", "caption": "a river", "points": [[[300, 300], [600, 300], [600, 480]],
                                                                       [[20, 400], [120, 400], [120, 500]]]}]
    (root / "annotations" / "anno.json").write_text(json.dumps(anno))
    return root


def test_rs5m_eval_cli_writes_tables_plots_and_checks_contamination(tmp_path, capsys):
    root = image_folder(tmp_path / "zs", per_class=3)
    shard = plant_shards(tmp_path, [reencoded_and_resized((root / "river" / "river_0.jpg").read_bytes(), 1)], [])
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "train_filename.txt").write_text("".join(f"{c.lower()}_1.jpg\n" for c in CLASSES))
    (tmp_path / "caps" / "train_caps.txt").write_text("".join(f"{c} one\n{c} two\n" for c in CLASSES))
    selo_root = air_slt(tmp_path / "AIR-SLT")
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    rng = random.Random(5)
    for folder, make in ((pos, aerial_image), (neg, photo_image)):
        folder.mkdir()
        for i in range(6):
            (folder / f"{i}.jpg").write_bytes(jpeg(make(rng, (96, 80))))
    from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, save_detector

    meta = DetectorMeta("clip_head", {"embed_dim": 64, "hidden": 0},
                        embedder={"clip_model": "rs5m-tiny-vit", "clip_pretrained": None})
    detector = save_detector(build_module(meta), meta, str(tmp_path / "det"), Storage())
    config = {"output": str(tmp_path / "out"), "label": "tiny random CLIP",
              "model": {"clip_model": "rs5m-tiny-vit"},
              "sets": [{"name": "gen-zs", "task": "zero_shot", "path": str(root)},
                       {"name": "gen-ret", "task": "retrieval", "format": "class_matched",
                        "path": str(tmp_path / "caps"), "split": "train", "images": str(root)},
                       {"name": "gen-selo", "task": "selo", "path": str(selo_root)},
                       {"name": "missing", "task": "zero_shot", "path": str(tmp_path / "nowhere")}],
              "contamination": {"train_shards": [shard], "exclude": True, "embeddings": False}}
    import yaml

    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["eval", "--config", str(tmp_path / "eval.yaml"), "--detector", detector,
                     "--positives", str(pos), "--negatives", str(neg)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny random CLIP |" in printed and "rs5m-v1" in printed and "Rmi" in printed
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    by_set = {r["dataset"]: r for r in report["results"]}
    assert report["contamination"]["gen-zs"]["near"] + report["contamination"]["gen-zs"]["exact"] == 1
    assert report["contamination"]["gen-zs"]["excluded"] and by_set["gen-zs"]["metrics"]["images"] == 11
    assert by_set["gen-ret"]["metrics"]["images"] == 11 and by_set["gen-ret"]["metrics"]["captions"] == 22
    selo = by_set["gen-selo"]["metrics"]
    assert selo["queries"] == 2 and 0 <= selo["Rmi"] <= 1
    assert report["detector"]["metrics"]["n"] == 12 and 0 <= report["detector"]["metrics"]["roc_auc"] <= 1
    plots = {Path(p).name for p in report["plots"]}
    assert {"gen-zs-confusion.png", "gen-zs-per-class.png", "gen-selo-selo-0.png"} <= plots
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Evaluation of tiny random CLIP")
    assert "no images in class sub-folders" in report["failed_sets"]["missing"]  # reported; the others ran


def test_contamination_reads_every_run_of_a_persistent_dedup_index(tmp_path):
    import pyarrow as pa

    from rs5m_ray.dedup_index import DedupIndex

    storage = Storage()
    for run, ids, hashes in (("a", ["x0", "x1"], [0x0F0F, 0x1234]), ("b", ["y0"], [-5])):
        DedupIndex(str(tmp_path / "index"), storage, run).commit(
            "pub11-train-0000", pa.table({"sample_id": ids, "source": ["laion2b"] * len(ids),
                                          "phash": pa.array(hashes, pa.int64())}))
    ref = contamination.index_reference(str(tmp_path / "index"), storage)
    assert sorted(ref.ids) == ["x0", "x1", "y0"]
    # 0x0F0F exactly, -5 with one bit flipped (-5 ^ 1 = -6), 0xFFFF0000 far from all
    found = contamination.check(["e0", "e1", "e2"], np.array([0x0F0F, -6, 0xFFFF0000], np.int64), ref, 4)
    assert (found["exact"], found["near"]) == (1, 1)
    assert {m["training_sample"] for m in found["matches"]} == {"x0", "y0"}
