"""A loopback HTTP image server with injectable faults, for tests, benchmarks and the demo.

Serves images from a dict or a directory under `/img/<name>`, on one or more
ports of 127.0.0.1 (each port is a distinct host:port for per-host limits), with
an optional latency on every response. Fault routes:

  /status/<code>                      that status, empty body (404, 500, ...)
  /flaky/<code>/<failures>/<name>     <code> for the first <failures> requests of this path, then the image
  /retry-after/<seconds>/<failures>/<name>   429 + Retry-After the first <failures> times, then the image
  /slow/<seconds>/<name>              waits, then the image
  /truncated/<name>                   announces the full length, sends half, closes
  /redirect/<hops>/<name>             a chain of <hops> 302s ending at the image
  /redirect-loop/<n>                  302 to /redirect-loop/<n+1>, forever
  /redirect-to?location=<url>         302 to any location (file://, private addresses, ...)
  /oversize/<bytes>                   a streamed body of that size, no Content-Length
  /wrong-type/<name>                  the image labelled text/html
  /opt-out/<directive>/<name>         the image with X-Robots-Tag: <directive>

`stats()` reports requests per path and the maximum number of requests in
flight at once per Host header (the limiter under test keys on host:port too).
Run standalone with `python -m rs5m_ray.sample.image_server --help`.
"""
from __future__ import annotations

import argparse
import asyncio
import mimetypes
import socket
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path

from aiohttp import web


class ImageServer:
    def __init__(self, images: dict[str, bytes] | None = None, directory: str | Path | None = None,
                 latency_s: float = 0.0, ports: int = 1, host: str = "127.0.0.1"):
        self.images = dict(images or {})
        self.directory = Path(directory) if directory else None
        self.latency_s = latency_s
        self.host = host
        self._n_ports = ports
        self.ports: list[int] = []
        self._lock = threading.Lock()
        self.reset_stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "ImageServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_sites())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="image-server", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("image server did not start")
        return self

    async def _start_sites(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for _ in range(self._n_ports):
            sock = socket.socket()
            sock.bind((self.host, 0))
            await web.SockSite(self._runner, sock, backlog=1024).start()
            self.ports.append(sock.getsockname()[1])

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, path: str, port_index: int = 0, hostname: str | None = None) -> str:
        return f"http://{hostname or self.host}:{self.ports[port_index]}/{path.lstrip('/')}"

    # -- statistics --------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._lock:
            self._requests: Counter = Counter()
            self._in_flight: Counter = Counter()
            self._max_in_flight: dict[str, int] = defaultdict(int)

    def stats(self) -> dict:
        with self._lock:
            return {"requests": dict(self._requests), "max_in_flight": dict(self._max_in_flight),
                    "total_requests": sum(self._requests.values())}

    # -- routes ------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        with self._lock:
            self._requests[request.path] += 1
            seen = self._requests[request.path]
            self._in_flight[host] += 1
            self._max_in_flight[host] = max(self._max_in_flight[host], self._in_flight[host])
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await self._route(request, request.path.strip("/").split("/"), seen)
        finally:
            with self._lock:
                self._in_flight[host] -= 1

    async def _route(self, request: web.Request, parts: list[str], seen: int) -> web.StreamResponse:
        kind, args = parts[0], parts[1:]
        if kind == "img" and args:
            return self._image("/".join(args))
        if kind == "status" and len(args) == 1:
            return web.Response(status=int(args[0]))
        if kind == "flaky" and len(args) >= 3:
            return web.Response(status=int(args[0])) if seen <= int(args[1]) else self._image("/".join(args[2:]))
        if kind == "retry-after" and len(args) >= 3:
            if seen <= int(args[1]):
                return web.Response(status=429, headers={"Retry-After": args[0]})
            return self._image("/".join(args[2:]))
        if kind == "slow" and len(args) >= 2:
            await asyncio.sleep(float(args[0]))
            return self._image("/".join(args[1:]))
        if kind == "truncated" and args:
            return await self._truncated(request, self._body("/".join(args)))
        if kind == "redirect" and len(args) >= 2:
            hops, name = int(args[0]), "/".join(args[1:])
            raise web.HTTPFound(f"/redirect/{hops - 1}/{name}" if hops > 1 else f"/img/{name}")
        if kind == "redirect-loop":
            raise web.HTTPFound(f"/redirect-loop/{int(args[0]) + 1 if args else 1}")
        if kind == "redirect-to":
            raise web.HTTPFound(request.query["location"])
        if kind == "oversize" and len(args) == 1:
            return await self._stream(request, int(args[0]))
        if kind == "wrong-type" and args:
            return web.Response(body=self._body("/".join(args)), content_type="text/html")
        if kind == "opt-out" and len(args) >= 2:
            response = self._image("/".join(args[1:]))
            response.headers["X-Robots-Tag"] = args[0]
            return response
        raise web.HTTPNotFound()

    def _body(self, name: str) -> bytes:
        if name in self.images:
            return self.images[name]
        if self.directory is not None:
            path = (self.directory / name).resolve()
            if path.is_file() and self.directory.resolve() in path.parents:
                return path.read_bytes()
        raise web.HTTPNotFound()

    def _image(self, name: str) -> web.Response:
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.Response(body=self._body(name), content_type=content_type)

    async def _truncated(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        request.transport.close()
        return response

    async def _stream(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\xff" * 65536
        sent = 0
        try:
            while sent < size:
                await response.write(chunk[: size - sent])
                sent += min(len(chunk), size - sent)
        except (ConnectionError, RuntimeError):
            return response  # the client hung up, as it should for oversize bodies
        await response.write_eof()
        return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve images from a directory on loopback.")
    parser.add_argument("directory")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--preload", action="store_true",
                        help="read the directory's files into memory once (benchmarks: no disk read per request)")
    args = parser.parse_args(argv)
    images = ({p.name: p.read_bytes() for p in Path(args.directory).iterdir() if p.is_file()}
              if args.preload else None)
    server = ImageServer(images=images, directory=None if args.preload else args.directory,
                         latency_s=args.latency_ms / 1000, ports=args.ports).start()
    print(" ".join(str(p) for p in server.ports), flush=True)  # the parent reads the ports here
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
