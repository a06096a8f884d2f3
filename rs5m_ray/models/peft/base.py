"""What every PEFT method shares: the method interface, open_clip's transformer blocks, and an
attention module that takes adapter contributions (LoRA deltas, prefix keys and values, gates)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch import nn

# Every adapter tensor's name has a component starting with this (how `adapter_state` finds them).
PREFIX = "peft_"


def is_adapter_key(name: str) -> bool:
    return any(part.startswith(PREFIX) for part in name.split("."))


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclasses.dataclass
class PeftMethod:
    """One PEFT method with its options (dataclass fields; defaults = AdapterHub's)."""

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False

    def apply(self, model: nn.Module) -> list[str]:
        """Freeze `model`, add this method's modules; the names of the parameters that now train."""
        model.requires_grad_(False)
        self._add(model)
        names = trainable_names(model)
        if not names or not all(is_adapter_key(n) for n in names):
            raise RuntimeError(f"{self.name}: trainable parameters outside the adapter: {names[:5]}")
        return names

    def _add(self, model: nn.Module) -> None:
        raise NotImplementedError

    def metadata(self) -> dict:
        return {"method": self.name, "options": dataclasses.asdict(self)}

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors alone (what training changes)."""
        return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole adapted model: open_clip's names for the base, plus the adapter's tensors."""
        return model.state_dict()

    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A plain open_clip state dict computing what the adapted model computes."""
        raise ValueError(f"{self.name} cannot be merged into the base weights (it adds computation)")


def towers(model: nn.Module) -> list[Transformer]:
    """open_clip's transformer stacks (text, and the image tower when it is a ViT)."""
    found = [m for m in model.modules() if isinstance(m, Transformer)]
    if not found:
        raise ValueError("the model has no open_clip transformer tower to adapt")
    return found


def blocks(tower: Transformer) -> list[ResidualAttentionBlock]:
    return [b for b in tower.resblocks if isinstance(b, ResidualAttentionBlock)]


class AdaptedAttention(nn.Module):
    """open_clip's self-attention (nn.MultiheadAttention's math and parameter names) with adapter
    hooks: `lora` adds to the queries and values, `prefix` (a zero-argument callable returning
    this layer's prefix keys and values [L, d]) prepends keys and values, `prefix_gate` scales them."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.in_proj_weight is None or not mha._qkv_same_embed_dim:
            raise ValueError("only packed-projection self-attention can be adapted")
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.peft_lora: nn.Module | None = None
        self.peft_prefix_gate: nn.Module | None = None
        self.prefix = None  # not a submodule: the tower owns the prefix encoder

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.peft_lora is not None:
            dq, dv = self.peft_lora(x)
            q, v = q + dq, v + dv
        if self.prefix is not None:
            pk, pv = self.prefix()
            pk, pv = pk.to(k.dtype).expand(b, -1, -1), pv.to(v.dtype).expand(b, -1, -1)
            if self.peft_prefix_gate is not None:
                gate = self.peft_prefix_gate(x)
                pk, pv = pk * gate, pv * gate
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            if attn_mask is not None:  # prefix positions are visible to every query
                attn_mask = F.pad(attn_mask, (pk.shape[1], 0))
        h = self.num_heads
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None and attn_mask.dim() == 3:  # [B * heads, N, M]
            attn_mask = attn_mask.view(b, h, *attn_mask.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def adapted_attention(block: ResidualAttentionBlock) -> AdaptedAttention:
    """The block's attention as an AdaptedAttention (replacing nn.MultiheadAttention once)."""
    if not isinstance(block.attn, AdaptedAttention):
        block.attn = AdaptedAttention(block.attn)
    return block.attn


class Gate(nn.Module):
    """UniPELT's gate (AdapterHub `use_gating`): sigmoid of a linear map of each token, averaged
    over the sequence: one scalar per example in [0, 1], shaped [B, 1, 1]."""

    def __init__(self, dim: int, like: torch.Tensor):
        super().__init__()
        self.peft_gate = nn.Linear(dim, 1, dtype=like.dtype, device=like.device)
        nn.init.normal_(self.peft_gate.weight, std=0.02)  # AdapterHub's "bert" init
        nn.init.zeros_(self.peft_gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.peft_gate(x)).mean(dim=1, keepdim=True)
