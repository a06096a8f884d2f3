"""The RS detector c_i = P(RS | image), and its versioned checkpoints.

Two kinds (notes §1.5; the paper fine-tuned a ViTAE classifier, whose weights are not public):
- `clip_head` (default): logistic regression or a small MLP on the CLIP image embedding
  that the scoring pass computes anyway, so c_i costs no extra image forward.
- `backbone`: a timm image classifier (any timm name) with its own preprocessing, run on the
  same decoded image.

A checkpoint is a directory `<out>/v0001/` holding `detector.safetensors` and
`metadata.json` (kind, architecture, embedder, metrics, training protocol). The metadata
is written last, so a version without it is incomplete and ignored; `load_detector(<out>)`
picks the newest complete version.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision import transforms

from rs5m_ray.storage import Storage, join

WEIGHTS_FILE = "detector.safetensors"
META_FILE = "metadata.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("clip_head", "backbone")


@dataclass
class DetectorMeta:
    kind: str  # clip_head | backbone
    arch: dict  # clip_head: embed_dim, hidden (0 = logistic); backbone: name, image_size
    embedder: dict | None = None  # clip_head: the CLIP model whose embeddings it reads
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    version: int = 0
    created: str = ""


def build_module(meta: DetectorMeta) -> nn.Module:
    """The untrained network described by `meta` (one logit out)."""
    if meta.kind == "clip_head":
        dim, hidden = meta.arch["embed_dim"], meta.arch.get("hidden", 0)
        if not hidden:
            return nn.Linear(dim, 1)
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))
    if meta.kind == "backbone":
        import timm

        return timm.create_model(meta.arch["name"], pretrained=False, num_classes=1)
    raise ValueError(f"unknown detector kind {meta.kind!r}; expected one of {KINDS}")


def backbone_transform(image_size: int, train: bool = False) -> transforms.Compose:
    if train:
        resize = [transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip(),
                  transforms.RandomVerticalFlip()]
    else:
        resize = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class RSDetector:
    """A loaded detector: probabilities from CLIP embeddings or from pixels, by kind."""

    def __init__(self, module: nn.Module, meta: DetectorMeta, device: torch.device | str = "cpu"):
        self.meta = meta
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.preprocess = backbone_transform(meta.arch["image_size"]) if meta.kind == "backbone" else None

    @property
    def kind(self) -> str:
        return self.meta.kind

    def check_embedder(self, clip_model: str, clip_pretrained: str | None, embed_dim: int) -> None:
        """A head only means something on the embeddings it was trained on."""
        want = self.meta.embedder or {}
        have = {"clip_model": clip_model, "clip_pretrained": clip_pretrained}
        if {k: want.get(k) for k in have} != have or self.meta.arch["embed_dim"] != embed_dim:
            raise ValueError(f"detector v{self.meta.version} was trained on {want} embeddings "
                             f"(dim {self.meta.arch['embed_dim']}), not on {have} (dim {embed_dim})")

    @torch.inference_mode()
    def probs(self, inputs: torch.Tensor) -> torch.Tensor:
        """P(RS) for a batch of CLIP embeddings (clip_head) or preprocessed images (backbone)."""
        return torch.sigmoid(self.module(inputs.to(self.device)).float().squeeze(-1)).cpu()


def save_detector(module: nn.Module, meta: DetectorMeta, out: str, storage: Storage) -> str:
    """Write the next version under `out`; returns its directory."""
    from safetensors.torch import save

    meta.version = latest_version(out, storage) + 1
    meta.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = join(out, f"v{meta.version:04d}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    storage.write_atomic(join(path, WEIGHTS_FILE), save(tensors))
    storage.write_atomic(join(path, META_FILE), json.dumps(asdict(meta), indent=1).encode())
    return path


def latest_version(out: str, storage: Storage) -> int:
    found = [re.search(r"v(\d+)[/\\]" + META_FILE + "$", p) for p in storage.glob(join(out, "v*", META_FILE))]
    return max((int(m.group(1)) for m in found if m), default=0)


def load_detector(path: str, storage: Storage | None = None, device: torch.device | str = "cpu") -> RSDetector:
    """A version directory, or a checkpoint root (its newest complete version)."""
    from safetensors.torch import load

    storage = storage or Storage()
    if not storage.exists(join(path, META_FILE)):
        version = latest_version(path, storage)
        if not version:
            raise FileNotFoundError(f"no detector checkpoint (…/{META_FILE}) under {path}")
        path = join(path, f"v{version:04d}")
    meta = DetectorMeta(**json.loads(storage.read_bytes(join(path, META_FILE))))
    module = build_module(meta)
    module.load_state_dict(load(storage.read_bytes(join(path, WEIGHTS_FILE))))
    return RSDetector(module, meta, device)
