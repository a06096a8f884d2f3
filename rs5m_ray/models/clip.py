"""open_clip models by name, with weights from a tag, a path, S3 or the hub cache.

`load_clip(cfg)` is the one entry point: the architecture comes from open_clip's
registry (plus the tiny test configs in `configs/`, registered here), device and
dtype from config (fp16/bf16 on GPU, fp32 on CPU), optional channels-last and
torch.compile for the image tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from PIL import Image

from rs5m_ray.config import ScoringConfig
from rs5m_ray.models.images import open_rgb
from rs5m_ray.models.peft import method_of
from rs5m_ray.models.weights import LoadReport, load_weights, read_checkpoint, resolve_weights
from rs5m_ray.shards.reader import DRAFT_MARGIN, normalize, preprocess_batch
from rs5m_ray.storage import Storage

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_configs() -> None:
    """Make the tiny test architectures known to open_clip (idempotent; needed in every worker)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: expected auto, fp32, fp16 or bf16")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 inference is not supported on CPU; use fp32 or bf16")
    return precision


def is_open_clip_tag(model_name: str, pretrained: str | None) -> bool:
    return bool(pretrained) and pretrained in open_clip.list_pretrained_tags_by_model(model_name)


@dataclass
class ClipModel:
    """A loaded CLIP model and what it takes to feed it."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable
    device: torch.device
    dtype: torch.dtype
    channels_last: bool = False
    weights_report: LoadReport | None = None

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return max(size) if isinstance(size, (tuple, list)) else int(size)

    @property
    def eval_transform(self) -> tuple[int, tuple[float, ...], tuple[float, ...]] | None:
        """(size, mean, std) when `preprocess` is open_clip's standard eval transform (bicubic
        resize of the shorter side, square centre crop, normalise), which the shard reader
        reproduces faster (`decode_images`); else None."""
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size")
        sides = (size, size) if isinstance(size, int) else tuple(size or ())
        square = len(sides) == 2 and sides[0] == sides[1]
        if not square or cfg.get("interpolation") != "bicubic" or cfg.get("resize_mode") != "shortest":
            return None
        return int(sides[0]), tuple(cfg["mean"]), tuple(cfg["std"])

    def decode_images(self, data: list[bytes], draft: bool = True) -> tuple[torch.Tensor, list[str | None]]:
        """Model input of the images that decoded, in order, and one error per image (None = decoded).

        With the standard eval transform: the shard reader's fast path, uint8 pixels that
        `encode_images` normalises on the model's device; else PIL and `preprocess`.
        `draft` lets libjpeg decode large JPEGs at a reduced scale.
        """
        if self.eval_transform:
            pixels, errors = preprocess_batch(data, self.eval_transform[0], DRAFT_MARGIN if draft else None)
            return (pixels[[i for i, e in enumerate(errors) if e is None]] if any(errors) else pixels), errors
        decoded, errors = [], []
        for d in data:
            try:
                decoded.append(self.preprocess(open_rgb(d, self.image_size, draft)))
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - untrusted bytes: the caller records the error
                errors.append(f"{type(e).__name__}: {e}")
        return (torch.stack(decoded) if decoded else torch.empty(0, 3, self.image_size, self.image_size)), errors

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings on CPU, of normalised pixels or `decode_images`' uint8."""
        if pixels.dtype == torch.uint8:
            _, mean, std = self.eval_transform
            pixels = normalize(pixels, self.device, mean, std, self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = pixels.to(self.device, self.dtype, non_blocking=True, memory_format=fmt)
        return self._encode_image(x).float().cpu()

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=True)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize).float().cpu()


def load_clip(cfg: ScoringConfig, storage: Storage | None = None) -> ClipModel:
    """The configured model with its weights, in eval mode on the configured device."""
    register_configs()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    tag = cfg.clip_pretrained if is_open_clip_tag(cfg.clip_model, cfg.clip_pretrained) else None
    # A fixed seed for the initialisation: a model without pretrained weights (tests, demo) must
    # score the same on every actor and every rerun, or resumed runs would disagree with themselves.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=tag, precision=precision, device=device, cache_dir=cfg.weights_cache_dir)
    report = None
    if cfg.clip_pretrained and tag is None:
        path = resolve_weights(cfg.clip_pretrained, storage, cfg.weights_cache_dir)
        state_dict, adapter = read_checkpoint(path)
        if adapter:  # an unmergeable PEFT model (prefix, Pfeiffer, UniPELT): add its modules first
            method_of(adapter).apply(model)
        report = load_weights(model, state_dict, cfg.clip_pretrained, cfg.strict_weights)
    model.eval()
    if cfg.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    clip = ClipModel(cfg.clip_model, model, preprocess, open_clip.get_tokenizer(cfg.clip_model), device,
                     DTYPES[precision], cfg.channels_last, report)
    if cfg.compile:
        clip._encode_image = torch.compile(clip._encode_image, dynamic=True)
    return clip
