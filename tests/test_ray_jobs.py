"""Ray Jobs with token authentication against a real `ray start --head` cluster."""
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


def test_submit_job_spec_with_token_auth(tmp_path, token_cluster):
    address, env = token_cluster
    spec = tmp_path / "hello.job.yaml"
    spec.write_text("entrypoint: python -c \"import rs5m_ray; print('rs5m job ran')\"\n"
                    "entrypoint_num_cpus: 0\n")
    code = ("import sys; from rs5m_ray.jobs import submit_job; "
            f"print(submit_job({address!r}, {str(spec)!r}, wait=True, timeout_s=120))")
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "rs5m job ran" in ok.stdout
    # Without the token the cluster refuses the submission.
    bad_env = dict(env, RAY_AUTH_TOKEN="wrong-token-wrong-token-wrong-0000")
    bad = subprocess.run([sys.executable, "-c", code], env=bad_env, capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0
