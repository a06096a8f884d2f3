"""`rs5m`: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys


def _pub11(args: argparse.Namespace) -> int:
    from rs5m_ray.config import load_config
    from rs5m_ray.pipelines import pub11

    overrides = {"output": args.out} if args.out else {}
    report = pub11.run(load_config(args.config, overrides))
    print(json.dumps({k: report[k] for k in ("accounting_balanced", "shards", "drop_reasons")}, indent=1))
    return 0 if report["accounting_balanced"] else 1


def _demo(args: argparse.Namespace) -> int:
    from rs5m_ray.pipelines.demo import run_demo

    return run_demo(args.out, rows_per_source=args.rows_per_source, train_epochs=args.train_epochs)


def _train_detector(args: argparse.Namespace) -> int:
    from rs5m_ray.train import detector

    return detector.main(args) or 0


def _train_clip(args: argparse.Namespace) -> int:
    from rs5m_ray.config import TrainConfig, load_config
    from rs5m_ray.train import georsclip

    overrides = {"output": args.out} if args.out else {}
    result = georsclip.run(load_config(args.config, overrides, cls=TrainConfig))
    print(json.dumps(result, indent=1))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from rs5m_ray.jobs import submit_job

    job_id = submit_job(args.address, args.job, wait=args.wait)
    print(job_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rs5m", description="RS5M data curation and GeoRSCLIP training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole PUB11 path on generated sample data, local Ray, tiny models")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--rows-per-source", type=int, default=60)
    p.add_argument("--train-epochs", type=int, default=2, help="GeoRSCLIP epochs on the demo's shards (0: none)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("pub11", help="run the PUB11 filtering pipeline from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see jobs/)")
    p.add_argument("--out", default=None, help="override the config's output path")
    p.set_defaults(func=_pub11)

    p = sub.add_parser("train-detector", help="train the RS-vs-non-RS detector (c_i)")
    from rs5m_ray.train import detector

    detector.add_arguments(p)
    p.set_defaults(func=_train_detector)

    p = sub.add_parser("train-clip", help="fine-tune CLIP on RS5M shards with Ray Train (GeoRSCLIP)")
    p.add_argument("--config", required=True, help="YAML config (see jobs/georsclip-*.yaml)")
    p.add_argument("--out", default=None, help="override the config's output path")
    p.set_defaults(func=_train_clip)

    p = sub.add_parser("submit", help="submit a job spec from jobs/ to a Ray cluster (Ray Jobs, token auth)")
    p.add_argument("job", help="job spec YAML, e.g. jobs/pub11-cluster.yaml")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.set_defaults(func=_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
