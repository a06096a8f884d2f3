"""`rs5m train-detector`: train the RS detector and save a versioned checkpoint with its metrics.

Protocol as in the paper (notes §1.5): binary RS vs non-RS, classes balanced in every
split, 7:1:2 train/val/test. Balance is by subsampling the larger class at random
(seeded); the epoch with the best validation loss is kept; accuracy and ROC-AUC are
measured once, on the held-out test split.

Backbones: `clip-head` (default) trains a logistic (hidden=0) or MLP head on the
embeddings of the configured CLIP model; any timm name (e.g. `test_convnext`,
`resnet18`) trains that image classifier from scratch, end to end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from dataclasses import dataclass

import torch
from torch import nn

from rs5m_ray.config import ScoringConfig
from rs5m_ray.eval.detector import metrics
from rs5m_ray.models.clip import load_clip
from rs5m_ray.models.images import open_rgb
from rs5m_ray.stages.rs_detector import DetectorMeta, backbone_transform, build_module, latest_version, save_detector
from rs5m_ray.storage import Storage, join

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass
class Example:
    data: bytes
    label: int


def list_images(root: str, storage: Storage) -> list[str]:
    return [p for p in storage.glob(join(root, "**")) if p.lower().endswith(IMAGE_EXTENSIONS)]


def balanced_splits(positives: list, negatives: list, seed: int) -> dict[str, list[Example]]:
    """Subsample the larger class to the smaller one's size, then split each class 7:1:2."""
    rng = random.Random(seed)
    n = min(len(positives), len(negatives))
    if n < 10:
        raise ValueError(f"need at least 10 readable images per class, got {len(positives)} positives "
                         f"and {len(negatives)} negatives")
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label, items in ((1, positives), (0, negatives)):
        chosen = rng.sample(items, n)
        n_train, n_val = round(n * SPLITS["train"]), round(n * SPLITS["val"])
        for name, part in (("train", chosen[:n_train]), ("val", chosen[n_train:n_train + n_val]),
                           ("test", chosen[n_train + n_val:])):
            splits[name] += [Example(d, label) for d in part]
    return splits


