"""Storage: one filesystem per process and config, picklable, no secret in its repr."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import s3fs

from rs5m_ray import storage as storage_mod
from rs5m_ray.config import StorageConfig
from rs5m_ray.storage import Storage
from tests.conftest import REPO


def test_one_filesystem_per_process_and_config(s3_bucket, tmp_path):
    bucket, storage = s3_bucket
    fs = storage.fs(bucket)
    assert storage.fs(f"{bucket}/a/b.bin") is fs and storage.fs("s3a://x") is fs
    assert Storage(StorageConfig(**vars(storage.cfg))).fs(bucket) is fs  # equal config, same fs
    other = Storage(StorageConfig(**{**vars(storage.cfg), "region": "eu-west-1"}))
    assert other.fs(bucket) is not fs
    assert storage.fs(str(tmp_path)) is storage.fs(f"file://{tmp_path}")
    storage.write_atomic(f"{bucket}/x/1.bin", b"one")
    assert storage.read_bytes(f"{bucket}/x/1.bin") == b"one" and storage.fs(bucket) is fs


def test_a_new_process_builds_its_own_filesystem(s3_bucket, monkeypatch):
    bucket, storage = s3_bucket
    fs = storage.fs(bucket)
    assert b"S3FileSystem" not in pickle.dumps(storage)  # the cache never travels with a Storage
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.fs(bucket) is fs  # same process
    monkeypatch.setattr(storage_mod.os, "getpid", lambda: -1)  # as after a fork
    forked = copy.fs(bucket)
    assert forked is not fs and copy.fs(bucket) is forked
    monkeypatch.undo()
    # A real second process, from a pickled Storage: works against the same server.
    storage.write_atomic(f"{bucket}/p/in.bin", b"from parent")
    code = ("import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
            f"assert s.read_bytes('{bucket}/p/in.bin') == b'from parent'; "
            f"s.write_atomic('{bucket}/p/out.bin', b'from child')")
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(storage), check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert storage.read_bytes(f"{bucket}/p/out.bin") == b"from child"


def test_the_long_lived_filesystem_sees_other_writers_at_once(s3_bucket):
    bucket, storage = s3_bucket
    storage.write_atomic(f"{bucket}/d/a.bin", b"a")
    assert storage.glob(f"{bucket}/d/*.bin") == [f"{bucket}/d/a.bin"]
    assert not storage.exists(f"{bucket}/d/b.bin")
    c = storage.cfg
    writer = s3fs.S3FileSystem(endpoint_url=c.endpoint_url, key=c.key, secret=c.secret, skip_instance_cache=True)
    writer.pipe_file(f"{bucket}/d/b.bin", b"b")  # another process's client, say a Ray worker
    assert storage.glob(f"{bucket}/d/*.bin") == [f"{bucket}/d/a.bin", f"{bucket}/d/b.bin"]
    assert storage.exists(f"{bucket}/d/b.bin")


def test_repr_hides_the_credentials():
    s = Storage(StorageConfig(endpoint_url="http://minio:9000", key="AKIAEXAMPLEKEY", secret="s3cr3t-Value"))
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "s3cr3t-Value" not in text and "AKIAEXAMPLEKEY" not in text
    assert "http://minio:9000" in repr(s)
