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
        acquire, release = counting(book, calls)

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


def counting(book: LeaseBook, calls: dict):
    async def acquire(host, want, returning):
        calls["acquire"] += 1
        return await book.acquire(host, want, returning)

    def release(host, n):
        calls["release"] += 1
        book.release(host, n)

    return acquire, release


def test_reused_leases_cost_a_few_book_calls_not_two_per_request():
    async def run():
        book = LeaseBook(max_per_host=4, requests_per_s=None, burst=1)
        calls = {"acquire": 0, "release": 0}
        leases = HostLeases(*counting(book, calls), reuse_s=5.0, linger_s=0.05)
        seen = {"now": 0, "max": 0}
        for _ in range(3):  # three batches, as one worker's consecutive slices
            await hammer(leases, "a:80", 100, 0.001, seen)
        return book, calls, seen

    book, calls, seen = asyncio.run(run())
    assert seen["max"] == 4
    assert book.in_flight("a:80") == 0  # drain handed everything back
    assert calls["acquire"] + calls["release"] <= 30, calls  # 12 measured; ~2 per request (600) without reuse


def test_reused_lease_goes_back_after_reuse_s_and_idle_ones_after_linger():
    async def run():
        book = LeaseBook(max_per_host=1, requests_per_s=None, burst=1)
        calls = {"acquire": 0, "release": 0}
        leases = HostLeases(*counting(book, calls), reuse_s=0.05, linger_s=0.05)
        await leases.acquire("a:80")
        await asyncio.sleep(0.08)  # older than reuse_s: back to the book on release
        leases.release("a:80")
        await asyncio.sleep(0.01)
        back_at_once = book.in_flight("a:80") == 0
        await leases.acquire("a:80")
        leases.release("a:80")  # fresh: kept idle for linger_s
        await asyncio.sleep(0.01)
        held_while_lingering = book.in_flight("a:80") == 1
        await asyncio.sleep(0.1)
        return back_at_once, held_while_lingering, book.in_flight("a:80"), calls

    back_at_once, held_while_lingering, after_linger, calls = asyncio.run(run())
    assert back_at_once and held_while_lingering and after_linger == 0
    assert calls == {"acquire": 2, "release": 2}


def test_book_serves_waiting_workers_first_come_first_served():
    async def run():
        book = LeaseBook(max_per_host=1, requests_per_s=None, burst=1)
        order = []
        assert await book.acquire("a:80", 1) == 1  # worker A holds the only lease

        async def wait_for(name):
            await book.acquire("a:80", 1)
            order.append(name)

        b = asyncio.ensure_future(wait_for("B"))
        await asyncio.sleep(0.01)
        # A hands its lease back and asks again in one call: B, who waited first, gets it.
        a = asyncio.ensure_future(book.acquire("a:80", 1, returning=1))
        await asyncio.sleep(0.01)
        first = list(order)
        book.release("a:80", 1)
        await a
        return first, book.in_flight("a:80")

    first, in_flight = asyncio.run(run())
    assert first == ["B"] and in_flight == 1


def test_rate_limited_hosts_take_a_token_per_request():
    leases = connect_host_leases(DownloadConfig(host_requests_per_s=10.0), None)
    assert leases.reuse_s == 0  # a reused lease would skip the bucket
    assert connect_host_leases(DownloadConfig(), None).reuse_s > 0
