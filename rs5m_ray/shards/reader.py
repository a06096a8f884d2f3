"""Fast reader of RS5M shards for training and the model stages.

Gives the tensors of the CLIP eval transform (Resize(S) bicubic on the shorter side,
CenterCrop(S), RGB, ToTensor, Normalize) that RS5M's `dataloader.py` applies, but
cheaper: libjpeg-turbo (simplejpeg) decodes JPEGs straight into an array, at a reduced
DCT scale when that keeps at least twice the target's pixels per side; the resize is
torch's vectorised uint8 antialiased bicubic (PIL's kernel) and the crop a view;
batches stay uint8 in one shared-memory tensor per batch, and `normalize` runs on the
accelerator. Tar members are parsed directly, and shards stream from local disk or S3
through a read-ahead thread.

Tolerance against the reference, in 8-bit levels of the input (asserted in
tests/test_shard_reader.py, measured on PUB11-sized images by benchmarks/shard_throughput.py):
mean under 0.1 over a batch and under 1 for any image; single pixels at hard colour
edges of DCT-reduced images differ by up to ~45 (the decoder rebuilds chroma
differently at reduced scale); embeddings of a random ViT-B/32-shaped tower keep
cosine >= 0.9999. With `draft_margin=None` (full decode) only fixed-point rounding
differs: at most 3 levels.
"""
from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import braceexpand
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rs5m_ray.shards.layout import SHARD_RE
from rs5m_ray.shards.tar_stream import CHUNK, ReadAhead, iter_shard_samples
from rs5m_ray.storage import Storage

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A JPEG is decoded at a reduced DCT scale only while it keeps at least this many
# source pixels per output pixel along each side (so ~7% of PUB11 images, the costliest).
# Lower margins break the tolerance below (1.5: worst image mean 0.96 levels; 1.0: 2.5).
DRAFT_MARGIN = 2.0


def expand_urls(urls: str | Iterable[str], storage: Storage | None = None) -> list[str]:
    """Shard URLs from a brace pattern (`pub11-train-{0000..0031}.tar`), a glob, a
    directory (its files named like RS5M shards), or a list of any of these."""
    storage = storage or Storage()
    if not isinstance(urls, str):
        return [u for spec in urls for u in expand_urls(spec, storage)]
    out: list[str] = []
    for url in braceexpand.braceexpand(urls):
        if any(c in url for c in "*?["):
            out += storage.glob(url)
        elif url.endswith("/"):
            out += [p for p in storage.glob(url + "*.tar") if SHARD_RE.match(os.path.basename(p))]
        else:
            out.append(url)
    return out


# ---------------------------------------------------------------- image preprocessing

def _reference_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """torchvision Resize(size) then CenterCrop(size): resized (w, h) and crop (left, top)."""
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def _decode_rgb(data: bytes, size: int, draft_margin: float | None) -> tuple[np.ndarray, int, int]:
    """HWC uint8 RGB pixels and the image's full (width, height).

    libjpeg-turbo decodes a JPEG straight into an array, at a DCT scale of 1/2 or less
    when that keeps `draft_margin` x the resized image's pixels per side. Anything else,
    and JPEGs it decodes only with warnings, go to PIL like in the reference (which
    accepts warnings but not truncation).
    """
    try:
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        new_w, new_h, _, _ = _reference_geometry(w, h, size)
        reduce = {} if draft_margin is None else {
            "min_width": int(new_w * draft_margin), "min_height": int(new_h * draft_margin), "min_factor": 2}
        return simplejpeg.decode_jpeg(data, "RGB", **reduce), w, h
    except ValueError:
        img = Image.open(io.BytesIO(data))
        return np.array(img if img.mode == "RGB" else img.convert("RGB")), *img.size


