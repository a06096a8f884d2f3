"""The run harness every pipeline shares: a run directory that belongs to one configuration,
a staging area of input parts (the unit of work and of resume), per-part accounting, the
accounted shard sink and the report.

A run directory:

    run_config.json                      the configuration, credentials removed
    staging/candidates/part-NNNNN.parquet  candidate rows of each part (metadata phase)
    staging/candidates/_done.json          the metadata phase finished: its part list
    staging/<phase>/part-NNNNN.parquet     what a part phase kept, then
    staging/<phase>/part-NNNNN.done.json   its done-marker: counts, row groups, start and end time
    ledger/<stage>/*.parquet, stats/<stage>/*.parquet
    shards/, report.json, report.png

A rerun keeps the metadata phase once it is done and every part phase's done parts, so
what was downloaded stays what was downloaded even when the web has changed since; a
part without its marker is redone and overwrites its own files (named after the part).
Global stages read the staging (light columns only) and are recomputed by every run.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

import pyarrow.parquet as pq

from rs5m_ray.config import ShardConfig, output_keys, without_secrets
from rs5m_ray.shards.writer import SHARD, ShardWriter, write_manifest
from rs5m_ray.storage import Storage, is_local, join, strip_protocol

CANDIDATES = "candidates"
PART = "part"
METADATA_DONE = "_done.json"


def part_name(index: int) -> str:
    return f"part-{index:05d}"


class RunDirectoryInUse(ValueError):
    """The output directory holds a run whose output-affecting configuration differs."""


def claim_output(cfg: Any, storage: Storage, rerun_outputs: Iterable[str]) -> None:
    """A run directory belongs to one configuration, as far as its output goes: keys that only
    change resources (`config.RESOURCE_KEYS`) and credentials (never written) may differ on a
    resume. Call it once the inputs are validated, so a mistyped first run claims nothing. A
    rerun removes `rerun_outputs` (the outputs of stages every run recomputes) and keeps the staging."""
    path = join(cfg.output, "run_config.json")
    mine = without_secrets(cfg)
    if storage.exists(path):
        theirs, ours = output_keys(json.loads(storage.read_bytes(path))), output_keys(mine)
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k, _MISSING) != ours.get(k, _MISSING))
        if differ:
            shown = "; ".join(f"{k}: {_short(theirs.get(k, _MISSING))} -> {_short(ours.get(k, _MISSING))}"
                              for k in differ[:5])
            raise RunDirectoryInUse(
                f"{cfg.output} holds a run whose configuration differs in {len(differ)} key(s) that change the "
                f"output ({shown}{'; ...' if len(differ) > 5 else ''}): resume with the same values or choose "
                "another output")
        for name in rerun_outputs:
            storage.remove(join(cfg.output, name))
        if is_local(cfg.output):
            # Scratch files of writers killed mid-write (`<file>.tmp-<uuid>`, see Storage.scratch_path):
            # no writer of this run has started yet. (On object stores scratch files are local temp files.)
            for leftover in storage.glob(join(cfg.output, "**", "*.tmp-*")):
                storage.remove(leftover)
    storage.write_atomic(path, json.dumps(mine, sort_keys=True, indent=1).encode())


_MISSING = "<absent>"


def _short(value: Any) -> str:
    text = json.dumps(value) if value is not _MISSING else value
    return text if len(text) <= 60 else text[:57] + "..."


class Staging:
    """Parts between phases: `<output>/staging/<phase>/<part>.parquet` and its done-marker."""

    def __init__(self, output: str, storage: Storage):
        self.root = join(output, "staging")
        self.storage = storage

    def path(self, phase: str, part: str) -> str:
        return join(self.root, phase, f"{part}.parquet")

    def marker(self, phase: str, part: str) -> dict | None:
        path = join(self.root, phase, f"{part}.done.json")
        return json.loads(self.storage.read_bytes(path)) if self.storage.exists(path) else None

    def mark_done(self, phase: str, part: str, info: dict) -> None:
        self.storage.write_atomic(join(self.root, phase, f"{part}.done.json"),
                                  json.dumps({**info, PART: part}, sort_keys=True).encode())

    def markers(self, phase: str) -> list[dict]:
        return [json.loads(self.storage.read_bytes(p))
                for p in self.storage.glob(join(self.root, phase, "*.done.json"))]

    def candidate_parts(self) -> list[str] | None:
        """The metadata phase's parts, or None while it has not finished."""
        path = join(self.root, CANDIDATES, METADATA_DONE)
        return json.loads(self.storage.read_bytes(path))["parts"] if self.storage.exists(path) else None

    def finish_candidates(self, parts: list[str]) -> None:
        self.storage.write_atomic(join(self.root, CANDIDATES, METADATA_DONE),
                                  json.dumps({"parts": sorted(parts)}).encode())

    def reset_candidates(self) -> None:
        self.storage.remove(join(self.root, CANDIDATES))

    def paths(self, phase: str, parts: list[str]) -> list[str]:
        return [self.path(phase, p) for p in parts]


