"""Submitting job specs (jobs/*.yaml) to a Ray cluster through Ray Jobs.

A spec names an entrypoint, its runtime env and resources. With token
authentication on (RAY_AUTH_MODE=token), the client sends the token Ray finds in
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

SPEC_KEYS = {"entrypoint", "runtime_env", "entrypoint_num_cpus", "entrypoint_num_gpus", "metadata"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def load_job_spec(path: str) -> dict:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown or "entrypoint" not in spec:
        raise ValueError(f"{path}: a job spec needs `entrypoint` and may have {sorted(SPEC_KEYS)}; "
                         f"unknown: {sorted(unknown)}")
    working_dir = spec.get("runtime_env", {}).get("working_dir")
    if working_dir and not Path(working_dir).is_absolute():
        spec["runtime_env"]["working_dir"] = str((Path(path).parent / working_dir).resolve())
    return spec


def submit_job(address: str, spec_path: str, wait: bool = False, timeout_s: float = 3600) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    spec = load_job_spec(spec_path)
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
