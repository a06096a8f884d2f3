"""`rs5m train-clip`: GeoRSCLIP, open_clip fine-tuned on RS5M shards with Ray Train (DDP).

Each Ray Train worker reads its share of the shards with `ShardReader` (rank x loader
process split, seeded shuffle) in `cpus_per_worker` loader processes, normalises on its
device and trains with the symmetric InfoNCE loss over the global batch (features
gathered from every worker, as open_clip does). Full fine-tuning of both towers, or
frozen CLIP + LoRA (`peft: lora`).

An epoch is `samples_per_epoch // batch_size` steps on every worker, so all workers step
together however the shards divide; a worker whose share runs out starts it again with a
new shuffle (webdataset's `with_epoch` over resampled shards does the same). Every epoch
ends with a checkpoint `<output>/<name>/checkpoint_*/`: `model.pt` is a plain open_clip
state dict (LoRA merged in) that `scoring.clip_pretrained` and `load_clip` read;
`train_state.pt` holds what resuming needs. A failed worker restarts the run from the latest
checkpoint; so does rerunning the same config.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss

from rs5m_ray.config import ConfigError, ScoringConfig, TrainConfig, from_dict, to_dict
from rs5m_ray.models.clip import load_clip
from rs5m_ray.shards.reader import ShardReader, expand_urls, make_loader, normalize
from rs5m_ray.shards.writer import manifest_path
from rs5m_ray.storage import Storage, is_local
from rs5m_ray.train.lora import DEFAULT_TARGETS, add_lora, lora_state_dict, merged_state_dict

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp of the learned temperature
# Loader processes of a Ray Train worker start from a fork server: forking the worker itself,
# with its many threads, can deadlock the child (seen here: a validation loader hung forever).
LOADER_START = "forkserver"
PASSES_PER_EPOCH = 1_000_000  # shuffle seeds: epoch e reads passes e * this, e * this + 1, ...


def check(cfg: TrainConfig) -> None:
    if not cfg.train_shards:
        raise ConfigError("train_shards: no shards given")
    if cfg.peft not in ("none", "lora"):
        raise ConfigError(f"peft: expected none or lora, got {cfg.peft!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision: expected auto, fp32 or bf16, got {cfg.precision!r}")
    if cfg.num_workers < 1 or cfg.batch_size % cfg.num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} must split evenly over num_workers {cfg.num_workers}")
    if cfg.epochs < 1 or cfg.cpus_per_worker < 1:
        raise ConfigError("epochs and cpus_per_worker must be >= 1")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with relative local paths made absolute: Ray Train workers run in another directory."""
    def absolute(path: str) -> str:
        if not is_local(path):
            return path
        # A trailing "/" means "the shards in this directory": keep it.
        return os.path.join(os.path.abspath(path), "") if path.endswith("/") else os.path.abspath(path)

    pretrained = cfg.clip_pretrained
    if pretrained and os.path.exists(pretrained):  # else a tag, s3:// or hf-hub: name
        pretrained = os.path.abspath(pretrained)
    return dataclasses.replace(cfg, output=absolute(cfg.output), clip_pretrained=pretrained,
                               train_shards=[absolute(u) for u in cfg.train_shards],
                               val_shards=[absolute(u) for u in cfg.val_shards])


def samples_per_epoch(cfg: TrainConfig, storage: Storage) -> int:
    """The configured count, else the sum of the train shards' manifests."""
    if cfg.samples_per_epoch:
        return cfg.samples_per_epoch
    urls = expand_urls(cfg.train_shards, storage)
    if not urls:
        raise ConfigError(f"train_shards: no shards match {cfg.train_shards}")
    total = 0
    for url in urls:
        manifest = manifest_path(*url.rsplit("/", 1))
        if not storage.exists(manifest):
            raise ConfigError(f"{url} has no manifest ({manifest}); set samples_per_epoch")
        total += json.loads(storage.read_bytes(manifest))["count"]
    return total


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def flips_and_rotations(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of [B,C,H,W] (square) under one of the 8 symmetries of the square, at random."""
    code = torch.randint(0, 8, (images.shape[0],), generator=generator).to(images.device)
    out = torch.empty_like(images)
    for c in range(8):
        chosen = code == c
        group = images[chosen].flip(-1) if c >= 4 else images[chosen]
        out[chosen] = torch.rot90(group, c % 4, (-2, -1))
    return out


def endless_batches(reader: ShardReader, loader_workers: int, first_pass: int, pin_memory: bool) -> Iterator[dict]:
    """The reader's batches, pass after pass (each pass reshuffled)."""
    for n in itertools.count(first_pass):
        reader.set_epoch(n)
        empty = True
        for batch in make_loader(reader, loader_workers, pin_memory, start_method=LOADER_START):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"the shards hold less than one batch of {reader.batch_size} per loader process "
                             f"(rank {reader.rank}); lower batch_size or cpus_per_worker")