def preprocess(data: bytes, size: int = 224, draft_margin: float | None = DRAFT_MARGIN) -> torch.Tensor:
    """Encoded image -> uint8 CHW RGB tensor [3, size, size] of the CLIP eval transform.

    The resize is torch's uint8 antialiased bicubic (PIL's kernel, vectorised); the
    crop is a view. `draft_margin=None` decodes at full size.
    """
    pixels, w, h = _decode_rgb(data, size, draft_margin)
    new_w, new_h, left, top = _reference_geometry(w, h, size)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)  # a channels-last view of the pixels
    resized = F.interpolate(chw[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return resized[0, :, top:top + size, left:left + size]


def preprocess_batch(images: list[bytes], size: int = 224,
                     draft_margin: float | None = DRAFT_MARGIN) -> tuple[torch.Tensor, list[str | None]]:
    """Encoded images (e.g. a table's `jpg` column in a model stage) -> uint8 [N,3,S,S]
    and one error message per image (None when it decoded; its slot is then zeros)."""
    out = torch.zeros((len(images), 3, size, size), dtype=torch.uint8)
    errors: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            out[i] = preprocess(data, size, draft_margin)
        except Exception as e:  # noqa: BLE001 - the caller turns it into a drop reason
            errors[i] = f"{type(e).__name__}: {e}"
    return out, errors


def normalize(images: torch.Tensor, device: str | torch.device = "cpu",
              mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float on `device`: ToTensor + Normalize in one pass there."""
    x = images.to(device, non_blocking=True).to(dtype)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device, dtype=dtype).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device, dtype=dtype).view(1, -1, 1, 1)
    return x.mul_(scale).sub_(shift)


def _shuffled(samples: Iterator, bufsize: int, rng: random.Random, initial: int = 100) -> Iterator:
    """webdataset's shuffle buffer (same semantics as `.shuffle(bufsize)`), seeded."""
    if bufsize <= 1:
        yield from samples
        return
    initial, buf = min(initial, bufsize), []
    for s in samples:
        buf.append(s)
        if len(buf) < bufsize:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    buf[k], buf[-1] = buf[-1], buf[k]
    return buf.pop()


# ---------------------------------------------------------------- the reader

@dataclass
class ReaderStats:
    shards: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def _batch_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """uint8 tensor; `shared` puts it in shared memory, handed to the main process as a
    file descriptor, not copied. Allocated there directly, like default_collate does:
    `share_memory_()` would first copy a private buffer into it."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)


class ShardReader(IterableDataset):
    """Batches `{"image": uint8 [B,3,S,S], "caption", "img_name", "key", "json", "skipped"}`.

    `image` is one preallocated shared-memory buffer that images are resized into (no
    per-sample tensors to stack, no copy when a DataLoader worker hands it over);
    feed it to `normalize`.
    `skipped` counts what was dropped since the previous batch, by reason
    (corrupt_sample, incomplete_sample, bad_shard); summed over batches it is the
    run's total, also across DataLoader workers (whose `stats` stay in their process),
    except skips after a worker's last batch, which only its `stats` and log hold.
    Order is deterministic given (urls, seed, epoch, world_size, DataLoader workers).
    Shards are split over rank x worker; with fewer shards than that, every reader
    reads all shards and keeps every n-th sample so each sample still comes once.
    With a `tokenizer` (captions -> token tensor, e.g. open_clip's), batches also carry
    `text`, tokenised in the loader processes rather than on the training step.
    """

    def __init__(self, urls: str | Iterable[str], storage: Storage | None = None, *, image_size: int = 224,
                 batch_size: int = 256, seed: int = 0, shuffle_buffer: int = 10_000, shuffle_shards: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 draft_margin: float | None = DRAFT_MARGIN, read_ahead_bytes: int = 64 << 20,
                 tokenizer: Callable[[list[str]], torch.Tensor] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.storage = storage or Storage()
        self.urls = expand_urls(urls, self.storage)
        if not self.urls:
            raise ValueError(f"no shards match {urls!r}")
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.epoch = seed, 0
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.draft_margin, self.read_ahead_bytes = draft_margin, read_ahead_bytes
        self.tokenizer = tokenizer
        self.stats = ReaderStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        """(loader processes, this one's index)."""
        info = get_worker_info()
        return (info.num_workers, info.id) if info else (1, 0)

    def _assignment(self) -> tuple[list[str], int, int, int]:
        """This reader's shards, which n-th of every `count` samples it keeps, and its index."""
        workers, worker = self._worker()
        index, count = self.rank * workers + worker, self.world_size * workers
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(urls)
        if len(urls) >= count:
            return urls[index::count], 0, 1, index
        return urls, index, count, index

    def samples(self) -> Iterator[dict[str, bytes]]:
        """Raw samples of this reader's share, after the shuffle buffer."""
        urls, index, count, reader = self._assignment()
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        return _shuffled(self._raw_samples(urls, index, count), self.shuffle_buffer, rng)

    def _raw_samples(self, urls: list[str], index: int, count: int) -> Iterator[dict[str, bytes]]:
        ahead = ReadAhead(urls, self.storage, self.read_ahead_bytes)
        n = 0
        try:
            for url in urls:
                raw = ahead.next_shard()
                self.stats.shards += 1
                error: Exception | None = None
                try:
                    for sample in iter_shard_samples(io.BufferedReader(raw, CHUNK), url):
                        if n % count == index:
                            yield sample
                        n += 1
                except (ValueError, OSError) as e:  # TarFormatError is a ValueError
                    error = e
                raw.drain()
                # A read failure also ends the tar stream early: count it once, and when all
                # readers read every shard (sample split), only in the first of them.
                if (raw.error or error) and index == 0:
                    self._skip("bad_shard", url, raw.error or error)
        finally:
            ahead.close()

    def _skip(self, reason: str, what: str, err: object) -> None:
        self.stats.skipped[reason] += 1
        log.warning("skipping %s (%s): %s", what, reason, err)

    def __iter__(self) -> Iterator[dict]:
        size, bs = self.image_size, self.batch_size
        in_worker = get_worker_info() is not None
        buf = batch = None
        reported: Counter = Counter()
        for sample in self.samples():
            if buf is None:
                buf = _batch_buffer((bs, 3, size, size), shared=in_worker)
                batch = {"caption": [], "img_name": [], "key": [], "json": []}
            if "img_content" not in sample or "caption" not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                self._skip("incomplete_sample", f"{sample['__url__']}:{sample['__key__']}", f"members {members}")
                continue
            try:
                buf[len(batch["key"])] = preprocess(sample["img_content"], size, self.draft_margin)
                caption = sample["caption"].decode("utf-8")
                name = sample["img_name"].decode("utf-8") if "img_name" in sample else sample["__key__"]
            except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
                self._skip("corrupt_sample", f"{sample['__url__']}:{sample['__key__']}", e)
                continue
            batch["caption"].append(caption)
            batch["img_name"].append(name)
            batch["key"].append(sample["__key__"])
            batch["json"].append(sample.get("json", b"").decode("utf-8", "replace"))
            self.stats.samples += 1
            if len(batch["key"]) == bs:
                yield self._emit(buf, batch, reported)
                buf = None
        if buf is not None and batch["key"] and not self.drop_last:
            yield self._emit(buf[: len(batch["key"])], batch, reported)

    def _emit(self, buf: torch.Tensor, batch: dict, reported: Counter) -> dict:
        batch["image"] = buf
        if self.tokenizer:
            batch["text"] = self.tokenizer(batch["caption"])
        batch["skipped"] = dict(self.stats.skipped - reported)
        reported.update(batch["skipped"])
        return batch


def make_loader(reader: ShardReader, num_workers: int = 4, pin_memory: bool = False,
                prefetch_batches: int = 2, start_method: str | None = None) -> DataLoader:
    """A DataLoader running `reader` in `num_workers` processes (batches come whole from the reader).

    `start_method="forkserver"` where the caller runs many threads, as a Ray worker does: a
    child forked while another thread holds a lock can hang forever. None = fork (fastest start).
    """
    context = None
    if num_workers and start_method:
        context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            context.set_forkserver_preload([__name__])  # the server imports torch and the reader once
    return DataLoader(reader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch_batches if num_workers else None,
                      persistent_workers=False, multiprocessing_context=context)
