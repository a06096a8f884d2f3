"""The RS5M shard layout: names, per-sample members, deterministic tar bytes.

RS5M's own loader (`dataloader.py`) reads members `<key>.img_name`, `<key>.img_content`
and `<key>.caption`; we add `<key>.json` with scores and provenance, which that
loader ignores.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import BinaryIO, Iterable, Mapping

SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<split>train|val)-(?P<index>\d{4,})\.tar$")


def shard_name(prefix: str, split: str, index: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{prefix}-{split}-{index:04d}.tar"


def sample_key(sample_id: str) -> str:
    """webdataset splits a member name at its first dot: keys must not contain one."""
    return sample_id.replace(".", "_").replace("/", "_")


def sample_members(sample_id: str, jpg: bytes, caption: str, meta: Mapping) -> list[tuple[str, bytes]]:
    key = sample_key(sample_id)
    return [
        (f"{key}.img_name", f"{sample_id}.jpg".encode()),
        (f"{key}.img_content", jpg),
        (f"{key}.caption", caption.encode()),
        (f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()),
    ]


class TarWriter:
    """Writes a tar member by member to a binary file; the bytes depend only on the members
    (fixed mtime, owner, mode), and only one member is held in memory at a time."""

    def __init__(self, fileobj: BinaryIO):
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A whole tar in memory (small shards, tests)."""
    buf = io.BytesIO()
    writer = TarWriter(buf)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    return buf.getvalue()
