"""Submitting job specs (jobs/*.yaml) to a Ray cluster through Ray Jobs.

A spec names an entrypoint, its runtime env and resources. With token
authentication on (RAY_AUTH_MODE=token), the client sends the token Ray finds in
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import time
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rs5m_ray.config import ConfigError

SPEC_KEYS = {"entrypoint", "runtime_env", "entrypoint_num_cpus", "entrypoint_num_gpus", "metadata"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def load_job_spec(path: str) -> dict:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown or "entrypoint" not in spec:
        raise ConfigError(f"{path}: a job spec needs `entrypoint` and may have {sorted(SPEC_KEYS)}; "
                         f"unknown: {sorted(unknown)}")
    working_dir = spec.get("runtime_env", {}).get("working_dir")
    if working_dir and not Path(working_dir).is_absolute():
        spec["runtime_env"]["working_dir"] = str((Path(path).parent / working_dir).resolve())
    return spec


def stock_image_pip(project: str | Path) -> list[str]:
    """The pip list that carries the project's dependencies onto a stock `rayproject/ray` image:
    `[project] dependencies` of `project`/pyproject.toml, each pinned as `constraints.txt` pins it.
    Ray itself is the image's and is left out."""
    root = Path(project)
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    packages = []
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "ray":
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        packages.append(f"{req.name}{extras}{pins.get(name, str(req.specifier))}")
    return packages


def with_stock_image_env(spec: dict) -> dict:
    """`spec` with the project's pip list added to its runtime env (the project found in its working_dir)."""
    env = dict(spec.get("runtime_env") or {})
    if "working_dir" not in env:
        raise ValueError("a job for a stock Ray image needs runtime_env.working_dir (the project to upload)")
    env["pip"] = stock_image_pip(env["working_dir"])
    return {**spec, "runtime_env": env}


def job_client(address: str | None):
    """A Ray Jobs client; `address` None: RAY_ADDRESS. Sends the token when token auth is on."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit_job(address: str | None, spec_path: str, wait: bool = False, timeout_s: float = 3600,
               stock_image: bool = False) -> str:
    client = job_client(address)
    spec = load_job_spec(spec_path)
    if stock_image:
        spec = with_stock_image_env(spec)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(**spec)
            break
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up; it says to try again.
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    if wait:
        deadline = time.monotonic() + timeout_s
        while str(client.get_job_status(job_id)).split(".")[-1] not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout_s} s")
            time.sleep(1)
        print(client.get_job_logs(job_id))
    return job_id
