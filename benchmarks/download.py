"""Download + decode + shards, side by side: `rs5m pub11` against img2dataset, same inputs, same box.

A loopback server (a separate process; its CPU is not counted) serves a pool of distinct
photo-like 500x400 JPEGs with a fixed latency per response on several ports (= several
hosts). N distinct URLs (`/img/<i % pool>.jpg?k=<row>`) are written once as img2dataset's
parquet (`url`, `caption`) and as a LAION2B-en-style parquet (`URL`, `TEXT`) for rs5m. Then,
one after the other, each contender runs as a subprocess:

  img2dataset  its own virtualenv (created once under ~/.cache/rs5m-bench), webdataset output,
               --resize_mode no (every image still fully decoded by cv2 and re-encoded as JPEG q95,
               sha256 and EXIF extracted: its defaults), 2 processes x 64 threads
  rs5m         `rs5m pub11 --config <generated yaml>`: keyword filter, URL dedup, pHash, near-dup
               and scoring off; every image fully decoded and validated; ray.num_cpus = 2;
               run at N and at N/5 to split its fixed start-up cost from its cost per image

Measured per run: wall time (start to exit of the command) and the CPU time of its whole
process tree, driver plus every Ray process, exited ones included (a cpuacct cgroup the
command starts in; without cgroups, a /proc sampler of the tree). Cross-check: the machine's
busy time (/proc/stat) minus the server's and this harness's own CPU, which equals the tree's
on a box nobody else uses. Afterwards each output is read back and every image in it is
fully decoded (PIL) and counted.

    python benchmarks/download.py                 # N = 50,000 (the issue's figure)
    python benchmarks/download.py --n 2000        # quick
    python benchmarks/download.py --only rs5m --rs5m-set decode.reencode=always
"""
from __future__ import annotations
from figures import record  # benchmarks/figures.py: the figures `rs5m plan` reads

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
IMG2DATASET = "img2dataset==1.47.0"
CACHE = Path(os.environ.get("RS5M_BENCH_CACHE", "~/.cache/rs5m-bench")).expanduser()
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".img_content")
TICK = os.sysconf("SC_CLK_TCK")
# The overrides the issue names: the work both contenders do is download + decode/validate + shards.
RS5M_BASE_CONFIG = {
    "keyword": {"enabled": False},
    "url_dedup": {"enabled": False},
    "near_dup": {"phash_enabled": False, "embedding_enabled": False},
    "decode": {"phash": False},
    "scoring": {"enabled": False},
    "download": {"allow_private_addresses": True},
    "ray": {"num_cpus": 2},
}


# -- inputs ---------------------------------------------------------------------------
def make_images(directory: Path, count: int, seed: int = 0) -> int:
    """Photo-like 500x400 JPEGs (smooth fields plus texture); returns the mean size in bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:400, 0:500].astype(np.float32)
    sizes = []
    for i in range(count):
        base = rng.uniform(40, 200, 3)
        slope = rng.uniform(-0.2, 0.2, (2, 3))
        waves = 25 * np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6))[..., None]
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + waves + rng.normal(0, 12, (400, 500, 3))
        data = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(data, "JPEG", quality=85)
        (directory / f"{i}.jpg").write_bytes(data.getvalue())
        sizes.append(len(data.getvalue()))
    return int(np.mean(sizes))


def start_server(directory: Path, latency_ms: float, ports: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "rs5m_ray.sample.image_server", str(directory), "--preload",
                             "--latency-ms", str(latency_ms), "--ports", str(ports)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return proc, [int(p) for p in proc.stdout.readline().split()]


def write_inputs(directory: Path, n: int, ports: list[int], pool: int) -> dict[str, Path]:
    """The same n distinct URLs, as img2dataset's parquet and as a LAION2B-en-style parquet."""
    urls = [f"http://127.0.0.1:{ports[i % len(ports)]}/img/{i % pool}.jpg?k={i}" for i in range(n)]
    captions = [f"aerial view of a field, sample {i}" for i in range(n)]
    (directory / "laion2b").mkdir(parents=True)
    paths = {"img2dataset": directory / "img2dataset.parquet", "rs5m": directory / "laion2b" / "part-0.parquet"}
    pq.write_table(pa.table({"url": urls, "caption": captions}), paths["img2dataset"])
    pq.write_table(pa.table({"SAMPLE_ID": list(range(n)), "URL": urls, "TEXT": captions}), paths["rs5m"])
    return paths


