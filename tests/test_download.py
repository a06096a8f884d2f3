"""Download stage against a loopback server with injected faults, safety rules and Ray workers."""
from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from rs5m_ray.config import DownloadConfig
from rs5m_ray.ledger import Accounted, read_parquet_dir
from rs5m_ray.sample.image_server import ImageServer
from rs5m_ray.stages.download import DownloadStage, is_public_address, opted_out, parse_retry_after
from rs5m_ray.stages.host_limits import start_host_limits, stop_host_limits
from rs5m_ray.storage import Storage, join


def jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {"red.jpg": jpeg((200, 0, 0)), "green.jpg": jpeg((0, 200, 0))}
# Fast but otherwise default settings: retries and backoff stay on.
FAST = dict(timeout_s=2.0, connect_timeout_s=1.0, read_timeout_s=0.5, retries=2, backoff_base_s=0.05,
            max_retry_after_s=5.0, max_bytes=200_000, allow_hosts=["127.0.0.0/8"])


@pytest.fixture(scope="module")
def server():
    with ImageServer(IMAGES) as srv:
        yield srv


def rows(urls) -> pa.Table:
    return pa.table({"sample_id": [f"s{i}" for i in range(len(urls))], "source": ["cc3m"] * len(urls),
                     "url": urls, "caption": ["a satellite image"] * len(urls)})


# path -> expected drop reason (None = kept)
FAULTS = {
    "img/red.jpg": None,
    "img/missing.jpg": "http_404",
    "status/500": "http_500",
    "status/403": "http_403",
    "flaky/503/2/green.jpg": None,  # two 503s, then served: within the retry budget
    "flaky/500/5/red.jpg": "http_500",  # fails more often than we retry
    "retry-after/1/1/red.jpg": None,  # 429 + Retry-After: 1, then served
    "retry-after/3600/1/red.jpg": "http_429",  # asks for longer than max_retry_after_s
    "slow/3/red.jpg": "timeout",
    "truncated/red.jpg": "truncated",
    "redirect/3/green.jpg": None,
    "redirect-loop/0": "too_many_redirects",
    "oversize/5000000": "too_large",
    "wrong-type/red.jpg": "bad_content_type",
    "opt-out/noai/red.jpg": "opt_out",
    "opt-out/noimageai, noindex/red.jpg": "opt_out",
    "opt-out/otherbot: noai/red.jpg": None,  # scoped to another crawler
    "redirect-to?location=file:///etc/passwd": "unsupported_scheme",
}


def test_every_fault_ends_in_output_or_ledger(server, tmp_path):
    server.reset_stats()
    cfg = DownloadConfig(**FAST)
    urls = [server.url(p) for p in FAULTS] + [None, "file:///etc/passwd", "/etc/passwd", "ftp://example.com/a.jpg",
                                             "http://no-such-host.invalid/a.jpg", "http://[::1/a.jpg"]
    expected = list(FAULTS.values()) + ["invalid_url", "unsupported_scheme", "unsupported_scheme",
                                        "unsupported_scheme", "dns_error", "invalid_url"]
    batch = rows(urls)
    stage = Accounted("download", str(tmp_path), Storage(), DownloadStage, (cfg,))
    start = time.monotonic()
    out = stage(batch)
    elapsed = time.monotonic() - start

    ledger = read_parquet_dir(Storage(), join(str(tmp_path), "ledger", "download"))
    got = dict(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist()))
    got.update({sid: None for sid in out["sample_id"].to_pylist()})
    assert len(out) + len(ledger) == len(batch)
    assert [got[f"s{i}"] for i in range(len(urls))] == expected
    served = {sid: b for sid, b in zip(out["sample_id"].to_pylist(), out["image_bytes"].to_pylist())}
    assert served["s0"] == IMAGES["red.jpg"] and served["s10"] == IMAGES["green.jpg"]

    requests = server.stats()["requests"]
    attempts = cfg.retries + 1
    assert requests["/status/500"] == attempts  # transient: retried, and no more than the budget
    assert requests["/flaky/500/5/red.jpg"] == attempts
    assert requests["/slow/3/red.jpg"] == attempts
    assert requests["/status/403"] == requests["/img/missing.jpg"] == 1  # permanent: not retried
    assert requests["/flaky/503/2/green.jpg"] == 3
    assert requests["/retry-after/3600/1/red.jpg"] == 1  # gave up at once rather than wait an hour
    assert sum(p.startswith("/redirect-loop/") for p in requests) == cfg.max_redirects + 1
    assert elapsed >= 1.0  # Retry-After: 1 was waited out
    assert elapsed < 20


