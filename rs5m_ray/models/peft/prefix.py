"""Prefix tuning (Li & Liang 2021), AdapterHub's defaults.

AdapterHub `adapters`, configuration/adapter_config.py, `PrefixTuningConfig`: prefix_length 30,
flat False (the prefix is reparametrised: an embedding of the L positions through a bottleneck MLP
Linear(d, 512) - tanh - Linear(512, layers * 2 * d), giving every layer's keys and values),
bottleneck_size 512, non_linearity tanh, dropout 0.0, prefixes in every layer (leave_out []).

Applied to each open_clip transformer tower (one encoder per tower): every query of every layer
also attends to that layer's L prefix keys and values. Not mergeable.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rs5m_ray.models.peft.base import Gate, PeftMethod, adapted_attention, blocks, towers


class PrefixEncoder(nn.Module):
    """All layers' prefix keys and values of one tower, computed once per forward of the tower."""

    def __init__(self, layers: int, dim: int, length: int, bottleneck: int, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.layers, self.dim, self.length = layers, dim, length
        self.wte = nn.Embedding(length, dim, **kw)
        self.control_trans = nn.Sequential(nn.Linear(dim, bottleneck, **kw), nn.Tanh(),
                                           nn.Linear(bottleneck, layers * 2 * dim, **kw))
        self.current: torch.Tensor | None = None  # [layers, 2, L, d] of the running forward

    def forward(self) -> torch.Tensor:
        return self.control_trans(self.wte.weight).view(self.length, self.layers, 2, self.dim).permute(1, 2, 0, 3)


def _compute_prefix(tower: nn.Module, _args) -> None:
    tower.peft_prefix.current = tower.peft_prefix()


class LayerPrefix:
    """Layer i's (keys, values) of the tower's current prefix (a callable, not a module)."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.encoder.current[self.layer]
        return kv[0], kv[1]


def add_prefixes(model: nn.Module, length: int, bottleneck: int, gated: bool) -> None:
    for tower in towers(model):
        tower_blocks = blocks(tower)
        weight = tower_blocks[0].attn.in_proj_weight
        tower.peft_prefix = PrefixEncoder(len(tower_blocks), weight.shape[1], length, bottleneck, weight)
        tower.register_forward_pre_hook(_compute_prefix)
        for i, block in enumerate(tower_blocks):
            attn = adapted_attention(block)
            attn.prefix = LayerPrefix(tower.peft_prefix, i)
            if gated:
                attn.peft_prefix_gate = Gate(weight.shape[1], weight)


@dataclasses.dataclass
class PrefixTuning(PeftMethod):
    name = "prefix"
    prefix_length: int = 30
    bottleneck_size: int = 512

    def _add(self, model: nn.Module) -> None:
        if self.prefix_length < 1 or self.bottleneck_size < 1:
            raise ValueError("prefix: prefix_length and bottleneck_size must be >= 1")
        add_prefixes(model, self.prefix_length, self.bottleneck_size, gated=False)
