"""RS3 captioning: tiny BLIP-2 candidates, CLIP ranking 20 -> 10 -> 5, rotation-invariance pick."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from rs5m_ray.config import CaptionConfig, CaptionRankConfig
from rs5m_ray.models.captioner import RS5M_LORA, load_captioner, tiny_captioner_dir
from rs5m_ray.models.images import rotated_views, rotation_crop_fraction
from rs5m_ray.stages.caption import CaptionStage, chunk_seed
from rs5m_ray.stages.caption_rank import (ROTATION_INVARIANT, TOP, CaptionRanker, final_picks, least_variance,
                                          rotation_variances, top_indices)
from tests.conftest import shared_data_dir

ANGLES = [30.0 * i for i in range(12)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random BLIP-2 whose byte-level BPE is trained on real RSICD captions when present."""
    data = shared_data_dir()
    corpus = None
    if data is not None and (data / "captions/rsicd/train_caps.txt").is_file():
        corpus = (data / "captions/rsicd/train_caps.txt").read_text().splitlines()[:5000]
    return tiny_captioner_dir(str(tmp_path_factory.mktemp("captioner")), corpus)


@pytest.fixture(scope="session")
def stage(tiny_model) -> CaptionStage:
    cfg = CaptionConfig(model=tiny_model, num_candidates=20, batch_size=3, max_new_tokens=12, device="cpu")
    return CaptionStage(cfg, CaptionRankConfig(), None)


def jpeg(seed: int, size=(90, 70)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def batch(n: int, extra: list[bytes | None] = ()) -> pa.Table:
    data = [jpeg(i) for i in range(n)] + list(extra)
    return pa.table({"sample_id": [f"t_{i}" for i in range(len(data))], "source": ["t"] * len(data),
                     "jpg": pa.array(data, pa.binary())})


# --- ranking and rotation pick on crafted embeddings -------------------------------------------


def test_top_indices_keep_the_first_sampled_on_ties():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.5, 0.2])
    assert top_indices(scores, 3).tolist() == [1, 3, 2]  # 2 and 4 tie for third: 2 was sampled first
    assert top_indices(scores, 10).tolist() == [1, 3, 2, 4, 5, 0]


def unit(*v: float) -> np.ndarray:
    v = np.array(v, np.float32)
    return v / np.linalg.norm(v)


def rotating_views(a: float = 0.6) -> np.ndarray:
    """View embeddings that keep a component on axis 0 and rotate the rest in the (1, 2) plane."""
    b = np.sqrt(1 - a * a)
    return np.stack([unit(a, b * np.cos(np.radians(t)), b * np.sin(np.radians(t)), 0) for t in ANGLES])


def test_rotation_pick_prefers_stable_caption_over_best_at_zero_degrees():
    views = rotating_views()
    unstable = unit(0.6, 0.8, 0, 0)  # the most similar caption at 0 degrees, but it follows the rotation
    stable = unit(0.5, 0, 0, 0.866)
    texts = np.stack([unstable, stable])
    sims = texts @ views.T
    assert sims[0, 0] > sims[1, 0]
    var = rotation_variances(texts, views)
    assert var[1] == pytest.approx(0, abs=1e-12) and var[0] > 0.01
    assert least_variance(var) == 1
    assert least_variance(np.array([0.2, 0.0, 0.0])) == 1  # a tie goes to the better-ranked caption


class FakeClip:
    """Crafted embeddings in place of a CLIP model: images by position, texts by name."""

    image_size = 16

    def __init__(self, images: np.ndarray, views: np.ndarray, texts: dict[str, np.ndarray]):
        self.images, self.views, self.texts = images, views, texts
        self.text_calls: list[list[str]] = []

    def preprocess(self, img):
        return torch.zeros(3, 4, 4)

    def encode_images(self, x):
        return torch.from_numpy(self.images if len(x) == len(self.images) else self.views.reshape(len(x), -1))

    def encode_texts(self, texts):
        self.text_calls.append(list(texts))
        return torch.from_numpy(np.stack([self.texts[t] for t in texts]))


def fake_ranker(a: FakeClip, b: FakeClip, cfg: CaptionRankConfig) -> CaptionRanker:
    ranker = CaptionRanker.__new__(CaptionRanker)
    ranker.cfg, ranker.a, ranker.b = cfg, a, b
    ranker.rotation = a if cfg.rotation_model == "a" else b
    ranker.angles = ANGLES
    return ranker


