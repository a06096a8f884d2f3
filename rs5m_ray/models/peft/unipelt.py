"""UniPELT (Mao et al. 2022), AdapterHub's defaults.

AdapterHub `adapters`, configuration/adapter_config.py, `UniPELTConfig`: the union of
PrefixTuningConfig(prefix_length=10), SeqBnConfig(reduction_factor=16) and LoRAConfig(r=8)
(alpha 8, q and v), each with use_gating=True: every sub-module's contribution is scaled per
example by a learned gate (sigmoid of a linear map of the tokens, averaged over the sequence).
The gates depend on the input, so nothing merges into the base weights.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from rs5m_ray.models.peft.base import PeftMethod, adapted_attention, blocks, towers
from rs5m_ray.models.peft.lora import GatedLoRA
from rs5m_ray.models.peft.pfeiffer import add_bottlenecks
from rs5m_ray.models.peft.prefix import add_prefixes


@dataclasses.dataclass
class UniPELT(PeftMethod):
    name = "unipelt"
    prefix_length: int = 10
    bottleneck_size: int = 512
    reduction_factor: float = 16.0
    r: int = 8
    alpha: float = 8.0

    def _add(self, model: nn.Module) -> None:
        add_prefixes(model, self.prefix_length, self.bottleneck_size, gated=True)
        add_bottlenecks(model, self.reduction_factor, gated=True)
        for tower in towers(model):
            for block in blocks(tower):
                attn = adapted_attention(block)
                attn.peft_lora = GatedLoRA(attn.embed_dim, self.r, self.alpha, attn.in_proj_weight)
