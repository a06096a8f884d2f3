"""Endless, resumable training batches: each loader process reads its share of the shards pass
after pass (every pass reshuffled), and every batch says where its loader stands.

A batch's `position` is (loader, pass, offset): the loader's stream continues at raw sample
`offset` of shuffled pass `pass`. Offsets count raw samples (corrupt and incomplete ones too),
so a restart at that position fast-forwards through the tar members and the shuffle buffer
without decoding a skipped image, and reaches the same next sample even where samples were
skipped. A DataLoader hands batches out round-robin over its loaders; a trainer that has
consumed B batches resumes with `rotation = B % loaders`, so the order goes on unchanged.
"""
from __future__ import annotations

from typing import Iterator

from rs5m_ray.shards.reader import ShardReader

Position = tuple[int, int]  # (pass, raw samples of that pass consumed)


class ResumableShardStream(ShardReader):
    """`ShardReader` batches without end, each with `position`; `start` maps loader -> Position."""

    def __init__(self, *args, loaders: int = 1, start: dict[int, Position] | None = None, rotation: int = 0,
                 **kwargs):
        super().__init__(*args, drop_last=True, **kwargs)
        self.loaders, self.start, self.rotation = loaders, dict(start or {}), rotation
        self.position: tuple[int, int, int] | None = None

    def _worker(self) -> tuple[int, int]:
        """The logical loader: DataLoader worker i plays loader (i + rotation) % loaders."""
        workers, worker = super()._worker()
        if workers != self.loaders:
            raise ValueError(f"stream built for {self.loaders} loader processes, run in {workers}")
        return workers, (worker + self.rotation) % workers

    def samples(self) -> Iterator[dict[str, bytes]]:
        loader = self._worker()[1]
        pass_, skip = self.start.get(loader, (0, 0))
        while True:
            self.set_epoch(pass_)
            offset = 0
            for sample in super().samples():
                offset += 1
                if offset > skip:
                    self.position = (loader, pass_, offset)
                    yield sample
            if offset == 0:
                raise ValueError(f"loader {loader} of rank {self.rank} has no samples; use fewer loader "
                                 "processes or workers, or more shards")
            pass_, skip = pass_ + 1, 0

    def _emit(self, buf, batch, reported):
        out = super()._emit(buf, batch, reported)
        out["position"] = self.position
        return out