def test_ranker_20_to_10_to_5_then_rotation_pick_on_crafted_embeddings():
    img = unit(1, 0, 0, 0)
    # Model A: candidate k has cosine 0.05 * k with the image, except a tie at the cut (c10 and c11 at
    # 0.5: c10 sampled first stays) and c19, an exact duplicate of c18 (scored once, same scores).
    a_score = {f"c{k}": 0.05 * k for k in range(19)}
    a_score["c11"] = a_score["c10"] = 0.5
    texts_a = {t: unit(s, np.sqrt(1 - s * s), 0, 0) for t, s in a_score.items()}
    cands = [f"c{k}" for k in range(19)] + ["c18"]
    # A keeps c18, c17, ..., c10 minus c11? -> distinct scores: c18 .9, c17 .85, ... c12 .6, c10 .5, c11 .5
    expect_a = ["c18", "c17", "c16", "c15", "c14", "c13", "c12", "c10", "c11", "c9"]
    # Model B re-ranks those: crafted so c9 (A's last) is best at 0 degrees but rotates, c12/c13 are stable.
    views = rotating_views()
    texts_b = {t: unit(0.1, 0, 0, 1) for t in expect_a}
    texts_b["c9"] = unit(0.6, 0.8, 0, 0)  # B score 0.6: top_caption; unstable
    texts_b["c13"] = unit(0.55, 0, 0, np.sqrt(1 - 0.55**2))  # 0.55, variance 0
    texts_b["c12"] = unit(0.5, 0, 0, np.sqrt(1 - 0.25))  # 0.5, variance 0: tie with c13, ranked lower
    texts_b["c18"] = unit(0.45, 0.3, 0, 0.84)  # 0.45*, varies
    texts_b["c17"] = unit(0.4, 0, 0.2, 0.89)
    a = FakeClip(img[None], views, texts_a)
    b = FakeClip(img[None], views, texts_b)
    cfg = CaptionRankConfig(text_chunk=4)
    (r,) = fake_ranker(a, b, cfg).rank([Image.new("RGB", (32, 32))], [cands])
    assert r.top_caption == "c9"
    assert r.rotation_invariant_caption == "c13"  # least variance; ties with c12, which B ranked lower
    kept_a = [c for c, s in zip(cands, r.score_b) if s is not None]
    assert sorted(set(kept_a)) == sorted(expect_a)
    kept_b = {c for c, v in zip(cands, r.rotation_variance) if v is not None}
    assert kept_b == {"c9", "c13", "c12", "c18", "c17"}
    assert r.score_a[19] == r.score_a[18] and r.score_b[19] == r.score_b[18]  # the duplicate's scores
    assert all(len(c) <= 4 for c in a.text_calls + b.text_calls)  # bounded text chunks
    assert sum(map(len, a.text_calls)) == 19  # each distinct text encoded once per model
    assert sum(map(len, b.text_calls)) == 10
    # Rotation model A instead: A's text (s, sqrt(1 - s^2), 0, 0) varies over the views by (1 - s^2) b^2
    # var(cos t): least for the highest A score among B's five, c18.
    (r_a,) = fake_ranker(a, b, CaptionRankConfig(rotation_model="a")).rank([Image.new("RGB", (32, 32))], [cands])
    assert r_a.top_caption == "c9" and r_a.rotation_invariant_caption == "c18"


def test_final_pick_is_seeded_by_sample_id_and_splits_half_half():
    ids = [f"s{i}" for i in range(2000)]
    picks = final_picks(ids, 2023)
    assert picks == final_picks(ids, 2023)
    assert picks != final_picks(ids, 7)
    assert set(picks) == {TOP, ROTATION_INVARIANT}
    assert 0.45 < picks.count(TOP) / len(picks) < 0.55
    assert final_picks(ids[:10], 2023) == picks[:10]  # one sample's pick ignores the others


def test_rotated_views_have_no_fill_and_rotate_exactly():
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.integers(100, 200, (90, 120, 3))).astype(np.uint8))
    views = rotated_views(img, ANGLES, 32)
    assert all(v.size == (32, 32) for v in views)
    assert min(np.asarray(v).min() for v in views) >= 60  # bicubic may undershoot a little; black fill would be 0
    assert rotation_crop_fraction(ANGLES) == pytest.approx(1 / (np.cos(np.pi / 6) + 0.5))
    v0, v90 = np.asarray(views[0]), np.asarray(views[3])
    assert np.array_equal(np.rot90(v0), v90)  # PIL rotates counter-clockwise, as np.rot90


# --- the captioner and the stage ----------------------------------------------------------------


