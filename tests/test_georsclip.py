"""GeoRSCLIP fine-tuning: LoRA, augmentation, epoch sizing, and real Ray Train DDP runs
(2 workers on CPU, gloo) that learn, checkpoint, resume, survive a killed worker, and write to S3."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image

from rs5m_ray.config import ConfigError, ScoringConfig, TrainConfig, load_config
from rs5m_ray.models.clip import load_clip
from rs5m_ray.shards.layout import sample_key, sample_members, shard_name, tar_bytes
from rs5m_ray.shards.reader import ShardReader, normalize
from rs5m_ray.shards.writer import manifest_path
from rs5m_ray.storage import Storage, join
from rs5m_ray.train import georsclip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (240, 240, 240), "black": (15, 15, 15), "purple": (150, 30, 170), "cyan": (30, 210, 210)}


def colour_jpeg(colour: str, i: int) -> bytes:
    """A noisy field of one colour: the caption names it, so image and text can be matched."""
    noise = np.random.default_rng(i).integers(-40, 40, (48, 60, 3))
    pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_colour_shards(out: str, storage: Storage, split: str, shards: int, per_shard: int,
                        manifests: bool = True, corrupt: bool = False) -> list[str]:
    """`corrupt` adds one undecodable sample to each shard, in the middle."""
    names = list(COLOURS)
    urls = []
    for s in range(shards):
        members = []
        for j in range(per_shard):
            i = s * per_shard + j
            colour = names[i % len(names)]
            members += sample_members(f"rs3_{split}{s}_{j}", colour_jpeg(colour, i), f"a {colour} field", {})
            if corrupt and j == per_shard // 2:
                members += sample_members(f"rs3_{split}{s}_bad", b"not a jpeg", "a broken image", {})
        name = shard_name("pub11", split, s)
        storage.write_atomic(join(out, name), tar_bytes(members))
        if manifests:
            storage.write_atomic(manifest_path(out, name), json.dumps({"count": per_shard}).encode())
        urls.append(join(out, name))
    return urls


def contrastive_loss(model_cfg: ScoringConfig, urls: list[str], storage: Storage) -> float:
    """Mean symmetric InfoNCE of a model over the samples of `urls`, in one batch."""
    clip = load_clip(model_cfg, storage)
    size, mean, std = clip.eval_transform
    (batch,) = ShardReader(urls, storage, image_size=size, batch_size=1000, shuffle_buffer=0)
    with torch.no_grad():
        features = clip.model(normalize(batch["image"], "cpu", mean, std), clip.tokenizer(batch["caption"]))
    return ClipLoss()(*features).item()


def tiny(**overrides) -> ScoringConfig:
    return ScoringConfig(clip_model="rs5m-tiny-vit", **overrides)


# ---------------------------------------------------------------- without Ray

def test_flips_and_rotations_apply_the_eight_symmetries_of_the_square():
    images = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).view(64, 3, 4, 4)
    out = georsclip.flips_and_rotations(images, torch.Generator().manual_seed(0))
    seen = set()
    for img, aug in zip(images, out):
        variants = [torch.rot90(img.flip(-1) if c >= 4 else img, c % 4, (-2, -1)) for c in range(8)]
        (code,) = [c for c, v in enumerate(variants) if torch.equal(v, aug)]
        seen.add(code)
    assert seen == set(range(8))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = [georsclip.cosine_with_warmup(s, warmup=4, total=20) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[20] == pytest.approx(0.0)


def test_epoch_size_comes_from_the_shard_manifests(tmp_path):
    storage = Storage()
    urls = write_colour_shards(str(tmp_path / "a"), storage, "train", 3, 7)
    cfg = TrainConfig(train_shards=[str(tmp_path / "a") + "/"])
    assert georsclip.samples_per_epoch(cfg, storage) == 21
    assert georsclip.samples_per_epoch(TrainConfig(train_shards=urls, samples_per_epoch=5), storage) == 5
    write_colour_shards(str(tmp_path / "b"), storage, "train", 1, 7, manifests=False)
    with pytest.raises(ConfigError, match="no manifest"):
        georsclip.samples_per_epoch(TrainConfig(train_shards=[str(tmp_path / "b") + "/"]), storage)
    with pytest.raises(ConfigError, match="no shards match"):
        georsclip.samples_per_epoch(TrainConfig(train_shards=[str(tmp_path / "c-*.tar")]), storage)


def test_relative_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    cfg = georsclip.absolute_paths(TrainConfig(
        output="out", train_shards=["s/pub11-train-{0000..0003}.tar", "s3://b/pub11-train-0000.tar"],
        val_shards=["s/v-*.tar", "shards/"], clip_pretrained="w.pt"))
    assert cfg.output == str(tmp_path / "out") and cfg.clip_pretrained == str(tmp_path / "w.pt")
    assert cfg.train_shards == [str(tmp_path / "s/pub11-train-{0000..0003}.tar"), "s3://b/pub11-train-0000.tar"]
    assert cfg.val_shards == [str(tmp_path / "s/v-*.tar"), str(tmp_path / "shards") + "/"]  # still a directory
    assert georsclip.absolute_paths(TrainConfig(clip_pretrained="openai")).clip_pretrained == "openai"


@pytest.mark.parametrize("overrides, message", [
    ({}, "no shards"),
    ({"train_shards": ["x.tar"], "peft": "ia3"}, "peft"),
    ({"train_shards": ["x.tar"], "precision": "fp8"}, "precision"),
    ({"train_shards": ["x.tar"], "peft": "lora", "lora_matrices": ["x"]}, "attn_matrices"),
    ({"train_shards": ["x.tar"], "freeze_image_tower": True, "freeze_text_tower": True}, "nothing left"),
    ({"train_shards": ["x.tar"], "batch_size": 9, "num_workers": 2}, "split evenly"),
])
def test_bad_training_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        georsclip.check(load_config(overrides=overrides, cls=TrainConfig))


# ---------------------------------------------------------------- Ray Train

def train_config(out: Path | str, train: list[str], val: list[str], **overrides) -> TrainConfig:
    base = {"output": str(out), "train_shards": train, "val_shards": val, "batch_size": 16, "lr": 2e-3,
            "weight_decay": 0.0, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 1,
            "shuffle_buffer": 50, "keep_checkpoints": 10}
    return load_config(overrides=base | overrides, cls=TrainConfig)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_ddp_finetuning_learns_checkpoints_and_resumes(ray_cluster, tmp_path):
    storage = Storage()
    # 3 shards over 2 workers: the shares differ, yet both workers must take the same steps.
    train = write_colour_shards(str(tmp_path / "shards"), storage, "train", 3, 48)
    val = write_colour_shards(str(tmp_path / "shards"), storage, "val", 1, 64)
    cfg = train_config(tmp_path / "out", train, val, epochs=3, augment=True)

    result = georsclip.run(cfg)
    run_dir = tmp_path / "out" / "georsclip"
    assert result["metrics"]["epoch"] == 3 and result["metrics"]["step"] == 3 * (144 // 16)
    assert result["metrics"]["val_samples"] == 64  # every val sample read once over both workers
    assert len(checkpoints(run_dir)) == 3
    model_pt = Path(result["checkpoint"]) / "model.pt"
    before = contrastive_loss(tiny(), val, storage)
    after = contrastive_loss(tiny(clip_pretrained=str(model_pt)), val, storage)
    # 8 colours in a batch of 64: the best achievable loss is ln(8) = 2.08; chance is ln(64) = 4.16.
    # Measured: 4.48 -> 2.10.
    assert before > 3.9 and after < 2.6, (before, after)

    resumed = georsclip.run(train_config(tmp_path / "out", train, val, epochs=4, augment=True))
    assert resumed["metrics"]["epoch"] == 4 and resumed["metrics"]["step"] == 4 * 9
    assert len(checkpoints(run_dir)) == 4  # one more epoch, not four


def test_lora_finetuning_on_s3_changes_only_the_adapted_weights(ray_cluster, s3_bucket):
    root, storage = s3_bucket
    train = write_colour_shards(f"{root}/shards", storage, "train", 2, 32)
    cfg = train_config(f"{root}/out", train, [], epochs=1, peft="lora", lora_rank=4, num_workers=1,
                       storage={"endpoint_url": storage.cfg.endpoint_url, "key": "testing", "secret": "testing"})
    result = georsclip.run(cfg)
    assert result["checkpoint"].startswith(root.removeprefix("s3://") + "/out/georsclip/checkpoint_")
    assert storage.read_bytes(f"{root}/out/georsclip/metrics.csv").count(b"\n") == 1 + 4  # header + 4 steps
    assert storage.read_bytes(f"{root}/out/georsclip/loss_curve.png").startswith(b"\x89PNG")
    tuned = torch.load(io.BytesIO(storage.read_bytes(f"s3://{result['checkpoint']}/model.pt")), weights_only=True)
    base = load_clip(tiny()).model.state_dict()
    assert tuned.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith("attn.in_proj_weight") for k in changed)  # q and v rows (AdapterHub)
    state = torch.load(io.BytesIO(storage.read_bytes(f"s3://{result['checkpoint']}/train_state.pt")),
                       weights_only=True)
    assert state["step"] == 4 and state["adapter"] and all("peft_lora_" in k for k in state["adapter"])
    assert math.isfinite(result["metrics"]["loss"])


def registered_checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError):  # not written yet, or being written
        return []


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers (Ray titles an actor's process `ray::<class>...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def audit(run_dir: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> the last audit line written for it (steps redone after a restart overwrite)."""
    out = {}
    for path in sorted((run_dir / "audit").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            key = (rank, entry["step"])
            if key in out:  # a redone step read exactly the same samples
                assert out[key]["keys"] == entry["keys"], key
            out[key] = entry
    return out


def test_a_worker_killed_mid_epoch_resumes_at_the_next_unseen_sample(ray_cluster, tmp_path):
    """2 workers x 2 loader processes, a corrupt sample in every shard, checkpoints every 2 steps,
    SIGKILL in the second epoch: each epoch still sees every sample exactly once, in the order of
    an uninterrupted run, and the DDP replicas hold the same weights at every step."""
    storage = Storage()
    train = write_colour_shards(str(tmp_path / "shards"), storage, "train", 4, 12, corrupt=True)
    # 4 shards over 2 ranks x 2 loaders, 12 good samples each: 3 batches of 4 per loader and pass.
    base = {"epochs": 2, "batch_size": 8, "samples_per_epoch": 48, "loader_workers": 2, "cpus_per_worker": 1,
            "checkpoint_every_steps": 2, "audit_log": True, "shuffle_buffer": 5}
    reference = georsclip.run(train_config(tmp_path / "ref", train, [], **base))
    assert reference["metrics"]["step"] == 12
    expected = audit(tmp_path / "ref" / "georsclip")

    run_dir = tmp_path / "out" / "georsclip"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(georsclip.run, train_config(tmp_path / "out", train, [], **base))
        deadline = time.monotonic() + 300
        # Kill once a checkpoint inside the second epoch is registered (step 8 of 12).
        while time.monotonic() < deadline and not future.done() and not any(
                c["metrics"]["step"] >= 8 for c in registered_checkpoints(run_dir)):
            time.sleep(0.1)
        victims = train_worker_pids()
        assert victims and not future.done(), "the run ended before the kill"
        os.kill(victims[-1], signal.SIGKILL)
        result = future.result(timeout=600)
    assert result["metrics"]["step"] == 12
    seen = audit(run_dir)
    assert seen.keys() == expected.keys()
    good = {f"rs3_train{s}_{j}" for s in range(4) for j in range(12)}
    for epoch in (1, 2):
        keys = [k for (rank, step), e in seen.items() if e["epoch"] == epoch for k in e["keys"]]
        assert sorted(keys) == sorted(sample_key(s) for s in good)  # each sample once, no corrupt one
        assert {k: e["keys"] for k, e in seen.items() if e["epoch"] == epoch} == \
            {k: e["keys"] for k, e in expected.items() if e["epoch"] == epoch}
    for step in range(1, 13):
        assert seen[(0, step)]["fingerprint"] == seen[(1, step)]["fingerprint"]  # replicas identical
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("step,epoch,loss")  # no step twice after the restart


@pytest.mark.parametrize("overrides", [
    {"precision": "fp16", "grad_accumulation": 2, "max_grad_norm": 50.0, "warmup_steps": 3},
    {"freeze_image_tower": True, "normalization": "pub11", "peft": "none"},
    {"freeze_text_tower": True, "peft": "pfeiffer"},
])
def test_one_step_in_process_with_the_papers_switches(tmp_path, overrides):
    """The training step without Ray (as benchmarks/gpu_train_check.py's fallback runs it)."""
    storage = Storage()
    train = write_colour_shards(str(tmp_path / "shards"), storage, "train", 2, 16)
    cfg = georsclip.absolute_paths(train_config(tmp_path / "out", train, [], num_workers=1, batch_size=8,
                                                samples_per_epoch=32, loader_workers=1, **overrides))
    worker = georsclip.Worker(cfg, 0, 1, torch.device("cpu"))
    before = {k: v.clone() for k, v in worker.model.state_dict().items()}
    batches = worker.stream()
    out = worker.train_step(batches, torch.Generator().manual_seed(0))
    del batches
    assert worker.step == 1 and math.isfinite(out["loss"].item())
    accumulated = overrides.get("grad_accumulation", 1)
    assert worker.positions[0][0][1] >= 8 * accumulated  # raw samples read by the one loader
    assert worker.scheduler.get_last_lr()[0] == pytest.approx(cfg.lr * (2 / 3 if "warmup_steps" in overrides else 1))
    changed = {k for k, v in worker.model.state_dict().items() if not torch.equal(v, before[k])}
    if overrides.get("freeze_image_tower"):
        assert changed and not any(k.startswith("visual.") for k in changed)
        assert worker.mean == georsclip.NORMALIZATIONS["pub11"][0]
    if overrides.get("freeze_text_tower"):  # Pfeiffer adapters of the image tower only, and the temperature
        assert changed and all(k.startswith("visual.") and "peft_" in k or k == "logit_scale" for k in changed)
    if "precision" in overrides:
        assert worker.scaler.is_enabled() and any(k.startswith("visual.") for k in changed)


def test_periodic_zero_shot_evaluation_goes_through_the_eval_api(tmp_path):
    from rs5m_ray.eval.api import clip_of, evaluate
    from rs5m_ray.eval.datasets import read_image_folder

    folder = tmp_path / "colours"
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        for i in range(3):
            (folder / colour / f"{i}.jpg").write_bytes(colour_jpeg(colour, i))
    storage = Storage()
    train = write_colour_shards(str(tmp_path / "shards"), storage, "train", 1, 8)
    cfg = georsclip.absolute_paths(train_config(tmp_path / "out", train, [], num_workers=1, batch_size=8,
                                                samples_per_epoch=8, eval_image_folders=[str(folder)]))
    worker = georsclip.Worker(cfg, 0, 1, torch.device("cpu"))
    metrics = worker.evaluate()
    direct = evaluate(clip_of(worker.model, worker.tokenizer), read_image_folder(str(folder)))["metrics"]
    assert metrics == {f"eval_colours_{k}": direct[k] for k in ("top1", "top5") if k in direct}
    assert "eval_colours_top1" in metrics
    assert worker.model.training  # evaluation leaves the model in training mode
