"""`rs5m`: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys


class InputBudgetExceeded(RuntimeError):
    """More unreadable files or bad rows than the operator allowed (the run's outputs are complete)."""


def _pub11(args: argparse.Namespace) -> int:
    from rs5m_ray.config import load_config
    from rs5m_ray.pipelines import pub11
    from rs5m_ray.report import input_summary, over_budget

    overrides = {"output": args.out} if args.out else {}
    report = pub11.run(load_config(args.config, overrides))
    print(json.dumps({k: report[k] for k in ("accounting_balanced", "shards", "drop_reasons")}, indent=1))
    print("\n".join(input_summary(report)))
    exceeded = over_budget(report, args.max_unreadable_files, args.max_bad_row_fraction)
    if exceeded:
        raise InputBudgetExceeded(exceeded)
    return 0 if report["accounting_balanced"] else 1


def _rs3(args: argparse.Namespace) -> int:
    from rs5m_ray.config import Rs3Config, load_config
    from rs5m_ray.pipelines import rs3

    overrides = {"output": args.out} if args.out else {}
    report = rs3.run(load_config(args.config, overrides, cls=Rs3Config))
    print(json.dumps({k: report[k] for k in ("accounting_balanced", "shards", "drop_reasons")}, indent=1))
    return 0 if report["accounting_balanced"] else 1


def _gpe(args: argparse.Namespace) -> int:
    from rs5m_ray.config import GpeConfig, RayConfig
    from rs5m_ray.ray_runtime import init_ray
    from rs5m_ray.stages.gpe import GpeUnavailable, check_available, extract_gpe
    from rs5m_ray.storage import Storage

    cfg = GpeConfig(backend=args.backend)
    try:
        check_available(cfg)
    except GpeUnavailable as e:
        print(f"rs5m gpe: {e}", file=sys.stderr)
        return 2
    init_ray(RayConfig())
    summary = extract_gpe(args.shards, args.out, Storage(), cfg)
    print(json.dumps(summary, indent=1))
    return 0


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


def _rate(args: argparse.Namespace) -> int:
    from rs5m_ray.rate.command import run

    return run(args)


def check_entrypoint(spec: dict) -> None:
    """Validate what a job spec's `rs5m` entrypoint will run (its arguments and its config), here,
    before anything connects to the cluster."""
    import shlex
    from pathlib import Path

    from rs5m_ray.config import ConfigError, TrainConfig, load_config

    argv = shlex.split(spec["entrypoint"])
    starts = [i + 1 for i, a in enumerate(argv) if a in ("rs5m", "rs5m_ray.cli") or a.endswith("/rs5m")]
    if not starts:
        return  # not an rs5m command: nothing of ours to check
    try:
        args = build_parser().parse_args(argv[starts[0]:])
    except SystemExit:
        raise ConfigError(f"entrypoint: not a valid rs5m command: {spec['entrypoint']!r}") from None
    config = getattr(args, "config", None)
    if config is None:
        return
    root = Path((spec.get("runtime_env") or {}).get("working_dir") or ".")
    path = root / config
    if not path.exists():
        raise ConfigError(f"entrypoint: config {config} not found in the working_dir ({root})")
    if args.command == "pub11":
        from rs5m_ray.pipelines.pub11 import check

        check(load_config(path))
    elif args.command == "train-clip":
        from rs5m_ray.train.georsclip import check

        check(load_config(path, cls=TrainConfig))


def _eval(args: argparse.Namespace) -> int:
    from rs5m_ray.eval.run import main

    return main(args)


def _submit(args: argparse.Namespace) -> int:
    from rs5m_ray.jobs import load_job_spec, submit_job

    check_entrypoint(load_job_spec(args.job))
    job_id = submit_job(args.address, args.job, wait=args.wait, stock_image=args.stock_image)
    print(job_id)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from rs5m_ray.jobs import job_client

    client = job_client(args.address)
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(json.dumps({"job_id": args.job_id, "status": str(info.status).split(".")[-1],
                          "entrypoint": info.entrypoint, "message": info.message}, indent=1))
    elif args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    else:
        print(json.dumps({"job_id": args.job_id, "stop_requested": client.stop_job(args.job_id)}))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rs5m_ray.config import PlanConfig, load_config
    from rs5m_ray.plan import markdown, plan, update_readme

    result = plan(load_config(args.config, cls=PlanConfig))
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    if args.readme:
        update_readme(args.readme, markdown(result))
    return 0


def _runtime_env(args: argparse.Namespace) -> int:
    from rs5m_ray.jobs import stock_image_pip

    print(json.dumps({"pip": stock_image_pip(args.project)}))
    return 0


def job_arguments(p: argparse.ArgumentParser, example: str, required: bool = True) -> None:
    """A job's --config (a YAML file like `example`) and --out (overrides its output path)."""
    p.add_argument("--config", required=required, default=None, help=f"YAML config (see {example})")
    p.add_argument("--out", default=None, help="override the config's output path")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; `command`: the one about to run (the others' options that import torch are skipped)."""
    parser = argparse.ArgumentParser(prog="rs5m", description="RS5M data curation and GeoRSCLIP training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole PUB11 path on generated sample data, local Ray, tiny models")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--rows-per-source", type=int, default=60, help="generated metadata rows per source")
    p.add_argument("--train-epochs", type=int, default=2, help="GeoRSCLIP epochs on the demo's shards (0: none)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("pub11", help="run the PUB11 filtering pipeline from a YAML config")
    job_arguments(p, "jobs/")
    p.add_argument("--max-unreadable-files", type=int, default=0,
                   help="exit non-zero (3) when more input files than this cannot be read")
    p.add_argument("--max-bad-row-fraction", type=float, default=0.001,
                   help="exit non-zero (3) when more of the input rows than this are malformed or invalid UTF-8")
    p.set_defaults(func=_pub11)

    p = sub.add_parser("rs3", help="run the RS3 pipeline (FMoW / BigEarthNet / MillionAID) from a YAML config")
    job_arguments(p, "jobs/rs3-local.yaml")
    p.set_defaults(func=_rs3)

    p = sub.add_parser("gpe", help="place names (GPE) in the captions of written shards (pub11 or rs3)")
    p.add_argument("--shards", required=True, help="a run's shards/ directory (local or s3://)")
    p.add_argument("--out", required=True, help="where the img_name/text/entity parquet table goes")
    p.add_argument("--backend", choices=["spacy", "nltk"], default="spacy")
    p.set_defaults(func=_gpe)

    p = sub.add_parser("train-detector", help="train the RS-vs-non-RS detector (c_i)")
    if command in (None, "train-detector"):  # its options' module imports torch (~20 s on a loaded box)
        from rs5m_ray.train import detector

        detector.add_arguments(p)
    p.set_defaults(func=_train_detector)

    p = sub.add_parser("train-clip", help="fine-tune CLIP on RS5M shards with Ray Train (GeoRSCLIP)")
    job_arguments(p, "jobs/georsclip-*.yaml")
    p.set_defaults(func=_train_clip)

    p = sub.add_parser("eval", help="evaluate a checkpoint: zero-shot, retrieval, SeLo, contamination; or a detector")
    job_arguments(p, "jobs/eval-local.yaml", required=False)
    p.add_argument("--detector", default=None, help="RS-detector checkpoint to evaluate on --positives/--negatives")
    p.add_argument("--positives", default=None, help="folder of RS images (detector evaluation)")
    p.add_argument("--negatives", default=None, help="folder of non-RS images (detector evaluation)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("rate", help="serve a web page for human rating of captions from shards, or --summary")
    from rs5m_ray.rate.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=_rate)

    p = sub.add_parser("submit", help="submit a job spec from jobs/ to a Ray cluster (Ray Jobs, token auth)")
    p.add_argument("job", help="job spec YAML, e.g. jobs/pub11-cluster.job.yaml")
    p.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.add_argument("--stock-image", action="store_true",
                   help="the cluster runs a stock rayproject/ray image: install the project's dependencies per job")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job (Ray Jobs, token auth)")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id", help="the id `rs5m submit` printed")
    p.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS)")
    p.set_defaults(func=_jobs)

    p = sub.add_parser("plan", help="nodes, hours and cost of RS5M at full scale, from benchmarks/figures.json")
    p.add_argument("--config", default=None, help="YAML PlanConfig: node types, prices, target hours (default: built in)")
    p.add_argument("--json", action="store_true", help="the plan as JSON instead of a table")
    p.add_argument("--readme", default=None, help="also rewrite the generated planning section of this README")
    p.set_defaults(func=_plan)

    p = sub.add_parser("runtime-env", help="print the runtime env (JSON) that runs the jobs on a stock Ray image, for `ray job submit --runtime-env-json`")
    p.add_argument("--project", default=".", help="the project checkout (its pyproject.toml and constraints.txt)")
    p.set_defaults(func=_runtime_env)

    for p in [parser, *sub.choices.values()]:
        p.formatter_class = _HelpWithDefaults
        if p is not parser:
            p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, unless its help already speaks of it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def known_errors() -> tuple[type[BaseException], ...]:
    """Operator errors: one line on stderr and exit status 2, the traceback only with --debug."""
    from rs5m_ray.config import ConfigError
    from rs5m_ray.pipelines.harness import RunDirectoryInUse

    return (ConfigError, FileNotFoundError, NotADirectoryError, RunDirectoryInUse, ConnectionError,
            InputBudgetExceeded)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    try:
        return args.func(args)
    except known_errors() as e:
        if args.debug:
            raise
        print(f"rs5m {args.command}: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, InputBudgetExceeded) else 2


if __name__ == "__main__":
    sys.exit(main())
