"""Checkpoint files and model folders: find them, read them safely, load them with a key report.

Sources: a local path, any remote URL Storage reads (s3://...), or `hf-hub:org/repo/path/in/repo`
(the Hugging Face hub cache; set HF_HUB_OFFLINE=1 to use only what is cached). Remote files
are cached on local disk once per node. Files are read with `torch.load(weights_only=True)`
or safetensors: never arbitrary pickles.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rs5m_ray.storage import Storage, is_local

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_CACHE = Path.home() / ".cache" / "rs5m_ray" / "weights"
# Checkpoint layouts seen in the wild -> open_clip names. ITRA (GeoRSCLIP's trainer) stores the
# towers as text_backbone.* / image_backbone.* (RS5M inference/convert_weight.py); DDP adds module.
KEY_PREFIX_MAP = (("module.", ""), ("text_backbone.", ""), ("image_backbone.", "visual."))


@dataclass
class LoadReport:
    """What a checkpoint load left out: model keys it lacked, checkpoint keys the model lacks."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def resolve_weights(source: str, storage: Storage | None = None, cache_dir: str | None = None) -> str:
    """A local file holding `source`'s bytes (downloaded into the cache when remote)."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if source.startswith(HF_HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        parts = source[len(HF_HUB_PREFIX):].split("/")
        if len(parts) < 3:
            raise ValueError(f"{source!r}: expected hf-hub:org/repo/path/to/file")
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), cache_dir=str(cache / "hf"))
    if is_local(source):
        path = source.removeprefix("file://")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {source}")
        return path
    return _cached_copy(source, storage or Storage(), cache)


def resolve_model_dir(source: str, storage: Storage | None = None, cache_dir: str | None = None) -> str:
    """A local directory holding the model folder `source` (a Hugging Face `save_pretrained`
    layout, or a peft adapter): a local directory as it is; `s3://...` copied once per node
    into the cache; `hf-hub:org/repo[@revision]` from the hub cache."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if source.startswith(HF_HUB_PREFIX):
        from huggingface_hub import snapshot_download

        repo, _, revision = source[len(HF_HUB_PREFIX):].partition("@")
        return snapshot_download(repo, revision=revision or None, cache_dir=str(cache / "hf"))
    if is_local(source):
        path = source.removeprefix("file://")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {source}")
        return path
    storage = storage or Storage()
    root = source.rstrip("/")
    target = cache / hashlib.sha1(root.encode()).hexdigest()[:16] / os.path.basename(root)
    if target.is_dir():
        return str(target)
    files = [f for f in storage.glob(f"{root}/**") if not storage.fs(f).isdir(f)]
    if not files:
        raise FileNotFoundError(f"model directory not found or empty: {source}")
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    for f in files:
        local = tmp / f[len(root) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        with storage.open(f) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
    try:
        os.rename(tmp, target)  # atomic: a directory appears whole; another actor of the node may win
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s (%d files) at %s", source, len(files), target)
    return str(target)


def _cached_copy(url: str, storage: Storage, cache: Path) -> str:
    fs = storage.fs(url)
    size = fs.info(url)["size"]
    target = cache / hashlib.sha1(url.encode()).hexdigest()[:16] / os.path.basename(url)
    if target.is_file() and target.stat().st_size == size:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    with storage.open(url) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
    os.replace(tmp, target)  # concurrent actors on one node may race here: each writes a whole file
    log.info("cached %s (%d bytes) at %s", url, size, target)
    return str(target)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch checkpoint, unwrapped from `state_dict` and key prefixes."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """`read_state_dict`'s tensors and the checkpoint's `peft` entry (the adapter method a
    `rs5m_ray.models.peft` checkpoint was trained with; None for plain weights)."""
    peft = None
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path, device="cpu")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        peft = data.get("peft")
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {_rename(k): v for k, v in data.items()}, peft


def _rename(key: str) -> str:
    for old, new in KEY_PREFIX_MAP:
        if key.startswith(old):
            key = new + key[len(old):]
    return key


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                 strict: bool = True) -> LoadReport:
    """Load into `model`; missing keys raise when strict, else they are reported and logged."""
    result = model.load_state_dict(state_dict, strict=False)
    report = LoadReport(source, sorted(result.missing_keys), sorted(result.unexpected_keys))
    if report.missing and strict:
        raise ValueError(f"{source}: checkpoint lacks {len(report.missing)} model key(s), e.g. "
                         f"{report.missing[:5]}; wrong architecture? (strict_weights=false to allow)")
    if report.missing or report.unexpected:
        log.warning("%s: missing keys %s, unexpected keys %s", source, report.missing[:10], report.unexpected[:10])
    return report