def fit(module: nn.Module, batches, evaluate, epochs: int, lr: float) -> nn.Module:
    """AdamW on BCE; keeps the weights of the epoch with the lowest validation loss."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        module.train()
        for x, y in batches():
            opt.zero_grad()
            loss_fn(module(x).squeeze(-1), y).backward()
            opt.step()
        sched.step()
        val_loss = evaluate()
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in module.state_dict().items()}
        log.info("epoch %d of %d: val_loss %.4f", epoch + 1, epochs, val_loss)
    if best_state is None:
        raise RuntimeError("validation loss was never finite: training diverged (lower --lr)")
    module.load_state_dict(best_state)
    return module.eval()


def train_detector(positives: list[bytes], negatives: list[bytes], backbone: str = "clip-head",
                   clip_cfg: ScoringConfig | None = None, hidden: int = 0, image_size: int = 64,
                   epochs: int | None = None, batch_size: int = 32, lr: float | None = None, seed: int = 2023,
                   storage: Storage | None = None) -> tuple[nn.Module, DetectorMeta]:
    """Train on image bytes; returns the module and its metadata (metrics on the test split)."""
    torch.manual_seed(seed)
    splits = balanced_splits(positives, negatives, seed)
    labels = {k: torch.tensor([e.label for e in v], dtype=torch.float32) for k, v in splits.items()}
    if backbone == "clip-head":
        clip_cfg = clip_cfg or ScoringConfig()
        clip = load_clip(clip_cfg, storage)
        inputs = {k: _embed(clip, [e.data for e in v], clip_cfg.decode_draft) for k, v in splits.items()}
        meta = DetectorMeta("clip_head", {"embed_dim": int(inputs["train"].shape[1]), "hidden": hidden},
                            embedder={"clip_model": clip_cfg.clip_model, "clip_pretrained": clip_cfg.clip_pretrained})
        module = build_module(meta)
        epochs, lr = epochs or 300, lr or 1e-2
        batches = lambda: [(inputs["train"], labels["train"])]  # noqa: E731  full batch: embeddings are tiny
    else:
        meta = DetectorMeta("backbone", {"name": backbone, "image_size": image_size})
        module = build_module(meta)
        images = {k: [open_rgb(e.data, image_size) for e in v] for k, v in splits.items()}
        augment, plain = backbone_transform(image_size, train=True), backbone_transform(image_size)
        inputs = {k: torch.stack([plain(im) for im in v]) for k, v in images.items() if k != "train"}
        epochs, lr = epochs or 30, lr or 2e-3
        batches = lambda: _augmented_batches(images["train"], labels["train"], augment, batch_size)  # noqa: E731
    loss_fn = nn.BCEWithLogitsLoss()

    def val_loss() -> float:
        with torch.no_grad():
            module.eval()
            return float(loss_fn(module(inputs["val"]).squeeze(-1), labels["val"]))

    fit(module, batches, val_loss, epochs, lr)
    with torch.no_grad():
        probs = {k: torch.sigmoid(module(inputs[k]).squeeze(-1)).numpy() for k in ("val", "test")}
    meta.metrics = {"test": metrics(labels["test"].numpy(), probs["test"]),
                    "val": metrics(labels["val"].numpy(), probs["val"])}
    meta.training = {"positives_available": len(positives), "negatives_available": len(negatives),
                     "balance": "subsample the larger class", "split": "7:1:2 per class",
                     "sizes": {k: len(v) for k, v in splits.items()}, "epochs": epochs, "lr": lr, "seed": seed,
                     "selection": "lowest validation loss"}
    return module, meta


def _embed(clip, data: list[bytes], draft: bool, chunk: int = 64) -> torch.Tensor:
    """Embeddings from the same preprocessing the scoring stage uses, so the head sees what it will score."""
    out = []
    for i in range(0, len(data), chunk):
        pixels, errors = clip.decode_images(data[i:i + chunk], draft)
        if any(errors):
            raise ValueError(f"undecodable training image: {next(e for e in errors if e)}")
        out.append(clip.encode_images(pixels))
    return torch.cat(out)


def _augmented_batches(images, labels: torch.Tensor, augment, batch_size: int):
    order = torch.randperm(len(images)).tolist()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield torch.stack([augment(images[j]) for j in idx]), labels[idx]


def read_images(root: str, storage: Storage) -> list[bytes]:
    """Bytes of every readable image below `root` (unreadable ones are logged and skipped)."""
    if not storage.exists(root):
        raise FileNotFoundError(f"folder not found: {root}")
    paths = list_images(root, storage)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) below {root}")
    out = []
    for i, path in enumerate(paths, 1):
        if i % 1000 == 0:
            log.info("%s: read %d of %d images", root, i, len(paths))
        data = storage.read_bytes(path)
        try:
            open_rgb(data, 8)
        except Exception as e:  # a training set may hold a broken file; it must not stop the job
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        out.append(data)
    return out


def ensure_detector(cfg: ScoringConfig, output: str, storage: Storage, per_class: int = 60,
                    seed: int = 2023) -> ScoringConfig:
    """`cfg` with a detector: the configured checkpoint, else (demo) a CLIP head trained now on generated
    aerial scenes vs ground-level photos, saved under <output>/models/rs_detector and reused on reruns."""
    if cfg.detector_checkpoint:
        return cfg
    from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image

    root = join(output, "models", "rs_detector")
    if not latest_version(root, storage):
        rng = random.Random(seed)
        positives = [jpeg(aerial_image(rng, (160, 128))) for _ in range(per_class)]
        negatives = [jpeg(photo_image(rng, (160, 128))) for _ in range(per_class)]
        module, meta = train_detector(positives, negatives, "clip-head", cfg, hidden=64, seed=seed, storage=storage)
        meta.training["data"] = "generated: rs5m_ray.sample.generate aerial_image vs photo_image"
        save_detector(module, meta, root, storage)
    return dataclasses.replace(cfg, detector_checkpoint=root)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positives", required=True, help="folder of RS images (searched recursively)")
    parser.add_argument("--negatives", required=True, help="folder of non-RS images")
    parser.add_argument("--out", required=True, help="checkpoint root; a new version v000N is written under it")
    parser.add_argument("--backbone", default="clip-head",
                        help="clip-head (head on CLIP embeddings) or a timm model name trained from scratch")
    parser.add_argument("--hidden", type=int, default=0, help="clip-head hidden width (0 = logistic regression)")
    parser.add_argument("--clip-model", default=ScoringConfig.clip_model)
    parser.add_argument("--clip-pretrained", default=None, help="tag, path, s3:// or hf-hub: weights")
    parser.add_argument("--image-size", type=int, default=64, help="timm backbone input size")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=2023)


def main(args: argparse.Namespace) -> int:
    """CLI entry: train, save, print the summary (checkpoint path, metrics) as JSON; progress on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(run(args), indent=1))
    return 0


def run(args: argparse.Namespace, storage: Storage | None = None) -> dict:
    storage = storage or Storage()
    positives, negatives = read_images(args.positives, storage), read_images(args.negatives, storage)
    log.info("%d positive and %d negative images readable", len(positives), len(negatives))
    clip_cfg = ScoringConfig(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
    module, meta = train_detector(positives, negatives, args.backbone, clip_cfg, args.hidden, args.image_size,
                                  args.epochs, args.batch_size, args.lr, args.seed, storage)
    path = save_detector(module, meta, args.out, storage)
    return {"checkpoint": path, "kind": meta.kind, "arch": meta.arch, "metrics": meta.metrics,
            "training": meta.training}
