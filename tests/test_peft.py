"""The PEFT registry on a tiny open_clip model: each method trains only its own parameters, its
checkpoint reloads to identical outputs (also through the model loader), LoRA's merged export
matches the adapted model."""
from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss

from rs5m_ray.config import ScoringConfig
from rs5m_ray.models import peft
from rs5m_ray.models.clip import load_clip

TINY = ScoringConfig(clip_model="rs5m-tiny-vit")
IMAGES, TEXTS = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.randint(0, 1000, (4, 77))


def features(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(IMAGES, TEXTS)[:2]


def trained(method: peft.PeftMethod) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """A tiny model adapted by `method` after 3 AdamW steps; its weights before them; trainable names."""
    model = load_clip(TINY).model
    names = method.apply(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = ClipLoss()(*model(IMAGES, TEXTS)[:3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, before, names


@pytest.mark.parametrize("name", sorted(peft.METHODS))
def test_each_method_trains_only_its_parameters_and_reloads_identically(name, tmp_path):
    method = peft.get_method(name)
    model, before, names = trained(method)
    assert names and all(peft.base.is_adapter_key(n) for n in names)
    assert set(names) <= set(method.adapter_state(model))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(method.adapter_state(model)), sorted(changed - set(method.adapter_state(model)))[:3]
    # Both towers carry the adapter.
    assert any(n.startswith("visual.") for n in names) and any(n.startswith("transformer.") for n in names)
    adapted = features(model)
    assert not torch.allclose(adapted[0], features(load_clip(TINY).model)[0])

    # The adapter alone, on a fresh copy of the same base.
    path = tmp_path / "adapter.pt"
    torch.save(peft.adapter_checkpoint(method, model), path)
    fresh = load_clip(TINY).model
    assert peft.load_adapter(fresh, torch.load(path, weights_only=True)).metadata() == method.metadata()
    assert all(torch.equal(a, b) for a, b in zip(adapted, features(fresh)))

    # The whole model through the loader that scoring and evaluation use.
    full = tmp_path / "model.pt"
    if method.mergeable:
        torch.save(method.merged_state_dict(model), full)
        plain = load_clip(TINY).model
        plain.load_state_dict(torch.load(full, weights_only=True))  # strict: open_clip's own keys
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(adapted, features(plain)))
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            method.merged_state_dict(model)
        torch.save(peft.adapter_checkpoint(method, model, whole_model=True), full)
    loaded = load_clip(ScoringConfig(clip_model="rs5m-tiny-vit", clip_pretrained=str(full)))
    assert not loaded.weights_report.missing and not loaded.weights_report.unexpected
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(adapted, features(loaded.model)))


def test_lora_starts_at_the_base_model_on_q_and_v_only():
    model = load_clip(TINY).model
    base = features(model)
    peft.get_method("lora").apply(model)
    assert all(torch.equal(a, b) for a, b in zip(base, features(model)))  # B = 0 at the start
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    merged = peft.get_method("lora").merged_state_dict(model)
    plain = load_clip(TINY).model.state_dict()
    changed = {k for k in plain if not torch.equal(plain[k], merged[k])}
    assert changed and all(k.endswith("attn.in_proj_weight") for k in changed)
    d = plain[sorted(changed)[0]].shape[1]
    k_rows = slice(d, 2 * d)
    assert all(torch.equal(plain[k][k_rows], merged[k][k_rows]) for k in changed)  # keys untouched


def test_defaults_are_adapterhubs_and_bad_options_are_refused():
    assert peft.get_method("lora").metadata()["options"] == {"r": 8, "alpha": 8.0, "attn_matrices": ("q", "v")}
    assert peft.get_method("pfeiffer").reduction_factor == 16
    assert peft.get_method("prefix").prefix_length == 30 and peft.get_method("prefix").bottleneck_size == 512
    assert peft.get_method("unipelt").prefix_length == 10
    with pytest.raises(ValueError, match="unknown PEFT method"):
        peft.get_method("ia3")
    with pytest.raises(ValueError, match="unknown option"):
        peft.get_method("pfeiffer", r=4)
    with pytest.raises(ValueError, match="attn_matrices"):
        peft.get_method("lora", attn_matrices=("x",))
