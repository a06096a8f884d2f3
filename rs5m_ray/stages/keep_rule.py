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
from typing import Callable

import numpy as np
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


def source_rank(sources: np.ndarray, keep_priority: list[str], drop_first: list[str]) -> np.ndarray:
    """0.. for `keep_priority` in order, then unlisted sources, then `drop_first` in order."""
    ranks = {s: i for i, s in enumerate(keep_priority)}
    unlisted = len(keep_priority)
    ranks.update({s: unlisted + 1 + i for i, s in enumerate(drop_first)})
    return np.array([ranks.get(s, unlisted) for s in sources], dtype=np.int64)


def seeded_order(sample_ids, seed: int) -> np.ndarray:
    """A per-row pseudo-random uint64, fixed by the seed and the sample_id."""
    key = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8, key=key).digest(), "little")
                     for s in sample_ids], dtype=np.uint64)


def choose_keepers(members: pa.Table, cluster: np.ndarray, cfg: NearDupConfig) -> np.ndarray:
    """For each member row, the index of its cluster's kept row (per the keep rule above)."""
    sources = members["source"].to_numpy(zero_copy_only=False)
    quality = pc.fill_null(members["quality"], -np.inf).to_numpy(zero_copy_only=False)
    from_index = members["from_index"].to_numpy(zero_copy_only=False).astype(bool)
    order = np.lexsort((seeded_order(members["sample_id"].to_pylist(), cfg.seed), -quality,
                        source_rank(sources, cfg.keep_priority, cfg.drop_first), ~from_index, cluster))
    first = np.ones(len(order), dtype=bool)
    first[1:] = cluster[order][1:] != cluster[order][:-1]
    keeper_of_cluster = np.empty(cluster.max() + 1 if len(cluster) else 0, dtype=np.int64)
    keeper_of_cluster[cluster[order][first]] = order[first]
    return keeper_of_cluster[cluster]


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


class MarkNearDups:
    """Stage: mark the rows named in a drops table (an ObjectRef resolved once per worker)."""

    def __init__(self, drops: ray.ObjectRef | pa.Table):
        self._drops = drops

    def drops(self) -> pa.Table:
        if isinstance(self._drops, ray.ObjectRef):
            self._drops = ray.get(self._drops)
        return self._drops

    def __call__(self, batch: pa.Table) -> pa.Table:
        drops = self.drops()
        where = pc.index_in(batch["sample_id"], drops["sample_id"])
        return mark_dropped(batch, pc.is_valid(where), pc.take(drops["drop_reason"], where),
                            pc.take(drops["drop_detail"], where))


def run_near_dup(ds, value_column: str, quality_column: str | None, find_drops: Callable, output: str,
                 storage: Storage, index, stage_name: str):
    """Shared frame of both joins: member rows (+ index rows) -> `find_drops` -> marked, ledgered stream.

    `find_drops(keys)` returns an ObjectRef of the drops table. `index` (a DedupIndex
    or None) adds earlier runs' values and receives this run's kept values.
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
    kept = ds.map_batches(marker, batch_format="pyarrow")
    return index.append(kept, value_column) if index is not None else kept
