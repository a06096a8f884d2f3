"""LoRA on open_clip's attention (Hu et al. 2021), AdapterHub's defaults.

AdapterHub `adapters`, configuration/adapter_config.py, `LoRAConfig`: r = 8, alpha = 8,
dropout 0.0, selfattn_lora only, attn_matrices ["q", "v"], init "lora" (A Kaiming-uniform,
B zero, so training starts at the pretrained model), composition "add".

open_clip's attention reads its packed q/k/v weight `in_proj_weight` directly instead of calling
a Linear, so plain LoRA is a weight parametrization: W' = W + (alpha / r) * B @ A on the chosen
rows; it merges into a plain open_clip state dict. UniPELT's gated LoRA (`GatedLoRA`) scales the
update per example, so it runs inside `AdaptedAttention` instead and cannot merge.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from rs5m_ray.models.peft.base import Gate, PeftMethod, blocks, is_adapter_key, towers

MATRICES = ("q", "k", "v")


def _factors(rank: int, out_features: int, in_features: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    a = nn.Parameter(torch.empty(rank, in_features, dtype=like.dtype, device=like.device))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))


class PackedLoRA(nn.Module):
    """Parametrization of a packed [q; k; v] weight: adds scale * B_m @ A_m to matrix m's rows."""

    def __init__(self, weight: torch.Tensor, matrices: tuple[str, ...], rank: int, alpha: float):
        super().__init__()
        d = weight.shape[0] // 3
        self.matrices, self.scale = matrices, alpha / rank
        for m in matrices:
            a, b = _factors(rank, d, weight.shape[1], weight)
            setattr(self, f"peft_lora_A_{m}", a)
            setattr(self, f"peft_lora_B_{m}", b)

    def delta(self) -> torch.Tensor:
        rows = [self.scale * getattr(self, f"peft_lora_B_{m}") @ getattr(self, f"peft_lora_A_{m}")
                if m in self.matrices else None for m in MATRICES]
        like = next(r for r in rows if r is not None)
        return torch.cat([r if r is not None else torch.zeros_like(like) for r in rows])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


class GatedLoRA(nn.Module):
    """UniPELT's LoRA on queries and values, scaled per example by a gate: (dq, dv) of input x."""

    def __init__(self, dim: int, rank: int, alpha: float, like: torch.Tensor):
        super().__init__()
        self.scale = alpha / rank
        self.peft_lora_A_q, self.peft_lora_B_q = _factors(rank, dim, dim, like)
        self.peft_lora_A_v, self.peft_lora_B_v = _factors(rank, dim, dim, like)
        self.gate = Gate(dim, like)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gate(x) * self.scale
        dq = x @ self.peft_lora_A_q.T @ self.peft_lora_B_q.T
        dv = x @ self.peft_lora_A_v.T @ self.peft_lora_B_v.T
        return dq * g, dv * g


@dataclasses.dataclass
class LoRA(PeftMethod):
    name = "lora"
    mergeable = True
    r: int = 8
    alpha: float = 8.0
    attn_matrices: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        self.attn_matrices = tuple(self.attn_matrices)
        if self.r < 1 or not self.attn_matrices or not set(self.attn_matrices) <= set(MATRICES):
            raise ValueError(f"lora: r >= 1 and attn_matrices from {MATRICES}, got r={self.r}, "
                             f"attn_matrices={self.attn_matrices}")

    def _add(self, model: nn.Module) -> None:
        for tower in towers(model):
            for block in blocks(tower):
                weight = block.attn.in_proj_weight
                parametrize.register_parametrization(
                    block.attn, "in_proj_weight", PackedLoRA(weight, self.attn_matrices, self.r, self.alpha))

    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """W + scale * B @ A under open_clip's own names: a checkpoint any open_clip loader reads."""
        state = {k: v for k, v in model.state_dict().items()
                 if ".parametrizations." not in k and not is_adapter_key(k)}
        with torch.no_grad():
            for module_name, module in model.named_modules():
                if parametrize.is_parametrized(module):
                    for attr in module.parametrizations:
                        key = f"{module_name}.{attr}" if module_name else attr
                        state[key] = getattr(module, attr).detach().clone()
        return state

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.merged_state_dict(model)
