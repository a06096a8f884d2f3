"""Real-data analogue of RS5M's Table I ("pretrained, then adapted"), CPU-cheap.

1. Pretrain the tiny CLIP (rs5m-tiny-vit, random init) from scratch on 15 of AID's 30 classes
   (`aid-train` images, each with a random RSICD caption of its class; RSICD's 30 classes are AID's).
2. Adapt it to the other 15 classes with full fine-tuning, LoRA, Pfeiffer, prefix tuning and
   UniPELT (rs5m_ray.models.peft, AdapterHub defaults), same steps and data for each.
3. Zero-shot top-1 on the `aid-dev` images of the 15 new classes (chance 1/15 = 6.7%), RS5M's
   protocol (rs5m_ray.eval), before and after each, with trainable-parameter counts.
Training runs `rs5m_ray.train.georsclip.Worker.train_step` and its data stream in this process
(the step `rs5m train-clip` runs in each Ray Train worker), one loader process.

    .venv/bin/python benchmarks/peft_aid.py --data ../shared/data --out /tmp/peft-aid
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch

from rs5m_ray.config import TrainConfig, load_config
from rs5m_ray.eval.api import clip_of, evaluate
from rs5m_ray.eval.datasets import class_matched_captions, read_image_folder
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.train.georsclip import Worker

METHODS = ("full", "lora", "pfeiffer", "prefix", "unipelt")


def write_shards(out: Path, image_root: Path, classes: list[str], captions: dict, shards: int, seed: int) -> int:
    rng = random.Random(seed)
    samples = [(c, p) for c in classes for p in sorted((image_root / c).glob("*.jpg"))]
    rng.shuffle(samples)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = []
        for i, (cls, path) in enumerate(samples[s::shards]):
            caption = rng.choice(rng.choice(captions[cls]))
            members += sample_members(f"aid_{cls}_{path.stem}", path.read_bytes(), caption, {})
        (out / shard_name("aid", "train", s)).write_bytes(tar_bytes(members))
    return len(samples)


def train(cfg: TrainConfig) -> tuple[torch.nn.Module, Worker, float]:
    worker = Worker(cfg, 0, 1, torch.device("cpu"))
    batches = worker.stream()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    while worker.step < worker.total_steps:
        worker.train_step(batches, generator)
    del batches
    return worker.model, worker, time.perf_counter() - start


def zero_shot(model, worker: Worker, folder: Path) -> float:
    clip = clip_of(model, worker.tokenizer, device="cpu")
    return evaluate(clip, read_image_folder(str(folder)))["metrics"]["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--adapt-epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out)
    classes = sorted(p.name for p in (data / "aid-train").iterdir() if p.is_dir())
    base, new = classes[0::2], classes[1::2]
    captions = class_matched_captions(classes, str(data / "captions" / "rsicd"))
    n_base = write_shards(out / "base", data / "aid-train", base, captions, 2, seed=0)
    n_new = write_shards(out / "new", data / "aid-train", new, captions, 2, seed=1)
    dev_new = out / "aid-dev-new"  # the dev images of the new classes only: 15-way zero-shot
    for c in new:
        shutil.copytree(data / "aid-dev" / c, dev_new / c, dirs_exist_ok=True)
    common = {"clip_model": "rs5m-tiny-vit", "batch_size": 64, "weight_decay": 0.1, "precision": "fp32",
              "cpus_per_worker": 1, "loader_workers": 1, "shuffle_buffer": 500, "augment": True, "seed": 0}
    pre_cfg = load_config(overrides=common | {"train_shards": [str(out / "base") + "/"], "samples_per_epoch": n_base,
                                              "epochs": args.pretrain_epochs, "lr": 1e-3, "warmup_steps": 20},
                          cls=TrainConfig)
    pretrained = out / "pretrained.pt"
    if pretrained.exists():  # a rerun into the same --out adapts the same pretrained model
        pre_cfg = dataclasses.replace(pre_cfg, clip_pretrained=str(pretrained), epochs=1)
        worker, seconds = Worker(pre_cfg, 0, 1, torch.device("cpu")), 0.0
        model = worker.model
    else:
        model, worker, seconds = train(pre_cfg)
        torch.save(model.state_dict(), pretrained)
    rows = [{"model": "pretrained on 15 base classes (before adapting)", "trainable_params": 0,
             "new_class_top1": zero_shot(model, worker, dev_new), "train_seconds": round(seconds)}]
    print(rows[-1], flush=True)
    for method in METHODS:
        cfg = load_config(overrides=common | {
            "train_shards": [str(out / "new") + "/"], "samples_per_epoch": n_new, "epochs": args.adapt_epochs,
            "clip_pretrained": str(pretrained), "peft": "none" if method == "full" else method,
            "lr": 1e-4 if method == "full" else 1e-3, "warmup_steps": 10, "weight_decay": 0.0 if method != "full" else 0.1},
            cls=TrainConfig)
        model, worker, seconds = train(cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"model": method, "trainable_params": trainable,
                     "new_class_top1": zero_shot(model, worker, dev_new), "train_seconds": round(seconds)})
        print(rows[-1], flush=True)
    print(json.dumps({"base_classes": base, "new_classes": new, "base_samples": n_base, "new_samples": n_new,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
