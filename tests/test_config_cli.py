import subprocess
import sys

import pytest

from rs5m_ray.cli import build_parser
from rs5m_ray.config import ConfigError, TrainConfig, load_config
from rs5m_ray.jobs import load_job_spec
from rs5m_ray.train import georsclip


def test_yaml_config_with_sections(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output: s3://bucket/run1\n"
                 "ingest:\n  sources:\n    - {name: laion2b, paths: ['s3://meta/laion2b/*.parquet']}\n"
                 "parts: {num_parts: 512}\nshards: {train_shards: 32, val_shards: 2, val_fraction: 0.05}\n")
    cfg = load_config(p, overrides={"shards": {"seed": 7}})
    assert cfg.output == "s3://bucket/run1"
    assert cfg.ingest.sources[0].name == "laion2b"
    assert cfg.parts.num_parts == 512
    shards = cfg.shards
    assert (shards.train_shards, shards.val_shards, shards.val_fraction, shards.seed) == (32, 2, 0.05, 7)
    assert shards.max_shard_bytes == 4 * 1024**3  # untouched keys keep their defaults


@pytest.mark.parametrize("text, message", [
    ("parts: {num_partitons: 4}\n", "unknown key"),
    ("shards: {samples_per_shard: 20000}\n", "unknown key"),
    ("shards: {train_shards: many}\n", "expected int"),
    ("ingest: {sources: laion2b}\n", "expected a list"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_example_configs_in_jobs_load():
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    configs = [p for p in jobs.glob("*.yaml") if not p.name.endswith(".job.yaml")]
    assert configs
    from rs5m_ray.config import EvalConfig, PipelineConfig, Rs3Config

    for p in configs:
        if p.name.startswith("georsclip"):
            georsclip.check(load_config(p, cls=TrainConfig))
        else:
            load_config(p, cls={"rs3": Rs3Config, "eval": EvalConfig}.get(p.name.split("-")[0], PipelineConfig))
    for p in jobs.glob("*.job.yaml"):  # the same command on the project image and on a stock one
        assert load_job_spec(str(p))["entrypoint"].startswith(("python -m rs5m_ray.cli ", "python benchmarks/"))


def test_cli_has_a_subcommand_per_job():
    out = subprocess.run([sys.executable, "-m", "rs5m_ray.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "pub11", "train-detector", "train-clip", "submit"):
        assert cmd in out.stdout
    args = build_parser().parse_args(["pub11", "--config", "jobs/pub11-local.yaml"])
    assert args.config == "jobs/pub11-local.yaml"


@pytest.mark.parametrize("overrides, message", [
    ({}, "detector_checkpoint is required"),
    ({"scoring": {"detector_checkpoint": "d"}, "decode": {"phash": False}}, "needs decode.phash"),
    ({"scoring": {"enabled": False}, "near_dup": {"phash_enabled": False}}, "needs scoring.enabled"),
])
def test_inconsistent_pipeline_configs_are_refused_before_any_work(overrides, message):
    from rs5m_ray.pipelines.pub11 import check

    with pytest.raises(ConfigError, match=message):
        check(load_config(overrides=overrides))
