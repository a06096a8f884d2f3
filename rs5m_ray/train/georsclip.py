"""`rs5m train-clip`: GeoRSCLIP, open_clip fine-tuned on RS5M shards with Ray Train (DDP).

Each Ray Train worker reads its share of the shards (rank x loader process split, seeded
shuffle) through one endless, resumable stream (`train/stream.py`) in `loader_workers`
processes started once per run, normalises on its device and trains with the symmetric
InfoNCE loss over the global batch (features gathered from every worker, as open_clip does).
Full fine-tuning, optionally with a frozen tower, or frozen CLIP + a PEFT method
(`rs5m_ray.models.peft`: lora, pfeiffer, prefix, unipelt).

An epoch is `samples_per_epoch // (batch_size * grad_accumulation)` optimizer steps on every
worker, so all workers step together however the shards divide; a loader whose share runs out
starts it again with a new shuffle. A checkpoint `<output>/<name>/checkpoint_*/` is written every
`checkpoint_every_steps` steps and at each epoch end: `model.pt` is a plain open_clip state dict
(LoRA merged in), or for an unmergeable method the adapted model with its PEFT metadata, both
read by `load_clip`; `train_state.pt` holds the optimiser, schedule, step, and every loader's
position in its shuffled stream, so a restart (a failed worker, or the same config rerun)
continues at the next unseen sample: none repeated, none skipped.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss

from rs5m_ray.config import ConfigError, ScoringConfig, TrainConfig, check_bounds, from_dict, to_dict
from rs5m_ray.models import peft
from rs5m_ray.models.clip import load_clip
from rs5m_ray.plots import png_bytes, pyplot
from rs5m_ray.shards.reader import CLIP_MEAN, CLIP_STD, ShardReader, expand_urls, make_loader, normalize
from rs5m_ray.storage import Storage, is_local, join
from rs5m_ray.train.stream import ResumableShardStream

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp of the learned temperature
# Loader processes of a Ray Train worker start from a fork server: forking the worker itself,
# with its many threads, can deadlock the child (seen here: a validation loader hung forever).
LOADER_START = "forkserver"
# Normalisation presets of RS5M's inference_tool.get_preprocess (notes §4.4): (mean, std).
NORMALIZATIONS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "rs5m": ((0.406, 0.423, 0.390), (0.188, 0.175, 0.185)),
    "pub11": ((0.445, 0.469, 0.441), (0.208, 0.193, 0.213)),  # the paper's Table IV "RS5M" row
    "rs3": ((0.350, 0.356, 0.316), (0.158, 0.147, 0.143)),
    "geometa": ((0.320, 0.322, 0.285), (0.179, 0.168, 0.166)),
}
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_second", "samples_per_second_per_worker",
                  "data_wait_fraction", "step_seconds", "data_wait_seconds", "max_memory_gb")


def check(cfg: TrainConfig) -> None:
    if not cfg.train_shards:
        raise ConfigError("train_shards: no shards given")
    check_bounds(cfg)
    if cfg.peft != "none":
        peft_method(cfg)  # unknown options fail here, before Ray starts
    if cfg.audit_log and not is_local(cfg.output):
        raise ConfigError("audit_log: needs a local output")
    if cfg.freeze_image_tower and cfg.freeze_text_tower and cfg.peft == "none":
        raise ConfigError("freeze_image_tower and freeze_text_tower: nothing left to train")


def peft_method(cfg: TrainConfig) -> peft.PeftMethod:
    options = {"lora": {"r": cfg.lora_rank, "alpha": cfg.lora_alpha,
                        "attn_matrices": tuple(cfg.lora_matrices) if cfg.lora_matrices else None},
               "pfeiffer": {"reduction_factor": cfg.reduction_factor},
               "prefix": {"prefix_length": cfg.prefix_length},
               "unipelt": {"r": cfg.lora_rank, "alpha": cfg.lora_alpha, "reduction_factor": cfg.reduction_factor,
                           "prefix_length": cfg.prefix_length}}[cfg.peft]
    try:
        return peft.get_method(cfg.peft, **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def loader_workers(cfg: TrainConfig) -> int:
    """Loader processes per worker: one core of the reservation stays with the training step."""
    return cfg.loader_workers or max(1, cfg.cpus_per_worker - 1)


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
                               val_shards=[absolute(u) for u in cfg.val_shards],
                               eval_image_folders=[absolute(u) for u in cfg.eval_image_folders])


def samples_per_epoch(cfg: TrainConfig, storage: Storage) -> int:
    """The configured count, else the sum of the train shards' manifests."""
    from rs5m_ray.shards.writer import manifest_path  # the writer needs Ray; the training step does not

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


