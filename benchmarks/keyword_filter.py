"""Metadata path throughput, end to end as the user runs it: rows per CPU-second of the whole process tree.

Generates LAION-style parquet (URL ~100 bytes, TEXT ~60 bytes of real alt-text when ../shared/data
is present, else a synthetic vocabulary; snappy, PLAIN pages as real LAION pages fall back to, 512K rows
per file) with RS keywords planted in `--hit-fraction` of the rows (default 0.5%; LAION2B-en: 0.09%).
Every keyword hit points at a closed loopback port, so its download fails at once with a drop reason.

Headline (`e2e`): `rs5m_ray.pipelines.pub11.run(cfg)`, the public entry point, on two input sizes
(`--sizes`, default 1M and 4M rows), each in a fresh subprocess (a fresh local Ray instance). The
config turns off what needs images or models (scoring, pHash and embedding near-dup, decode pHash),
allows private addresses (the loopback hits) and sets download retries to 0. Measured per run: wall
time and the CPU seconds of the whole process tree (driver, GCS, raylet, every Ray worker), sampled
from /proc every 50 ms until the last process has exited (zombies still show their final times). This
process makes itself a child subreaper, so processes whose parent dies stay in its tree. RUSAGE_CHILDREN
is printed too, as a lower bound only: the raylet ignores SIGCHLD, so its workers are reaped by the
kernel and their CPU never reaches any parent's rusage (checked: raylet SigIgn has bit 17 set).
Reported: the MARGINAL cost between the two sizes (rows per CPU-second and rows/s of wall time:
start-up cancels; with --repeats, per size the run with the least CPU) and where it goes by process
name, the fixed start-up cost, and the ledger bytes / input bytes. `--mode metadata` times the
metadata path alone (ingest -> keyword filter -> ledger on Ray Data, composed as
tests/multinode_scenario.py does); it is also the fallback, said so in the output, when `pub11.run`
fails twice.

Beside it, in this process (`stage`): parquet decode + the KeywordFilter stage alone + kept rows
written (the figure this benchmark reported before), the decode floor, and a per-row Python `re` loop.
"""
from __future__ import annotations
from figures import record  # benchmarks/figures.py: the figures `rs5m plan` reads

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m_ray.stages.keyword_filter import RS5M_KEYWORDS, KeywordFilter, caption_hits

ROWS_PER_FILE = 524_288
ROW_GROUP = 131_072
BATCH_ROWS = 262_144
SOURCE = "laion2b"


