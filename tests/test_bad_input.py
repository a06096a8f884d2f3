"""Bad input and operator errors (issue 11): each failure class with its exact outcome."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import http.server
import io
import ipaddress
import json
import math
import random
import re
import socket
import threading
import types
import typing
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rs5m_ray import config as config_module
from rs5m_ray.config import (ConfigError, DecodeConfig, DownloadConfig, IngestConfig, PipelineConfig, SourceConfig,
                             TrainConfig, load_config)
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.sample.generate import jpeg, photo_image
from rs5m_ray.sample.image_server import ImageServer
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.stages.decode import DecodeStage
from rs5m_ray.stages.download import AddressPolicy, DownloadStage
from rs5m_ray.storage import Storage

# ---------------------------------------------------------------- config validation at load


def _numeric(tp) -> type | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in (int, float) else None


def _config_fields(cls: type, path: str):
    """(key path, field, type) for every field of `cls` and of its sections, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(inner):
            sub = f"{path}{f.name}[0]." if inner is not tp else f"{path}{f.name}."
            yield from _config_fields(inner, sub)
        else:
            yield f"{path}{f.name}", f, tp


def _bad_values(f: dataclasses.Field, tp: type) -> list:
    b = f.metadata["bounds"]
    step = 1 if tp is int else 0.5
    bad = [v for v in (b.ge - step if b.ge is not None else None, b.gt, b.le + step if b.le is not None else None,
                       b.lt) if v is not None]
    return [tp(v) for v in bad] + ([math.nan, math.inf] if tp is float else [])


def _item_class(tp) -> type | None:
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    return inner if dataclasses.is_dataclass(inner) else None


