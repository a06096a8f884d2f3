"""Parameter-efficient fine-tuning of open_clip models: one registry, one checkpoint format.

RS5M's PEFT rows (notes §4.3) ran AdapterHub's LoRA, Pfeiffer adapter, prefix tuning and UniPELT with
AdapterHub's default settings on CLIP ViT-B/32. They are built here as modules on open_clip's own
towers, not with the `adapters` library: what users train and load are open_clip checkpoints
(GeoRSCLIP's released weights, the scoring stage's `clip_pretrained`, any open_clip architecture
such as ConvNeXt), while `adapters` works only on Hugging Face `CLIPModel`s (a weight conversion
each way, ViTs only) and pins its own transformers release. Each method's defaults are AdapterHub's,
copied with their source into its module.

A method object applies itself to a model (freezing the rest), names the parameters that train,
saves and loads its state with its metadata, and, where it can, merges into a plain open_clip
state dict (`mergeable`). Checkpoint layout (torch.save, weights_only-readable):
    {"peft": {"method": name, "options": {...}}, "state_dict": {name: tensor}}
`state_dict` holds the adapter's tensors only (`adapter_state`), or the whole adapted model
(`model_state`): the form `rs5m_ray.models.clip.load_clip` reads as `clip_pretrained` when a
method cannot merge.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from rs5m_ray.models.peft.base import PeftMethod, trainable_names
from rs5m_ray.models.peft.lora import LoRA
from rs5m_ray.models.peft.pfeiffer import Pfeiffer
from rs5m_ray.models.peft.prefix import PrefixTuning
from rs5m_ray.models.peft.unipelt import UniPELT

METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (LoRA, Pfeiffer, PrefixTuning, UniPELT)}

__all__ = ["METHODS", "PeftMethod", "get_method", "method_of", "trainable_names", "adapter_checkpoint",
           "load_adapter"]


def get_method(name: str, **options: Any) -> PeftMethod:
    """The method `name` with AdapterHub's defaults, overridden by `options` (None values ignored)."""
    if name not in METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: v for k, v in options.items() if v is not None})


def method_of(metadata: dict) -> PeftMethod:
    """The method a checkpoint's `peft` entry describes."""
    return get_method(metadata["method"], **metadata.get("options", {}))


def adapter_checkpoint(method: PeftMethod, model: nn.Module, whole_model: bool = False) -> dict:
    """What to torch.save: the adapter alone, or the whole adapted model (loadable by `load_clip`)."""
    state = method.model_state(model) if whole_model else method.adapter_state(model)
    return {"peft": method.metadata(), "state_dict": state}


def load_adapter(model: nn.Module, checkpoint: dict) -> PeftMethod:
    """Apply the checkpoint's method to `model` (the same base it was trained on) and load its tensors."""
    method = method_of(checkpoint["peft"])
    method.apply(model)
    result = model.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if k in set(method.adapter_state(model))]
    if result.unexpected_keys or missing:
        raise ValueError(f"{method.name} checkpoint does not match the model: unexpected "
                         f"{result.unexpected_keys[:5]}, missing adapter keys {missing[:5]}")
    return method
