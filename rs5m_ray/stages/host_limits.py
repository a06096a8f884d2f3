"""Per-host politeness that holds across the whole job, not just one process.

A `LeaseBook` keeps, for every host (the URL's host:port), the number of requests
in flight (capped) and a token bucket (rate limit). A request needs one lease and
hands it back when done. Under Ray one named async actor per job owns the book;
each worker's `HostLeases` client asks it for as many leases as it has requests
waiting for a host, in one call. The book serves waiting callers in arrival order,
so leases handed back go to whoever waited first.

Without a rate limit a worker keeps its leases while it has queued requests for
that host: a finished request's lease goes straight to the next one, up to
`reuse_s` after the book granted it (then it goes back, and waiting workers get
their turn), and an idle lease is kept `linger_s` for the next batch's requests
before it is handed back. So the book sees a few calls per host per `reuse_s`,
not two per request. With a rate limit every request takes a lease (= a token)
from the book; leases that finish in the same event-loop turn still go back in
one call. Outside Ray (or when no actor name is given) the same client talks to
an in-process book.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from rs5m_ray import metrics
from rs5m_ray.config import DownloadConfig

# Local reuse of leases (only without a rate limit): how long a granted lease may serve
# one worker's queued requests before it goes back to the book, and how long an idle one
# is kept for requests that are about to come.
LEASE_REUSE_S = 5.0
LEASE_LINGER_S = 0.25


class LeaseBook:
    """Concurrency caps and token buckets per host; lives in one asyncio event loop.

    Callers that cannot be served at once queue per host and are served first come,
    first served, as leases come back or tokens accrue.
    """

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
        self._queues: dict[str, deque] = {}  # host -> deque of (want, future)
        self._timers: dict[str, asyncio.TimerHandle] = {}  # host -> wake-up when the next token arrives

    async def acquire(self, host: str, want: int, returning: int = 0) -> int:
        """Hand back `returning` leases, then wait for at least one lease for `host`; grant up to `want`."""
        if returning:
            self.release(host, returning)
        if not self._queues.get(host):
            granted = self._take(host, want)
            if granted:
                return granted
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(host, deque()).append((want, fut))
        self._schedule(host)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just before the caller went away
                self.release(host, fut.result())
            raise

    def release(self, host: str, n: int) -> None:
        self._active[host] = max(0, self._active[host] - n)
        self._serve(host)
        if self._active.get(host) == 0 and self.rate is None and host not in self._queues:
            del self._active[host]  # keep the book small on jobs with millions of hosts

    def in_flight(self, host: str) -> int:
        return self._active.get(host, 0)

    def _take(self, host: str, want: int) -> int:
        granted = min(want, self.max_per_host - self._active[host])
        if self.rate is not None:
            tokens = self._refill(host)
            granted = min(granted, math.floor(tokens))
            if granted >= 1:
                self._tokens[host] = (tokens - granted, time.monotonic())
        if granted < 1:
            return 0
        self._active[host] += granted
        return granted

    def _serve(self, host: str) -> None:
        """Grant leases to queued callers in arrival order while the cap and the bucket allow."""
        queue = self._queues.get(host)
        while queue:
            want, fut = queue[0]
            if fut.done():  # the caller went away
                queue.popleft()
                continue
            granted = self._take(host, want)
            if not granted:
                break
            queue.popleft()
            fut.set_result(granted)
        if queue is not None and not queue:
            del self._queues[host]
        self._schedule(host)

    def _schedule(self, host: str) -> None:
        """With callers queued for lack of tokens (not of free slots), wake up when the next token is due."""
        if self.rate is None or not self._queues.get(host) or host in self._timers:
            return
        if self._active[host] >= self.max_per_host:
            return  # a release will serve the queue
        tokens = self._refill(host)
        delay = max(0.0, (1 - tokens) / self.rate)

        def wake() -> None:
            del self._timers[host]
            self._serve(host)

        self._timers[host] = asyncio.get_running_loop().call_later(delay, wake)

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
    idle: int = 0  # leases held and not in use
    stamps: deque = field(default_factory=deque)  # grant time of every lease held, oldest first
    finished: int = 0  # leases to hand back
    calling: bool = False
    keep_idle_until: float = 0.0  # loop time until which idle leases are kept (linger)
    flush_at: float = 0.0  # loop time of the armed flush
    timer: asyncio.TimerHandle | None = None


class HostLeases:
    """One worker's client: `await acquire(host)` before a request, `release(host)` after.

    `acquire_fn(host, want, returning)` and `release_fn(host, n)` reach the book,
    either an actor's methods or an in-process LeaseBook. `reuse_s` > 0 lets a lease
    serve this worker's queued requests for that long after it was granted and keeps
    idle leases `linger_s` (only for books without a rate limit: every request must
    take a token there). Call `drain()` at the end of a batch: it hands back the idle
    leases of hosts this client has nothing in flight for, and waits for the book calls;
    after the last batch nothing stays held.
    """

    def __init__(self, acquire_fn: Callable[[str, int, int], Awaitable[int]],
                 release_fn: Callable[[str, int], Awaitable[None] | None],
                 reuse_s: float = 0.0, linger_s: float = 0.0):
        self._acquire_fn = acquire_fn
        self._release_fn = release_fn
        self.reuse_s, self.linger_s = reuse_s, linger_s if reuse_s > 0 else 0.0
        self._hosts: dict[str, _HostState] = defaultdict(_HostState)
        self._pending: set[asyncio.Future] = set()
        self.calls = {"acquire": 0, "release": 0}  # book calls made, for benchmarks

    async def acquire(self, host: str) -> None:
        st = self._hosts[host]
        if st.idle:
            st.idle -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        st.waiters.append(fut)
        if not st.calling:
            st.calling = True
            self._track(self._refill(host, st))
        waiting = time.perf_counter()
        try:
            await fut
            metrics.observe("rs5m_host_lease_wait_seconds", time.perf_counter() - waiting)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # a lease was handed to us as we were cancelled
                self.release(host)
            raise

    def release(self, host: str) -> None:
        st = self._hosts[host]
        if self.reuse_s and st.stamps and time.monotonic() - st.stamps[0] < self.reuse_s:
            if not self._hand_over(st):  # fresh: straight to the next queued request, else kept idle
                self._keep_idle(host, st, 1)
            return
        if st.stamps:
            st.stamps.popleft()  # the oldest lease goes back
        st.finished += 1
        self._arm(host, st, 0.0)  # leases finishing in the same loop turn go back in one call

    async def drain(self) -> None:
        """Hand back the idle leases of hosts with no request in flight here; wait for the book calls."""
        while True:
            for host, st in list(self._hosts.items()):
                if len(st.stamps) <= st.idle:  # nothing in use (without reuse nothing is tracked: idle ones go)
                    st.keep_idle_until = 0.0
                    if st.timer is not None:
                        st.timer.cancel()
                        st.timer = None
                    self._flush(host)
            if not self._pending:
                return
            # A pending grant may bring back leases nobody waits for any more: hand those back too.
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    @staticmethod
    def _hand_over(st: _HostState) -> bool:
        while st.waiters:
            fut = st.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    async def _refill(self, host: str, st: _HostState) -> None:
        try:
            while any(not f.done() for f in st.waiters):
                returning, st.finished = st.finished, 0
                want = sum(not f.done() for f in st.waiters)
                self.calls["acquire"] += 1
                granted = await self._acquire_fn(host, want, returning)
                if self.reuse_s:
                    st.stamps.extend([time.monotonic()] * granted)
                while granted and self._hand_over(st):
                    granted -= 1
                if granted:
                    self._keep_idle(host, st, granted)
        except BaseException as e:  # the book is unreachable: fail the waiting requests
            while st.waiters:
                fut = st.waiters.popleft()
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
        finally:
            st.calling = False
            self._arm(host, st, 0.0)

    def _keep_idle(self, host: str, st: _HostState, n: int) -> None:
        st.idle += n
        st.keep_idle_until = asyncio.get_running_loop().time() + self.linger_s
        self._arm(host, st, self.linger_s)

    def _arm(self, host: str, st: _HostState, delay: float) -> None:
        """Flush `host` after `delay` (the earliest armed time wins)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if st.timer is not None:
            if st.flush_at <= at:
                return
            st.timer.cancel()
        st.flush_at = at
        st.timer = loop.call_at(at, self._flush, host) if delay > 0 else loop.call_soon(self._flush, host)

    def _flush(self, host: str) -> None:
        """Hand back finished leases now (the book may be waiting for them); idle ones once lingered."""
        st = self._hosts.get(host)
        if st is None:
            return
        st.timer = None
        n, st.finished = st.finished, 0
        # Idle leases go back even while a book call is pending (it may be waiting for them).
        waiting = any(not f.done() for f in st.waiters)
        if st.idle and not waiting:
            now = asyncio.get_running_loop().time()
            if now >= st.keep_idle_until:
                n += st.idle
                for _ in range(min(st.idle, len(st.stamps))):
                    st.stamps.pop()
                st.idle = 0
            else:
                self._arm(host, st, st.keep_idle_until - now)
        if not waiting and not st.calling and not st.idle and not st.stamps and st.timer is None:
            del self._hosts[host]
        if n:
            self.calls["release"] += 1
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
    reuse = dict(reuse_s=LEASE_REUSE_S, linger_s=LEASE_LINGER_S) if cfg.host_requests_per_s is None else {}
    if actor_name is None:
        book = LeaseBook(cfg.max_per_host, cfg.host_requests_per_s, cfg.host_burst)
        return HostLeases(book.acquire, book.release, **reuse)
    import ray

    try:
        actor = ray.get_actor(actor_name)
    except ValueError:
        raise RuntimeError(f"host limits actor {actor_name!r} is not running: "
                           "call start_host_limits(cfg) in the driver first") from None
    return HostLeases(lambda h, w, r: actor.acquire.remote(h, w, r),
                      lambda h, n: actor.release.remote(h, n), **reuse)