def test_stage_runs_the_vision_tower_once_per_image(stage):
    seen = []
    hook = stage.captioner.model.vision_model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    calls = []
    original = stage.captioner.model.language_model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["inputs_embeds"].shape[0])
        return original(*args, **kwargs)

    stage.captioner.model.language_model.generate = counting
    try:
        out = stage(batch(5))
    finally:
        hook.remove()
        del stage.captioner.model.language_model.generate
    assert seen == [3, 2]  # batch_size 3: two generate calls, each image through the tower once
    assert calls == [3, 2]  # the language model expands the candidates itself
    assert out["caption_candidates"].to_pylist()[0].__len__() == 20


def test_seeded_rerun_gives_identical_candidates_and_sidecar(stage):
    first, again = stage(batch(2)), stage(batch(2))
    assert first.equals(again)
    cands = first["caption_candidates"].to_pylist()
    assert len(set(cands[0])) > 1  # sampled, not greedy
    assert chunk_seed(2023, ["a", "b"]) != chunk_seed(2024, ["a", "b"])
    row = first.slice(0, 1).to_pylist()[0]
    assert row["caption"] in (row["top_caption"], row["rotation_invariant_caption"])
    assert row["top_caption"] in row["caption_candidates"]
    assert sum(s is not None for s in row["candidate_score_b"]) >= 5
    assert sum(v is not None for v in row["candidate_rotation_variance"]) == min(5, len(set(row["caption_candidates"])))


def test_drops_decode_error_no_caption_and_empty_candidates(stage, monkeypatch):
    rows = batch(3, [b"not a jpeg", None])
    original = stage.captioner.generate

    def flaky(images, n, seed, **kw):
        if len(images) > 1:
            raise RuntimeError("batch failed")  # the stage retries image by image
        if images[0].size == (90, 70) and seed % 3 == 0:
            return [[""] * n]
        return original(images, n, seed, **kw)

    seeds = {}
    for i in range(3):
        seeds[i] = chunk_seed(stage.cfg.seed, [f"t_{i}"])
    monkeypatch.setattr(stage.captioner, "generate", flaky)
    out = stage(rows)
    reasons = out["drop_reason"].to_pylist()
    assert reasons[3:] == ["decode_error", "decode_error"]
    for i in range(3):
        assert reasons[i] == ("empty_candidates" if seeds[i] % 3 == 0 else None)

    def broken(images, n, seed, **kw):
        raise RuntimeError("model failure")

    monkeypatch.setattr(stage.captioner, "generate", broken)
    out = stage(batch(2))
    assert out["drop_reason"].to_pylist() == ["no_caption", "no_caption"]
    assert "model failure" in out["drop_detail"][0].as_py()


