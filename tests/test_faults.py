"""Faults on a real 3-node local Ray cluster (tests/fault_scenarios.py, in its own process): a poisoned
batch in an actor pool, S3 answering 503 SlowDown, the CLIP actor's node lost mid-run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    run = subprocess.run([sys.executable, "-m", "tests.fault_scenarios", str(workdir)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((workdir / "outcome.json").read_text())


def test_poisoned_batch_in_an_actor_pool_goes_to_the_ledger_without_failing_the_job(outcome):
    r = outcome["poisoned"]
    assert r["finished"], "the job hung"
    assert r["stage_errors"] == 50 and r["poison_ledgered"]  # the poisoned batch, all of it, and only it
    assert r["ledgered"] == 50 and r["kept"] == 250
    assert r["detail"] == "ValueError: cannot score this batch"
    assert r["all_once"]


def test_s3_slow_down_is_retried_nothing_lost_nothing_written_twice(outcome):
    r = outcome["slow_down"]
    assert r["finished"]
    # The faults happened: the first 6 requests and every third after (the writers' and the reader's).
    assert r["refused_while_writing"] >= 6 and r["refused_503"] > r["refused_while_writing"]
    assert r["kept"] == 300 - len(range(0, 300, 7))
    assert r["rows_in"] == 300 and r["ledgered"] == len(range(0, 300, 7)) and r["ledger_ids_unique"]
    assert r["objects"] == 2 * 6  # a ledger file and a stats file per batch
    assert r["puts_per_object"] == [1]  # every object stored once


def test_node_lost_during_the_clip_pool_leaves_the_output_of_a_clean_run(outcome):
    r = outcome["node_lost"]
    assert r["finished"], "the run failed or hung"
    assert 1 <= r["scored_parts_at_loss"] < r["parts"], "the node was lost while parts were still being scored"
    assert r["scoring_restarts"] >= 1  # the CLIP actor died with its node and Ray Data restarted it
    assert r["balanced"] == [True, True]
    assert r["clean_samples"] > 0 and r["same_samples"] and r["same_drops"] and r["each_once"]
    assert r["shards_identical"]
