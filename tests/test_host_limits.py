"""Host leases: caps and token buckets per host, batched calls to the book (no Ray needed)."""
from __future__ import annotations

import asyncio
import time

import pytest

from rs5m_ray.config import DownloadConfig
from rs5m_ray.stages.host_limits import HostLeases, LeaseBook, connect_host_leases


async def hammer(leases: HostLeases, host: str, n: int, hold_s: float, seen: dict) -> None:
    async def one() -> None:
        await leases.acquire(host)
        try:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            await asyncio.sleep(hold_s)
        finally:
            seen["now"] -= 1
            leases.release(host)

    await asyncio.gather(*(one() for _ in range(n)))
    await leases.drain()


def test_cap_holds_and_calls_are_batched():
    async def run():
        book = LeaseBook(max_per_host=4, requests_per_s=None, burst=1)
        calls = {"acquire": 0, "release": 0}

        async def acquire(host, want, returning):
            calls["acquire"] += 1
            return await book.acquire(host, want, returning)

        def release(host, n):
            calls["release"] += 1
            book.release(host, n)

        # Two workers sharing one book, as two processes share the actor.
        workers = [HostLeases(acquire, release), HostLeases(acquire, release)]
        seen = {"now": 0, "max": 0}
        await asyncio.gather(*(hammer(w, "a:80", 60, 0.01, seen) for w in workers))
        return book, calls, seen

    book, calls, seen = asyncio.run(run())
    assert seen["max"] == 4
    assert book.in_flight("a:80") == 0  # every lease came back
    assert calls["acquire"] + calls["release"] < 120  # fewer book calls than requests


def test_token_bucket_limits_rate():
    async def run():
        leases = connect_host_leases(DownloadConfig(max_per_host=100, host_requests_per_s=40.0, host_burst=5), None)
        start = time.monotonic()
        await hammer(leases, "b:443", 25, 0.0, {"now": 0, "max": 0})
        return time.monotonic() - start

    elapsed = asyncio.run(run())
    assert elapsed >= (25 - 5) / 40 * 0.9  # 5 from the burst, the other 20 at 40/s


def test_hosts_are_independent():
    async def run():
        leases = connect_host_leases(DownloadConfig(max_per_host=1), None)
        seen_a, seen_b = {"now": 0, "max": 0}, {"now": 0, "max": 0}
        start = time.monotonic()
        await asyncio.gather(hammer(leases, "a:80", 5, 0.05, seen_a), hammer(leases, "b:80", 5, 0.05, seen_b))
        return time.monotonic() - start, seen_a["max"], seen_b["max"]

    elapsed, max_a, max_b = asyncio.run(run())
    assert max_a == max_b == 1
    assert elapsed < 0.5  # the two hosts ran side by side (serial would be 0.5 s)


def test_unreachable_book_fails_the_request_not_the_loop():
    async def broken(host, want, returning):
        raise ConnectionError("actor died")

    async def run():
        leases = HostLeases(broken, lambda h, n: None)
        with pytest.raises(ConnectionError):
            await leases.acquire("a:80")

    asyncio.run(run())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LeaseBook(0, None, 1)
    with pytest.raises(ValueError):
        LeaseBook(4, 0.0, 1)
