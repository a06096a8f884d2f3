"""Download stage: fetch each row's image politely and safely; every failure is a drop reason.

`DownloadStage(cfg, storage, host_limits)` maps a batch with a `url` column to
the same rows plus `image_bytes`. Inside a batch, requests run concurrently on an
asyncio loop (one background thread per process, shared by all stages in it)
with at most `concurrency_per_task` in flight. Per-host caps and rate limits come
from `host_limits` (job-wide under Ray). Every hop of a redirect chain is checked
again: http(s) only, public addresses only unless `AddressPolicy` allows more
(checked on the resolved address that is actually connected to, IPv6 forms that
embed an IPv4 address judged by that address), so a URL can never reach a local
file or an internal service. Credentials in a URL (`user:pass@`) are never sent. Rows whose `url` is an s3:// URL or a local
path are read through `Storage`, only when `allow_storage_sources` is set.
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import threading
import time
import weakref
from urllib.parse import urlsplit

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc
import yarl

from rs5m_ray import metrics
from rs5m_ray.config import DownloadConfig
from rs5m_ray.ledger import mark_dropped
from rs5m_ray.stages.host_limits import HostLeases, connect_host_leases
from rs5m_ray.storage import Storage

IMAGE_BYTES = "image_bytes"
WEB_SCHEMES = ("http", "https")
STORAGE_SCHEMES = ("", "file", "s3", "s3a", "gs", "gcs", "abfs", "az", "hdfs")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
OCTET_STREAM_TYPES = ("application/octet-stream", "binary/octet-stream")


class FetchFailure(Exception):
    """A row's download failed for `reason` (the ledger's drop_reason)."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False,
                 retry_after: float | None = None):
        super().__init__(reason, detail)
        self.reason, self.detail, self.transient, self.retry_after = reason, detail, transient, retry_after


class BlockedAddress(OSError):
    """A host resolved only to addresses the safety rules refuse."""


# Link-local and cloud metadata services: allowed only by an allow_hosts entry inside them.
METADATA_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"))
NAT64_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, IPv4-compatible, NAT64, 6to4, Teredo)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)
    if any(ip in n for n in NAT64_NETWORKS) or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


class AddressPolicy:
    """Which addresses may be connected to: public ones; those inside `allow_hosts`; every loopback
    and private one with `allow_private`. Link-local and metadata addresses only when an allow_hosts
    entry lies inside their range (a broad entry such as 0.0.0.0/0 does not name them)."""

    def __init__(self, allow_hosts: list[str] = (), allow_private: bool = False):
        self.networks = [ipaddress.ip_network(h, strict=False) for h in allow_hosts]
        self.allow_private = allow_private

    @classmethod
    def of(cls, cfg: DownloadConfig) -> "AddressPolicy":
        return cls(cfg.allow_hosts, cfg.allow_private_addresses)

    def allows(self, address: str | IPAddress) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0]) if isinstance(address, str) else address
        embedded = embedded_ipv4(ip)
        if embedded:
            return all(self.allows(v4) for v4 in embedded)
        metadata = [m for m in METADATA_NETWORKS if ip.version == m.version and ip in m]
        named = [n for n in self.networks if n.version == ip.version and ip in n]
        if metadata:
            return any(n.subnet_of(m) for n in named for m in metadata)
        if named:
            return True
        if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return False
        # is_global is false for loopback, private, link-local, carrier-grade NAT and reserved addresses.
        return ip.is_global or (self.allow_private and (ip.is_loopback or ip.is_private))


def is_public_address(address: str) -> bool:
    return AddressPolicy().allows(address)


