"""Per-host politeness that holds across the whole job, not just one process.

A `LeaseBook` keeps, for every host (the URL's host:port), the number of requests
in flight (capped) and a token bucket (rate limit). A request needs one lease and
hands it back when done. Under Ray one named async actor per job owns the book;
each worker's `HostLeases` client asks it for as many leases as it has requests
waiting for a host, in one call, and hands back the leases that finish in the
same event-loop turn together, so the actor sees calls per burst, not per request. Outside
Ray (or when no actor name is given) the same client talks to an in-process book.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from rs5m_ray.config import DownloadConfig


class LeaseBook:
    """Concurrency caps and token buckets per host; lives in one asyncio event loop."""

    def __init__(self, max_per_host: int, requests_per_s: float | None, burst: int):
        if max_per_host < 1:
            raise ValueError(f"max_per_host must be >= 1, got {max_per_host}")
        if requests_per_s is not None and requests_per_s <= 0:
            raise ValueError(f"host_requests_per_s must be > 0 or None, got {requests_per_s}")
        self.max_per_host = max_per_host
        self.rate = requests_per_s
        self.burst = max(1, burst)
        self._active: dict[str, int] = defaultdict(int)
        self._tokens: dict[str, tuple[float, float]] = {}  # host -> (tokens, monotonic stamp)
        self._changed: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def acquire(self, host: str, want: int, returning: int = 0) -> int:
        """Wait until at least one lease for `host` is free; grant up to `want`."""
        if returning:
            self.release(host, returning)
        while True:
            tokens = self._refill(host)
            granted = min(want, self.max_per_host - self._active[host])
            if self.rate is not None:
                granted = min(granted, math.floor(tokens))
            if granted >= 1:
                self._active[host] += granted
                if self.rate is not None:
                    self._tokens[host] = (tokens - granted, time.monotonic())
                return granted
            event = self._changed[host]
            event.clear()
            # Out of tokens: the next one arrives on a schedule, not on a release.
            wait = None if tokens >= 1 else (1 - tokens) / self.rate
            try:
                await asyncio.wait_for(event.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def release(self, host: str, n: int) -> None:
        self._active[host] = max(0, self._active[host] - n)
        if self._active[host] == 0 and self.rate is None:
            del self._active[host]  # keep the book small on jobs with millions of hosts
        if host in self._changed:
            self._changed[host].set()

    def in_flight(self, host: str) -> int:
        return self._active.get(host, 0)

    def _refill(self, host: str) -> float:
        if self.rate is None:
            return math.inf
        now = time.monotonic()
        tokens, stamp = self._tokens.get(host, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - stamp) * self.rate)


class HostLimitsActor:
    """The job-wide book, as an async Ray actor (see `start_host_limits`)."""

    def __init__(self, max_per_host: int, requests_per_s: float | None, burst: int):
        self.book = LeaseBook(max_per_host, requests_per_s, burst)

    async def acquire(self, host: str, want: int, returning: int = 0) -> int:
        return await self.book.acquire(host, want, returning)

    async def release(self, host: str, n: int) -> None:
        self.book.release(host, n)

    async def in_flight(self, host: str) -> int:
        return self.book.in_flight(host)


@dataclass
class _HostState:
    waiters: deque = field(default_factory=deque)
    granted: int = 0  # leases received and not handed to a request yet
    finished: int = 0  # leases used up, to hand back
    calling: bool = False


class HostLeases:
    """One worker's client: `await acquire(host)` before a request, `release(host)` after.

    `acquire_fn(host, want, returning)` and `release_fn(host, n)` reach the book,
    either an actor's methods or an in-process LeaseBook. Call `drain()` before
    leaving the event loop so no lease stays held between batches.
    """

    def __init__(self, acquire_fn: Callable[[str, int, int], Awaitable[int]],
                 release_fn: Callable[[str, int], Awaitable[None] | None]):
        self._acquire_fn = acquire_fn
        self._release_fn = release_fn
        self._hosts: dict[str, _HostState] = defaultdict(_HostState)
        self._pending: set[asyncio.Future] = set()
        self._flush_scheduled: set[str] = set()

    async def acquire(self, host: str) -> None:
        st = self._hosts[host]
        if st.granted:
            st.granted -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        st.waiters.append(fut)
        if not st.calling:
            st.calling = True
            self._track(self._refill(host, st))
        await fut

    def release(self, host: str) -> None:
        st = self._hosts[host]
        st.finished += 1
        if host not in self._flush_scheduled:
            # Leases finishing in the same loop turn go back in one call.
            self._flush_scheduled.add(host)
            asyncio.get_running_loop().call_soon(self._return_idle, host)

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _refill(self, host: str, st: _HostState) -> None:
        try:
            while any(not f.done() for f in st.waiters):
                returning, st.finished = st.finished, 0
                want = sum(not f.done() for f in st.waiters)
                granted = await self._acquire_fn(host, want, returning)
                while granted and st.waiters:
                    fut = st.waiters.popleft()
                    if not fut.done():
                        fut.set_result(None)
                        granted -= 1
                st.granted += granted
        except BaseException as e:  # the book is unreachable: fail the waiting requests
            while st.waiters:
                fut = st.waiters.popleft()
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
        finally:
            st.calling = False
            self._return_idle(host)

    def _return_idle(self, host: str) -> None:
        """Hand back finished leases now (the book may be waiting for them), unused ones too when idle."""
        self._flush_scheduled.discard(host)
        st = self._hosts.get(host)
        if st is None:
            return
        n, st.finished = st.finished, 0
        if not st.calling and not any(not f.done() for f in st.waiters):
            n += st.granted
            del self._hosts[host]
        if n:
            result = self._release_fn(host, n)
            if result is not None:
                self._track(result)

    def _track(self, awaitable: Awaitable) -> None:
        fut = asyncio.ensure_future(awaitable)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)


def actor_name_for_job() -> str:
    import ray

    return f"rs5m-host-limits-{ray.get_runtime_context().get_job_id()}"


def start_host_limits(cfg: DownloadConfig, name: str | None = None) -> str:
    """Start (or find) the job's host-limits actor from the driver; returns its name.

    The actor is owned by the driver, so it ends with the job at the latest. Pass
    the name to the download stage (`DownloadStage(..., host_limits=name)`).
    """
    import ray

    name = name or actor_name_for_job()
    # Ray collects an unreferenced actor even when it is named: the driver keeps a handle.
    _DRIVER_HANDLES[name] = ray.remote(HostLimitsActor).options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=10_000,
    ).remote(cfg.max_per_host, cfg.host_requests_per_s, cfg.host_burst)
    return name


def stop_host_limits(name: str) -> None:
    import ray

    handle = _DRIVER_HANDLES.pop(name, None)
    if handle is not None:
        ray.kill(handle)


_DRIVER_HANDLES: dict = {}


def connect_host_leases(cfg: DownloadConfig, actor_name: str | None) -> HostLeases:
    """The job-wide actor's client when a name is given, else process-local limits."""
    if actor_name is None:
        book = LeaseBook(cfg.max_per_host, cfg.host_requests_per_s, cfg.host_burst)
        return HostLeases(book.acquire, book.release)
    import ray

    try:
        actor = ray.get_actor(actor_name)
    except ValueError:
        raise RuntimeError(f"host limits actor {actor_name!r} is not running: "
                           "call start_host_limits(cfg) in the driver first") from None
    return HostLeases(lambda h, w, r: actor.acquire.remote(h, w, r),
                      lambda h, n: actor.release.remote(h, n))
