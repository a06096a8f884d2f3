"""One storage layer for local paths, s3:// and any other fsspec URL.

Outputs are committed atomically: a local file is written beside its target and
renamed into place; an object-store file is written with one PUT, which S3 makes
visible whole or not at all.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import threading
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow.fs as pafs

from rs5m_ray.config import StorageConfig


# One filesystem per (process, protocol, storage config): an S3 filesystem holds a client, a
# connection pool and an event-loop thread, too costly to build per call. Keyed by pid because
# none of that survives a fork; module-level so that pickling a Storage (Ray) never ships it.
_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def _config_key(cfg: StorageConfig) -> tuple:
    return (cfg.endpoint_url, cfg.key, cfg.secret, cfg.region)


@dataclass(frozen=True)
class Storage:
    """fsspec access to one URL scheme, built from a StorageConfig (picklable for Ray)."""

    cfg: StorageConfig = field(default_factory=StorageConfig)

    def fs(self, path: str) -> fsspec.AbstractFileSystem:
        """This process's filesystem for the scheme of `path` (built on first use, then reused)."""
        protocol = fsspec.core.split_protocol(path)[0] or "file"
        if protocol == "s3a":
            protocol = "s3"
        # The endpoint may come from the environment: part of the key, as read now.
        s3 = self._s3_options() if protocol == "s3" else None
        key = (os.getpid(), protocol, _config_key(self.cfg), s3 and s3.get("endpoint_url"))
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            with _FILESYSTEMS_LOCK:
                fs = _FILESYSTEMS.get(key)
                if fs is None:
                    if any(k[0] != key[0] for k in _FILESYSTEMS):  # forked: the parent's are unusable
                        _FILESYSTEMS.clear()
                    fs = fsspec.filesystem(protocol, **s3) if s3 is not None else fsspec.filesystem(protocol)
                    _FILESYSTEMS[key] = fs
        return fs

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
        opts["config_kwargs"] = {"retries": {"max_attempts": c.max_attempts, "mode": "standard"}}
        # Our own per-process cache (Storage.fs) is the only one: fsspec's is keyed by options only.
        opts["skip_instance_cache"] = True
        # The instance lives as long as the process: no listing cache, so files that other
        # processes (Ray workers) write are seen at once.
        opts["use_listings_cache"] = False
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

    def scratch_path(self, path: str) -> str:
        """Where to build `path` before `commit_file`: beside it locally (so the commit is a
        rename), in the local temp dir for an object store."""
        if is_local(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return f"{path}.tmp-{uuid.uuid4().hex}"
        return os.path.join(tempfile.gettempdir(), f"rs5m-{uuid.uuid4().hex}")

    def commit_file(self, scratch: str, path: str) -> None:
        """Make `path` hold the finished local file `scratch` whole: a rename locally; one upload
        on an object store (multipart for large files, visible only once complete)."""
        if is_local(path):
            with open(scratch, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(scratch, path)
            return
        try:
            self.fs(path).put_file(scratch, path)
        finally:
            os.remove(scratch)

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
