"""The Pfeiffer bottleneck adapter (Pfeiffer et al. 2020), AdapterHub's defaults.

AdapterHub `adapters`, configuration/adapter_config.py, `SeqBnConfig` (the "pfeiffer" config):
output_adapter only (after each block's feed-forward, none after attention), reduction_factor 16,
non_linearity relu, original_ln_before and residual_before_ln (the adapter reads the block's
output after the residual add, and its output is added back to that), no extra layer norms,
init "bert" (weights N(0, 0.02), biases zero), scaling 1.0.

In open_clip's pre-LN blocks that is y = block(x); y + up(relu(down(y))). Not mergeable (it adds
a non-linear path).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rs5m_ray.models.peft.base import Gate, PeftMethod, blocks, towers


def _bert_linear(n_in: int, n_out: int, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, dtype=like.dtype, device=like.device)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class Bottleneck(nn.Module):
    def __init__(self, dim: int, reduction_factor: float, like: torch.Tensor, gated: bool):
        super().__init__()
        hidden = max(1, int(dim // reduction_factor))
        self.down, self.up = _bert_linear(dim, hidden, like), _bert_linear(hidden, dim, like)
        self.gate = Gate(dim, like) if gated else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = self.up(torch.relu(self.down(y)))
        return y + (out * self.gate(y) if self.gate is not None else out)


def _after_block(block: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
    return block.peft_adapter(output)


def add_bottlenecks(model: nn.Module, reduction_factor: float, gated: bool) -> None:
    for tower in towers(model):
        for block in blocks(tower):
            weight = block.mlp.c_proj.weight
            block.peft_adapter = Bottleneck(weight.shape[0], reduction_factor, weight, gated)
            block.register_forward_hook(_after_block)


@dataclasses.dataclass
class Pfeiffer(PeftMethod):
    name = "pfeiffer"
    reduction_factor: float = 16.0

    def _add(self, model: nn.Module) -> None:
        if self.reduction_factor <= 0:
            raise ValueError(f"pfeiffer: reduction_factor must be > 0, got {self.reduction_factor}")
        add_bottlenecks(model, self.reduction_factor, gated=False)