def shared_data() -> Path:
    return Path(os.environ.get("RS5M_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# -- data ------------------------------------------------------------------------------------------

def caption_pool(rng: np.random.Generator, hit_fraction: float) -> tuple[pa.Array, np.ndarray]:
    data = shared_data()
    pool: list[str] = []
    if (data / "web").is_dir():
        pool += pq.read_table(data / "web" / "laion_style_10000.parquet")["TEXT"].to_pylist()
        pool += pacsv.read_csv(data / "web" / "cc3m_validation.tsv",
                               read_options=pacsv.ReadOptions(column_names=["caption", "url"]),
                               parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False))["caption"].to_pylist()
    else:
        words = "the a of on in with beautiful house garden city river man woman dog cat car red blue old new".split()
        pool += [" ".join(rng.choice(words, rng.integers(4, 14))) for _ in range(20_000)]
    pool = [c for c in pool if c]
    planted = [f"{c} {rng.choice(RS5M_KEYWORDS)} {c}" for c in rng.choice(pool, 60)]
    weights = np.r_[np.full(len(pool), (1 - hit_fraction) / len(pool)),
                    np.full(len(planted), hit_fraction / len(planted))]
    return pa.array(pool + planted, pa.string()), weights


def url_pool(rng: np.random.Generator) -> pa.Array:
    data = shared_data()
    if (data / "web").is_dir():
        return pq.read_table(data / "web" / "laion_style_10000.parquet")["URL"].combine_chunks()
    return pa.array([f"https://cdn{i % 37}.example.com/{rng.bytes(24).hex()}/photo.jpg" for i in range(10_000)])


def closed_loopback_port() -> tuple[socket.socket, int]:
    """A loopback port bound but never listening: connecting is refused at once, and no other
    process can take the port while the returned socket stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def generate(out: Path, n: int, hit_fraction: float, port: int, seed: int = 0, rows_per_file: int = ROWS_PER_FILE
             ) -> list[Path]:
    """LAION-style parquet; every row whose caption hits (planted or natural) gets a URL on `port`."""
    rng = np.random.default_rng(seed)
    pool, weights = caption_pool(rng, hit_fraction)
    urls_pool = url_pool(rng)
    files = []
    for start in range(0, n, rows_per_file):
        rows = min(rows_per_file, n - start)
        captions = pc.take(pool, rng.choice(len(pool), rows, p=weights))
        ids = pc.cast(pa.array(np.arange(start, start + rows)), pa.string())
        urls = pc.binary_join_element_wise(pc.take(urls_pool, rng.integers(0, len(urls_pool), rows)), ids, "?id=")
        loopback = pc.binary_join_element_wise(f"http://127.0.0.1:{port}/img", ids, ".jpg", "")
        urls = pc.if_else(caption_hits(captions, RS5M_KEYWORDS), loopback, urls)
        path = out / f"part-{start // rows_per_file:05d}.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), path, row_group_size=ROW_GROUP,
                       compression="snappy", use_dictionary=False)
        files.append(path)
    return files


# -- end to end: one pipeline run per child process ---------------------------------------------------

def pipeline_overrides(files: list[Path], output: Path, num_cpus: int | None) -> dict:
    return {
        "output": str(output),
        "ray": {"num_cpus": num_cpus},
        "ingest": {"sources": [{"name": SOURCE, "paths": [str(f) for f in files]}]},
        "scoring": {"enabled": False},
        "near_dup": {"phash_enabled": False, "embedding_enabled": False},
        "decode": {"phash": False},
        "download": {"allow_private_addresses": True, "retries": 0},
    }


def child(spec_path: str) -> None:
    """Runs in a fresh process: the pipeline (or, failing that, its metadata path), result as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    from rs5m_ray.config import load_config

    cfg = load_config(overrides=spec["overrides"])
    if spec["mode"] == "pipeline":
        try:
            from rs5m_ray.pipelines import pub11

            report = pub11.run(cfg)
            result = {"mode": "pub11.run", "funnel": report.get("funnel"),
                      "drop_reasons": report.get("drop_reasons"),
                      "accounting_balanced": report.get("accounting_balanced")}
        except Exception as e:  # noqa: BLE001 - the parent retries, then falls back, and says so
            result = {"pub11_error": f"{type(e).__name__}: {e}"[:500]}
    else:
        result = {"mode": "metadata path (ingest -> keyword filter)", **metadata_path(cfg)}
    Path(spec["result"]).write_text(json.dumps(result))


def metadata_path(cfg) -> dict:
    """ingest -> keyword filter on Ray Data (the pipeline's operators and Accounted ledger), consumed."""
    import ray
    import ray.data

    from rs5m_ray.ledger import Accounted
    from rs5m_ray.ray_runtime import init_ray
    from rs5m_ray.sources.ingest import IngestFiles, list_inputs
    from rs5m_ray.storage import Storage

    storage = Storage(cfg.storage)
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = list_inputs(cfg.ingest, storage)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(IngestFiles(cfg.ingest, cfg.output, storage), batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(Accounted("keyword_filter", cfg.output, storage,
                                  KeywordFilter(cfg.keyword.keywords, cfg.output, storage)), batch_format="pyarrow")
    kept = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    ray.shutdown()
    return {"kept": kept}


def _libc_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, user + system CPU seconds, name) of every process (zombies included), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                head, tail = f.read().rsplit(b")", 1)
        except OSError:
            continue
        fields = tail.split()
        name = head.split(b"(", 1)[1].decode(errors="replace")
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, name)
    return table