def freeze_towers(model: torch.nn.Module, image: bool, text: bool) -> None:
    """Table VI's ablations: the image tower is `visual.*`, the text tower every other weight
    but the temperature."""
    for name, p in model.named_parameters():
        in_image = name.startswith("visual.")
        if (image and in_image) or (text and not in_image and name != "logit_scale"):
            p.requires_grad_(False)


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


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def fingerprint(model: torch.nn.Module) -> float:
    """A number every replica of the same weights gives alike (the audit log's replica check)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


class Worker:
    """One Ray Train worker's model, optimiser, data stream and metrics."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model):
        """`wrap` makes the distributed model (Ray Train's prepare_model: DDP over the group)."""
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        if device.type == "cpu":
            # The step gets the whole reservation: the loaders mostly wait on a full prefetch queue.
            torch.set_num_threads(cfg.cpus_per_worker)
        self.storage = Storage(cfg.storage)
        clip = load_clip(ScoringConfig(clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                                       weights_cache_dir=cfg.weights_cache_dir, strict_weights=cfg.strict_weights,
                                       device=str(device), precision="fp32"), self.storage)
        if clip.eval_transform is None:
            raise ConfigError(f"{cfg.clip_model}: its preprocessing is not the resize + centre crop the shard "
                              "reader produces")
        self.image_size, self.mean, self.std = clip.eval_transform
        if cfg.normalization != "model":
            self.mean, self.std = NORMALIZATIONS[cfg.normalization]
        self.tokenizer, self.model = clip.tokenizer, clip.model
        self.method = peft_method(cfg) if cfg.peft != "none" else None
        if self.method:
            self.method.apply(self.model)
        freeze_towers(self.model, cfg.freeze_image_tower, cfg.freeze_text_tower)
        self.model.train()
        self.ddp = wrap(self.model)
        # Fused AdamW: one pass over parameters and states instead of several (CPU and GPU).
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, fused=True)
        self.batches_per_epoch = cfg.samples_per_epoch // cfg.batch_size  # run() sets samples_per_epoch
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accumulation
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, cfg.warmup_steps, self.total_steps))
        self.dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        self.local_loss = ClipLoss()  # validation: each worker's batches on their own
        self.loaders = loader_workers(cfg)
        self.step = 0  # optimizer steps done
        self.positions: dict[int, dict[int, list[int]]] = {}  # rank -> loader -> [pass, offset] to resume at
        self.metrics_rows: list[dict] = []
        self.run_dir = join(cfg.output, cfg.name)

    # ------------------------------------------------------------------ data

    def stream(self) -> Iterator[dict]:
        """This rank's batches from where the last checkpoint left them, in `loaders` processes."""
        start = {int(k): tuple(v) for k, v in self.positions.get(self.rank, {}).items()}
        reader = ResumableShardStream(
            self.cfg.train_shards, self.storage, image_size=self.image_size,
            batch_size=self.cfg.batch_size // self.world_size, seed=self.cfg.seed,
            shuffle_buffer=self.cfg.shuffle_buffer, rank=self.rank, world_size=self.world_size,
            tokenizer=self.tokenizer, loaders=self.loaders, start=start,
            rotation=self.step * self.cfg.grad_accumulation % self.loaders)
        return iter(make_loader(reader, self.loaders, self.device.type == "cuda", start_method=LOADER_START))

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(batch["image"], self.device, self.mean, self.std)
        return images, batch["text"].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ training

    def train_step(self, batches: Iterator[dict], augment: torch.Generator) -> dict:
        """One optimizer step over `grad_accumulation` batches: its loss (a device tensor) and timings."""
        wait = 0.0
        total = torch.zeros((), device=self.device)
        keys = []
        for i in range(self.cfg.grad_accumulation):
            fetch = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - fetch
            loader, pass_, offset = batch["position"]
            self.positions.setdefault(self.rank, {})[loader] = [pass_, offset]
            if self.cfg.audit_log:
                keys += batch["key"]
            images, texts = self._inputs(batch)
            if self.cfg.augment:
                images = flips_and_rotations(images, augment)
            last = i == self.cfg.grad_accumulation - 1
            # Gradients are all-reduced once per optimizer step, on its last batch.
            with self.ddp.no_sync() if not last and hasattr(self.ddp, "no_sync") else contextlib.nullcontext():
                with torch.autocast(self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
                    image_features, text_features, logit_scale = self.ddp(images, texts)[:3]
                    loss = self.loss(image_features, text_features, logit_scale) / self.cfg.grad_accumulation
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return {"loss": total, "wait": wait, "keys": keys}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean InfoNCE loss and in-batch top-1 accuracy both ways (batches of batch_size / workers)
        over every val sample, each read by one worker."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, image->text hits, text->image hits, n
        val = ShardReader(self.cfg.val_shards, self.storage, image_size=self.image_size,
                          batch_size=self.cfg.batch_size // self.world_size, seed=self.cfg.seed, shuffle_buffer=0,
                          shuffle_shards=False, rank=self.rank, world_size=self.world_size, tokenizer=self.tokenizer)
        for batch in make_loader(val, self.loaders, start_method=LOADER_START):
            images, texts = self._inputs(batch)
            with torch.autocast(self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
                image_features, text_features, logit_scale = self.model(images, texts)[:3]
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

    def evaluate(self) -> dict[str, float]:
        """Zero-shot top-1/top-5 on each `eval_image_folders` entry (rank 0; RS5M's protocol)."""
        from rs5m_ray.eval.api import clip_of, evaluate
        from rs5m_ray.eval.datasets import read_image_folder

        clip = clip_of(self.model, self.tokenizer, name=f"{self.cfg.name}-step{self.step}", device=self.device)
        out = {}
        for folder in self.cfg.eval_image_folders:
            name = os.path.basename(folder.rstrip("/"))
            metrics = evaluate(clip, read_image_folder(folder))["metrics"]
            out |= {f"eval_{name}_{k}": metrics[k] for k in ("top1", "top5") if k in metrics}
        return out

    # ------------------------------------------------------------------ checkpoints

    def gather_positions(self) -> None:
        """Every rank's loader positions, on every rank (what a checkpoint must hold)."""
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, self.positions.get(self.rank, {}))
            self.positions = dict(enumerate(gathered))

    def save(self, directory: Path) -> None:
        if self.method is None:
            torch.save(self.model.state_dict(), directory / "model.pt")
        elif self.method.mergeable:
            torch.save(self.method.merged_state_dict(self.model), directory / "model.pt")
        else:
            torch.save(peft.adapter_checkpoint(self.method, self.model, whole_model=True), directory / "model.pt")
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "data": {"loaders": self.loaders, "world_size": self.world_size, "positions": self.positions},
                 "adapter": self.method.adapter_state(self.model) if self.method else None}
        torch.save(state, directory / "train_state.pt")
        (directory / "metrics.csv").write_text(metrics_csv(self.metrics_rows))
        settings = {k: v for k, v in to_dict(self.cfg).items() if k != "storage"}  # no credentials
        (directory / "train_config.json").write_text(json.dumps(settings, indent=1))

    def restore(self, directory: Path) -> None:
        state = torch.load(directory / "train_state.pt", map_location=self.device, weights_only=True)
        if state["adapter"] is not None:
            # Only the adapter: the frozen base comes from clip_pretrained, as at the start.
            result = self.model.load_state_dict(state["adapter"], strict=False)
        else:
            weights = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
            result = self.model.load_state_dict(weights, strict=True)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {directory} does not match the model: unexpected {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        data = state["data"]
        if (data["loaders"], data["world_size"]) == (self.loaders, self.world_size):
            self.positions = {int(r): {int(k): v for k, v in p.items()} for r, p in data["positions"].items()}
        else:  # another split of the shards: the old positions mean nothing; start fresh passes
            log.warning("data position of %s is for %d workers x %d loaders, not %d x %d: starting new passes",
                        directory, data["world_size"], data["loaders"], self.world_size, self.loaders)
            next_pass = 1 + max((v[0] for p in data["positions"].values() for v in p.values()), default=0)
            self.positions = {r: {k: [next_pass, 0] for k in range(self.loaders)} for r in range(self.world_size)}
        csv_path = directory / "metrics.csv"
        self.metrics_rows = list(csv.DictReader(io.StringIO(csv_path.read_text()))) if csv_path.exists() else []

    # ------------------------------------------------------------------ metrics

    def record(self, rows: list[dict]) -> None:
        """Rank 0 keeps the rows and appends them to <run dir>/metrics.csv (local output; S3 gets the
        whole file with each checkpoint)."""
        self.metrics_rows += rows
        if is_local(self.run_dir):
            path = Path(self.run_dir) / "metrics.csv"
            new = not path.exists() or len(self.metrics_rows) == len(rows)
            with open(path, "w" if new else "a") as f:
                f.write(metrics_csv(self.metrics_rows if new else rows, header=new))

    def publish_metrics(self) -> None:
        """The whole CSV and the loss curve into the run directory (after a resume, or at the end)."""
        self.storage.write_atomic(join(self.run_dir, "metrics.csv"), metrics_csv(self.metrics_rows).encode())
        if self.metrics_rows:
            self.storage.write_atomic(join(self.run_dir, "loss_curve.png"), loss_curve_png(self.metrics_rows))


def metrics_csv(rows: list[dict], header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, METRIC_COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def loss_curve_png(rows: list[dict]) -> bytes:
    plt = pyplot()
    steps = [int(r["step"]) for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=1)
    ax.set_ylabel("training loss (InfoNCE)")
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [float(r["lr"]) for r in rows], lw=1, color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    return png_bytes(fig)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    import ray.train.torch

    from rs5m_ray import progress

    cfg = from_dict(TrainConfig, config)
    context = ray.train.get_context()
    worker = Worker(cfg, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                    wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=False))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            worker.restore(Path(directory))
        if worker.rank == 0:
            worker.publish_metrics()  # drop rows of steps after the checkpoint: they are redone
    audit = None
    if cfg.audit_log:
        Path(worker.run_dir, "audit").mkdir(parents=True, exist_ok=True)
        audit = open(Path(worker.run_dir, "audit", f"rank{worker.rank}.jsonl"), "a")
    batches = worker.stream()
    pending: list[tuple[int, int, torch.Tensor, float, float]] = []  # step, epoch, loss, seconds, wait
    last = time.perf_counter()
    while worker.step < worker.total_steps:
        epoch = worker.step // worker.steps_per_epoch + 1
        augment = torch.Generator().manual_seed(cfg.seed * 1_000_003 + worker.step * 1_009 + worker.rank)
        out = worker.train_step(batches, augment)
        now = time.perf_counter()
        pending.append((worker.step, epoch, out["loss"], now - last, out["wait"]))
        last = now
        if audit:
            audit.write(json.dumps({"step": worker.step, "epoch": epoch, "keys": out["keys"],
                                    "fingerprint": fingerprint(worker.model)}) + "\n")
            audit.flush()
        epoch_end = worker.step % worker.steps_per_epoch == 0
        save = epoch_end or (cfg.checkpoint_every_steps and worker.step % cfg.checkpoint_every_steps == 0)
        if not (save or worker.step % cfg.log_every_steps == 0):
            continue
        memory = torch.cuda.max_memory_allocated(worker.device) / 2**30 if worker.device.type == "cuda" else None
        rows = [{"step": s, "epoch": e, "loss": loss.item(), "lr": worker.scheduler.get_last_lr()[0],
                 "step_seconds": sec, "data_wait_seconds": w,
                 "samples_per_second_per_worker": cfg.batch_size * cfg.grad_accumulation / worker.world_size / sec,
                 "samples_per_second": cfg.batch_size * cfg.grad_accumulation / sec, "data_wait_fraction": w / sec,
                 "max_memory_gb": memory}
                for s, e, loss, sec, w in pending]
        pending = []
        metrics = dict(rows[-1])
        if epoch_end and cfg.val_shards:
            metrics |= worker.validate()
        if epoch_end and cfg.eval_image_folders and epoch % cfg.eval_every_epochs == 0 and worker.rank == 0:
            metrics |= worker.evaluate()
        if worker.rank == 0:
            worker.record(rows)
            progress.report(f"train-clip-{cfg.name}", step=worker.step, steps_per_epoch=worker.steps_per_epoch,
                            total_steps=worker.total_steps, loss=rows[-1]["loss"],
                            samples_per_s=rows[-1]["samples_per_second"])
        if not save:
            ray.train.report(metrics)
            continue
        worker.gather_positions()
        with tempfile.TemporaryDirectory() as directory:
            if worker.rank == 0:
                worker.save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory)
                             if worker.rank == 0 else None)
        last = time.perf_counter()  # the checkpoint is not the next step's time
    if audit:
        audit.close()
    del batches  # stops the loader processes
    if worker.rank == 0:
        worker.publish_metrics()


def run(cfg: TrainConfig) -> dict:
    """Fine-tune on the Ray cluster of `cfg.ray`; the last metrics and checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rs5m_ray import progress
    from rs5m_ray.ray_runtime import init_ray

    check(cfg)
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage)
    cfg = dataclasses.replace(cfg, samples_per_epoch=samples_per_epoch(cfg, storage))  # read once, here
    if cfg.samples_per_epoch < cfg.batch_size * cfg.grad_accumulation:
        raise ConfigError(f"an epoch of {cfg.samples_per_epoch} samples is less than one step of "
                          f"{cfg.batch_size} x {cfg.grad_accumulation}")
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
    with progress.EpochProgress(f"train-clip-{cfg.name}"):  # per-epoch bars on the driver's stderr
        result = trainer.fit()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
