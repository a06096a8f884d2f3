"""Streaming RS5M shards: a read-ahead thread over local or object-store bytes and a
minimal tar parser (checksummed headers, pax names) that groups members per sample."""
from __future__ import annotations

import io
import queue
import threading
from typing import Iterator

from rs5m_ray.storage import Storage

CHUNK = 4 << 20


class ReadAhead:
    """Reads the shards' bytes in a thread, up to `max_bytes` ahead of the consumer, so
    object-store latency overlaps decoding (also across shard boundaries)."""

    _END = object()

    def __init__(self, urls: list[str], storage: Storage, max_bytes: int):
        self._q: queue.Queue = queue.Queue(maxsize=max(2, max_bytes // CHUNK))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(urls, storage), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, urls: list[str], storage: Storage) -> None:
        for url in urls:
            try:
                with storage.open(url) as f:
                    while chunk := f.read(CHUNK):
                        if not self._put(chunk):
                            return
                end = self._END
            except Exception as e:  # noqa: BLE001 - reported to the consumer as a bad shard
                end = e
            if not self._put(end):
                return

    def next_shard(self) -> "_ShardBytes":
        return _ShardBytes(self._q, self._END)

    def close(self) -> None:
        self._stop.set()


class _ShardBytes(io.RawIOBase):
    """The current shard's bytes as a file object over the read-ahead queue."""

    def __init__(self, q: queue.Queue, end):
        self._q, self._end = q, end
        self._buf = memoryview(b"")
        self.done = False
        self.error: Exception | None = None

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> None:
        item = self._q.get()
        if item is self._end or isinstance(item, Exception):
            self.done, self.error = True, item if isinstance(item, Exception) else None
        else:
            self._buf = memoryview(item)

    def readinto(self, b) -> int:
        while not self._buf and not self.done:
            self._next_chunk()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Skip the rest of this shard so the next one starts at its first byte."""
        while not self.done:
            self._next_chunk()


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


class TarFormatError(ValueError):
    pass


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated tar: wanted {n} bytes, got {len(data)}")
    return data


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def iter_tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of a tar stream's regular files: ustar, pax and GNU long names.

    A lean parser (the stdlib's tarfile costs ~5x more per member, which matters for
    small images); headers are checksummed so a corrupt shard fails loudly."""
    long_name = None
    while True:
        hdr = f.read(512)
        if len(hdr) < 512 or hdr == bytes(512):
            if hdr and hdr != bytes(512):
                raise TarFormatError("truncated tar header")
            return
        if _octal(hdr[148:156]) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("bad tar header checksum")
        size, kind = _octal(hdr[124:136]), hdr[156:157]
        data = _read_exact(f, size)
        if size % 512:
            _read_exact(f, 512 - size % 512)
        if kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
                if prefix:
                    name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
            yield name, data
            long_name = None
        elif kind != b"g":
            long_name = None  # directories, links, devices: not sample members


def _pax_path(data: bytes) -> str | None:
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_shard_samples(f, url: str) -> Iterator[dict[str, bytes]]:
    """Samples of one tar stream: members grouped by key, in file order."""
    sample: dict[str, bytes] = {}
    for name, data in iter_tar_members(f):
        key, suffix = _split_member(name)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        sample["__url__"] = url
        sample[suffix] = data
    if sample:
        yield sample