# -- img2dataset's own virtualenv -----------------------------------------------------
def ensure_img2dataset(requirement: str) -> Path:
    venv = CACHE / "img2dataset-venv"
    exe = venv / "bin" / "img2dataset"
    stamp = venv / "rs5m-bench-requirement.txt"
    if exe.exists() and stamp.exists() and stamp.read_text() == requirement:
        return exe
    print(f"creating {venv} with {requirement} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True)
    stamp.write_text(requirement)
    return exe


def package_version(python: Path, name: str) -> str:
    out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


# -- measuring ------------------------------------------------------------------------
def machine_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, user+system CPU seconds, start time) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, int(fields[19])


class CpuCgroup:
    """A cpuacct cgroup the measured command starts in: counts every descendant, exited ones too."""

    def __init__(self, name: str):
        self.path: Path | None = None
        for root, usage in (("/sys/fs/cgroup/cpuacct", "cpuacct.usage"), ("/sys/fs/cgroup", "cpu.stat")):
            path = Path(root) / f"rs5m-bench-{os.getpid()}-{name}"
            try:
                path.mkdir()
                (path / usage).read_text()
            except OSError:
                continue
            self.path, self._usage = path, usage
            break

    def enter(self) -> None:  # runs in the child between fork and exec
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_s(self) -> float | None:
        if self.path is None:
            return None
        text = (self.path / self._usage).read_text()
        if self._usage == "cpuacct.usage":
            return int(text) / 1e9
        return int(dict(line.split() for line in text.splitlines())["usage_usec"]) / 1e6

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()] if self.path else []

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError as e:
                print(f"warning: could not remove {self.path}: {e}", file=sys.stderr)


