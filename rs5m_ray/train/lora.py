"""LoRA for any open_clip tower, as a weight parametrization.

RS5M's PEFT runs (notes §4.3) froze CLIP and trained only the adapter. open_clip's
attention is `nn.MultiheadAttention`, which reads `in_proj_weight` and `out_proj.weight`
directly instead of calling a Linear, so LoRA wraps the weight tensors themselves:
W' = W + (alpha / r) * B @ A, with B zero-initialised so training starts at the
pretrained model. `merged_state_dict` bakes W' in: a plain open_clip state dict that
`load_clip` reads like any other checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

# Attention projections of both towers (ViT and text transformer): q, k, v packed in in_proj.
DEFAULT_TARGETS = ("attn.in_proj_weight", "attn.out_proj.weight")


class LoRA(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and add trainable LoRA factors to every 2-D weight whose name ends
    with one of `targets`. Returns the adapted weight names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.ndim == 2 and n.endswith(tuple(targets))]
    if not names:
        raise ValueError(f"no 2-D weight of the model ends with any of {list(targets)}")
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        parametrize.register_parametrization(module, attr, LoRA(getattr(module, attr), rank, alpha))
    return names


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA-adapted weight replaced by W + scale * B @ A
    under its original name (identical to `state_dict()` for a model without LoRA)."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if parametrize.is_parametrized(module):
                for attr in module.parametrizations:
                    state[f"{module_name}.{attr}" if module_name else attr] = getattr(module, attr).detach().clone()
    return state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors (what training changes), for resuming."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