def test_lora_adapter_from_a_path_changes_the_vision_tower(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Blip2ForConditionalGeneration

    peft_model = get_peft_model(Blip2ForConditionalGeneration.from_pretrained(tiny_model), LoraConfig(**RS5M_LORA))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    x = torch.randn(2, 3, 64, 64)
    base = load_captioner(CaptionConfig(model=tiny_model, device="cpu"))
    tuned = load_captioner(CaptionConfig(model=tiny_model, device="cpu", lora_adapter=str(tmp_path / "adapter")))
    with torch.no_grad():
        want = peft_model.eval().base_model.model.vision_model(x).last_hidden_state
        got = tuned.model.vision_model(x).last_hidden_state
        plain = base.model.vision_model(x).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_model_folder_from_s3_is_cached_once(tiny_model, s3_bucket, tmp_path):
    from pathlib import Path

    from rs5m_ray.models.weights import resolve_model_dir

    url, storage = s3_bucket
    for f in Path(tiny_model).iterdir():
        storage.write_atomic(f"{url}/blip2/{f.name}", f.read_bytes())
    local = resolve_model_dir(f"{url}/blip2", storage, str(tmp_path))
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(p.name for p in Path(tiny_model).iterdir())
    storage.remove(f"{url}/blip2")
    assert resolve_model_dir(f"{url}/blip2", storage, str(tmp_path)) == local  # from the node cache
    cap = load_captioner(CaptionConfig(model=local, device="cpu"))
    assert cap.image_size == 64


# --- wired into rs3 ------------------------------------------------------------------------------


def test_rs3_captions_every_image_and_a_recaptioned_part_gives_identical_shards(sort_shuffle, tmp_path):
    import os
    import shutil

    import pyarrow.parquet as pq

    from rs5m_ray.config import Rs3Config, load_config
    from rs5m_ray.pipelines import rs3
    from rs5m_ray.sample.rs3 import generate_rs3

    sources = generate_rs3(str(tmp_path / "in"), fmow_images=4, ben_patches=3, millionaid_images=2)
    cfg = load_config(overrides={
        "output": str(tmp_path / "run"), "sources": sources, "parts": {"num_parts": 1}, "read": {"max_actors": 1},
        "shards": {"train_shards": 1, "val_shards": 1}, "gpe": {"enabled": False},
        "caption": {"max_new_tokens": 8, "batch_size": 4, "weights_cache_dir": str(tmp_path / "cache")},
        "caption_rank": {"weights_cache_dir": str(tmp_path / "cache")}}, cls=Rs3Config)
    report = rs3.run(cfg)
    assert report["accounting_balanced"] and report["sink"]["balanced"]
    assert report["accounting"]["millionaid"]["kept"] == 1  # no metadata, but now a caption
    assert "caption" in report["funnel"] and "meta_caption/empty_caption" not in report["drop_reasons"]
    shards = os.path.join(cfg.output, "shards")
    rows = pq.read_table([os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".parquet")]).to_pylist()
    for r in rows:
        assert len(r["caption_candidates"]) == 20 and len(r["candidate_score_a"]) == 20
        chosen = r["top_caption"] if r["caption_pick"] == "top" else r["rotation_invariant_caption"]
        assert r["caption"] == (f"{r['geometa_cap']} {chosen}" if r["geometa_cap"] else chosen)  # meta in front
    assert any(r["geometa_cap"] for r in rows) and any(not r["geometa_cap"] for r in rows)
    tars = {n: open(os.path.join(shards, n), "rb").read() for n in os.listdir(shards) if n.endswith(".tar")}
    # Recaption the part from its staged images: the same candidates, picks and shards, byte for byte.
    shutil.rmtree(os.path.join(cfg.output, "staging", "captions"))
    shutil.rmtree(shards)
    rs3.run(cfg)
    assert {n: open(os.path.join(shards, n), "rb").read() for n in os.listdir(shards) if n.endswith(".tar")} == tars


def test_vllm_backend_requests_fan_out_seeded_and_collect_in_order():
    from rs5m_ray.stages.caption import collect_candidates, vllm_output, vllm_prompt, vllm_requests

    cfg = CaptionConfig(backend="vllm", num_candidates=20)
    reqs = vllm_requests({"sample_id": "s1", "jpg": jpeg(1)}, cfg, 32)
    assert [r["candidate"] for r in reqs] == list(range(20)) and reqs[0]["pixels"].shape == (32, 32, 3)
    seeds = [r["sampling_params"]["seed"] for r in reqs]
    assert len(set(seeds)) == 20 and seeds == [r["sampling_params"]["seed"] for r in
                                               vllm_requests({"sample_id": "s1", "jpg": jpeg(1)}, cfg, 32)]
    assert reqs[0]["sampling_params"] | {"seed": 0} == {"n": 1, "temperature": 1.0, "top_p": 0.95, "top_k": 50,
                                                          "max_tokens": 50, "seed": 0}
    assert vllm_requests({"sample_id": "bad", "jpg": b"nope"}, cfg, 32) == []  # ledgered by the ranking actors
    prompt = vllm_prompt(reqs[3], None)
    assert prompt["prompt"] == "" and prompt["multimodal_uuids"] == {"image": ["s1"]}
    outs = [vllm_output({"sample_id": "s1", "candidate": j, "generated_text": f" c{j} "}) for j in (2, 0, 1)]
    got = collect_candidates(pa.Table.from_pylist(outs)).to_pylist()
    assert got == [{"sample_id": "s1", "caption_candidates": ["c0", "c1", "c2"]}]


def test_finetuning_lowers_the_caption_loss(tiny_model):
    from rs5m_ray.train.captioner import caption_loss, finetune

    cap = load_captioner(CaptionConfig(model=tiny_model, device="cpu"))
    pairs = [(Image.open(io.BytesIO(jpeg(i))).convert("RGB"), c) for i, c in
             enumerate(["many planes are parked near a runway .", "a river runs through green farmland .",
                        "dense houses line the streets .", "storage tanks stand beside a port ."])]
    before = caption_loss(cap, pairs)
    losses = finetune(cap, lambda rng, n: pairs, steps=20, batch_size=4, lr=5e-3)
    assert len(losses) == 20 and caption_loss(cap, pairs) < 0.7 * before
