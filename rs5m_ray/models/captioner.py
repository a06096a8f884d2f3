"""Hugging Face vision-to-text captioners (BLIP-2 by default), with weights from a local
directory, `s3://` or the hub cache, and an optional peft LoRA adapter.

`load_captioner(cfg)` is the one entry point. `cfg.model` is a model folder
(`save_pretrained` layout: config, weights, processor files) as a local path, `s3://...`
(copied once per node into the weights cache) or `hf-hub:org/repo[@revision]` (the hub cache;
`hf-hub:Salesforce/blip2-opt-6.7b` is RS5M's captioner), or `rs5m-tiny-blip2`: a tiny randomly
initialised BLIP-2 with a byte-level BPE tokenizer, built here once per node (tests, demo,
benchmarks; its captions are noise until trained).

`Captioner.generate` runs the image tower (and BLIP-2's Q-Former) once per image and
samples all candidates of a batch of images in one `generate` call (`num_return_sequences`):
HF BLIP-2 computes the query embeddings once and expands them for the candidates.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from rs5m_ray.config import CaptionConfig
from rs5m_ray.models.clip import DTYPES, resolve_device, resolve_precision
from rs5m_ray.models.weights import DEFAULT_CACHE, resolve_model_dir
from rs5m_ray.storage import Storage

TINY_CAPTIONER = "rs5m-tiny-blip2"
# RS5M's released adapter (notes §2.2): PEFT LoRA on the BLIP-2 vision tower.
RS5M_LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
             "target_modules": ["self_attn.qkv", "self_attn.projection"]}
# The tiny test architecture: BLIP-2's three parts (ViT, Q-Former, OPT) at toy width.
TINY_IMAGE_SIZE = 64
TINY_QUERY_TOKENS = 8
TINY_VOCAB = 512
TINY_CORPUS = (  # tokenizer corpus when none is given: RS vocabulary, so merges are not all noise
    "an aerial image of {}", "a satellite view of {}", "many {} are near a road .", "some green trees are around {} .",
    "there is a {} in the middle of the picture .", "several buildings and {} are in a dense area .")
TINY_NOUNS = ("airport", "planes", "runway", "farmland", "river", "bridge", "beach", "forest", "buildings",
              "houses", "a stadium", "a parking lot", "cars", "ships", "a port", "storage tanks", "a church",
              "a desert", "mountains", "a meadow", "a pond", "a school", "a square", "a viaduct", "trees")


@dataclass
class Captioner:
    """A loaded vision-to-text model and its processor."""

    name: str
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype

    @property
    def image_size(self) -> int:
        return input_size(self.processor.image_processor)

    def inputs(self, images: list[Image.Image], prompt: str | None = None) -> dict[str, torch.Tensor]:
        text = [prompt] * len(images) if prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt")
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], num_candidates: int, seed: int, *, top_p: float, top_k: int,
                 temperature: float, max_new_tokens: int, prompt: str | None = None) -> list[list[str]]:
        """`num_candidates` sampled captions per image, from one `generate` call for the batch.
        Sampling draws from a generator seeded with `seed` alone, so the same images and seed give
        the same candidates (on the same hardware and software)."""
        if not images:
            return []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(**self.inputs(images, prompt), do_sample=True, top_p=top_p, top_k=top_k,
                                      temperature=temperature, max_new_tokens=max_new_tokens,
                                      num_return_sequences=num_candidates)
        texts = [_without_prompt(t, prompt) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return [texts[i * num_candidates:(i + 1) * num_candidates] for i in range(len(images))]


def input_size(image_processor) -> int:
    """The side of the model's input images (a size dict or transformers' SizeDict)."""
    size = image_processor.size
    sides = [size.get(k) if isinstance(size, dict) else getattr(size, k, None)
             for k in ("height", "width", "shortest_edge", "longest_edge")]
    return int(max(s for s in sides if s))


def _without_prompt(text: str, prompt: str | None) -> str:
    """Decoder-only models return the prompt before the caption."""
    text = text.strip()
    return text[len(prompt):].strip() if prompt and text.startswith(prompt.strip()) else text


def load_captioner(cfg: CaptionConfig, storage: Storage | None = None) -> Captioner:
    """The configured captioner in eval mode on the configured device (LoRA merged in)."""
    import transformers
    from transformers import AutoProcessor

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    path = tiny_captioner_dir(cfg.weights_cache_dir) if cfg.model == TINY_CAPTIONER else \
        resolve_model_dir(cfg.model, storage, cfg.weights_cache_dir)
    model_class = getattr(transformers, cfg.model_class, None)
    if model_class is None:
        raise ValueError(f"caption.model_class {cfg.model_class!r} is not a transformers class")
    model = model_class.from_pretrained(path, dtype=DTYPES[precision])
    if cfg.lora_adapter:
        from peft import PeftModel

        adapter = resolve_model_dir(cfg.lora_adapter, storage, cfg.weights_cache_dir)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged: no adapter cost per step
    return Captioner(cfg.model, model.to(device).eval(), AutoProcessor.from_pretrained(path), device,
                     DTYPES[precision])


def tiny_captioner_dir(cache_dir: str | None = None, corpus: list[str] | None = None) -> str:
    """The tiny BLIP-2 folder in the node's weights cache, built on first use (atomically: actors
    of one node may race). Same corpus -> same tokenizer and weights on every node."""
    corpus = corpus or [t.format(n) for t in TINY_CORPUS for n in TINY_NOUNS]
    digest = hashlib.sha1(json.dumps(corpus).encode()).hexdigest()[:12]
    target = (Path(cache_dir) if cache_dir else DEFAULT_CACHE) / f"{TINY_CAPTIONER}-{digest}"
    if not target.is_dir():
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        build_tiny_blip2(str(tmp), corpus)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def build_tiny_blip2(path: str, corpus: list[str], seed: int = 0) -> None:
    """Save a tiny random BLIP-2 (ViT + Q-Former + OPT) and its processor to `path`: a byte-level
    BPE tokenizer trained on `corpus` (OPT's conventions: `</s>` is BOS and EOS and leads every
    text) and BLIP-2's processor, which adds the `<image>` query-token placeholder."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              PreTrainedTokenizerFast)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=TINY_VOCAB, min_frequency=2,
                            special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=TINY_QUERY_TOKENS)
    vocab = len(tokenizer)
    config = Blip2Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
        qformer_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "encoder_hidden_size": 64, "vocab_size": vocab},
        # Head size 64 in the language model: the smallest that vLLM's attention kernels take.
        text_config={"model_type": "opt", "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "word_embed_proj_dim": 128, "max_position_embeddings": 128,
                     "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        num_query_tokens=TINY_QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