def _minimal(cls: type) -> dict:
    """The smallest valid mapping for `cls`: its required fields, and one item in lists that need one."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("bounds")
        item = _item_class(hints[f.name])
        if item is not None and bounds is not None and bounds.min_len:
            out[f.name] = [_minimal(item)]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            choices = bounds.choices if bounds is not None else None
            value = choices[0] if choices else "laion2b" if cls is config_module.SourceConfig else "x"
            out[f.name] = [value] if typing.get_origin(hints[f.name]) is list else value
    return out


def _overrides(top: type, path: str, value) -> dict:
    """A valid config mapping for `top` with `path` ('a.b', 'a[0].b') set to `value`."""
    head, _, rest = path.partition(".")
    base = _minimal(top)
    if head.endswith("[0]"):
        name = head[:-3]
        item = _item_class(typing.get_type_hints(top)[name])
        return base | {name: [_minimal(item) | _overrides(item, rest, value)]}
    if not rest:
        return base | {head: value}
    return base | {head: _overrides(typing.get_type_hints(top)[head], rest, value)}


CONFIG_CLASSES = [c for c in vars(config_module).values()
                  if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == config_module.__name__
                  and c.__name__.endswith("Config")]


def _sections(cls: type) -> set[type]:
    out = set()
    for tp in typing.get_type_hints(cls).values():
        inner = _item_class(tp) or (tp if dataclasses.is_dataclass(tp) else None)
        if inner is not None:
            out |= {inner} | _sections(inner)
    return out


NESTED = set().union(*(_sections(c) for c in CONFIG_CLASSES))
TOP = sorted((c for c in CONFIG_CLASSES if c not in NESTED), key=lambda c: c.__name__)  # the jobs' configs
NUMERIC = [(top, path, f, _numeric(tp)) for top in TOP for path, f, tp in _config_fields(top, "") if _numeric(tp)]


def test_the_walk_covers_every_config_dataclass():
    assert {PipelineConfig, TrainConfig} <= set(TOP)
    assert set(CONFIG_CLASSES) == set(TOP) | NESTED
    assert len(NUMERIC) > 60


@pytest.mark.parametrize("top, path, f, tp", NUMERIC, ids=[f"{t.__name__}:{p}" for t, p, _, _ in NUMERIC])
def test_every_numeric_config_field_is_range_checked(top, path, f, tp):
    assert "bounds" in f.metadata, f"{path}: declare its allowed range with config.bounded(...)"
    load_config(overrides=_overrides(top, path, _valid(f)), cls=top)  # the default passes
    for bad in _bad_values(f, tp):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=_overrides(top, path, bad), cls=top)
        message = str(e.value)
        assert message.startswith(f"{path}: {bad!r} is not allowed; allowed: "), message
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: expected"):
        load_config(overrides=_overrides(top, path, True), cls=top)  # a YAML boolean is not a number


def _valid(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else None


@pytest.mark.parametrize("overrides, message", [
    ({"download": {"retries": -1}}, r"^download\.retries: -1 is not allowed; allowed: >= 0, <= 100$"),
    ({"download": {"concurrency_per_task": 0}}, r"^download\.concurrency_per_task: 0 is not allowed; allowed: >= 1$"),
    ({"download": {"timeout_s": math.nan}}, r"^download\.timeout_s: nan is not allowed; allowed: > 0, finite$"),
    ({"download": {"max_bytes": 0}}, r"^download\.max_bytes: 0 is not allowed"),
    ({"download": {"max_redirects": -1}}, r"^download\.max_redirects: -1 is not allowed"),
    ({"download": {"min_actors": 5, "max_actors": 2}}, r"^download: needs min_actors <= max_actors$"),
    ({"shards": {"val_fraction": 2.5}}, r"^shards\.val_fraction: 2\.5 is not allowed; allowed: >= 0, <= 1, finite$"),
    ({"keyword": {"keywords": []}}, r"^keyword\.keywords: \[\] is not allowed; allowed: at least 1 long"),
    ({"keyword": {"keywords": ["aerial", ""]}}, r"^keyword\.keywords: .* items at least 1 long$"),
    ({"ray": {"shuffle_strategy": "fastest"}}, r"^ray\.shuffle_strategy: 'fastest' is not allowed; allowed: one of "),
    ({"decode": {"resize_mode": "crop"}}, r"^decode\.resize_mode: 'crop' is not allowed; allowed: one of "
                                          r"\['keep', 'max_side', 'shortest_side'\]$"),
    ({"scoring": {"device": "tpu"}}, r"^scoring\.device: 'tpu' is not allowed; allowed: matching "),
    ({"ingest": {"sources": [{"name": "laion2b", "paths": []}]}}, r"^ingest\.sources\[0\]\.paths: \[\] is not"),
    ({"near_dup": {"hamming_radius": 6, "phash_bands": 6}}, r"^near_dup: needs phash_bands > hamming_radius$"),
])
def test_bad_config_values_name_the_key_and_the_allowed_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_yaml_config_is_checked_at_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("download:\n  timeout_s: .nan\n")
    with pytest.raises(ConfigError, match=r"^download\.timeout_s: nan is not allowed"):
        load_config(p)


def test_unknown_source_is_refused_before_ray_starts(monkeypatch):
    from rs5m_ray.pipelines import pub11

    monkeypatch.setattr(pub11, "init_ray", lambda *a: pytest.fail("Ray started"))
    cfg = load_config(overrides={"ingest": {"sources": [{"name": "laion5b", "paths": ["x.parquet"]}]},
                                 "scoring": {"enabled": False}, "near_dup": {"embedding_enabled": False}})
    with pytest.raises(ConfigError, match=r"^ingest\.sources\[0\]\.name: unknown source 'laion5b'; known: \["):
        pub11.run(cfg)


# ---------------------------------------------------------------- ingest: one bad file, one bad line


ROWS = [(f"http://e.org/{i}.jpg", f"aerial view {i}") for i in range(6)]
FORMATS = {  # source: (file suffix, line of row 0 in the file)
    "laion2b": (".parquet", None), "yfcc15m": (".tsv", 2), "cc3m": (".tsv", 1), "sbu": (".jsonl", 1),
    "redcaps": (".json", None),
}


def _write(source: str, path, rows, *, raw_line: bytes | None = None, bad_at: int = 2) -> None:
    """`rows` of (url, caption) (str, bytes, or any JSON value) in the source's format; `raw_line`
    replaces row `bad_at` by those bytes in the text formats."""
    def text(v):
        return v if isinstance(v, bytes) or v is None else str(v).encode()

    if source == "laion2b":
        pq.write_table(pa.table({"URL": pa.array([text(u) for u, _ in rows], pa.binary()).view(pa.string()),
                                 "TEXT": pa.array([text(c) for _, c in rows], pa.binary()).view(pa.string())}), path)
        return
    if source == "redcaps":
        records = [{"url": u, "caption": c} for u, c in rows]
        body = b", ".join(raw_line if raw_line is not None and i == bad_at else json.dumps(r).encode()
                          for i, r in enumerate(records))
        path.write_bytes(b'{"info": {}, "annotations": [' + body + b"]}")
        return
    lines = []
    for i, (u, c) in enumerate(rows):
        if raw_line is not None and i == bad_at:
            lines.append(raw_line)
        elif source == "sbu":
            lines.append(json.dumps({"image_url": u, "caption": c}).encode())
        elif source == "cc3m":
            lines.append(text(c) + b"\t" + text(u))
        else:
            lines.append(text(u) + b"\t" + text(c))
    header = [b"downloadurl\ttitle"] if source == "yfcc15m" else []
    path.write_bytes(b"\n".join(header + lines) + b"\n")


def _ingest(tmp_path, source, suffix):
    """Ingest every file of `source` in tmp_path in-process: {sample_id: outcome}, the file errors."""
    storage, out = Storage(), str(tmp_path / "out")
    cfg = IngestConfig(sources=[SourceConfig(source, [str(tmp_path / f"*{suffix}*")])])
    files = list_inputs(cfg, storage)
    stage = IngestFiles(cfg, out, storage)
    kept = list(stage(pa.table({"source": [f["source"] for f in files], "path": [f["path"] for f in files]})))
    outcome = {}
    for t in kept:
        for r in t.to_pylist():
            outcome[r["sample_id"]] = ("kept", r["url"], r["caption"])
    ledger = read_parquet_dir(storage, f"{out}/ledger")
    for r in ledger.to_pylist() if ledger is not None else []:
        assert r["sample_id"] not in outcome, "a row both kept and dropped"
        outcome[r["sample_id"]] = (r["drop_reason"], r["drop_detail"])
    errors = [json.loads(p.read_text()) for p in (tmp_path / "out" / "errors" / "ingest").glob("*.json")]
    return outcome, errors


def _kept(source, stem, rows, first=0):
    return {f"{source}_{stem}_{first + i}": ("kept", u, c) for i, (u, c) in enumerate(rows)}


CORRUPTIONS = ["empty", "truncated", "wrong_types", "one_bad_row", "wrong_encoding", "lone_surrogate"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("source", sorted(FORMATS))
def test_a_corrupt_file_loses_no_row_outside_the_bad_one(tmp_path, source, corruption):
    suffix, first_line = FORMATS[source]
    if corruption == "lone_surrogate" and source not in ("sbu", "redcaps"):
        pytest.skip("a \\ud800 escape exists in JSON only")
    good = [(f"http://e.org/good{i}.jpg", f"aerial good {i}") for i in range(4)]
    _write(source, tmp_path / f"part-good{suffix}", good)
    bad = tmp_path / f"part-bad{suffix}"
    errors_expected = []
    expected = {}
    if corruption == "empty":
        bad.write_bytes(b"")
        if source in ("laion2b", "redcaps", "yfcc15m"):  # a file that must hold a footer, a document, a header
            errors_expected = ["parquet" if source == "laion2b" else "JSON" if source == "redcaps" else "missing URL"]
    elif corruption == "truncated":
        if source == "laion2b":
            _write(source, bad, ROWS)
            bad.write_bytes(bad.read_bytes()[:-40])
        else:
            plain = tmp_path / "plain"
            _write(source, plain, ROWS * 200)  # enough for a few complete lines before the cut
            data = gzip.compress(plain.read_bytes())
            plain.unlink()
            bad = tmp_path / f"part-bad{suffix}.gz"
            bad.write_bytes(data[: len(data) // 2])
        errors_expected = ["malformed"]
    elif corruption == "wrong_types":
        if source == "laion2b":
            pq.write_table(pa.table({"URL": [u for u, _ in ROWS], "TEXT": [[c] for _, c in ROWS]}), bad)
            errors_expected = ["column 'TEXT' has type list<element: string>, which cannot be read as text"]
            expected = {f"laion2b_part-bad_{i}": ("unreadable_file", "ColumnTypeError: column 'TEXT' has type "
                                                  "list<element: string>, which cannot be read as text")
                        for i in range(6)}
        elif source in ("sbu", "redcaps"):
            _write(source, bad, [(42, c) if i == 2 else (u, c) for i, (u, c) in enumerate(ROWS)])
            where = "line3" if source == "sbu" else "record3"
            key = "image_url" if source == "sbu" else "url"
            expected = {**_kept(source, "part-bad", ROWS[:2]), **_kept(source, "part-bad", ROWS[3:], 2),
                        f"{source}_part-bad_{where}": ("malformed_row", f"{where[:-1]} 3: '{key}' is a JSON int, "
                                                       "not a string")}
        else:  # delimited text has no types: a number where a URL should be is still text
            rows = [("42", c) if i == 2 else (u, c) for i, (u, c) in enumerate(ROWS)]
            _write(source, bad, rows)
            expected = _kept(source, "part-bad", rows)
    elif corruption in ("one_bad_row", "wrong_encoding", "lone_surrogate"):
        if corruption == "one_bad_row":
            raw = {"laion2b": None, "yfcc15m": b"http://e.org/2.jpg\tcap\textra", "cc3m": b"cap\thttp://e.org/2.jpg\tx",
                   "sbu": b'{"image_url": "http://e.org/2.jpg", "caption": ', "redcaps": b'"just a string"'}[source]
        elif corruption == "wrong_encoding":
            raw = {"laion2b": None, "yfcc15m": b"http://e.org/2.jpg\ta\xe9rial", "cc3m": b"a\xe9rial\thttp://e.org/2.jpg",
                   "sbu": b'{"image_url": "http://e.org/2.jpg", "caption": "a\xe9rial"}',
                   "redcaps": b'{"url": "http://e.org/2.jpg", "caption": "a\xe9rial"}'}[source]
        else:
            key = "image_url" if source == "sbu" else "url"
            raw = b'{"%s": "http://e.org/2.jpg", "caption": "a\\ud800rial"}' % key.encode()
        if source == "laion2b":
            bad_row = (None, "aerial 2") if corruption == "one_bad_row" else ("http://e.org/2.jpg", b"a\xe9rial")
            _write(source, bad, [bad_row if i == 2 else r for i, r in enumerate(ROWS)])
        else:
            _write(source, bad, ROWS, raw_line=raw)
        if corruption == "one_bad_row" and source != "laion2b":
            where = f"record{3}" if source == "redcaps" else f"line{first_line + 2}"
            expected = {**_kept(source, "part-bad", ROWS[:2]), **_kept(source, "part-bad", ROWS[3:], 2)}
            detail = {"yfcc15m": "expected 2 columns, got 3", "cc3m": "expected 2 columns, got 3",
                      "sbu": "invalid JSON (Expecting value)", "redcaps": "a JSON str, not an object"}[source]
            expected[f"{source}_part-bad_{where}"] = ("malformed_row", f"{where[:-1]} {where[-1]}: {detail}"
                                                      if source == "redcaps" else f"line {first_line + 2}: {detail}")
        else:
            reason = ("null_url", None) if corruption == "one_bad_row" else ("invalid_utf8", "caption")
            expected = {**_kept(source, "part-bad", ROWS), f"{source}_part-bad_2": reason}

    outcome, errors = _ingest(tmp_path, source, suffix)
    assert {k: v for k, v in outcome.items() if "part-good" in k} == _kept(source, "part-good", good)
    bad_rows = {k: v for k, v in outcome.items() if "part-bad" in k}
    assert [e["path"] for e in errors] == [str(bad)] * len(errors_expected)
    for e, why in zip(errors, errors_expected):
        assert why in e["error"] and e["source"] == source
    if corruption == "truncated":
        # What was read before the cut is kept as it was; what can be counted after it is accounted for.
        (e,) = errors
        ids = [f"{source}_part-bad_{i}" for i in range(len(bad_rows))]
        assert sorted(bad_rows) == sorted(ids)
        originals = _kept(source, "part-bad", ROWS * 200)
        read = [bad_rows[i] for i in ids[:e["rows_read_before_error"]]]
        assert read == [originals[i] for i in ids[:len(read)]]
        assert [v[0] for v in bad_rows.values()].count("unreadable_file") == (e["rows_lost"] or 0)
        if source != "laion2b":
            assert "EOFError: Compressed file ended before the end-of-stream marker" in e["error"]
            if source == "redcaps":  # one JSON document's records cannot be counted
                assert e["rows_lost"] is None
            elif source == "sbu":  # JSON lines before the cut are kept
                assert e["rows_read_before_error"] > 0
            else:  # Arrow reads 8 MB blocks: the cut block's complete lines are counted, not kept
                assert e["rows_lost"] > 0
    else:
        assert bad_rows == expected


# ---------------------------------------------------------------- network: a narrow allowance, refusals before connecting


LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
NAMES = {  # what the fake resolver answers: every name but loop.test is refused before connecting
    "loop.test": "127.0.0.1", "metadata.test": "169.254.169.254", "nat64.test": "64:ff9b::a9fe:a9fe",
    "sixtofour.test": "2002:a9fe:a9fe::1", "mapped.test": "::ffff:10.0.0.1", "compat.test": "::a9fe:a9fe",
    "private.test": "10.1.2.3", "imds6.test": "fd00:ec2::254", "linklocal6.test": "fe80::1",
}


class FakeResolver(aiohttp.abc.AbstractResolver):
    async def resolve(self, host, port=0, family=socket.AF_INET):
        addr = NAMES[host]
        return [{"hostname": host, "host": addr, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in addr else socket.AF_INET}]

    async def close(self):
        pass


@pytest.fixture
def connections(monkeypatch):
    """Every address the download stage connects to; anything outside 127.0.0.0/8 is refused and recorded."""
    seen, outside = [], []
    original = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def guarded(self, sock, address):
        ip = ipaddress.ip_address(address[0].split("%")[0])
        seen.append(str(ip))
        if (getattr(ip, "ipv4_mapped", None) or ip) not in LOOPBACK:
            outside.append(str(ip))
            raise ConnectionRefusedError(f"test guard: {ip} is outside 127.0.0.0/8")
        return await original(self, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", guarded)
    monkeypatch.setattr(DownloadStage, "inner_resolver", staticmethod(FakeResolver))
    yield seen
    assert outside == [], f"connections outside 127.0.0.0/8 were attempted: {outside}"


def _fetch(cfg: DownloadConfig, urls: list[str]) -> list[tuple]:
    stage = DownloadStage(cfg)
    try:
        out = stage(pa.table({"sample_id": [str(i) for i in range(len(urls))], "url": urls}))
    finally:
        stage.close()
    return list(zip(out["drop_reason"].to_pylist(), out["drop_detail"].to_pylist()))


@pytest.fixture(scope="module")
def image_server():
    with ImageServer({"a.jpg": jpeg(photo_image(random.Random(0), (64, 48)))}) as server:
        yield server


FAST = dict(retries=0, timeout_s=5.0, connect_timeout_s=2.0, max_per_host=4)


@pytest.mark.parametrize("allowance", [{"allow_hosts": ["127.0.0.0/8"]}, {"allow_private_addresses": True}])
def test_loopback_allowance_keeps_metadata_and_embedded_addresses_blocked(image_server, connections, allowance):
    port = image_server.ports[0]
    cfg = DownloadConfig(**FAST, **allowance)
    refused = [f"http://{name}:{port}/img/a.jpg" for name in NAMES if name not in ("loop.test", "private.test",
                                                                                    "mapped.test")]
    refused += ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[64:ff9b::a9fe:a9fe]/",
                "http://[::ffff:169.254.169.254]/", image_server.url("redirect-to?location=http://169.254.169.254/x")]
    if "allow_hosts" in allowance:  # the narrow allowance: loopback only
        refused += [f"http://private.test:{port}/img/a.jpg", f"http://mapped.test:{port}/img/a.jpg"]
    got = _fetch(cfg, [f"http://loop.test:{port}/img/a.jpg"] + refused)
    assert got[0] == (None, None)  # the loopback image is fetched
    assert [r for r, _ in got[1:]] == ["blocked_address"] * len(refused), got
    # the only connections made: the loopback image and the loopback redirect
    assert set(connections) == {"127.0.0.1"}


def test_a_named_metadata_address_is_allowed_and_the_default_is_public_only(connections):
    assert AddressPolicy(["169.254.169.254/32"]).allows("169.254.169.254")
    assert not AddressPolicy(["0.0.0.0/0", "::/0"]).allows("169.254.169.254")  # a broad entry does not name it
    assert not AddressPolicy(["0.0.0.0/0", "::/0"]).allows("fd00:ec2::254")
    assert AddressPolicy(["127.0.0.0/8"]).allows("::ffff:127.0.0.1") and AddressPolicy(["127.0.0.0/8"]).allows(
        "64:ff9b::7f00:1")  # judged by the embedded address
    assert AddressPolicy().allows("64:ff9b::808:808") and not AddressPolicy().allows("2002:7f00:1::")
    got = _fetch(DownloadConfig(**FAST), [f"http://{n}/a.jpg" for n in NAMES])
    assert [r for r, _ in got] == ["blocked_address"] * len(NAMES)
    assert connections == []  # refused before any connection


def test_allow_hosts_must_be_addresses():
    with pytest.raises(ConfigError, match=r"^download: needs allow_hosts to be IP addresses or networks"):
        load_config(overrides={"download": {"allow_hosts": ["images.example.org"]}})


# ---------------------------------------------------------------- credentials in URLs


class _HeaderRecorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    body = jpeg(photo_image(random.Random(1), (32, 32)))

    def do_GET(self):  # noqa: N802
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_credentials_in_urls_are_never_sent_nor_stored(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeaderRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://alice:s3cret@127.0.0.1:{server.server_port}/a.jpg"
        assert _fetch(DownloadConfig(**FAST, allow_hosts=["127.0.0.0/8"]), [url]) == [(None, None)]
        assert _HeaderRecorder.seen and all("Authorization" not in h for h in _HeaderRecorder.seen)
    finally:
        server.shutdown()
    # ingest: stored without them (strip, the default) or dropped as url_credentials
    rows = [("http://alice:s3cret@e.org/1.jpg", "aerial 1"), ("http://e.org/@user/2.jpg", "aerial 2"),
            ("https://bob@e.org:8080/3.jpg?x=@y", "aerial 3")]
    for mode in ("strip", "drop"):
        d = tmp_path / mode
        d.mkdir()
        _write("laion2b", d / "part-0.parquet", rows)
        storage, out = Storage(), str(d / "out")
        cfg = IngestConfig(sources=[SourceConfig("laion2b", [str(d / "*.parquet")])], url_credentials=mode)
        kept = pa.concat_tables(list(IngestFiles(cfg, out, storage)(pa.table({"source": ["laion2b"],
                                                                              "path": [str(d / "part-0.parquet")]}))))
        ledger = read_parquet_dir(storage, f"{out}/ledger")
        if mode == "strip":
            assert kept["url"].to_pylist() == ["http://e.org/1.jpg", "http://e.org/@user/2.jpg",
                                               "https://e.org:8080/3.jpg?x=@y"] and ledger is None
        else:
            assert kept["url"].to_pylist() == ["http://e.org/@user/2.jpg"]
            assert sorted(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist(),
                              ledger["url"].to_pylist())) == [
                ("laion2b_part-0_0", "url_credentials", "http://e.org/1.jpg"),
                ("laion2b_part-0_2", "url_credentials", "https://e.org:8080/3.jpg?x=@y")]
        for f in (d / "out").rglob("*"):
            assert not f.is_file() or b"s3cret" not in f.read_bytes()


# ---------------------------------------------------------------- image-quality guards


@pytest.mark.parametrize("size, reason", [((1, 1), "image_too_small"), ((9, 40), "image_too_small"),
                                          ((10000, 1), "image_too_small"), ((400, 20), "aspect_ratio_too_large"),
                                          ((200, 20), None), ((64, 48), None)])
def test_tiny_and_extreme_aspect_images_are_dropped(size, reason):
    images = []
    for fmt in ("JPEG", "PNG"):  # the plain-JPEG header path and Pillow's path
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
        images.append(buf.getvalue())
    out = DecodeStage(DecodeConfig())(pa.table({"sample_id": ["j", "p"], "image_bytes": images}))
    assert out["drop_reason"].to_pylist() == [reason, reason]
    if reason:
        detail = out["drop_detail"][0].as_py()
        assert detail == (f"{size[0]}x{size[1]} < 10 px" if reason == "image_too_small"
                          else f"{size[0]}x{size[1]}: {max(size) / min(size):.1f} > 10")
    off = DecodeStage(DecodeConfig(min_image_size=0, max_aspect_ratio=None))(
        pa.table({"sample_id": ["j"], "image_bytes": images[:1]}))
    assert off["drop_reason"].to_pylist() == [None]  # both guards can be switched off


# ---------------------------------------------------------------- the run directory: claimed after validation, by output keys


def _pub11_yaml(tmp_path, sources: list[dict], **sections) -> str:
    import yaml

    cfg = {"output": str(tmp_path / "out"), "ingest": {"sources": sources}, "scoring": {"enabled": False},
           "near_dup": {"embedding_enabled": False}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_resume_compares_only_output_keys_and_names_them(tmp_path):
    from rs5m_ray.pipelines.harness import RunDirectoryInUse, claim_output

    storage, out = Storage(), str(tmp_path / "out")
    base = {"output": out, "ingest": {"sources": [{"name": "laion2b", "paths": ["a/*.parquet"]}]}}
    claim_output(load_config(overrides=base), storage, [])
    stray = tmp_path / "out" / "shards" / "pub11-train-0000.tar.tmp-5d41402abc4b2a76"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half a tar")
    # resource-only knobs may change on a resume; stray scratch files of a killed writer are removed
    claim_output(load_config(overrides=base | {"ray": {"num_cpus": 7}, "download": {"max_actors": 9},
                                               "scoring": {"num_gpus": 1.0, "batch_size": 64}}), storage, [])
    assert not stray.exists()
    with pytest.raises(RunDirectoryInUse, match=r"differs in 2 key\(s\) that change the output "
                                                r"\(download\.retries: 2 -> 5; shards\.val_fraction: 0\.05 -> 0\.1\)"):
        claim_output(load_config(overrides=base | {"download": {"retries": 5}, "shards": {"val_fraction": 0.1}}),
                     storage, [])


def test_a_failed_first_run_claims_nothing(tmp_path, monkeypatch, capsys):
    from rs5m_ray import cli
    from rs5m_ray.pipelines import pub11

    monkeypatch.setattr(pub11, "init_ray", lambda *a: pytest.fail("Ray started"))
    typo = _pub11_yaml(tmp_path, [{"name": "laion2b", "paths": [str(tmp_path / "metdata" / "*.parquet")]}],
                       scoring={"enabled": False, "detector_checkpoint": None})
    assert cli.main(["pub11", "--config", typo]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rs5m pub11: error: source laion2b: no files match ['{tmp_path}/metdata/*.parquet']"]
    assert not (tmp_path / "out").exists()  # the corrected rerun is not refused


# ---------------------------------------------------------------- operator experience


def test_known_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from rs5m_ray import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("download:\n  retries: -1\n")
    assert cli.main(["pub11", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "rs5m pub11: error: download.retries: -1 is not allowed; allowed: >= 0, <= 100\n"
    with pytest.raises(ConfigError, match="download.retries"):
        cli.main(["pub11", "--config", str(bad), "--debug"])
    assert cli.main(["pub11", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"rs5m pub11: error: config file {tmp_path}/nope.yaml not found\n"
    assert cli.main(["train-detector", "--positives", str(tmp_path / "rs"), "--negatives", str(tmp_path),
                     "--out", str(tmp_path / "det")]) == 2
    assert capsys.readouterr().err == f"rs5m train-detector: error: folder not found: {tmp_path}/rs\n"


def test_help_shows_defaults():
    from rs5m_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["pub11"].format_help().split())
    assert "--max-unreadable-files MAX_UNREADABLE_FILES exit non-zero (3) when more input files than this cannot be " \
           "read (default: 0)" in text and "(default: 0.001)" in text
    assert "(default: 60)" in sub.choices["demo"].format_help()


def test_submit_validates_the_job_before_connecting(tmp_path, monkeypatch, capsys):
    import rs5m_ray.jobs
    from rs5m_ray import cli

    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "bad.yaml").write_text("shards: {val_fraction: 2.5}\n")
    spec = tmp_path / "jobs" / "bad.job.yaml"
    spec.write_text("entrypoint: python -m rs5m_ray.cli pub11 --config jobs/bad.yaml\nruntime_env: {working_dir: ..}\n")
    monkeypatch.setattr(rs5m_ray.jobs, "job_client", lambda *a: pytest.fail("connected before validating"))
    assert cli.main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == ("rs5m submit: error: shards.val_fraction: 2.5 is not allowed; "
                                       "allowed: >= 0, <= 1, finite\n")
    spec.write_text("entrypoint: python -m rs5m_ray.cli pub11 --config jobs/missing.yaml\n"
                    "runtime_env: {working_dir: ..}\n")
    assert cli.main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    assert "entrypoint: config jobs/missing.yaml not found in the working_dir" in capsys.readouterr().err
    spec.write_text("entrypoint: rs5m pub11 --config jobs/bad.yaml\nworkdir: ..\n")
    assert cli.main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith(f"rs5m submit: error: {spec}: a job spec needs `entrypoint` and may "
                                              "have ['entrypoint', ")


def test_connection_refused_is_one_line(capsys):
    from rs5m_ray import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    spec = str(Path(__file__).resolve().parents[1] / "jobs" / "pub11-cluster.job.yaml")
    assert cli.main(["submit", spec, "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rs5m submit: error: Failed to connect to Ray at address: http://127.0.0.1:{port}")
    assert err.count("\n") == 1


# ---------------------------------------------------------------- end to end: bad files and lines through `rs5m pub11` on Ray


def test_bad_inputs_through_pub11_on_ray(tmp_path, ray_cluster, capsys):
    """One unreadable parquet (a list column), one truncated .tsv.gz, one ragged TSV line: the job goes
    on, every readable row reaches the shards, the loss is accounted, and the budgets set the exit code."""
    from rs5m_ray import cli
    from rs5m_ray.report import over_budget

    rng = random.Random(3)
    images = {f"{i}.jpg": jpeg(photo_image(rng, (64, 48))) for i in range(12)}
    with ImageServer(images) as server:
        d = tmp_path / "meta"
        d.mkdir()
        good = [(server.url(f"img/{i}.jpg"), f"aerial view {i}") for i in range(6)]
        _write("laion2b", d / "part-good.parquet", good)
        pq.write_table(pa.table({"URL": [u for u, _ in good], "TEXT": [[c] for _, c in good]}), d / "part-bad.parquet")
        cc3m = [(server.url(f"img/{i}.jpg"), f"aerial view, scene {i}") for i in range(6, 12)]
        _write("cc3m", d / "cc3m.tsv", cc3m, raw_line=b"aerial\thttp://e.org/x.jpg\tthird column", bad_at=3)
        plain = tmp_path / "plain.tsv"
        _write("cc3m", plain, ROWS * 200)
        data = gzip.compress(plain.read_bytes())
        (d / "cut.tsv.gz").write_bytes(data[: len(data) // 2])
        config = _pub11_yaml(tmp_path, [{"name": "laion2b", "paths": [str(d / "*.parquet")]},
                                        {"name": "cc3m", "paths": [str(d / "*.tsv*")]}],
                             download={"allow_hosts": ["127.0.0.0/8"], "retries": 0, "max_actors": 1},
                             parts={"num_parts": 1}, shards={"train_shards": 1, "val_shards": 1},
                             near_dup={"phash_enabled": False, "embedding_enabled": False},
                             ray={"shuffle_strategy": "sort_shuffle_pull_based"})
        assert cli.main(["pub11", "--config", config]) == 3
        first = capsys.readouterr()
    assert first.err == ("rs5m pub11: error: 2 unreadable input files, more than --max-unreadable-files 0 "
                         "(listed in report.json under unreadable_files)\n")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert over_budget(report, 2, 0.01) is None and over_budget(report, 2, 0.001).startswith(
        "bad rows are 0.3")  # what the CLI would say with --max-unreadable-files 2 and each fraction
    cut = next(e for e in report["unreadable_files"] if e["path"].endswith("cut.tsv.gz"))
    assert report["accounting_balanced"]
    assert report["drop_reasons"]["ingest/unreadable_file"] == 6 + cut["rows_lost"]
    assert report["drop_reasons"]["ingest/malformed_row"] == 1
    assert report["shards"]["samples"] == 11  # every readable row (the 4th cc3m line is the ragged one)
    p = report["input_problems"]
    assert (p["unreadable_files"], p["bad_rows"], p["unreadable_files_with_uncounted_rows"]) == (2, 1, 0)
    out = first.out
    assert f"1 bad rows ({1 / p['input_rows']:.4%}: malformed_row, invalid_utf8); 2 unreadable files holding " \
           f"{6 + cut['rows_lost']} countable rows (ingest/unreadable_file)" in out
    assert f"unreadable: {d}/part-bad.parquet: ColumnTypeError: column 'TEXT' has type list<element: string>" in out
    assert f"unreadable: {d}/cut.tsv.gz: malformed tsv: EOFError: Compressed file ended" in out
