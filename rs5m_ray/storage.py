"""One storage layer for local paths, s3:// and any other fsspec URL.

Outputs are committed atomically: a local file is written beside its target and
renamed into place; an object-store file is written with one PUT, which S3 makes
visible whole or not at all.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow.fs as pafs

from rs5m_ray.config import StorageConfig


@dataclass(frozen=True)
class Storage:
    """fsspec access to one URL scheme, built from a StorageConfig (picklable for Ray)."""

    cfg: StorageConfig = field(default_factory=StorageConfig)

    def fs(self, path: str) -> fsspec.AbstractFileSystem:
        protocol = fsspec.core.split_protocol(path)[0] or "file"
        if protocol in ("s3", "s3a"):
            return fsspec.filesystem("s3", **self._s3_options())
        return fsspec.filesystem(protocol)

    def _s3_options(self) -> dict:
        c = self.cfg
        opts: dict = {}
        endpoint = c.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if c.key:
            opts["key"], opts["secret"] = c.key, c.secret
        if c.region:
            opts["client_kwargs"] = {"region_name": c.region}
        # Fresh instances: fsspec caches per-process, and tests start their own servers.
        opts["skip_instance_cache"] = True
        return opts

    def arrow_fs(self, path: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the path within it, for parquet I/O."""
        fs = self.fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), strip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs(path).exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs(path).cat_file(path)

    def open(self, path: str, mode: str = "rb"):
        return self.fs(path).open(path, mode)

    def glob(self, pattern: str) -> list[str]:
        fs = self.fs(pattern)
        protocol = fsspec.core.split_protocol(pattern)[0]
        found = sorted(fs.glob(pattern))
        return [f"{protocol}://{p}" if protocol and protocol != "file" else p for p in found]

    def makedirs(self, path: str) -> None:
        if is_local(path):
            os.makedirs(path, exist_ok=True)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Make `path` hold `data` completely or not at all."""
        if is_local(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs(path).pipe_file(path, data)

    def remove(self, path: str) -> None:
        fs = self.fs(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def is_local(path: str) -> bool:
    return fsspec.core.split_protocol(path)[0] in (None, "file")


def strip_protocol(path: str) -> str:
    return fsspec.core.split_protocol(path)[1]


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)
