"""Duplicate clusters -> one kept row per cluster -> drop marks on the main stream.

Both near-dup joins (pHash, embeddings) emit *edge rows*: one row per directed edge,
carrying the metadata of its first endpoint (`sample_id, source, quality,
from_index, value`) and the `peer` sample_id and `score` (Hamming distance or
cosine similarity). Only rows that have a near duplicate appear there, so the
cluster resolution below runs in one Ray task over the edge list, never over all
rows. Scaling assumption: the duplicate edges fit one worker's memory (~100 bytes
per pHash edge, so ~10^8 edges on a 16 GB worker; embedding edges also carry the
embedding); the number of rows does not matter.

Keep rule per cluster, first criterion first:
1. rows already in the persistent dedup index (`from_index`) win: old data stays;
2. source rank: `keep_priority` in order, then unlisted sources, then `drop_first`
   (RS5M: drop LAION-COCO members first, prefer laion2b, laion400m, coyo700m);
3. highest `quality` (e.g. clip_score) when a quality column is configured;
4. a seeded pseudo-random pick: smallest keyed hash of the sample_id, so the
   choice depends on the seed and the cluster's members only.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rs5m_ray.config import NearDupConfig
from rs5m_ray.ledger import Accounted, mark_dropped
from rs5m_ray.storage import Storage

DROPS_SCHEMA = pa.schema([("sample_id", pa.string()), ("drop_reason", pa.string()), ("drop_detail", pa.string())])


def member_rows(batch: pa.Table, value_column: str, quality_column: str | None, from_index: bool) -> pa.Table:
    """The light rows a near-dup join shuffles: sample_id, source, quality, from_index, value.

    Rows without a value (no hash / no embedding) take no part: they are kept.
    """
    missing = [c for c in ("sample_id", "source", value_column, quality_column) if c and c not in batch.column_names]
    if missing:
        raise ValueError(f"near-dup input lacks column(s) {missing}; has {batch.column_names}")
    batch = batch.filter(pc.is_valid(batch[value_column]))
    n = len(batch)
    quality = pc.cast(batch[quality_column], pa.float64()) if quality_column else pa.nulls(n, pa.float64())
    return pa.table({"sample_id": pc.cast(batch["sample_id"], pa.string()),
                     "source": pc.cast(batch["source"], pa.string()),
                     "quality": quality, "from_index": pa.array(np.full(n, from_index)),
                     "value": batch[value_column]})


def source_rank(sources, keep_priority, drop_first) -> np.ndarray:
    """0.. for `keep_priority` in order, then unlisted sources, then `drop_first` in order."""
    ranks = {s: i for i, s in enumerate(keep_priority)}
    unlisted = len(keep_priority)
    ranks.update({s: unlisted + 1 + i for i, s in enumerate(drop_first)})
    names, inverse = np.unique(np.asarray(sources, dtype=object).astype(str), return_inverse=True)
    return np.array([ranks.get(s, unlisted) for s in names], dtype=np.int64)[inverse.reshape(-1)]


def seeded_order(sample_ids, seed: int) -> np.ndarray:
    """A per-row pseudo-random uint64, fixed by the seed and the sample_id."""
    key = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8, key=key).digest(), "little")
                     for s in sample_ids], dtype=np.uint64)


@dataclass(frozen=True)
class KeepRule:
    """RS5M's keep rule among copies (near-dup clusters, rows sharing a URL): see the module doc.

    The one implementation of the order; picklable (Ray ships it to workers). `quality_column`
    names the column that a table-level caller (URL dedup) reads quality from; None = no quality.
    """

    keep_priority: tuple[str, ...]
    drop_first: tuple[str, ...]
    seed: int
    quality_column: str | None = None

    @classmethod
    def from_config(cls, cfg: NearDupConfig, quality_column: str | None = None) -> "KeepRule":
        return cls(tuple(cfg.keep_priority), tuple(cfg.drop_first), cfg.seed, quality_column)

    def order(self, sample_ids, sources, quality=None, from_index=None, group=None) -> np.ndarray:
        """Row indices sorted by group, then best-to-keep first within each group."""
        n = len(sample_ids)
        keys = [seeded_order(sample_ids, self.seed)]
        if quality is not None:
            q = np.asarray(quality, dtype=np.float64)
            keys.append(-np.where(np.isnan(q), -np.inf, q))  # highest first, missing last
        keys.append(source_rank(sources, self.keep_priority, self.drop_first))
        if from_index is not None:
            keys.append(~np.asarray(from_index, dtype=bool))
        keys.append(np.zeros(n, dtype=np.int64) if group is None else np.asarray(group))
        return np.lexsort(keys)

    def keepers(self, group: np.ndarray, sample_ids, sources, quality=None, from_index=None) -> np.ndarray:
        """For each row, the index of its group's kept row (groups: labels 0..k-1)."""
        group = np.asarray(group, dtype=np.int64)
        order = self.order(sample_ids, sources, quality, from_index, group)
        first = np.ones(len(order), dtype=bool)
        first[1:] = group[order][1:] != group[order][:-1]
        keeper_of_group = np.empty(group.max() + 1 if len(group) else 0, dtype=np.int64)
        keeper_of_group[group[order][first]] = order[first]
        return keeper_of_group[group]


def choose_keepers(members: pa.Table, cluster: np.ndarray, cfg: NearDupConfig | KeepRule) -> np.ndarray:
    """For each member row, the index of its cluster's kept row (per the keep rule above)."""
    rule = cfg if isinstance(cfg, KeepRule) else KeepRule.from_config(cfg)
    return rule.keepers(cluster, members["sample_id"].to_pylist(),
                        members["source"].to_numpy(zero_copy_only=False),
                        quality=members["quality"].to_numpy(zero_copy_only=False),
                        from_index=members["from_index"].to_numpy(zero_copy_only=False))


