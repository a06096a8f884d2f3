"""The near-dup marker: a drop lookup built once, same marks as a per-batch index_in."""
from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.compute as pc

from rs5m_ray.ledger import mark_dropped
from rs5m_ray.stages import keep_rule
from rs5m_ray.stages.keep_rule import DROPS_SCHEMA, MarkNearDups

DROPS = pa.table({"sample_id": ["s3", "s7", "s1", "s9", "s3"],
                  "drop_reason": ["near_dup_of:s0", "near_dup_of:s2", "near_dup_of:s0", "near_dup_of:s8",
                                  "near_dup_of:s5"],
                  "drop_detail": ["hamming:1", "hamming:3", "cosine:0.990", "hamming:0", "hamming:4"]},
                 schema=DROPS_SCHEMA)


def batch(ids, dropped=None):
    t = pa.table({"sample_id": pa.array(ids, pa.string()), "caption": pa.array([f"c{i}" for i in ids], pa.string())})
    if dropped:
        t = mark_dropped(t, pa.array([i in dropped for i in ids]), "keyword_miss", "earlier stage")
    return t


def index_in_marks(b: pa.Table, drops: pa.Table) -> pa.Table:
    """The former per-batch marking, as the reference."""
    where = pc.index_in(b["sample_id"], drops["sample_id"])
    return mark_dropped(b, pc.is_valid(where), pc.take(drops["drop_reason"], where),
                        pc.take(drops["drop_detail"], where))


def test_marks_equal_the_per_batch_index_in():
    marker = MarkNearDups(DROPS)
    batches = [batch([f"s{i}" for i in range(10)]), batch(["s9", "x", "s3"], dropped={"s9"}),
               batch([]), batch(["a", "b"]),
               pa.table({"sample_id": pa.chunked_array([["s1", "s2"], ["s7"]]), "caption": ["", "", ""]})]
    for b in batches:
        assert marker(b).equals(index_in_marks(b, DROPS))
    out = marker(batches[0])
    # the first mark of a repeated id wins, as with index_in
    assert out.filter(pc.equal(out["sample_id"], "s3"))["drop_reason"].to_pylist() == ["near_dup_of:s0"]
    empty = MarkNearDups(DROPS_SCHEMA.empty_table())
    assert empty(batches[0]).equals(index_in_marks(batches[0], DROPS_SCHEMA.empty_table()))


def test_lookup_is_built_once_per_marker(monkeypatch):
    built = []
    real = keep_rule.DropLookup.__init__

    def counting(self, drops):
        built.append(len(drops))
        real(self, drops)

    monkeypatch.setattr(keep_rule.DropLookup, "__init__", counting)
    marker = MarkNearDups(DROPS)
    for i in range(5):
        marker(batch([f"s{j}" for j in range(i, i + 4)]))
    assert built == [5]
    # shipped to a worker: the lookup is not pickled, the copy builds its own once
    copy = pickle.loads(pickle.dumps(marker))
    assert copy._lookup is None
    copy(batch(["s1"]))
    copy(batch(["s7"]))
    assert built == [5, 5]


def test_lookup_of_an_object_ref_is_shared_by_the_markers_of_a_process(ray_cluster, monkeypatch):
    built = []
    real = keep_rule.DropLookup.__init__
    monkeypatch.setattr(keep_rule.DropLookup, "__init__", lambda self, d: (built.append(1), real(self, d))[1])
    ref = ray_cluster.put(DROPS)
    b = batch([f"s{i}" for i in range(10)])
    for _ in range(3):  # Ray deserialises the stage per task: each task holds a fresh copy
        assert pickle.loads(pickle.dumps(MarkNearDups(ref)))(b).equals(index_in_marks(b, DROPS))
    assert built == [1]