class TreeSampler(threading.Thread):
    """Fallback and cross-check: the last seen CPU time of every process in the tree, summed."""

    def __init__(self, root: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.seen: dict[tuple[int, int], float] = {}
        self.per_title: dict[str, float] = {}  # CPU by process title; Ray workers retitle themselves per task
        self.stop = threading.Event()

    def sample(self) -> None:
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = proc_stat(int(entry.name))
                if st is not None:
                    stats[int(entry.name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                _, cpu, start = stats[pid]
                before = self.seen.get((pid, start), 0.0)
                if cpu > before:
                    self.seen[(pid, start)] = cpu
                    title = process_title(pid) or "?"
                    self.per_title[title] = self.per_title.get(title, 0.0) + cpu - before
            todo.extend(children.get(pid, ()))

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.sample()

    def total(self) -> float:
        return sum(self.seen.values())

    def by_title(self) -> dict[str, float]:
        """CPU per process title (each sample's increase credited to the title the process had then)."""
        return dict(sorted(self.per_title.items(), key=lambda kv: -kv[1]))


def process_title(pid: int) -> str | None:
    """A short name: Ray's process title, else the script or module a Python process runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in argv if a]
    if not argv:
        return None
    if argv[0].startswith("ray::"):
        return argv[0].split(" ")[0][:60]
    if "python" in Path(argv[0]).name and len(argv) > 1:
        rest = [a for a in argv[1:] if not a.startswith("-")] or argv[1:]
        return Path(rest[0]).name[:60]
    return Path(argv[0]).name[:60]


@dataclass
class Run:
    name: str
    n: int
    wall_s: float = 0.0
    cpu_tree_s: float | None = None  # cgroup
    cpu_sampled_s: float = 0.0  # /proc sampler (misses up to interval_s per process)
    cpu_machine_s: float = 0.0  # machine busy - server - harness
    images: int = 0  # image members in the output
    valid: int = 0  # of which decode fully
    distinct_keys: int = 0
    returncode: int = 0
    log: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.cpu_tree_s if self.cpu_tree_s is not None else self.cpu_sampled_s


def measure(name: str, n: int, cmd: list[str], log: Path, server_pid: int, env: dict | None = None) -> Run:
    cgroup = CpuCgroup(name)
    run = Run(name, n, log=str(log))
    busy0, server0, self0 = machine_busy_s(), proc_stat(server_pid)[1], time.process_time()
    wall0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=cgroup.enter,
                                env={**os.environ, **(env or {})})
        sampler = TreeSampler(proc.pid)
        sampler.start()
        run.returncode = proc.wait()
    run.wall_s = time.perf_counter() - wall0
    # Ray's processes may outlive the driver by a moment: their CPU counts too.
    deadline = time.monotonic() + 60
    while cgroup.pids() and time.monotonic() < deadline:
        sampler.sample()
        time.sleep(0.2)
    sampler.stop.set()
    sampler.join()
    run.cpu_tree_s = cgroup.cpu_s()
    run.cpu_sampled_s = sampler.total()
    run.extra["cpu_by_process"] = sampler.by_title()
    run.cpu_machine_s = (machine_busy_s() - busy0) - (proc_stat(server_pid)[1] - server0) \
        - (time.process_time() - self0)
    if cgroup.pids():
        print(f"warning: {name} left processes {cgroup.pids()}", file=sys.stderr)
    else:
        cgroup.close()
    return run


def check_output(run: Run, directory: Path) -> None:
    """Count image members of every tar under `directory` and fully decode each one."""
    keys = set()
    for tar_path in sorted(directory.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(IMAGE_SUFFIXES):
                    continue
                run.images += 1
                keys.add(member.name.rsplit(".", 1)[0])
                try:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                        img.load()
                        ok = img.size == (500, 400)
                except Exception:
                    ok = False
                run.valid += ok
    run.distinct_keys = len(keys)


# -- the contenders -------------------------------------------------------------------
def run_img2dataset(exe: Path, url_list: Path, out: Path, n: int, server_pid: int, args) -> Run:
    cmd = [str(exe), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(args.img2dataset_processes), "--thread_count", str(args.img2dataset_threads),
           "--resize_mode", "no", "--encode_format", "jpg", "--encode_quality", "95",
           # 4 shards per process: with its default 10,000 per shard, 50,000 URLs make 5 shards and the
           # last one runs on one process alone while the other idles.
           "--number_sample_per_shard", str(-(-n // (4 * args.img2dataset_processes))),
           "--distributor", "multiprocessing", "--retries", "0",
           "--enable_wandb", "False"]
    run = measure("img2dataset", n, cmd, out.parent / f"{out.name}.log", server_pid,
                  env={"NO_ALBUMENTATIONS_UPDATE": "1"})
    check_output(run, out)
    run.extra["successes"] = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return run


def set_dotted(cfg: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def run_rs5m(metadata_dir: Path, out: Path, n: int, server_pid: int, args) -> Run:
    cfg = json.loads(json.dumps(RS5M_BASE_CONFIG))
    cfg["output"] = str(out)
    cfg["ingest"] = {"sources": [{"name": "laion2b", "paths": [str(metadata_dir / "*.parquet")]}]}
    for assignment in args.rs5m_set:
        set_dotted(cfg, assignment)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rs5m = Path(sys.executable).parent / "rs5m"
    run = measure(f"rs5m-{n}", n, [str(rs5m), "pub11", "--config", str(config)],
                  out.parent / f"{out.name}.log", server_pid, env={"RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    run.extra["config"] = str(config)
    check_output(run, out / "shards")
    return run


# -- report ---------------------------------------------------------------------------
def print_table(runs: list[Run], header: str) -> None:
    print(f"\n{header}")
    cols = f"{'run':<22}{'N':>7}{'images':>8}{'valid':>8}{'wall s':>8}{'img/s':>8}{'CPU s':>8}" \
           f"{'img/CPU-s':>10}{'CPU s (proc)':>13}{'CPU s (box)':>12}"
    print(cols)
    print("-" * len(cols))
    for r in runs:
        print(f"{r.name:<22}{r.n:>7}{r.images:>8}{r.valid:>8}{r.wall_s:>8.1f}{r.valid / r.wall_s:>8.0f}"
              f"{r.cpu_s:>8.1f}{r.valid / max(r.cpu_s, 1e-9):>10.0f}{r.cpu_sampled_s:>13.1f}{r.cpu_machine_s:>12.1f}")
    print("CPU s: the command's cgroup (driver + every child, exited ones included); (proc): /proc sampler of "
          "the tree, each process's last sample; (box): machine busy time minus server and harness.")
    for r in runs:
        top = list(r.extra.get("cpu_by_process", {}).items())[:8]
        print(f"  {r.name} CPU s by process: " + ", ".join(f"{name} {cpu:.1f}" for name, cpu in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="URLs (all distinct)")
    parser.add_argument("--small-n", type=int, default=None,
                        help="second rs5m size, for its fixed vs per-image cost (default n/5; 0: skip)")
    parser.add_argument("--only", choices=("both", "rs5m", "img2dataset"), default="both")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--hosts", type=int, default=8, help="server ports, i.e. distinct host:port keys")
    parser.add_argument("--pool", type=int, default=64, help="distinct JPEGs behind the URLs")
    parser.add_argument("--img2dataset", default=IMG2DATASET, help="pip requirement for img2dataset's virtualenv")
    parser.add_argument("--img2dataset-processes", type=int, default=2)
    parser.add_argument("--img2dataset-threads", type=int, default=64)
    parser.add_argument("--rs5m-set", action="append", default=[], metavar="KEY=YAML",
                        help="extra rs5m config override, e.g. decode.reencode=always (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs, outputs and logs here")
    args = parser.parse_args()
    small_n = args.n // 5 if args.small_n is None else args.small_n

    exe = ensure_img2dataset(args.img2dataset) if args.only != "rs5m" else None
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rs5m-bench-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=False)
    images = work / "images"
    images.mkdir()
    mean_bytes = make_images(images, args.pool)
    server, ports = start_server(images, args.latency_ms, args.hosts)
    runs: list[Run] = []
    try:
        inputs = write_inputs(work / "meta", args.n, ports, args.pool)
        if small_n:
            small_inputs = write_inputs(work / "meta-small", small_n, ports, args.pool)
        if exe is not None:
            runs.append(run_img2dataset(exe, inputs["img2dataset"], work / "img2dataset-out", args.n,
                                        server.pid, args))
            runs[-1].name = f"img2dataset {package_version(exe.parent / 'python', 'img2dataset')}"
        if args.only != "img2dataset":
            runs.append(run_rs5m(inputs["rs5m"].parent, work / f"rs5m-{args.n}", args.n, server.pid, args))
            runs[-1].name = "rs5m pub11"
            if small_n:
                runs.append(run_rs5m(small_inputs["rs5m"].parent, work / f"rs5m-{small_n}", small_n,
                                     server.pid, args))
                runs[-1].name = "rs5m pub11 (small)"
    finally:
        server.stdin.close()
        server.wait(30)

    print(f"\ninputs: {args.n} distinct URLs over {args.pool} distinct 500x400 JPEGs (mean {mean_bytes / 1024:.0f} "
          f"KiB), {args.latency_ms:.0f} ms latency per response, {args.hosts} host:ports on loopback; "
          f"{os.cpu_count()} cores, load average now {os.getloadavg()[0]:.1f}")
    if args.rs5m_set:
        print(f"rs5m overrides beyond the issue's: {args.rs5m_set}")
    print_table(runs, "results (valid = image members that decode fully at 500x400)")
    for r in runs:
        if r.returncode != 0 or r.valid != r.n or r.distinct_keys != r.images:
            print(f"CHECK FAILED: {r.name}: exit {r.returncode}, {r.valid}/{r.n} valid, {r.images} images, "
                  f"{r.distinct_keys} distinct keys; log {r.log}")
    base = next((r for r in runs if r.name.startswith("img2dataset")), None)
    ours = next((r for r in runs if r.name == "rs5m pub11"), None)
    if base and ours:
        wall = (ours.valid / ours.wall_s) / (base.valid / base.wall_s)
        cpu = (ours.valid / ours.cpu_s) / (base.valid / base.cpu_s)
        print(f"\nrs5m / img2dataset: {wall:.2f}x images/s (wall), {cpu:.2f}x images per CPU-second "
              f"(goal: >= 1.5x both)")
    small = next((r for r in runs if r.name == "rs5m pub11 (small)"), None)
    if ours and small and ours.n != small.n:
        d = ours.n - small.n
        cpu_ms = (ours.cpu_s - small.cpu_s) / d * 1000
        wall_ms = (ours.wall_s - small.wall_s) / d * 1000
        print(f"rs5m marginal cost: {cpu_ms:.2f} CPU-ms/image ({1000 / cpu_ms:.0f} img per CPU-s), "
              f"{wall_ms:.2f} ms wall/image ({1000 / wall_ms:.0f} img/s); fixed: "
              f"{ours.cpu_s - cpu_ms * ours.n / 1000:.1f} CPU-s, {ours.wall_s - wall_ms * ours.n / 1000:.1f} s wall")
        record("download", {"download_decode_images_per_cpu_s": round(1000 / cpu_ms, 1)})
    if tmp is None:
        print(f"inputs, outputs, configs and logs kept in {work}")
    else:
        tmp.cleanup()


if __name__ == "__main__":
    main()
