"""Ray Jobs with token authentication against a real `ray start --head` cluster, through `rs5m`."""
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def token_cluster():
    """A head node of its own (`--block`, in its own process group, so stopping it leaves other Ray clusters be)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="rs5m-test-token-0123456789abcdef")
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             "--num-cpus=1", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             # Fixed defaults (52365, ...) may be held by the suite's other Ray instance.
                             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while not _answers(address):
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail("the Ray head with token auth did not come up")
        time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # the head drains for 30 s on SIGTERM; nothing here needs draining
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # up, and refusing us without a token
    except OSError:
        return False


def rs5m(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rs5m_ray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def wait_for_status(address: str, job_id: str, env: dict, wanted: set[str], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        run = rs5m("jobs", "status", job_id, "--address", address, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        status = json.loads(run.stdout)["status"]
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(1)


def test_rs5m_submit_status_logs_and_stop_with_token_auth(tmp_path, token_cluster):
    address, env = token_cluster
    done = tmp_path / "hello.job.yaml"
    done.write_text("entrypoint: python -c \"import rs5m_ray; print('rs5m job ran')\"\nentrypoint_num_cpus: 0\n")
    submitted = rs5m("submit", str(done), "--address", address, "--wait", env=env)  # waits, prints the logs
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.split()[-1]
    assert wait_for_status(address, job_id, env, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    logs = rs5m("jobs", "logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0 and "rs5m job ran" in logs.stdout

    endless = tmp_path / "endless.job.yaml"
    endless.write_text("entrypoint: python -c \"import time; time.sleep(600)\"\nentrypoint_num_cpus: 0\n")
    second = rs5m("submit", str(endless), "--address", address, env=env).stdout.split()[-1]
    stopped = rs5m("jobs", "stop", second, "--address", address, env=env)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stop_requested"] is True
    assert wait_for_status(address, second, env, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    # The first job is untouched by the second's stop.
    assert wait_for_status(address, job_id, env, {"SUCCEEDED"}, timeout_s=5) == "SUCCEEDED"

    # Without the right token the cluster refuses both submission and queries.
    bad_env = dict(env, RAY_AUTH_TOKEN="wrong-token-wrong-token-wrong-0000")
    assert rs5m("submit", str(done), "--address", address, env=bad_env).returncode != 0
    assert rs5m("jobs", "status", job_id, "--address", address, env=bad_env).returncode != 0
