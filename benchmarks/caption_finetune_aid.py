"""Real-data check of the captioner: fine-tune the tiny BLIP-2 on AID images paired with
class-matched RSICD captions (RSICD's 30 classes are AID's 30), and report the caption loss on
held-out pairs before and after, plus candidates before and after ranking for a few held-out images.

Pairs are class-level: an AID image of class c with a random RSICD caption of class c (RSICD
captions describe other images of that class). Held out: every 10th AID image of each class with
every 10th RSICD caption of that class, neither seen in training. The tokenizer is a byte-level BPE
trained on the RSICD training captions. The rankers are the tiny random CLIP test models: their
ordering is noise, so only the captioner's candidates carry information here.

Usage: python benchmarks/caption_finetune_aid.py --out /tmp/aid-captioner [--steps 300]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from rs5m_ray.config import CaptionConfig, CaptionRankConfig
from rs5m_ray.models.captioner import load_captioner, tiny_captioner_dir
from rs5m_ray.stages.caption import CaptionStage
from rs5m_ray.train.captioner import caption_loss, finetune

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rsicd_by_class(root: Path) -> dict[str, list[str]]:
    names = (root / "train_filename.txt").read_text().split()
    caps = (root / "train_caps.txt").read_text().splitlines()
    out = defaultdict(list)
    for k, name in enumerate(names):
        cls = name.rsplit("_", 1)[0] if "_" in name else None
        if cls:
            out[cls] += [c.strip() for c in caps[5 * k:5 * k + 5] if c.strip()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per-class", type=int, default=60, help="training images per class")
    ap.add_argument("--show", type=int, default=3, help="held-out images whose candidates are shown")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    captions = rsicd_by_class(SHARED / "captions" / "rsicd")
    train, held = [], []
    for folder in sorted((SHARED / "aid-train").iterdir()):
        cls = folder.name.lower()
        files = sorted(folder.glob("*.jpg"))
        held_files = files[::10][:6]
        train_files = [f for f in files if f not in held_files][:args.per_class]
        caps = captions[cls]
        held_caps, train_caps = caps[::10], [c for i, c in enumerate(caps) if i % 10]
        train += [(Image.open(f).convert("RGB"), cls, train_caps) for f in train_files]
        held += [(Image.open(f).convert("RGB"), cls, held_caps, f.name) for f in held_files]
    rng = random.Random(0)
    held_pairs = [(img, rng.choice(caps)) for img, _, caps, _ in held]
    corpus = [c for _, _, caps in train[::args.per_class] for c in caps]
    base_dir = tiny_captioner_dir(str(out / "cache"), corpus)
    cap = load_captioner(CaptionConfig(model=base_dir, device="cpu"))

    def sample(r: random.Random, n: int):
        return [(img, r.choice(caps)) for img, _, caps in r.sample(train, n)]

    before = caption_loss(cap, held_pairs)
    start = time.perf_counter()
    losses = finetune(cap, sample, args.steps, args.batch_size, args.lr)
    seconds = time.perf_counter() - start
    after = caption_loss(cap, held_pairs)
    tuned_dir = out / "finetuned"
    cap.model.save_pretrained(tuned_dir)
    cap.processor.save_pretrained(tuned_dir)

    shown = [held[i] for i in range(0, len(held), max(1, len(held) // args.show))][:args.show]
    table = pa.table({"sample_id": [f"aid_{name}" for *_, name in shown], "source": ["aid"] * len(shown),
                      "jpg": pa.array([jpeg_bytes(img) for img, *_ in shown], pa.binary())})
    examples = {}
    for label, model in (("random_init", base_dir), ("finetuned", str(tuned_dir))):
        stage = CaptionStage(CaptionConfig(model=model, device="cpu", max_new_tokens=30), CaptionRankConfig())
        rows = stage(table).to_pylist()
        examples[label] = [{"image": name, "class": cls, "candidates_first_5_of_20": r["caption_candidates"][:5],
                            "top_caption": r["top_caption"], "rotation_invariant_caption": r["rotation_invariant_caption"],
                            "caption": r["caption"]} for r, (_, cls, _, name) in zip(rows, shown)]
    result = {"train_pairs_images": len(train), "held_out_pairs": len(held_pairs), "steps": args.steps,
              "batch_size": args.batch_size, "train_seconds": round(seconds, 1),
              "held_out_caption_loss": {"before": round(before, 3), "after": round(after, 3)},
              "train_loss_first_last_10": [round(sum(losses[:10]) / 10, 3), round(sum(losses[-10:]) / 10, 3)],
              "captioner": "rs5m-tiny-blip2 architecture, BPE on RSICD train captions",
              "rankers": "tiny random CLIP test models (ordering is noise)", "examples": examples}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


if __name__ == "__main__":
    main()