def test_public_only_by_default(server):
    stage = DownloadStage(DownloadConfig(**{**FAST, "allow_hosts": []}))
    urls = [server.url("img/red.jpg"), server.url("img/red.jpg", hostname="localhost"),
            "http://10.1.2.3/a.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::1]/a.jpg",
            "http://[::ffff:127.0.0.1]/a.jpg", "http://0.0.0.0/a.jpg", "http://192.168.1.1/a.jpg"]
    server.reset_stats()
    out = stage(rows(urls))
    assert out["drop_reason"].to_pylist() == ["blocked_address"] * len(urls)
    assert server.stats()["total_requests"] == 0  # refused before connecting


def test_is_public_address():
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700::1111")
    for addr in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
                 "0.0.0.0", "::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "224.0.0.1"):
        assert not is_public_address(addr), addr


def test_storage_sources_only_when_allowed(tmp_path, s3_bucket):
    bucket, storage = s3_bucket
    storage.write_atomic(f"{bucket}/x/red.jpg", IMAGES["red.jpg"])
    local = tmp_path / "green.jpg"
    local.write_bytes(IMAGES["green.jpg"])
    urls = [f"{bucket}/x/red.jpg", str(local), f"file://{local}", str(tmp_path / "missing.jpg")]

    refused = DownloadStage(DownloadConfig(**FAST), storage)(rows(urls))
    assert refused["drop_reason"].to_pylist() == ["unsupported_scheme"] * 4

    out = DownloadStage(DownloadConfig(**FAST, allow_storage_sources=True), storage)(rows(urls))
    assert out["drop_reason"].to_pylist() == [None, None, None, "not_found"]
    assert out["image_bytes"].to_pylist()[:3] == [IMAGES["red.jpg"], IMAGES["green.jpg"], IMAGES["green.jpg"]]


def test_web_url_never_reaches_local_file_even_with_storage_sources(server, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(IMAGES["red.jpg"])
    cfg = DownloadConfig(**FAST, allow_storage_sources=True)
    urls = [server.url(f"redirect-to?location=file://{secret}"), server.url(f"redirect-to?location={secret}")]
    out = DownloadStage(cfg)(rows(urls))
    # An absolute path in Location is resolved against the web URL, so it stays on the server.
    assert out["drop_reason"].to_pylist() == ["unsupported_scheme", "http_404"]


def test_opt_out_and_retry_after_parsing():
    assert opted_out(["noai"], ["noai", "noimageai"], "rs5m-ray")
    assert opted_out(["noindex", "NoImageAI"], ["noai", "noimageai"], "rs5m-ray")
    assert opted_out(["rs5m-ray: noai"], ["noai"], "rs5m-ray")
    assert opted_out(["*: noimageai"], ["noimageai"], "rs5m-ray")
    assert not opted_out(["googlebot: noai"], ["noai"], "rs5m-ray")
    assert not opted_out(["noindex, nofollow"], ["noai", "noimageai"], "rs5m-ray")
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: retry now


def test_stage_survives_pickling_and_reuse(server):
    import pickle

    stage = DownloadStage(DownloadConfig(**FAST))
    first = stage(rows([server.url("img/red.jpg")]))
    clone = pickle.loads(pickle.dumps(stage))
    second = clone(rows([server.url("img/green.jpg")]))
    assert first["image_bytes"].to_pylist() == [IMAGES["red.jpg"]]
    assert second["image_bytes"].to_pylist() == [IMAGES["green.jpg"]]


def run_on_ray_workers(server, cfg, host_limits):
    import ray.data

    # Two hosts (127.0.0.1:port and localhost:port) interleaved, 120 URLs each, 6 blocks of 40.
    urls = [server.url(f"img/{n}", hostname=h) for n in ["red.jpg", "green.jpg"] * 60
            for h in ("127.0.0.1", "localhost")]
    # A stage instance (not the class) runs as Ray tasks: up to 8 at once at 0.25 CPU each.
    ds = ray.data.from_arrow(rows(urls)).repartition(6).map_batches(
        DownloadStage(cfg, host_limits=host_limits), batch_format="pyarrow", batch_size=40, num_cpus=0.25)
    out = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert len(out) == len(urls) and pc.all(pc.is_null(out["drop_reason"])).as_py()
    return server.stats()["max_in_flight"]


def test_per_host_limit_holds_across_ray_workers(ray_cluster):
    cfg = DownloadConfig(**{**FAST, "max_per_host": 3, "timeout_s": 10.0, "read_timeout_s": 5.0})
    with ImageServer(IMAGES, latency_s=0.1) as server:
        name = start_host_limits(cfg)
        try:
            job_wide = run_on_ray_workers(server, cfg, name)
        finally:
            stop_host_limits(name)
        server.reset_stats()
        # Control: per-process limits only, same workers: the cap is exceeded, so the
        # job-wide result above is the actor's doing, not an artefact of the setup.
        per_process = run_on_ray_workers(server, cfg, None)
    hosts = [f"127.0.0.1:{server.ports[0]}", f"localhost:{server.ports[0]}"]
    assert sorted(job_wide) == sorted(hosts)
    assert all(2 <= job_wide[h] <= 3 for h in hosts), job_wide
    assert max(per_process.values()) > 3, per_process