class Worker:
    """One Ray Train worker's model, optimiser and data."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        import ray.train.torch

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.storage = Storage(cfg.storage)
        clip = load_clip(ScoringConfig(clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                                       weights_cache_dir=cfg.weights_cache_dir, strict_weights=cfg.strict_weights,
                                       device=str(device), precision="fp32"), self.storage)
        if clip.eval_transform is None:
            raise ConfigError(f"{cfg.clip_model}: its preprocessing is not the resize + centre crop the shard "
                              "reader produces")
        self.image_size, self.mean, self.std = clip.eval_transform
        self.tokenizer, self.model = clip.tokenizer, clip.model
        if cfg.peft == "lora":
            add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets or DEFAULT_TARGETS))
        self.model.train()
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.steps_per_epoch = cfg.samples_per_epoch // cfg.batch_size  # run() sets samples_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, cfg.warmup_steps, total))
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        self.local_loss = ClipLoss()  # validation: each worker's batches on their own
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=self._amp())
        self.epoch = 0

    def _amp(self) -> bool:
        return self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")

    def _reader(self, shards: list[str], train: bool) -> ShardReader:
        return ShardReader(shards, self.storage, image_size=self.image_size,
                           batch_size=self.cfg.batch_size // self.world_size, seed=self.cfg.seed,
                           shuffle_buffer=self.cfg.shuffle_buffer if train else 0, shuffle_shards=train,
                           rank=self.rank, world_size=self.world_size, drop_last=train, tokenizer=self.tokenizer)

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(batch["image"], self.device, self.mean, self.std)
        return images, batch["text"].to(self.device, non_blocking=True)

    def train_epoch(self) -> dict[str, float]:
        """One epoch; its mean loss, throughput, and the share of time spent waiting for batches."""
        batches = endless_batches(self._reader(self.cfg.train_shards, train=True), self.cfg.cpus_per_worker,
                                  self.epoch * PASSES_PER_EPOCH, pin_memory=self.device.type == "cuda")
        augment = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 1_009 + self.rank)
        loss_sum = wait = 0.0
        start = time.perf_counter()
        for _ in range(self.steps_per_epoch):
            fetch = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - fetch
            images, texts = self._inputs(batch)
            if self.cfg.augment:
                images = flips_and_rotations(images, augment)
            with self.autocast:
                image_features, text_features, logit_scale = self.ddp(images, texts)
                loss = self.loss(image_features, text_features, logit_scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            loss_sum += loss.item()  # also waits for the device, so `wait` is time the step did not run
        seconds = time.perf_counter() - start
        batches.close()
        self.epoch += 1
        return {"train_loss": self._mean(loss_sum, self.steps_per_epoch),
                "samples_per_second": self.steps_per_epoch * self.cfg.batch_size / seconds,
                "data_wait_fraction": self._mean(wait, seconds)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean InfoNCE loss and in-batch top-1 accuracy both ways (batches of batch_size / workers)
        over every val sample, each read by one worker."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, image->text hits, text->image hits, n
        val = self._reader(self.cfg.val_shards, train=False)
        for batch in make_loader(val, self.cfg.cpus_per_worker, start_method=LOADER_START):
            images, texts = self._inputs(batch)
            with self.autocast:
                image_features, text_features, logit_scale = self.model(images, texts)
            loss = self.local_loss(image_features.float(), text_features.float(), logit_scale.float())
            logits = image_features @ text_features.T
            target = torch.arange(len(logits), device=logits.device)
            sums += torch.tensor([loss.item() * len(logits), (logits.argmax(1) == target).sum().item(),
                                  (logits.argmax(0) == target).sum().item(), len(logits)], dtype=torch.float64)
        self.model.train()
        if self.world_size > 1:
            dist.all_reduce(sums)
        n = max(sums[3].item(), 1.0)
        return {"val_loss": sums[0].item() / n, "val_image_to_text_top1": sums[1].item() / n,
                "val_text_to_image_top1": sums[2].item() / n, "val_samples": int(sums[3].item())}

    def _mean(self, value: float, count: float) -> float:
        total = torch.tensor([value, count], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def save(self, directory: Path) -> None:
        torch.save(merged_state_dict(self.model), directory / "model.pt")
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        state["weights"] = lora_state_dict(self.model) if self.cfg.peft == "lora" else None
        torch.save(state, directory / "train_state.pt")
        settings = {k: v for k, v in to_dict(self.cfg).items() if k != "storage"}  # no credentials
        (directory / "train_config.json").write_text(json.dumps(settings, indent=1))

    def restore(self, directory: Path) -> None:
        state = torch.load(directory / "train_state.pt", map_location=self.device, weights_only=True)
        weights = state["weights"] or torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        # LoRA state holds only the factors: the frozen base comes from clip_pretrained, as at the start.
        unexpected = self.model.load_state_dict(weights, strict=state["weights"] is None).unexpected_keys
        if unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config)
    context = ray.train.get_context()
    worker = Worker(cfg, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            worker.restore(Path(directory))
    while worker.epoch < cfg.epochs:
        metrics = worker.train_epoch()
        metrics |= {"epoch": worker.epoch, "lr": worker.scheduler.get_last_lr()[0],
                    "steps": worker.epoch * worker.steps_per_epoch}
        if cfg.val_shards:
            metrics |= worker.validate()
        with tempfile.TemporaryDirectory() as directory:
            if worker.rank == 0:
                worker.save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory)
                             if worker.rank == 0 else None)


def run(cfg: TrainConfig) -> dict:
    """Fine-tune on the Ray cluster of `cfg.ray`; the last epoch's metrics and checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rs5m_ray.ray_runtime import init_ray

    check(cfg)
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage)
    cfg = dataclasses.replace(cfg, samples_per_epoch=samples_per_epoch(cfg, storage))  # read once, here
    if cfg.samples_per_epoch < cfg.batch_size:
        raise ConfigError(f"an epoch of {cfg.samples_per_epoch} samples is less than one batch "
                          f"of {cfg.batch_size}")
    init_ray(cfg.ray)
    filesystem, path = (None, cfg.output) if is_local(cfg.output) else storage.arrow_fs(cfg.output)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    result = trainer.fit()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