def clusters(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of `n` vertices given undirected edges a-b."""
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def resolve_drops(cfg: NearDupConfig, distance_detail: Callable, *edge_tables: pa.Table) -> pa.Table:
    """Edge rows -> the drop marks (sample_id, drop_reason, drop_detail) of the new rows to remove.

    `distance_detail(values, who, kept_by)` describes how far each removed row `who`
    lies from its kept row `kept_by` (rows of `values`, the members' value column).
    """
    nonempty = [t for t in edge_tables if len(t)]
    if not nonempty:
        return DROPS_SCHEMA.empty_table()
    edges = pa.concat_tables(nonempty)
    ids = pc.unique(edges["sample_id"])
    members = edges.take(pc.index_in(ids, edges["sample_id"]))
    peers = pc.index_in(edges["peer"], ids)
    if peers.null_count:
        raise RuntimeError("an edge points to a row that emitted no edge rows")
    cluster = clusters(len(ids), pc.index_in(edges["sample_id"], ids).to_numpy(), peers.to_numpy())
    keeper = choose_keepers(members, cluster, cfg)
    from_index = members["from_index"].to_numpy(zero_copy_only=False).astype(bool)
    drop = (keeper != np.arange(len(ids))) & ~from_index
    who, kept_by = np.nonzero(drop)[0], keeper[drop]
    kept_ids = pc.take(members["sample_id"], pa.array(kept_by))
    return pa.table({
        "sample_id": pc.take(members["sample_id"], pa.array(who)),
        "drop_reason": pc.binary_join_element_wise("near_dup_of:", kept_ids, ""),
        "drop_detail": pa.array(distance_detail(members["value"], who, kept_by), pa.string()),
    }, schema=DROPS_SCHEMA)


class DropLookup:
    """A drops table and a hash index of its sample_ids, built once and probed per batch.

    (`pc.index_in(batch, drops)` would rebuild the hash table of all drops on every batch.)
    """

    def __init__(self, drops: pa.Table):
        index = pd.Index(drops["sample_id"].to_numpy(zero_copy_only=False), dtype=object)
        if not index.is_unique:  # first mark wins, as index_in did
            first = ~index.duplicated(keep="first")
            drops, index = drops.filter(pa.array(first)), index[first]
        self.drops = drops
        self.index = index

    def positions(self, sample_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Row of each sample_id in the drops table, null where it is not there."""
        pos = self.index.get_indexer(pd.Index(sample_ids.to_numpy(zero_copy_only=False), dtype=object))
        return pa.array(pos, pa.int64(), mask=pos < 0)

    def mark(self, batch: pa.Table) -> pa.Table:
        where = self.positions(batch["sample_id"])
        return mark_dropped(batch, pc.is_valid(where), pc.take(self.drops["drop_reason"], where),
                            pc.take(self.drops["drop_detail"], where))


# Per process, the lookups of the latest drops ObjectRefs: Ray runs the marker as tasks and
# deserialises the stage per task, so a per-instance lookup alone would be rebuilt per task.
_LOOKUPS: OrderedDict[tuple[int, str], DropLookup] = OrderedDict()
_LOOKUPS_KEPT = 2  # the pHash and the embedding marker of one run


class MarkNearDups:
    """Stage: mark the rows named in a drops table (an ObjectRef resolved once per worker process)."""

    def __init__(self, drops: ray.ObjectRef | pa.Table):
        self._drops = drops
        self._lookup: DropLookup | None = None

    def __getstate__(self) -> dict:
        return {"_drops": self._drops, "_lookup": None}  # workers build their own

    def lookup(self) -> DropLookup:
        if self._lookup is None:
            if isinstance(self._drops, ray.ObjectRef):
                key = (os.getpid(), self._drops.hex())
                if key not in _LOOKUPS:
                    _LOOKUPS[key] = DropLookup(ray.get(self._drops))
                    while len(_LOOKUPS) > _LOOKUPS_KEPT:
                        _LOOKUPS.popitem(last=False)
                _LOOKUPS.move_to_end(key)
                self._lookup = _LOOKUPS[key]
            else:
                self._lookup = DropLookup(self._drops)
        return self._lookup

    def drops(self) -> pa.Table:
        return self.lookup().drops

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.lookup().mark(batch)


def run_near_dup(ds, value_column: str, quality_column: str | None, find_drops: Callable, output: str,
                 storage: Storage, index, stage_name: str):
    """Shared frame of both joins: member rows (+ index rows) -> `find_drops` -> marked, ledgered stream.

    `find_drops(keys)` returns an ObjectRef of the drops table. `index` (a DedupIndex
    or None) adds earlier runs' values; this run's enter it when their shards commit.
    """
    ds = ds.materialize()  # read twice (join, then marking): never rerun upstream stages
    keys = ds.map_batches(member_rows, fn_kwargs={"value_column": value_column, "quality_column": quality_column,
                                                  "from_index": False}, batch_format="pyarrow")
    old = index.read(value_column) if index is not None else None
    if old is not None:
        keys = keys.union(old.map_batches(member_rows, fn_kwargs={"value_column": value_column,
                                                                  "quality_column": None, "from_index": True},
                                          batch_format="pyarrow"))
    marker = Accounted(stage_name, output, storage, MarkNearDups(find_drops(keys)))
    return ds.map_batches(marker, batch_format="pyarrow")
