"""Model loading: tiny registered configs, weights from path / S3 / hub cache / GeoRSCLIP-style files."""
from __future__ import annotations

import pickle

import pytest
import torch

from rs5m_ray.config import ScoringConfig
from rs5m_ray.models.clip import TINY_MODELS, is_open_clip_tag, load_clip, resolve_precision
from rs5m_ray.models.prompts import RS_PROMPTS
from rs5m_ray.models.weights import read_state_dict, resolve_weights


@pytest.fixture(scope="module")
def source_model():
    """A tiny model whose weights the tests save in various layouts and load back."""
    torch.manual_seed(7)
    return load_clip(ScoringConfig(clip_model="rs5m-tiny-vit")).model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prompts_are_the_papers_33():
    assert len(RS_PROMPTS) == 33 == len(set(RS_PROMPTS))
    assert "a blurry satellite image." in RS_PROMPTS
    assert "an aerial image." in RS_PROMPTS and "a remote sensing image." in RS_PROMPTS
    assert "a jpeg corrupted aerial image." in RS_PROMPTS and "a black and white remote sensing image." in RS_PROMPTS


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_configs_load_and_embed(name):
    clip = load_clip(ScoringConfig(clip_model=name))
    assert clip.device.type == "cpu" and clip.dtype == torch.float32
    emb = clip.encode_images(torch.randn(3, 3, clip.image_size, clip.image_size))
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert clip.encode_texts(list(RS_PROMPTS[:2])).shape == (2, 64)


def test_precision_rules():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int3", torch.device("cpu"))


def test_open_clip_tags_are_told_apart_from_paths():
    assert is_open_clip_tag("ViT-B-32", "openai")
    assert not is_open_clip_tag("ViT-B-32", "/models/RS5M_ViT-B-32.pt")
    assert not is_open_clip_tag("rs5m-tiny-vit", None)


def test_load_from_local_path(tmp_path, source_model):
    path = tmp_path / "plain.pt"
    torch.save(source_model.state_dict(), path)
    clip = load_clip(ScoringConfig(clip_pretrained=str(path)))
    assert_same_weights(clip.model, source_model)
    assert clip.weights_report.missing == [] and clip.weights_report.unexpected == []


def test_load_safetensors(tmp_path, source_model):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    assert_same_weights(load_clip(ScoringConfig(clip_pretrained=str(path))).model, source_model)


@pytest.mark.parametrize("prefix", ["module.", "module.itra"])
def test_georsclip_style_checkpoint_with_prefixes_reports_keys(tmp_path, source_model, prefix):
    """`state_dict` wrapper, DDP `module.`, ITRA's text_backbone./image_backbone. names, one stray key."""
    def rename(k: str) -> str:
        if prefix == "module.itra":
            k = "image_backbone." + k[len("visual."):] if k.startswith("visual.") else "text_backbone." + k
        return "module." + k

    sd = {rename(k): v for k, v in source_model.state_dict().items()}
    sd["module.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "RS5M_tiny.pt"
    torch.save({"epoch": 5, "state_dict": sd}, path)
    clip = load_clip(ScoringConfig(clip_pretrained=str(path)))
    assert_same_weights(clip.model, source_model)
    assert clip.weights_report.unexpected == ["extra_head.weight"]
    assert clip.weights_report.missing == []


def test_missing_keys_raise_when_strict_and_are_reported_otherwise(tmp_path, source_model):
    sd = {k: v for k, v in source_model.state_dict().items() if not k.startswith("visual.")}
    path = tmp_path / "text_only.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="lacks"):
        load_clip(ScoringConfig(clip_pretrained=str(path)))
    clip = load_clip(ScoringConfig(clip_pretrained=str(path), strict_weights=False))
    assert clip.weights_report.missing and all(k.startswith("visual.") for k in clip.weights_report.missing)


def test_wrong_architecture_is_a_clear_error(tmp_path, source_model):
    path = tmp_path / "vit.pt"
    torch.save(source_model.state_dict(), path)
    with pytest.raises(ValueError, match="wrong architecture"):
        load_clip(ScoringConfig(clip_model="rs5m-tiny-convnext", clip_pretrained=str(path)))


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(str(path))


def test_missing_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_clip(ScoringConfig(clip_pretrained="/nonexistent/RS5M_ViT-B-32.pt"))


def test_load_from_s3_through_storage_and_cache(s3_bucket, tmp_path, source_model):
    bucket, storage = s3_bucket
    path = tmp_path / "w.pt"
    torch.save(source_model.state_dict(), path)
    url = f"{bucket}/ckpt/RS5M_tiny.pt"
    storage.write_atomic(url, path.read_bytes())
    cfg = ScoringConfig(clip_pretrained=url, weights_cache_dir=str(tmp_path / "cache"))
    assert_same_weights(load_clip(cfg, storage).model, source_model)
    cached = resolve_weights(url, storage, cfg.weights_cache_dir)
    assert cached.startswith(str(tmp_path / "cache")) and open(cached, "rb").read() == path.read_bytes()


def test_load_from_hub_cache(tmp_path, source_model, monkeypatch):
    """hf-hub:org/repo/file resolves from a populated hub cache without network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "cache" / "hf" / "models--Zilun--GeoRSCLIP"
    (repo / "snapshots" / "abc123" / "ckpt").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    torch.save(source_model.state_dict(), repo / "snapshots" / "abc123" / "ckpt" / "RS5M_tiny.pt")
    cfg = ScoringConfig(clip_pretrained="hf-hub:Zilun/GeoRSCLIP/ckpt/RS5M_tiny.pt",
                        weights_cache_dir=str(tmp_path / "cache"))
    assert_same_weights(load_clip(cfg).model, source_model)