def light_rows(storage: Storage, staging: Staging, phase: str):
    """Every row a part phase staged, without its image bytes, as a Ray dataset; None if none."""
    import ray.data

    paths = [staging.path(phase, m[PART]) for m in staging.markers(phase) if m["rows"]]
    if not paths:
        return None
    fs, _ = storage.arrow_fs(paths[0])
    with storage.open(paths[0]) as f:
        columns = [c for c in pq.read_schema(f).names if c != "jpg"]
    return ray.data.read_parquet([strip_protocol(p) for p in paths], filesystem=fs).select_columns(columns)


def write_shards(ds, output: str, storage: Storage, cfg: ShardConfig, staging: Staging, images_phase: str,
                 index=None) -> dict:
    """The accounted sink: one shard writer per shard over the light rows of `ds` (None: no rows), bytes
    streamed from `images_phase`'s staged parts; then this run's `shards/manifest.json`. Returns the
    report's `shard_run`."""
    from functools import partial

    manifests: list[dict] = []
    run = {"written": 0, "skipped": 0}
    if ds is not None and ds.count():
        writer = ShardWriter(output, storage, cfg, partial(staging.path, images_phase), index)
        summary = ds.groupby(SHARD).map_groups(writer, batch_format="pyarrow").take_all()
        manifests = [json.loads(r["manifest"]) for r in summary]
        run = {s: sum(r["status"] == s for r in summary) for s in ("written", "skipped")}
    manifest = write_manifest(join(output, "shards"), storage, manifests)
    return {**run, "samples": manifest["samples"]}


def timed(info: dict[str, Any], started: float) -> dict[str, Any]:
    """A done-marker's timing: wall-clock start and end (the report's timeline)."""
    return {**info, "started": started, "finished": time.time()}


def timeline(staging: Staging, phases: list[str]) -> dict:
    """Per phase: first start, last end, busy part-seconds, and how long the phases overlapped."""
    spans = {}
    for phase in phases:
        marks = [m for m in staging.markers(phase) if "started" in m]
        if marks:
            spans[phase] = {"start": min(m["started"] for m in marks), "end": max(m["finished"] for m in marks),
                            "parts": len(marks),
                            "part_seconds": round(sum(m["finished"] - m["started"] for m in marks), 3),
                            "intervals": sorted([m["started"], m["finished"]] for m in marks)}
    if not spans:
        return {}
    t0 = min(s["start"] for s in spans.values())
    for s in spans.values():
        s["intervals"] = [[round(a - t0, 3), round(b - t0, 3)] for a, b in s["intervals"]]
        s["start"], s["end"] = round(s["start"] - t0, 3), round(s["end"] - t0, 3)
    result: dict = {"phases": spans}
    if len(spans) == 2:
        (a, sa), (b, sb) = spans.items()
        result["overlap_seconds"] = round(_busy_overlap(sa["intervals"], sb["intervals"]), 3)
        result["overlap_of"] = [a, b]
    return result


def _busy_overlap(a: list[list[float]], b: list[list[float]]) -> float:
    """Seconds during which some part of `a` and some part of `b` were both in progress."""
    return sum(max(0.0, min(x1, y1) - max(x0, y0)) for x0, x1 in _union(a) for y0, y1 in _union(b))


def _union(intervals: list[list[float]]) -> list[list[float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
