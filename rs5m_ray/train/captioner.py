"""Fine-tuning a captioner on image-caption pairs (RS5M tuned BLIP-2 on RSITMD, notes §2.2).

`caption_loss` is the model's mean token cross-entropy of the captions given the images (the
query-token placeholders, padding and the leading BOS carry no loss); `finetune` runs AdamW
over random batches of pairs, on every weight or, with `lora`, on RS5M's LoRA adapter of the
vision tower alone (`models.captioner.RS5M_LORA`; save it with `save_pretrained` and load it as
`caption.lora_adapter`). Single process: the captioners RS5M tunes fit one GPU.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from PIL import Image

from rs5m_ray.models.captioner import RS5M_LORA, Captioner


def training_inputs(cap: Captioner, images: list[Image.Image], captions: list[str]) -> dict[str, torch.Tensor]:
    """Processor inputs with `labels`: each caption followed by EOS, loss on caption tokens only."""
    tok = cap.processor.tokenizer
    inputs = cap.processor(images=images, text=[c + tok.eos_token for c in captions], return_tensors="pt",
                           padding=True)
    labels = inputs["input_ids"].clone()
    image_token = getattr(cap.model.config, "image_token_index", None)
    labels[inputs["attention_mask"] == 0] = -100
    if image_token is not None:
        labels[labels == image_token] = -100
    first_text = (labels != -100).int().argmax(dim=1)  # the BOS that leads every text: given, not predicted
    labels[torch.arange(len(labels)), first_text] = -100
    inputs["labels"] = labels
    return {k: v.to(cap.device, cap.dtype) if v.is_floating_point() else v.to(cap.device) for k, v in inputs.items()}


@torch.no_grad()
def caption_loss(cap: Captioner, pairs: list[tuple[Image.Image, str]], batch_size: int = 32) -> float:
    """Mean per-token loss of the captions over `pairs` (eval mode)."""
    cap.model.eval()
    total, tokens = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        images, captions = zip(*pairs[s:s + batch_size])
        inputs = training_inputs(cap, list(images), list(captions))
        n = int((inputs["labels"] != -100).sum())
        total += float(cap.model(**inputs).loss) * n
        tokens += n
    return total / max(tokens, 1)


def finetune(cap: Captioner, sample: Callable[[random.Random, int], list[tuple[Image.Image, str]]], steps: int,
             batch_size: int = 32, lr: float = 1e-3, lora: bool = False, seed: int = 0) -> list[float]:
    """Train `cap.model` in place on batches drawn by `sample(rng, batch_size)`; the training losses.
    With `lora`, the model becomes a peft model holding RS5M's vision adapter."""
    if lora:
        from peft import LoraConfig, get_peft_model

        cap.model = get_peft_model(cap.model, LoraConfig(**RS5M_LORA))
    params = [p for p in cap.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cap.model.train()
    losses = []
    for _ in range(steps):
        images, captions = zip(*sample(rng, batch_size))
        loss = cap.model(**training_inputs(cap, list(images), list(captions))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    cap.model.eval()
    return losses