def _descendants(table: dict[int, tuple[int, float, str]], root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for k in kids.get(todo.pop(), ()):
            if k not in found:
                found.add(k)
                todo.append(k)
    return found


def measure(cmd: list[str], timeout_s: float) -> dict:
    """Wall and CPU seconds of `cmd` and every process it starts, until all of them have exited."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampled: dict[int, float] = {}
    names: dict[int, str] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    me = os.getpid()
    driver_exit, rc = None, None
    while True:
        table = _proc_table()
        tree = _descendants(table, me)
        for pid in tree:
            sampled[pid] = max(sampled.get(pid, 0.0), table[pid][1])
            names[pid] = table[pid][2]
        # Reap the driver and whatever was reparented to us (we are a subreaper): RUSAGE_CHILDREN counts them.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == proc.pid:
                driver_exit, rc = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
                proc.returncode = rc
        if driver_exit is not None and not _descendants(_proc_table(), me):
            break
        if time.perf_counter() - start > timeout_s:
            for pid in tree:  # our own descendants only
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            raise TimeoutError(f"{cmd} ran over {timeout_s} s")
        time.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    by_name: dict[str, float] = {}
    for pid, secs in sampled.items():
        by_name[names[pid]] = by_name.get(names[pid], 0.0) + secs
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": rc, "wall_s": driver_exit, "tree_exit_s": time.perf_counter() - start,
            "cpu_s": sum(sampled.values()), "cpu_rusage_s": cpu, "processes": len(sampled), "by_name": by_name}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_e2e(files: list[Path], work: Path, mode: str, num_cpus: int | None, timeout_s: float) -> dict:
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    out = work / f"run-{rows}-{mode}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: pub11 would resume from a run directory's staging
    spec = {"mode": mode, "overrides": pipeline_overrides(files, out, num_cpus),
            "result": str(work / f"result-{rows}-{mode}.json")}
    spec_path = work / f"spec-{rows}-{mode}.json"
    spec_path.write_text(json.dumps(spec))
    m = measure([sys.executable, __file__, "--child", str(spec_path)], timeout_s)
    if m["rc"] != 0:
        raise RuntimeError(f"child for {rows:,} rows exited with {m['rc']}")
    result = json.loads(Path(spec["result"]).read_text())
    return {"rows": rows, "input_bytes": sum(f.stat().st_size for f in files),
            "ledger_bytes": dir_bytes(out / "ledger"),
            "keyword_ledger_bytes": dir_bytes(out / "ledger" / "keyword_filter"), **m, **result}


# -- in this process: the stage alone, its decode floor, and the per-row Python loop ------------------

def batches(path: Path):
    return pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, use_threads=False)


def run_stage(files: list[Path], out: Path) -> tuple[int, int, float]:
    """Parquet decode + KeywordFilter + kept rows written: CPU seconds of this process."""
    stage = KeywordFilter()
    rows = kept = 0
    start = time.process_time()
    for i, f in enumerate(files):
        writer = None
        for batch in batches(f):
            table = pa.Table.from_batches([batch]).rename_columns(["url", "caption"])
            table = table.append_column("source", pa.nulls(len(table), pa.string()))
            result = stage(table)
            hits = result.filter(pc.is_null(result["drop_reason"]))
            writer = writer or pq.ParquetWriter(out / f"ours-{i}.parquet", hits.schema)
            writer.write_table(hits)
            rows += len(table)
            kept += len(hits)
        writer.close()
    return rows, kept, time.process_time() - start


def run_decode(files: list[Path]) -> float:
    start = time.process_time()
    for f in files:
        for _ in batches(f):
            pass
    return time.process_time() - start


def run_baseline(files: list[Path], limit: int) -> tuple[int, float]:
    pattern = re.compile("|".join(re.escape(k) for k in RS5M_KEYWORDS), re.IGNORECASE)
    rows = 0
    start = time.process_time()
    for f in files:
        for batch in batches(f):
            urls, captions = [], []
            for url, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                rows += 1
                if caption and pattern.search(caption):
                    urls.append(url)
                    captions.append(caption)
            if rows >= limit:
                return rows, time.process_time() - start
    return rows, time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[1_048_576, 4_194_304], metavar=("SMALL", "LARGE"),
                    help="input rows of the two end-to-end runs")
    ap.add_argument("--hit-fraction", type=float, default=0.005)
    ap.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE)
    ap.add_argument("--mode", choices=["pipeline", "metadata"], default="pipeline",
                    help="pipeline: pub11.run(cfg); metadata: ingest -> keyword filter on Ray Data only")
    ap.add_argument("--num-cpus", type=int, default=None, help="ray.num_cpus (default: all cores)")
    ap.add_argument("--stage-rows", type=int, default=None, help="rows for the in-process stage figure "
                    "(default: the small size; 0 skips it)")
    ap.add_argument("--baseline-rows", type=int, default=262_144, help="rows for the Python re loop (0 skips)")
    ap.add_argument("--repeats", type=int, default=1, help="end-to-end runs per size (the least CPU counts)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per end-to-end run, seconds")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    small, large = sorted(args.sizes)
    _libc_subreaper()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        t0 = time.perf_counter()
        closed, port = closed_loopback_port()  # held until the end: the hits' downloads are refused
        files = generate(data, large, args.hit_fraction, port, rows_per_file=args.rows_per_file)
        n_small = -(-small // args.rows_per_file)
        small_files = files[:n_small]
        print(f"generated {large:,} rows in {len(files)} parquet files "
              f"({sum(f.stat().st_size for f in files) / 1e6:.0f} MB, {time.perf_counter() - t0:.1f} s); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)

        # Sizes interleaved (small, large, small, large, ...); per size the run with the least CPU
        # counts: the least disturbed by other load on the machine.
        mode, runs, failures = args.mode, [], 0
        plan = [small_files, files] * args.repeats
        while len(runs) < len(plan):
            try:
                r = run_e2e(plan[len(runs)], tmp, mode, args.num_cpus, args.timeout)
            except RuntimeError as e:
                failures += 1
                if failures > 4:
                    raise
                print(f"{e}; retrying", flush=True)
                continue
            error = r.get("pub11_error")
            if error:
                failures += 1
                # Ray's node start-up waits 30 s at most: on a loaded machine, retried.
                if failures <= 2 or ("timed out during startup" in error and failures <= 4):
                    print(f"pub11.run failed ({error}); retrying", flush=True)
                    continue
                # Both sizes must run the same path: start over on the fallback.
                print(f"pub11.run failed again ({error}); measuring the metadata path "
                      "(ingest -> keyword filter on Ray Data) for both sizes instead", flush=True)
                mode, runs = "metadata", []
                continue
            runs.append(r)
            top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["by_name"].items(), key=lambda kv: -kv[1])[:4])
            print(f"e2e       {r['rows']:>10,} rows via {r['mode']}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s "
                  f"over {r['processes']} processes ({top}; RUSAGE_CHILDREN saw {r['cpu_rusage_s']:.1f}), "
                  f"{r['rows'] / r['cpu_s'] / 1e6:.3f} M rows/CPU-s overall; ledger "
                  f"{r['ledger_bytes'] / 1e6:.1f} MB = {r['ledger_bytes'] / r['input_bytes']:.3f}x input "
                  f"({r['input_bytes'] / 1e6:.0f} MB); load average {os.getloadavg()[0]:.1f}", flush=True)
        a = min(runs[0::2], key=lambda r: r["cpu_s"])
        b = min(runs[1::2], key=lambda r: r["cpu_s"])
        d_rows, d_cpu, d_wall = b["rows"] - a["rows"], b["cpu_s"] - a["cpu_s"], b["wall_s"] - a["wall_s"]
        startup_cpu = a["cpu_s"] - a["rows"] * d_cpu / d_rows
        startup_wall = a["wall_s"] - a["rows"] * d_wall / d_rows
        where = {k: b["by_name"].get(k, 0.0) - a["by_name"].get(k, 0.0) for k in set(a["by_name"]) | set(b["by_name"])}
        where_s = ", ".join(f"{k} {v / d_rows * 1e6:.2f}" for k, v in sorted(where.items(), key=lambda kv: -kv[1])[:4])
        print(f"marginal  {d_rows:,} rows ({a['mode']}): {d_rows / d_cpu / 1e6:.3f} M rows/CPU-s (goal >= 1.0), "
              f"{d_rows / d_wall / 1e6:.3f} M rows/s wall on {os.cpu_count()} cores; CPU-s per 1M rows by "
              f"process: {where_s}")
        record("keyword_filter", {"metadata_rows_per_cpu_s": round(d_rows / d_cpu)})
        print(f"start-up  {startup_cpu:.1f} CPU-s, {startup_wall:.1f} s wall (fixed cost, extrapolated to 0 rows)")
        print(f"ledger    {b['ledger_bytes'] / b['input_bytes']:.3f}x input bytes at {b['rows']:,} rows "
              f"(keyword_filter ledger {b['keyword_ledger_bytes'] / b['input_bytes']:.3f}x; goal <= 0.05)")
        closed.close()

        stage_rows = small if args.stage_rows is None else args.stage_rows
        if stage_rows:
            stage_files = files[:-(-stage_rows // args.rows_per_file)]
            rows, kept, secs = run_stage(stage_files, tmp)
            decode = run_decode(stage_files)
            print(f"stage     KeywordFilter alone in-process (decode + stage + kept rows written), {rows:,} rows -> "
                  f"{kept:,} kept: {rows / secs / 1e6:.2f} M rows/CPU-s; decode alone {rows / decode / 1e6:.2f} M "
                  f"rows/CPU-s ({decode / secs:.0%} of it)")
            if args.baseline_rows:
                b_rows, b_secs = run_baseline(files, args.baseline_rows)
                print(f"baseline  per-row Python re loop, {b_rows:,} rows: {b_rows / b_secs / 1e6:.3f} M rows/CPU-s "
                      f"(stage is {rows / secs / (b_rows / b_secs):.0f}x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