class CheckedResolver(aiohttp.abc.AbstractResolver):
    """Resolves names and keeps only the addresses the policy allows, so the checked address is the
    one connected to."""

    def __init__(self, policy: AddressPolicy, inner: aiohttp.abc.AbstractResolver) -> None:
        self.policy, self._inner = policy, inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if self.policy.allows(r["host"])]
        if not allowed:
            raise BlockedAddress(f"{host} resolves to blocked {sorted({r['host'] for r in found})}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """This process's download event loop, running in a daemon thread."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="rs5m-download-loop", daemon=True).start()
        return _LOOP


class DownloadStage:
    """Callable stage: pa.Table with `url` -> same rows with `image_bytes`, failures marked dropped."""

    def __init__(self, cfg: DownloadConfig, storage: Storage | None = None, host_limits: str | None = None):
        self.cfg = cfg
        self.storage = storage or Storage()
        self.host_limits = host_limits
        self._agent_token = cfg.user_agent.split("/")[0].strip().lower()
        self.policy = AddressPolicy.of(cfg)
        self._session: aiohttp.ClientSession | None = None
        self._leases: HostLeases | None = None
        self._slots: asyncio.Semaphore | None = None
        self._batches = 0  # batches in flight on the event loop (several threads may call the stage)

    def __getstate__(self) -> dict:
        # Runtime state (session, leases) is rebuilt lazily wherever the stage lands.
        return {k: v for k, v in self.__dict__.items() if k not in ("_session", "_leases", "_slots", "_batches")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _session=None, _leases=None, _slots=None, _batches=0)

    def __call__(self, table: pa.Table) -> pa.Table:
        urls = table["url"].to_pylist()
        results = asyncio.run_coroutine_threadsafe(self._fetch_all(urls), background_loop()).result()
        body = pa.array([r[0] for r in results], pa.binary())
        if IMAGE_BYTES in table.column_names:
            table = table.drop_columns([IMAGE_BYTES])
        table = table.append_column(IMAGE_BYTES, body)
        reasons = pa.array([r[1] for r in results], pa.string())
        return mark_dropped(table, pc.is_valid(reasons), reasons, pa.array([r[2] for r in results], pa.string()))

    async def fetch(self, url: str | None) -> tuple[bytes | None, str | None, str | None]:
        """One URL: (body, None, None), or (None, drop reason, detail); never raises for a bad URL/response.

        Run it on `background_loop()` (as `__call__` does: the session and the leases belong
        to the loop that first used them), e.g. `asyncio.run_coroutine_threadsafe(stage.fetch(u),
        background_loop())`. Idle host leases go back on their own after a moment; `close()`
        hands back the rest.
        """
        if self._session is None:
            self._open()
        return await self._fetch(url)

    def close(self) -> None:
        if self._session is not None:
            async def shut() -> None:
                await self._leases.drain()
                await self._session.close()

            asyncio.run_coroutine_threadsafe(shut(), background_loop()).result()
            self._session = None

    # -- per batch -------------------------------------------------------------------
    async def _fetch_all(self, urls: list[str | None]) -> list[tuple[bytes | None, str | None, str | None]]:
        if self._session is None:
            self._open()
        self._batches += 1
        try:
            return await asyncio.gather(*(self._fetch(u) for u in urls))
        finally:
            self._batches -= 1
            if not self._batches:  # the last batch in flight hands back what is held (leases linger between batches)
                await self._leases.drain()

    def _open(self) -> None:
        cfg = self.cfg
        self._leases = connect_host_leases(cfg, self.host_limits)
        self._slots = asyncio.Semaphore(cfg.concurrency_per_task)
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency_per_task, limit_per_host=0, ttl_dns_cache=300,
            resolver=CheckedResolver(self.policy, self.inner_resolver()))
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            headers={"User-Agent": cfg.user_agent},
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=cfg.connect_timeout_s,
                                          sock_read=cfg.read_timeout_s))
        weakref.finalize(self, _close_soon, self._session)

    @staticmethod
    def inner_resolver() -> aiohttp.abc.AbstractResolver:
        """What resolves names before the policy filters them (tests put a fake one here)."""
        return aiohttp.DefaultResolver()

    # -- per row ---------------------------------------------------------------------
    async def _fetch(self, url: str | None) -> tuple[bytes | None, str | None, str | None]:
        start = time.perf_counter()
        result = await self._fetch_row(url)
        metrics.observe("rs5m_download_seconds", time.perf_counter() - start, status=result[1] or "ok")
        return result

    async def _fetch_row(self, url: str | None) -> tuple[bytes | None, str | None, str | None]:
        try:
            if not url or not url.strip():
                raise FetchFailure("invalid_url", "empty url")
            try:
                scheme = urlsplit(url).scheme.lower()
            except ValueError as e:
                raise FetchFailure("invalid_url", str(e)[:200]) from None
            if scheme not in WEB_SCHEMES:
                if self.cfg.allow_storage_sources and scheme in STORAGE_SCHEMES:
                    return await self._read_storage(url), None, None
                raise FetchFailure("unsupported_scheme", scheme or "local path")
            return await self._fetch_with_retries(url), None, None
        except FetchFailure as f:
            return None, f.reason, f.detail or None
        except Exception as e:  # an unforeseen failure drops this row, never the batch
            return None, "download_error", f"{type(e).__name__}: {e}"[:500]

    async def _fetch_with_retries(self, url: str) -> bytes:
        for attempt in range(self.cfg.retries + 1):
            try:
                return await self._follow_redirects(url)
            except FetchFailure as f:
                if not f.transient or attempt == self.cfg.retries:
                    f.detail = f"{f.detail}; attempts={attempt + 1}".lstrip("; ")
                    raise
                delay = self._retry_delay(attempt, f.retry_after)
                if delay is None:
                    f.detail = f"{f.detail}; retry-after {f.retry_after:.0f}s over the cap".lstrip("; ")
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            return None if retry_after > self.cfg.max_retry_after_s else retry_after
        ceiling = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt)
        return ceiling * random.uniform(0.5, 1.0)  # jitter spreads out workers that failed together

    async def _follow_redirects(self, url: str) -> bytes:
        for _ in range(self.cfg.max_redirects + 1):
            target = self._checked(url)
            body, location = await self._request(target)
            if location is None:
                return body
            try:
                url = str(target.join(yarl.URL(location)))
            except (ValueError, TypeError) as e:
                raise FetchFailure("invalid_url", f"redirect to {location[:100]!r}: {e}") from None
        raise FetchFailure("too_many_redirects", f"more than {self.cfg.max_redirects}")

    def _checked(self, url: str) -> yarl.URL:
        try:
            target = yarl.URL(url)
        except (ValueError, TypeError) as e:
            raise FetchFailure("invalid_url", str(e)[:200]) from None
        if target.scheme not in WEB_SCHEMES:
            raise FetchFailure("unsupported_scheme", target.scheme or "relative")
        if not target.host:
            raise FetchFailure("invalid_url", "no host")
        try:
            literal = ipaddress.ip_address(target.host.split("%")[0])
        except ValueError:
            literal = None  # a name: CheckedResolver checks what it resolves to
        if literal is not None and not self.policy.allows(literal):
            raise FetchFailure("blocked_address", target.host)
        # Credentials in a URL are never sent (aiohttp would turn them into Basic auth).
        return target.with_user(None) if target.user is not None or target.password is not None else target

    async def _request(self, target: yarl.URL) -> tuple[bytes | None, str | None]:
        """One HTTP exchange: (body, None), or (None, Location) for a redirect."""
        host = f"{target.host}:{target.port}"
        await self._leases.acquire(host)
        try:
            async with self._slots:
                async with self._session.get(target, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUSES:
                        location = resp.headers.get("Location")
                        if not location:
                            raise FetchFailure(f"http_{resp.status}", "redirect without Location")
                        return None, location
                    self._check_response(resp)
                    return await self._read_capped(resp), None
        except FetchFailure:
            raise
        except Exception as e:
            raise _as_failure(e) from None
        finally:
            self._leases.release(host)

    def _check_response(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status != 200:
            raise FetchFailure(f"http_{resp.status}", transient=resp.status in TRANSIENT_STATUSES,
                               retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if self.cfg.respect_opt_out and opted_out(resp.headers.getall("X-Robots-Tag", []),
                                                  self.cfg.opt_out_directives, self._agent_token):
            raise FetchFailure("opt_out", ", ".join(resp.headers.getall("X-Robots-Tag")))
        media_type = (resp.content_type or "").lower()
        if (self.cfg.require_image_content_type and "Content-Type" in resp.headers
                and not media_type.startswith("image/") and media_type not in OCTET_STREAM_TYPES):
            raise FetchFailure("bad_content_type", media_type)
        if resp.content_length is not None and resp.content_length > self.cfg.max_bytes:
            raise FetchFailure("too_large", f"Content-Length {resp.content_length} > {self.cfg.max_bytes}")

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read the body, giving up (and dropping the connection) past max_bytes."""
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > self.cfg.max_bytes:
                raise FetchFailure("too_large", f"body over {self.cfg.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_storage(self, path: str) -> bytes:
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(None, self._read_storage_blocking, path)

    def _read_storage_blocking(self, path: str) -> bytes:
        try:
            fs = self.storage.fs(path)
            if fs.size(path) > self.cfg.max_bytes:
                raise FetchFailure("too_large", f"{fs.size(path)} > {self.cfg.max_bytes}")
            return self.storage.read_bytes(path)
        except FileNotFoundError:
            raise FetchFailure("not_found", path) from None
        except (IsADirectoryError, PermissionError, OSError) as e:
            raise FetchFailure("storage_error", f"{type(e).__name__}: {e}"[:300]) from None


def _as_failure(e: Exception) -> FetchFailure:
    """Map a client exception to a drop reason; transient ones are retried."""
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        if isinstance(e.os_error, BlockedAddress):
            return FetchFailure("blocked_address", str(e.os_error))
        return FetchFailure("dns_error", str(e.os_error)[:200])
    if isinstance(e, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
        return FetchFailure("ssl_error", str(e)[:200])
    if isinstance(e, asyncio.TimeoutError):  # includes aiohttp's connect/read timeouts
        return FetchFailure("timeout", type(e).__name__, transient=True)
    if isinstance(e, aiohttp.ClientPayloadError):
        return FetchFailure("truncated", str(e)[:200], transient=True)
    if isinstance(e, aiohttp.InvalidURL):
        return FetchFailure("invalid_url", str(e)[:200])
    if isinstance(e, aiohttp.ClientResponseError):
        return FetchFailure("bad_response", str(e)[:200])
    if isinstance(e, (aiohttp.ClientError, OSError)):
        return FetchFailure("connection_error", f"{type(e).__name__}: {e}"[:200], transient=True)
    raise e


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def opted_out(header_values: list[str], directives: list[str], agent_token: str) -> bool:
    """True if X-Robots-Tag carries an opt-out directive for everyone or for our agent."""
    wanted = {d.lower() for d in directives}
    for value in header_values:
        agent = None
        for part in value.lower().split(","):
            part = part.strip()
            if ":" in part:  # "agent: directive, directive" scopes what follows to that agent
                agent, part = (s.strip() for s in part.split(":", 1))
            if part in wanted and agent in (None, "*", agent_token):
                return True
    return False


def _close_soon(session: aiohttp.ClientSession) -> None:
    loop = background_loop()
    if not loop.is_closed():
        asyncio.run_coroutine_threadsafe(session.close(), loop)
